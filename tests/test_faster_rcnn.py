"""Faster R-CNN: the detector contract (losses, detections in original pixels, input_size), with and
without FPN, the backbone cut at stride 16, a checkpoint rebuild, and the command line end to end on
the built-in data set and on a COCO data set with polygons written here."""
import json

import numpy as np
import pytest
import torch
from _detect_cli import train_eval_predict
from PIL import Image, ImageDraw

from cvforge import zoo
from cvforge.errors import CvforgeError

TINY = "shapes:train=8,val=4,size=64,seed=3"
SMALL = {"backbone": "resnet18", "imgsz": 64, "hidden": 64, "fpn_channels": 32}


def _build(fpn: bool = False, **options):
    name = "faster_rcnn_fpn" if fpn else "faster_rcnn"
    kwargs = {**SMALL, **options}
    if not fpn:
        kwargs.pop("fpn_channels")
    return zoo.build_model(name, task="detect", num_classes=3, **kwargs)


def _batch():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 30.0, 60.0, 62.0]]),
                "labels": torch.tensor([0, 2]), "iscrowd": torch.tensor([False, True])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # an empty image
    return images, targets


@pytest.mark.parametrize("fpn", [False, True])
def test_losses_and_detections_follow_the_contract(fpn):
    model = _build(fpn)
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"rpn_obj", "rpn_box", "cls", "box"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.rpn.head.cls_logits.weight.grad is not None and model.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert next(model.backbone.parameters()).grad is not None  # approximate joint training reaches the backbone
    model.eval()
    assert int(model.input_size) == 64
    with torch.no_grad():
        out = model([torch.randint(0, 256, (3, 100, 140), dtype=torch.uint8)])  # resized to 64 inside
        batched = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert len(out) == 1 and len(batched) == 2
    boxes = out[0]["boxes"]
    assert set(out[0]) == {"boxes", "scores", "labels"} and len(boxes) <= 100
    assert (boxes[:, 2] <= 140).all() and (boxes[:, 3] <= 100).all() and (boxes >= 0).all()
    assert out[0]["labels"].dtype == torch.int64 and (out[0]["labels"] < 3).all()


def test_box_beta_sets_the_smooth_l1_transition_of_the_box_loss():
    images, targets = _batch()
    losses = {}
    for beta in (1.0, 1 / 9):
        torch.manual_seed(0)
        model = _build(box_beta=beta).train()
        torch.manual_seed(1)  # the same regions sampled for both
        losses[beta] = model(images, targets)
    # same weights and regions: the classification term is equal, the box term larger (smooth L1 grows as beta shrinks)
    assert torch.equal(losses[1.0]["cls"], losses[1 / 9]["cls"])
    assert losses[1 / 9]["box"] > losses[1.0]["box"] > 0


def test_rpn_score_thresh_drops_unlikely_proposals():
    images, _ = _batch()
    counts = {}
    for thresh in (0.0, 0.99):
        torch.manual_seed(0)
        model = _build(fpn=True, rpn_score_thresh=thresh).eval()
        with torch.no_grad():
            batch, _, sizes = model.resize(images)
            counts[thresh] = [len(p) for p in model.propose(batch, model.features(model.normalize(batch)), sizes)]
            out = model(images)
    assert min(counts[0.0]) > 0 and max(counts[0.99]) == 0  # an untrained RPN (objectness ~0.5) is nowhere 99 % sure
    assert all(len(o["boxes"]) == 0 for o in out)  # no proposals: no detections, and no error


def test_without_fpn_the_backbone_stops_at_stride_16_and_fpn_keeps_it():
    plain, pyramid = _build(), _build(fpn=True)
    assert plain.backbone.strides[-1] == 16 and not any("layer4" in n for n, _ in plain.named_parameters())
    assert plain.features.num_levels == 1 and plain.rpn.anchors.num_anchors_per_location() == [9]
    assert pyramid.features.num_levels == 5 and pyramid.rpn.anchors.num_anchors_per_location() == [3] * 5
    assert pyramid.backbone.strides[-1] == 32


