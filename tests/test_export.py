"""ONNX export (export.py): parity with PyTorch, metadata, and `cvforge predict` through onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from _checkpoints import save_as_checkpoint
from PIL import Image

from cvforge.cli import main
from cvforge.export import PARITY_TOLERANCE, export_onnx, load_onnx
from cvforge.zoo import build_model

CLASSES = ["background", "disc", "bar"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained FCN-8s whose score layers are non-zero (so outputs vary per pixel), saved as cvforge does."""
    torch.manual_seed(0)
    model = build_model("fcn8s", task="segment", num_classes=len(CLASSES)).eval()
    for layer in [model.head.score, *model.skip_scores]:
        torch.nn.init.normal_(layer.weight, std=0.05)
    path = tmp_path_factory.mktemp("export") / "best.pt"
    return save_as_checkpoint(path, model, CLASSES, imgsz=64)


def test_export_matches_pytorch_and_stores_metadata(checkpoint, capsys):
    path = export_onnx(checkpoint)
    assert path == checkpoint.with_suffix(".onnx") and path.is_file()
    report = capsys.readouterr().out
    diff = float(report.split("scores max |diff| ")[1].split()[0].rstrip(","))
    assert diff <= PARITY_TOLERANCE
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["task"] == "segment" and json.loads(props["classes"]) == CLASSES and props["imgsz"] == "64"
    # Dynamic batch and image size, odd sizes included: the graph pads and crops like the model.
    from cvforge.api import load
    torch_model = load(checkpoint, device="cpu").module
    onnx_model = load_onnx(path)
    images = torch.randint(0, 256, (3, 3, 45, 71), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch_model(images)
    got = onnx_model.module(images)
    assert got["scores"].shape == (3, 3, 45, 71)
    assert (got["scores"] - expected["scores"]).abs().max() <= PARITY_TOLERANCE
    assert (got["masks"] == expected["masks"]).float().mean() > 0.999


def test_predict_with_the_onnx_file_from_the_command_line(checkpoint, tmp_path, capsys):
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    assert "onnx parity" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for weights, out in ((onnx_path, tmp_path / "pred_onnx"), (checkpoint, tmp_path / "pred_torch")):
        assert main(["predict", "--weights", str(weights), str(tmp_path / "a.png"), "--out", str(out)]) == 0
    masks = [np.asarray(Image.open(tmp_path / d / "masks" / "a.png")) for d in ("pred_onnx", "pred_torch")]
    assert masks[0].shape == (37, 53) and (masks[0] == masks[1]).mean() > 0.999
    record = json.loads((tmp_path / "pred_onnx" / "predictions.json").read_text())[0]
    assert record["overlay_file"].endswith("a.png") and record["top"][0]["name"] in CLASSES


def test_eval_of_the_onnx_file_gives_the_checkpoints_metrics(checkpoint, tmp_path):
    """Masks labelled with the checkpoint's own predictions: its mIoU is far from 0, and the ONNX file's
    evaluation through onnxruntime must give the same numbers."""
    from cvforge.api import evaluate, load
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (2, 48, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        masks = load(checkpoint, device="cpu").module(torch.from_numpy(images).permute(0, 3, 1, 2))["masks"]
    for index, (pixels, mask) in enumerate(zip(images, masks)):
        for folder, array in (("images", pixels), ("masks", mask.numpy().astype(np.uint8))):
            (tmp_path / folder / "val").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / folder / "val" / f"{index}.png")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    onnx_path = export_onnx(checkpoint, out=tmp_path / "model.onnx")
    expected = evaluate(checkpoint, data=str(tmp_path), out=tmp_path / "eval_pt", device="cpu", quiet=True)
    got = evaluate(onnx_path, data=str(tmp_path), out=tmp_path / "eval_onnx", quiet=True)
    assert expected["mIoU"] > 0.9 and got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-3, nan_ok=True), key


def test_export_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["export", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["predict", "--weights", str(bad), str(tmp_path / "x.png")]) == 2
    assert "bad.onnx" in capsys.readouterr().err
