"""ONNX export of the region-based detectors (export.py): R-CNN, SPPNet and Fast R-CNN export their network
on (canvas, regions), Faster / Mask R-CNN their whole eval network for one image. The parity check runs and
passes for each, and the .onnx file gives the detections (and masks) of the PyTorch checkpoint, through
the model's own proposals and postprocess and through `cvforge predict`."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from _checkpoints import save_as_checkpoint
from PIL import Image

from cvforge.cli import main
from cvforge.export import PARITY_TOLERANCE, PROBE_DETECTIONS, export_onnx, load_onnx
from cvforge.zoo import build_model

CLASSES = ["disc", "bar", "star"]
SMALL = {"imgsz": 64, "hidden": 64}
FEW = {**SMALL, "max_proposals": 40}  # selective search on 64-px images: a few dozen regions
# 40 boxes per level before the RPN's NMS, so the number of proposals varies by image (below the 300 kept)
RPN = {**SMALL, "pre_nms_top_n": [2000, 40]}
MODELS = {  # name: (task, options, graph kind)
    "fast_rcnn": ("detect", FEW, "regions"),
    "sppnet": ("detect", {**FEW, "levels": [1, 2]}, "regions"),
    "rcnn": ("detect", {**FEW, "warp": 32}, "regions"),
    "faster_rcnn": ("detect", RPN, "image"),
    "faster_rcnn_fpn": ("detect", {**RPN, "fpn_channels": 32}, "image"),
    "mask_rcnn": ("instance", {**RPN, "fpn_channels": 32, "mask_channels": 16, "mask_convs": 2}, "image"),
}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """The selective search cache in the test's own folder."""
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path / "home"))


def save_region_detector(path, name: str, **extra):
    """An untrained detector whose output layers are spread out (so boxes move off their regions and the
    scores differ: NMS has real work), saved as cvforge train saves it; ``extra``: more model options."""
    task, options, _ = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, task=task, num_classes=len(CLASSES), **options, **extra).eval()
    layers = [model.classifier, model.regressor, model.svm] if name == "rcnn" else (
        [model.predictor.cls_score, model.predictor.bbox_pred] if hasattr(model, "predictor") else
        [model.box_predictor.cls_score, model.box_predictor.bbox_pred, model.rpn.head.bbox_pred])
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.05)
    return save_as_checkpoint(path, model, CLASSES, 64)