def test_fpn_blocks_take_maps_from_inside_a_stage_and_drop_the_blocks_after():
    # mobilenet_v3_small: features.9 is the first block of the stride-32 stage, features.12 its last
    model = _build(fpn=True, backbone="mobilenet_v3_small", fpn_blocks=["features.9", "features.3"],
                   anchor_sizes=[32, 64, 128])
    assert model.features.fpn_blocks == ["features.3", "features.9"]  # in the order the backbone runs them
    assert model.features.num_levels == 3 and model.features.pooled_levels == ["0", "1"]
    assert model.backbone.out_channels[-1] == 96 and model.backbone.stage_paths[-1] == ["features.9"]
    assert not any(".features.1" + i in n for n, _ in model.named_parameters() for i in "012")  # 10-12 dropped
    maps = model.features(torch.zeros(1, 3, 64, 64))
    assert [tuple(m.shape[-3:]) for m in maps] == [(32, 8, 8), (32, 2, 2), (32, 1, 1)]
    images, targets = _batch()
    sum(model.train()(images, targets).values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # nothing left unused
    with pytest.raises(CvforgeError, match="features.12"):  # the error lists the blocks there are
        _build(fpn=True, backbone="mobilenet_v3_small", fpn_blocks=["features.99"])
    with pytest.raises(CvforgeError, match="needs an FPN"):
        _build(backbone="mobilenet_v3_small", fpn_blocks=["features.3"])


def test_rebuilds_from_its_spec_with_the_same_outputs():
    model = _build(fpn=True).eval()
    spec = model.cvforge_spec
    rebuilt = zoo.build_model(spec["name"], task=spec["task"], **spec["kwargs"]).eval()
    rebuilt.load_state_dict(model.state_dict())
    image = [torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8)]
    with torch.no_grad():
        a, b = model(image)[0], rebuilt(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def write_polygon_coco(root, images: int = 10, size: int = 64, seed: int = 0):
    """A COCO data set (train and val) of coloured triangles and squares, annotated with polygons only:
    ``root/images/*.png``, ``root/annotations/instances_{train,val}.json``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    categories = [{"id": 7, "name": "triangle"}, {"id": 9, "name": "square"}]
    for split, count in (("train", images), ("val", max(2, images // 3))):
        data = {"images": [], "annotations": [], "categories": categories}
        for i in range(count):
            picture = Image.new("RGB", (size, size), (40, 40, 40))
            draw = ImageDraw.Draw(picture)
            name = f"{split}_{i}.png"
            data["images"].append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for k in range(2):
                x, y = int(rng.integers(2, size // 2 - 4)) + k * size // 2, int(rng.integers(2, size // 2))
                side = int(rng.integers(12, 24))
                triangle = (i + k) % 2 == 0
                points = ([x, y + side, x + side // 2, y, x + side, y + side] if triangle else
                          [x, y, x + side, y, x + side, y + side, x, y + side])
                points = [min(v, size - 1) for v in points]
                draw.polygon(points, fill=(230, 60, 60) if triangle else (60, 200, 230))
                xs, ys = points[0::2], points[1::2]
                data["annotations"].append({
                    "id": len(data["annotations"]) + 1, "image_id": i + 1, "category_id": 7 if triangle else 9,
                    "segmentation": [[float(v) for v in points]], "iscrowd": 0,
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "area": float((max(xs) - min(xs)) * (max(ys) - min(ys)))})
            picture.save(root / "images" / name)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def test_cli_on_the_builtin_data_set(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from cvforge.data import build_dataset
    image = build_dataset(TINY, "val", "detect").samples[0].image
    written = train_eval_predict(tmp_path, capsys, "detect", "faster_rcnn", TINY, image)
    assert "metrics/mAP50-95" in written["header"] and "train/rpn_obj" in written["header"]
    assert "mAP50-95" in written["eval"]


@pytest.mark.slow
def test_cli_on_a_coco_data_set_with_polygons(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_polygon_coco(tmp_path / "coco")
    written = train_eval_predict(tmp_path, capsys, "detect", "faster_rcnn_fpn", str(root), root / "images" / "val_0.png")
    assert "metrics/mAP50" in written["header"] and "mAP50-95" in written["eval"]


def test_unknown_options_are_refused_with_the_list():
    with pytest.raises(CvforgeError, match="unknown model option.*anchor_size\\b"):
        zoo.build_model("faster_rcnn", task="detect", num_classes=2, anchor_size=(8,))
    with pytest.raises(CvforgeError, match="mask_channels"):
        zoo.build_model("mask_rcnn", task="instance", num_classes=2, mask_channel=8)


def test_the_papers_roi_pool_without_fpn():
    from cvforge.errors import CvforgeError
    model = _build(roi_pool="max")
    images, targets = _batch()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 2
    with pytest.raises(CvforgeError, match="roi_pool"):
        _build(fpn=True, roi_pool="max")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["faster_rcnn_fpn", "mask_rcnn"])
def test_learns_a_small_data_set(tmp_path, name):
    """Both stages train together: after a short run on 8 images the detector finds their objects."""
    from cvforge.data import build_dataset
    from cvforge.data.loader import build_loader
    from cvforge.eval import build_evaluator
    task = "instance" if name == "mask_rcnn" else "detect"
    data = build_dataset(str(write_polygon_coco(tmp_path / "coco", images=8)), "train", task)
    torch.manual_seed(0)
    extra = {"mask_channels": 32, "mask_convs": 2} if name == "mask_rcnn" else {}
    model = zoo.build_model(name, task=task, num_classes=2, backbone="resnet18", imgsz=64, hidden=256,
                            fpn_channels=64, anchor_sizes=(16, 32, 64, 128, 256), anchor_reference=64, **extra)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    loader = build_loader(data, task, batch_size=4, shuffle=True, seed=0)
    model.train()
    for epoch in range(40):
        loader.sampler.set_epoch(epoch)
        for images, targets in loader:
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
    model.eval()
    evaluator = build_evaluator(task, data.classes)
    with torch.no_grad():
        for images, targets in build_loader(data, task, batch_size=4, shuffle=False):
            evaluator.update(model(images), targets)
    metrics = evaluator.compute()
    assert metrics["mAP50"] > 0.5, metrics
    if task == "instance":
        assert metrics["mask_mAP50"] > 0.5, metrics
