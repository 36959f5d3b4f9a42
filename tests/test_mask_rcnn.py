"""Mask R-CNN: the mask loss (targets RoIAligned from the original-pixel masks), pasting masks into the
image, the model's contract, and ``--task instance`` end to end with mask AP and drawn masks."""
import json

import numpy as np
import pytest
import torch
from _detect_cli import train_eval_predict
from PIL import Image
from test_faster_rcnn import write_polygon_coco

from cvforge import zoo
from cvforge.errors import CvforgeError
from cvforge.models.detection.mask_rcnn import mask_loss, paste_masks


def _square_mask(size=32, box=(8, 8, 24, 24)):
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    mask[0, y1:y2, x1:x2] = 1
    return mask


def test_mask_loss_uses_the_true_class_and_the_original_pixels():
    target = {"masks": _square_mask()}
    region = [torch.tensor([[16.0, 16.0, 48.0, 48.0]])]  # the object's box at input scale 2
    matched = [torch.tensor([0, -1])]  # one foreground region, one background
    right = torch.full((1, 3, 8, 8), -20.0)
    right[0, 1] = 20.0  # class 1's mask says "all object"
    small = mask_loss(right, torch.tensor([1]), region, matched, [target], [2.0])
    wrong = mask_loss(right, torch.tensor([2]), region, matched, [target], [2.0])
    assert small < 0.01 and wrong > 10
    shifted = mask_loss(right, torch.tensor([1]), [region[0] + 16], matched, [target], [2.0])
    assert shifted > 5  # the region now covers mostly background
    empty = mask_loss(torch.zeros(0, 3, 8, 8, requires_grad=True), torch.zeros(0, dtype=torch.int64), [], [], [], [])
    assert empty.item() == 0 and empty.requires_grad


def test_paste_masks_puts_each_mask_into_its_box():
    detections = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "scores": torch.tensor([0.9]),
                  "labels": torch.tensor([1])}
    probabilities = torch.zeros(1, 2, 28, 28)
    probabilities[0, 1] = 1.0
    out = paste_masks(detections, probabilities, (50, 60))
    mask = out["masks"]
    assert mask.shape == (1, 50, 60) and mask.dtype == torch.uint8
    ys, xs = mask[0].nonzero(as_tuple=True)
    assert abs(int(xs.min()) - 10) <= 1 and abs(int(xs.max()) - 29) <= 1 and abs(int(ys.min()) - 20) <= 1
    empty = paste_masks({k: v[:0] for k, v in detections.items()}, probabilities[:0], (50, 60))
    assert empty["masks"].shape == (0, 50, 60)


def _model(num_classes: int = 2):
    return zoo.build_model("mask_rcnn", task="instance", num_classes=num_classes, backbone="resnet18", imgsz=64,
                           hidden=64, fpn_channels=32, mask_channels=16, mask_convs=2)


def test_losses_and_masks_follow_the_contract():
    torch.manual_seed(0)
    model = _model()
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([1]),
                "masks": _square_mask(64)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"rpn_obj", "rpn_box", "cls", "box", "mask"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["mask"] > 0
    sum(losses.values()).backward()
    assert model.mask_head[0].weight.grad.abs().sum() > 0
    with pytest.raises(CvforgeError, match="--task instance"):
        model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    model.eval()
    with torch.no_grad():
        out = model([torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)])[0]
    assert set(out) == {"boxes", "scores", "labels", "masks"}
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape == (len(out["boxes"]), 48, 80)


@pytest.mark.slow
def test_cli_instance_on_a_coco_data_set_with_polygons(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_polygon_coco(tmp_path / "coco", images=8)
    image = root / "images" / "val_0.png"
    written = train_eval_predict(tmp_path, capsys, "instance", "mask_rcnn", str(root), image)
    assert "metrics/mask_mAP50-95" in written["header"] and "metrics/mAP50-95" in written["header"]
    assert "mask_mAP50-95" in written["eval"]
    records = json.loads((written["pred"] / "predictions.json").read_text())
    ids = np.asarray(Image.open(records[0]["mask_file"]))
    assert ids.shape == (64, 64) and ids.max() <= len(records[0]["detections"])


def test_predict_saves_instance_ids_and_draws_the_masks(tmp_path):
    from cvforge.predict import describe, save_records
    picture = tmp_path / "scene.png"
    Image.new("RGB", (40, 30), (0, 0, 0)).save(picture)
    masks = torch.zeros(3, 30, 40, dtype=torch.uint8)
    masks[0, 0:10, 0:10] = 1
    masks[1, 5:15, 5:15] = 1  # overlaps the first, less confident
    masks[2, 20:30, 30:40] = 1  # below the drawing threshold
    output = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [30, 20, 40, 30]]),
               "scores": torch.tensor([0.9, 0.8, 0.1]), "labels": torch.tensor([0, 1, 1]), "masks": masks}]
    records = [{"image": str(picture), **r} for r in describe("instance", output, ["a", "b"])]
    save_records("instance", records, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())[0]
    ids = np.asarray(Image.open(saved["mask_file"]))
    assert ids[2, 2] == 1 and ids[7, 7] == 1 and ids[12, 12] == 2 and ids[25, 35] == 0
    drawn = np.asarray(Image.open(tmp_path / "out" / "images" / "scene.png"))
    assert drawn[12, 12].sum() > 0 and drawn[25, 35].sum() == 0  # mask colour where shown, untouched elsewhere


def test_trains_on_yolo_polygon_labels_through_the_instance_transforms_and_collate(tmp_path):
    from cvforge.data import build_dataset
    from cvforge.data.loader import build_loader
    from cvforge.data.synthetic import make_shapes
    from cvforge.data.transforms import build_transforms
    make_shapes(tmp_path / "shapes", train=4, val=2, size=64, seed=1)  # YOLO polygons in labels/*.txt
    data = build_dataset(str(tmp_path / "shapes" / "data.yaml"), "train", "instance",
                         transforms=build_transforms("instance", True, 64))
    images, targets = next(iter(build_loader(data, "instance", batch_size=4, shuffle=True)))
    assert all(t["masks"].shape[0] == len(t["boxes"]) and t["masks"].shape[-2:] == (64, 64) for t in targets)
    torch.manual_seed(0)
    model = _model(len(data.classes)).train()
    losses = model(images, targets)
    assert torch.isfinite(losses["mask"]) and losses["mask"] > 0


def test_no_detection_gives_empty_masks_of_the_image_size():
    model = zoo.build_model("mask_rcnn", task="instance", num_classes=2, backbone="resnet18", imgsz=64, hidden=64,
                            fpn_channels=32, mask_channels=16, mask_convs=2, score_thresh=1.0).eval()
    with torch.no_grad():
        out = model([torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)])[0]
    assert len(out["boxes"]) == 0 and out["masks"].shape == (0, 40, 50)