def _images():
    """Two uint8 images of other sizes and aspect ratios than the export's example."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8, generator=generator),
            torch.randint(0, 256, (3, 70, 40), dtype=torch.uint8, generator=generator)]


def _parity(report: str) -> list[float]:
    """Every "max |diff| X" of the printed parity lines; for boxes in pixels, "X px (Y of N px)": Y."""
    return [float(relative or absolute) for absolute, relative in
            re.findall(r"max \|diff\| ([0-9.e+-]+)(?: px \(([0-9.e+-]+) of)?", report)]


@pytest.mark.parametrize("name", list(MODELS))
def test_export_parity_and_the_same_detections(tmp_path, capsys, name):
    checkpoint = save_region_detector(tmp_path / "best.pt", name)
    path = export_onnx(checkpoint)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("onnx parity")]
    assert len(lines) == 2  # the example and other sizes of the dynamic axes
    outputs = ["boxes", "scores", "labels"] if MODELS[name][2] == "image" else ["class_logits", "box_deltas"]
    assert all(f"{output} " in line for line in lines for output in outputs)
    diffs = _parity(" ".join(lines))
    assert len(diffs) >= 4 and max(diffs) <= PARITY_TOLERANCE
    if MODELS[name][2] == "image":  # the check compared detections, not empty outputs
        assert all(0 < int(n) <= PROBE_DETECTIONS for n in re.findall(r"(\d+) detections", " ".join(lines)))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["graph"] == MODELS[name][2] and props["task"] == MODELS[name][0] and props["input_size"] == "64"
    from cvforge.api import load
    with torch.no_grad():
        expected = load(checkpoint, device="cpu").module(_images())
        got = load_onnx(path).module(_images())
    for g, e in zip(got, expected, strict=True):
        assert len(e["boxes"]) > 0 and len(g["boxes"]) == len(e["boxes"])
        assert torch.equal(g["labels"], e["labels"])
        assert (g["boxes"] - e["boxes"]).abs().max() <= 1e-3 and (g["scores"] - e["scores"]).abs().max() <= 1e-5
        if name == "mask_rcnn":
            assert g["masks"].shape == e["masks"].shape and (g["masks"] == e["masks"]).float().mean() > 0.999


def test_an_fpn_over_blocks_inside_a_stage_exports_with_parity(tmp_path, capsys):
    # torchvision's mobilenet FPN layout: two maps of the stride-32 stage (its first block and its last)
    checkpoint = save_region_detector(tmp_path / "best.pt", "faster_rcnn_fpn", backbone="mobilenet_v3_small",
                                      fpn_blocks=["features.9", "features.12"])
    export_onnx(checkpoint)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("onnx parity")]
    diffs = _parity(" ".join(lines))
    # an untrained mobilenet's maps are nearly constant on noise: one of the two checks finds detections
    assert len(lines) == 2 and any(int(n) > 0 for n in re.findall(r"(\d+) detections", " ".join(lines)))
    assert len(diffs) >= 2 and max(diffs) <= PARITY_TOLERANCE


def test_the_parity_check_sees_detections_the_score_threshold_hides(tmp_path, capsys):
    """Scores of about 1 / 4 under a threshold of 0.9: the model finds nothing on the noise image, the check
    still compares detections (its threshold is an input of the graph), and so can predict."""
    checkpoint = save_region_detector(tmp_path / "best.pt", "faster_rcnn", score_thresh=0.9)
    path = export_onnx(checkpoint)
    counts = [int(n) for n in re.findall(r"(\d+) detections", capsys.readouterr().out)]
    assert len(counts) == 2 and min(counts) > 0
    from cvforge.api import load
    torch_model, onnx_model = load(checkpoint, device="cpu").module, load_onnx(path).module
    with torch.no_grad():
        assert all(len(d["boxes"]) == 0 for d in onnx_model(_images()) + torch_model(_images()))
        torch_model.score_thresh = onnx_model.score_thresh = 0.05
        expected, got = torch_model(_images()), onnx_model(_images())
    for g, e in zip(got, expected, strict=True):
        assert len(e["boxes"]) > 0 and len(g["boxes"]) == len(e["boxes"]) and torch.equal(g["labels"], e["labels"])
        assert (g["boxes"] - e["boxes"]).abs().max() <= 1e-3


def test_rcnn_graph_outputs_the_svm_scores_and_takes_no_regions(tmp_path, capsys):
    checkpoint = save_region_detector(tmp_path / "best.pt", "rcnn")
    path = export_onnx(checkpoint, check=False)
    assert capsys.readouterr().out == ""
    model = load_onnx(path)
    outputs = model.module.forward_raw(torch.rand(2, 3, 64, 64), [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "class_logits": (0, 4), "box_deltas": (0, 16), "svm_scores": (0, 3)}


def _write_pictures(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (45, 67, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (60, 38, 3), dtype=np.uint8)).save(folder / "b.png")


@pytest.mark.parametrize("name", ["fast_rcnn", "mask_rcnn"])
def test_predict_with_the_onnx_file_from_the_command_line(tmp_path, capsys, name):
    checkpoint = save_region_detector(tmp_path / "best.pt", name)
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    _write_pictures(tmp_path / "pictures")
    for weights, out in ((onnx_path, "pred_onnx"), (checkpoint, "pred_torch")):
        assert main(["predict", "--weights", str(weights), str(tmp_path / "pictures"), "--out", str(tmp_path / out),
                     "--device", "cpu"]) == 0
    onnx_results, torch_results = (json.loads((tmp_path / d / "coco_results.json").read_text())
                                   for d in ("pred_onnx", "pred_torch"))
    assert len(onnx_results) == len(torch_results) > 0 and {r["image_id"] for r in onnx_results} == {0, 1}
    for a, b in zip(onnx_results, torch_results):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        # the JSON rounds boxes to 0.01 px: a 1e-5 difference may round the other way
        assert np.allclose(a["bbox"], b["bbox"], atol=0.011) and abs(a["score"] - b["score"]) <= 1e-4
        assert ("segmentation" in a) == (name == "mask_rcnn") == ("segmentation" in b)
    if name == "mask_rcnn":
        from pycocotools import mask as mask_utils
        same = [mask_utils.iou([a["segmentation"]], [b["segmentation"]], [0])[0, 0]
                for a, b in zip(onnx_results, torch_results) if mask_utils.area(b["segmentation"]) > 0]
        assert same and min(same) > 0.99
        assert (tmp_path / "pred_onnx" / "instance_masks" / "a.png").is_file()


def test_region_detectors_need_opset_16(tmp_path, capsys):
    checkpoint = save_region_detector(tmp_path / "best.pt", "fast_rcnn")
    assert main(["export", "--weights", str(checkpoint), "--opset", "13", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "opset 16" in err and err.count("\n") == 1 and not (tmp_path / "x.onnx").exists()


def test_detections_tied_in_score_are_paired_by_box():
    from cvforge.export import _aligned
    expected = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 9, 9]], dtype=np.float32),
                "scores": np.array([0.5, 0.5, 0.2], dtype=np.float32), "labels": np.array([1, 1, 0])}
    got = {k: v[[1, 0, 2]] for k, v in expected.items()}  # onnxruntime sorted the tie the other way
    aligned = _aligned(got, expected)
    assert all(np.array_equal(aligned[k], expected[k]) for k in expected)
    other = {**got, "labels": np.array([1, 0, 0])}  # a label without a partner: left as is, for the report
    assert _aligned(other, expected) is other
