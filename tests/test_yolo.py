"""Modern YOLO: shapes, losses, assigner, DFL, decoding to original pixels, mosaic, DDP-safe losses."""
import random

import torch

from cvforge.data.mosaic import MosaicDataset, mosaic
from cvforge.models.detection.assigner import TaskAlignedAssigner
from cvforge.models.detection.yolo import distribution_focal_loss, yolo_n
from cvforge.zoo import build_model


def _targets():
    return [{"boxes": torch.tensor([[8.0, 8, 40, 48], [30, 20, 60, 60]]), "labels": torch.tensor([1, 2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def test_train_losses_touch_every_parameter_even_without_objects():
    torch.manual_seed(0)
    model = build_model("yolo-n", task="detect", num_classes=3).train()
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    for targets in (_targets(), _targets()[1:] * 2):  # with objects; a batch without any
        model.zero_grad()
        losses = model(images, targets)
        assert set(losses) == {"box", "cls", "dfl"} and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert all(p.grad is not None for p in model.parameters())
    assert int(model.input_size) == 64


def test_eval_boxes_in_original_pixels():
    model = yolo_n(num_classes=3, imgsz=64).eval()
    images = [torch.randint(0, 255, (3, 50, 90), dtype=torch.uint8), torch.randint(0, 255, (3, 70, 40), dtype=torch.uint8)]
    out = model(images)
    assert len(out) == 2 and 0 < len(out[0]["boxes"]) <= 300
    for o, image in zip(out, images):
        h, w = image.shape[-2:]
        assert o["boxes"][:, 2].max() <= w and o["boxes"][:, 3].max() <= h
        assert o["labels"].max() < 3 and o["scores"].min() > 0.001


def test_assigner_positives_inside_their_object():
    points = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="xy"), -1).reshape(-1, 2) * 8 + 4
    gt = torch.tensor([[[8.0, 8, 40, 40]]])
    pred = gt.expand(1, 64, 4).clone()
    scores = torch.full((1, 64, 2), 0.5)
    out = TaskAlignedAssigner(topk=5).assign(scores, pred, points, torch.tensor([[1]]), gt, torch.tensor([[True]]))
    fg = out.foreground[0]
    assert fg.sum() == 5
    inside = (points[fg] > 8).all(1) & (points[fg] < 40).all(1)
    assert inside.all() and (out.labels[0][fg] == 1).all()
    assert out.scores[0, fg, 1].max() > 0.99 and out.scores[0, fg, 0].sum() == 0 and out.scores[0, ~fg].sum() == 0


def test_dfl_minimum_at_the_target():
    target = torch.tensor([[2.3, 0.0, 5.0, 7.5]])
    good = torch.full((1, 4, 16), -20.0)
    for side, t in enumerate(target[0].tolist()):
        lo = int(t)
        good[0, side, lo] = torch.log(torch.tensor(lo + 1 - t + 1e-9))
        good[0, side, min(lo + 1, 15)] = torch.log(torch.tensor(t - lo + 1e-9))
    assert distribution_focal_loss(good, target) < distribution_focal_loss(torch.zeros(1, 4, 16), target)


def test_mosaic_keeps_boxes_on_their_shapes():
    random.seed(0)
    samples = []
    for k in range(4):
        image = torch.zeros(3, 64, 64, dtype=torch.uint8)
        image[:, 20:40, 20:40] = 255
        samples.append((image, {"boxes": torch.tensor([[20.0, 20, 40, 40]]), "labels": torch.tensor([k]),
                                "image_id": torch.tensor(k)}))
    image, target = mosaic(samples, 64)
    assert image.shape == (3, 64, 64) and len(target["boxes"]) == len(target["labels"]) >= 1
    for box in target["boxes"].round().long().tolist():
        patch = image[0, box[1]:box[3], box[0]:box[2]]
        assert patch.float().mean() > 200  # every kept box covers white pixels only


def test_mosaic_dataset_switches_off():
    class Data:
        classes, transforms = ["a"], None

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32, dtype=torch.uint8), {"boxes": torch.zeros(0, 4),
                                                                "labels": torch.zeros(0, dtype=torch.int64),
                                                                "image_id": torch.tensor(i)}
    data = MosaicDataset(Data(), 32)
    assert data[0][0].shape == (3, 32, 32)
    data.enabled = False
    assert data[1][1]["image_id"] == 1 and data.classes == ["a"]
