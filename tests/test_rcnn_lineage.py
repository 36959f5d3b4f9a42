"""R-CNN, SPPNet and Fast R-CNN end to end: forward/backward edge cases, and training from the command line
on a tiny shapes copy and on a VOC-format data set the test writes, evaluated with the shared evaluator."""

import pytest
import torch
from _detect_cli import train_eval_predict

from cvforge.cli import main
from cvforge.zoo import build_model

TINY = "shapes:train=8,val=4,size=64,seed=3"
SMALL = {"imgsz": 64, "hidden": 64}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Proposal cache and generated data in the test's own folder."""
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _images():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8),
              torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # no objects
    return images, targets


OPTIONS = {"fast_rcnn": SMALL, "sppnet": {**SMALL, "levels": (1, 2)}, "rcnn": {**SMALL, "warp": 32},
           "rcnn-softmax": {**SMALL, "warp": 32, "scores": "softmax"},
           "fast_rcnn-align": {**SMALL, "pooler": "roi_align"}}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_edge_cases_no_objects_no_proposals(name):
    model = build_model(name.split("-")[0], task="detect", num_classes=3, **OPTIONS[name])
    images, targets = _images()
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 30.0], [2.0, 5.0, 28.0, 44.0]]),
                 torch.tensor([[1.0, 1.0, 9.0, 9.0]])]
    model.train()
    losses = model(images, [{**t, "proposals": p} for t, p in zip(targets, proposals)])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    empty = model(images, [{**t, "proposals": torch.zeros(0, 4)} for t in targets])  # no proposals at all
    assert torch.isfinite(sum(empty.values()))
    nothing = model(images[1:], [{**targets[1], "proposals": torch.zeros(0, 4)}])  # no objects, no proposals
    assert sum(nothing.values()).item() == 0
    sum(nothing.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, image in zip(out, images):
        assert o["boxes"].shape[1] == 4 and o["labels"].dtype == torch.int64
        if len(o["boxes"]):
            assert o["boxes"][:, 2].max() <= image.shape[-1] and o["boxes"][:, 3].max() <= image.shape[-2]


def _train(tmp_path, model, data=TINY, *extra):
    code = main(["train", "--task", "detect", "--model", model, "--data", data, "--epochs", "1", "--imgsz", "64",
                 "--batch", "2", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"), *extra])
    assert code == 0
    weights = tmp_path / "runs" / "train" / "weights" / "best.pt"
    assert weights.exists()
    return weights


def test_fast_rcnn_train_eval_predict(tmp_path, capsys):
    from cvforge.data import build_dataset
    image = build_dataset(TINY, "val", "detect").samples[0].image
    written = train_eval_predict(tmp_path, capsys, "detect", "fast_rcnn", TINY, image, batch=2)
    header = written["header"]
    assert "metrics/mAP50-95" in header and "train/cls" in header and "train/box" in header
    assert "mAP50-95" in written["eval"]


def test_losses_reach_the_right_parts():
    """R-CNN's SVMs and regressor learn on detached features; SPPNet fine-tunes the fc layers only."""
    images, targets = _images()
    props = [torch.tensor([[0.0, 0.0, 20.0, 30.0], [4.0, 5.0, 30.0, 41.0], [40.0, 40.0, 47.0, 60.0]]),
             torch.tensor([[1.0, 1.0, 9.0, 9.0]])]
    batch = [{**t, "proposals": p} for t, p in zip(targets, props)]
    rcnn = build_model("rcnn", task="detect", num_classes=3, **OPTIONS["rcnn"]).train()
    losses = rcnn(images, batch)
    assert set(losses) == {"cls", "svm", "box"} and losses["svm"] > 0
    losses["svm"].backward()
    assert rcnn.svm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in rcnn.backbone.parameters())
    spp = build_model("sppnet", task="detect", num_classes=3, **OPTIONS["sppnet"]).train()
    sum(spp(images, batch).values()).backward()
    assert all(not p.requires_grad for p in spp.backbone.parameters())
    assert spp.head[1].weight.grad.abs().sum() > 0
    assert spp.spp.out_features(spp.backbone.out_channels[-1]) == 256 * 5


def test_rcnn_warp_scales_with_input_size():
    model = build_model("rcnn", task="detect", num_classes=2, hidden=16)
    assert model.warp == 227  # the paper's crops at its 600-px input
    model.input_size.fill_(128)
    assert model.warp == 128  # never larger than the input


CLI_OPTIONS = {"fast_rcnn": [], "sppnet": [], "rcnn": ["--warp", "32"]}  # model options pass through the CLI


@pytest.mark.parametrize("name", ["rcnn", "sppnet"])
def test_rcnn_and_sppnet_train_from_the_cli(tmp_path, name):
    weights = _train(tmp_path, name, TINY, *CLI_OPTIONS[name])
    spec = torch.load(weights, weights_only=True, map_location="cpu")["model_spec"]
    assert spec["name"] == name and spec["kwargs"]["imgsz"] == 64
    assert spec["kwargs"].get("warp") == (32 if name == "rcnn" else None)


def _write_voc(root, images=6, size=64):
    """A VOC-format data set: JPEGImages, Annotations (one XML per image), ImageSets/Main/{train,val}.txt."""
    from PIL import Image
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(images):
        pixels = torch.full((size, size, 3), 40, dtype=torch.uint8)
        x, y = 6 + 5 * i, 10 + 3 * i
        pixels[y:y + 24, x:x + 20] = torch.tensor([200, 60, 60], dtype=torch.uint8)
        name = f"im{i}"
        Image.fromarray(pixels.numpy()).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size><object><name>{'box' if i % 2 else 'slab'}</name><difficult>0</difficult>"
            f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + 20}</xmax><ymax>{y + 24}</ymax></bndbox>"
            "</object></annotation>")
        names.append(name)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(names[:4]) + "\n")
    (root / "ImageSets/Main/val.txt").write_text("\n".join(names[4:]) + "\n")
    return root


@pytest.mark.parametrize("name", ["fast_rcnn", pytest.param("sppnet", marks=pytest.mark.slow),
                                  pytest.param("rcnn", marks=pytest.mark.slow)])
def test_trains_on_a_voc_data_set(tmp_path, name):
    root = _write_voc(tmp_path / "voc")
    weights = _train(tmp_path, name, str(root), *CLI_OPTIONS[name])
    assert "metrics/VOC07_AP50" in (weights.parent.parent / "metrics.csv").read_text()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_truncated_backbone_stops_at_stride_16(name):
    from cvforge.models.detection.fast_rcnn import truncated_backbone
    backbone = truncated_backbone(name, 16, trainable_stages=1)
    assert backbone.strides[-1] == 16
    assert backbone(torch.zeros(1, 3, 64, 64))[-1].shape[-1] == 4
    assert not any(k.startswith("body.layer4") for k in backbone.state_dict())  # later stages hold no weights
    trainable = [any(p.requires_grad for p in s.parameters()) for s in backbone.stages]
    assert trainable == [False] * (len(trainable) - 1) + [True]
