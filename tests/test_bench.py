"""``cvforge bench`` end to end on a tiny shapes copy: two detectors (one with selective search) trained for
3 seconds each, every file written with one row per model, a second run that skips what is done, and a
bench of given weights."""
from __future__ import annotations

import csv
import json
import math

import pytest

from cvforge.cli import main

DATA = "shapes:train=16,val=8,size=64"
NUMBERS = ("epochs", "train_min", "mAP50", "mAP50-95", "ms_b1", "ms_b1_proposals", "ms_b8", "ms_b8_proposals",
           "proposal_ms", "params_m", "gflops", "imgsz", "train_peak_mb", "test_peak_mb")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Data set and proposal caches in the test's own folder (the children inherit the environment)."""
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_bench_writes_every_file_with_one_row_per_model_then_resumes(home, capsys):
    out = home / "bench"
    command = ["bench", "--data", DATA, "--models", "yolo-n,fast_rcnn", "--budget", "0.05", "--out", str(out),
               "--repeats", "2", "--device", "cpu"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    for name in ("bench.jsonl", "bench.csv", "bench.md", "settings.json", "plots/accuracy_vs_latency.png",
                 "plots/training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [r["model"] for r in rows] == ["yolo-n", "fast_rcnn"]
    for row in rows:
        values = {key: float(row[key]) for key in NUMBERS}
        assert all(math.isfinite(v) for v in values.values()), row
        assert values["epochs"] >= 1 and 0 <= values["mAP50-95"] <= values["mAP50"] <= 1
        assert min(values["ms_b1"], values["ms_b8"], values["params_m"], values["gflops"]) > 0
        assert values["train_peak_mb"] > 100 and values["test_peak_mb"] > 100  # includes torch itself
    yolo, fast = ({k: float(r[k]) for k in NUMBERS} for r in rows)
    assert yolo["proposal_ms"] == 0 and yolo["ms_b1_proposals"] == yolo["ms_b1"]
    assert fast["proposal_ms"] > 0 and fast["ms_b1_proposals"] == pytest.approx(fast["ms_b1"] + fast["proposal_ms"])
    table = (out / "bench.md").read_text()
    assert "| yolo-n | " in table and "| fast_rcnn | " in table and "| 66.9 | 0.320 |" in table  # paper's figures
    assert "| fast_rcnn | " in printed and "Girshick, ICCV 2015" in table

    # the same command again, with fast_rcnn's row lost: only its measurement runs, no training at all
    lines = (out / "bench.jsonl").read_text().splitlines()
    (out / "bench.jsonl").write_text(lines[0] + "\n")
    written = {path: path.stat().st_mtime_ns for path in out.glob("*/*.json")}  # each child's result
    assert main(command) == 0
    again = {p.relative_to(out).as_posix() for p in out.glob("*/*.json") if p.stat().st_mtime_ns != written[p]}
    assert again == {"fast_rcnn/measure.json"}
    assert [json.loads(line)["model"] for line in (out / "bench.jsonl").read_text().splitlines()] == ["yolo-n",
                                                                                                    "fast_rcnn"]
    assert sorted(p.name for p in (out / "fast_rcnn").glob("train*") if p.is_dir()) == ["train"]

    # given weights are not trained again; a last.pt (not a best.pt validated by its training) is evaluated
    given = home / "given"
    last = out / "yolo-n" / "train" / "weights" / "last.pt"
    assert main(["bench", "--data", DATA, "--models", "yolo-n", "--weights", f"yolo-n={last}", "--out", str(given),
                 "--repeats", "1", "--device", "cpu"]) == 0
    row = next(csv.DictReader((given / "bench.csv").open()))
    assert row["epochs"] == "" and 0 <= float(row["mAP50"]) <= 1
    assert not (given / "yolo-n" / "train").exists() and (given / "yolo-n" / "eval" / "pr_curves.png").exists()


def test_bench_refuses_mistakes_before_starting_anything(home, capsys):
    assert main(["bench", "--models", "resnet18", "--out", str(home / "b")]) == 2
    assert "cannot bench model 'resnet18'" in capsys.readouterr().err
    assert main(["bench", "--weights", "yolo-n=missing.pt", "--out", str(home / "b")]) == 2
    assert "weights for yolo-n not found" in capsys.readouterr().err
    (home / "b").mkdir()
    (home / "b" / "settings.json").write_text(json.dumps({"data": DATA, "budget": 1.0, "device": "auto", "seed": 0}))
    assert main(["bench", "--data", DATA, "--budget", "2", "--out", str(home / "b")]) == 2
    assert "this bench ran with other budget" in capsys.readouterr().err
    assert not (home / "b" / "bench.jsonl").exists()
