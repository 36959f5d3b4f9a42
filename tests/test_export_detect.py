"""ONNX export of detectors (export.py): parity of the raw head outputs, and `cvforge predict` with the
.onnx file giving the detections of the PyTorch checkpoint (the model's own letterbox, decoding and NMS
run around the graph)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from _checkpoints import save_as_checkpoint
from PIL import Image

from cvforge.cli import main
from cvforge.export import PARITY_TOLERANCE, export_onnx, load_onnx, torch_beside_onnxruntime
from cvforge.zoo import build_model

CLASSES = ["disc", "bar", "star"]


def save_detector(path, name: str, imgsz: int, **kwargs):
    """An untrained detector with spread-out class scores (so NMS has real work), saved as cvforge does."""
    torch.manual_seed(0)
    model = build_model(name, task="detect", num_classes=len(CLASSES), imgsz=imgsz, **kwargs).eval()
    last = [branch[-1] for branch in model.head.cls] if name.startswith("yolo-") else [model.head[-1]]
    for layer in last:
        torch.nn.init.normal_(layer.weight, std=0.05)
    if name == "yolov1":  # positive confidences and class probabilities, so some products pass conf
        torch.nn.init.uniform_(model.head[-1].bias, 0.1, 0.6)
    return save_as_checkpoint(path, model, CLASSES, imgsz)


@pytest.fixture(scope="module")
def yolo_n(tmp_path_factory):
    return save_detector(tmp_path_factory.mktemp("yolo") / "best.pt", "yolo-n", 64, conf=0.05)


def _images():
    """Two uint8 images of different sizes and aspect ratios (the letterbox pads differently)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8, generator=generator),
            torch.randint(0, 256, (3, 70, 40), dtype=torch.uint8, generator=generator)]


def _assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert len(e["boxes"]) > 0 and len(g["boxes"]) == len(e["boxes"])
        assert torch.equal(g["labels"], e["labels"])
        assert torch.allclose(g["boxes"], e["boxes"], atol=1e-3)
        assert torch.allclose(g["scores"], e["scores"], atol=1e-5)


@pytest.mark.parametrize("name, imgsz", [("yolo-n", 64), ("yolov1", 112)])
def test_detector_export_parity_and_onnx_detections(tmp_path, capsys, name, imgsz):
    checkpoint = save_detector(tmp_path / "best.pt", name, imgsz)
    path = export_onnx(checkpoint)
    report = capsys.readouterr().out
    diff = float(report.split("raw max |diff| ")[1].split()[0].rstrip(","))
    assert diff <= PARITY_TOLERANCE
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["task"] == "detect" and props["input_size"] == str(imgsz)
    assert json.loads(props["model_spec"])["name"] == name and json.loads(props["classes"]) == CLASSES
    from cvforge.api import load
    with torch.no_grad():
        expected = load(checkpoint, device="cpu").module(_images())
        got = load_onnx(path).module(_images())
    _assert_same_detections(got, expected)


def test_predict_with_the_onnx_detector_from_the_command_line(yolo_n, tmp_path, capsys):
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(yolo_n), "--format", "onnx", "--out", str(onnx_path)]) == 0
    assert "raw max |diff|" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 67, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for weights, out in ((onnx_path, "pred_onnx"), (yolo_n, "pred_torch")):
        assert main(["predict", "--weights", str(weights), str(tmp_path / "a.png"), "--out", str(tmp_path / out),
                     "--device", "cpu"]) == 0
    onnx_results, torch_results = (json.loads((tmp_path / d / "coco_results.json").read_text())
                                   for d in ("pred_onnx", "pred_torch"))
    assert len(onnx_results) == len(torch_results) > 0
    for a, b in zip(onnx_results, torch_results):
        assert a["category_id"] == b["category_id"]
        assert np.allclose(a["bbox"], b["bbox"], atol=0.02) and abs(a["score"] - b["score"]) <= 1e-4
    assert (tmp_path / "pred_onnx" / "labels" / "a.txt").is_file()


def test_torch_runs_at_one_thread_beside_onnxruntime_and_gets_its_threads_back():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_beside_onnxruntime():
            assert torch.get_num_threads() == 1  # onnxruntime's threads get the cores
            raise RuntimeError("inside")
    assert torch.get_num_threads() == threads


def test_detector_export_mistakes_are_one_line_errors(yolo_n, tmp_path, capsys):
    # YOLOv1 at 64 px: a 4 x 4 feature map pooled to the 7 x 7 grid, which ONNX cannot express.
    small = save_detector(tmp_path / "v1.pt", "yolov1", 64)
    assert main(["export", "--weights", str(small)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvforge: error: ONNX cannot express") and err.count("\n") == 1 and "112" in err
    assert main(["export", "--weights", str(yolo_n), "--imgsz", "96", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "leave out --imgsz" in capsys.readouterr().err


def _data_labelled_by(checkpoint, root):
    """A YOLO-format val split of two random images whose labels are the checkpoint's own most confident
    detections (up to 3 per image), so that its metrics are far from 0 and a difference would show."""
    from cvforge.api import load
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8), rng.integers(0, 255, (72, 56, 3), dtype=np.uint8)]
    with torch.no_grad():
        detections = load(checkpoint, device="cpu").module([torch.from_numpy(i).permute(2, 0, 1) for i in images])
    for index, (pixels, found) in enumerate(zip(images, detections)):
        (root / "images" / "val").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / "val" / f"{index}.png")
        height, width = pixels.shape[:2]
        lines = [f"{int(label)} {(x1 + x2) / 2 / width} {(y1 + y2) / 2 / height} {(x2 - x1) / width} {(y2 - y1) / height}"
                 for (x1, y1, x2, y2), label in zip(found["boxes"][:3].tolist(), found["labels"][:3])]
        (root / "labels" / "val" / f"{index}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: .\nval: images/val\nnames: {CLASSES}\n")
    return root / "data.yaml"


def test_eval_of_the_onnx_detector_gives_the_checkpoints_metrics(yolo_n, tmp_path, capsys):
    data = _data_labelled_by(yolo_n, tmp_path / "data")
    onnx_path = export_onnx(yolo_n, out=tmp_path / "model.onnx")
    assert load_onnx(onnx_path).data == "shapes"  # the training data's SPEC: eval's default --data
    from cvforge.api import evaluate
    expected = evaluate(yolo_n, data=str(data), out=tmp_path / "eval_pt", device="cpu", quiet=True)
    got = evaluate(onnx_path, data=str(data), out=tmp_path / "eval_onnx", quiet=True)
    assert expected["mAP50"] > 0.5
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
    capsys.readouterr()
    assert main(["eval", "--weights", str(onnx_path), "--data", str(data), "--out", str(tmp_path / "cli")]) == 0
    assert f"{expected['mAP50']:.4f}" in capsys.readouterr().out


def test_onnx_files_are_named_as_such_where_a_checkpoint_is_needed(yolo_n, tmp_path, capsys):
    onnx_path = export_onnx(yolo_n, out=tmp_path / "model.onnx")
    model = onnx.load(str(onnx_path))  # as exported before the training data went into the metadata
    kept = [p for p in model.metadata_props if p.key != "data"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    capsys.readouterr()
    assert main(["eval", "--weights", str(tmp_path / "old.onnx")]) == 2
    err = capsys.readouterr().err
    assert "does not say which data" in err and "--data" in err and err.count("\n") == 1
    assert main(["export", "--weights", str(onnx_path)]) == 2
    err = capsys.readouterr().err
    assert "an exported ONNX model, not a checkpoint" in err and err.count("\n") == 1
