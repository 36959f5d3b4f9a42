"""One detector through the command line: ``cvforge train`` (1 epoch, 64 px), ``eval``, ``predict``."""
from __future__ import annotations

import json

from cvforge.cli import main


def train_eval_predict(tmp_path, capsys, task: str, model: str, data: str, image, *extra: str, batch: int = 4) -> dict:
    """Runs the three commands (``extra``: more train flags) and checks what every detector must write;
    returns {"run": the run folder, "header": metrics.csv's header, "eval": what eval printed, "pred": folder}."""
    runs = tmp_path / "runs"
    assert main(["train", "--task", task, "--model", model, "--data", data, "--epochs", "1", "--imgsz", "64",
                 "--batch", str(batch), "--workers", "0", "--device", "cpu", "--project", str(runs), *extra]) == 0
    weights = runs / "train" / "weights" / "best.pt"
    header = (runs / "train" / "metrics.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert main(["eval", "--weights", str(weights), "--data", data, "--device", "cpu",
                 "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert main(["predict", "--weights", str(weights), str(image), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "pred" / "coco_results.json").read_text())
    assert isinstance(results, list) and all(len(r["bbox"]) == 4 for r in results)
    assert (tmp_path / "pred" / "images").is_dir()
    return {"run": runs / "train", "header": header, "eval": printed, "pred": tmp_path / "pred"}
