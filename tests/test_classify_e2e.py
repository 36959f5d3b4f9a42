"""Classification end to end from the command line: train -> eval -> predict, and the Python API."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import cvforge
from cvforge.cli import main

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _imagefolder(root, per_class=6, size=32):
    """Solid-ish colour classes: learnable in a few steps, so the test can check the model learned."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                noise = rng.integers(-25, 25, (size, size, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests of this file."""
    tmp_path = tmp_path_factory.mktemp("classify")
    data = _imagefolder(tmp_path / "colours")
    args = ["train", "--task", "classify", "--model", "resnet18", "--data", str(data), "--epochs", "8",
            "--imgsz", "32", "--batch", "6", "--workers", "0", "--optimizer", "adamw", "--lr", "0.003",
            "--warmup-epochs", "0", "--project", str(tmp_path / "runs"), "--name", "colours"]
    assert main(args) == 0
    return tmp_path, data


def test_train_eval_predict_from_the_command_line(trained, capsys):
    tmp_path, data = trained
    run = tmp_path / "runs" / "colours"
    for name in ("config.yaml", "metrics.csv", "weights/last.pt", "weights/best.pt",
                 "plots/curves.png", "plots/confusion_matrix.png"):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "metrics/top1" in header and "metrics/top5" in header
    capsys.readouterr()
    assert main(["eval", "--weights", str(run / "weights/best.pt"), "--data", str(data),
                 "--out", str(tmp_path / "eval")]) == 0
    top1 = float(next(line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("top1")))
    assert top1 >= 0.9  # three colours: a model that learned anything separates them
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(run / "weights/best.pt"), str(data / "val" / "red"),
                 "--out", str(out), "--top", "2"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert len(records) == 6 and all(len(r["top"]) == 2 for r in records)
    assert sum(r["name"] == "red" for r in records) >= 5
    assert (out / "predictions.csv").read_text().startswith("image,rank,label,name,score")


def test_python_api_load_and_predict(trained):
    tmp_path, data = trained
    model = cvforge.load(tmp_path / "runs" / "colours" / "weights" / "best.pt", device="cpu")
    assert model.classes == ["blue", "green", "red"] and model.task == "classify"
    guess = model.predict(data / "val" / "blue" / "0.png", top=3)
    assert guess["name"] == "blue" and abs(sum(g["score"] for g in guess["top"]) - 1) < 1e-4


def test_a_second_run_never_overwrites_the_first(trained, capsys):
    tmp_path, data = trained
    before = (tmp_path / "runs" / "colours" / "weights" / "best.pt").read_bytes()
    assert main(["train", "--task", "classify", "--data", str(data), "--epochs", "1", "--imgsz", "32",
                 "--batch", "6", "--workers", "0", "--project", str(tmp_path / "runs"), "--name", "colours"]) == 0
    assert (tmp_path / "runs" / "colours-2" / "weights" / "best.pt").is_file()
    assert (tmp_path / "runs" / "colours" / "weights" / "best.pt").read_bytes() == before


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--task", "classify", "--model", "not_a_model", "--data", str(_imagefolder(tmp_path / "d", 1)),
                 "--epochs", "1", "--project", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvforge: error: unknown classify model 'not_a_model'") and "\n" not in err
    assert main(["eval", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
