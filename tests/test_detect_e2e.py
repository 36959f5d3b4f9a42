"""Detection end to end through the command line: train -> eval -> predict (tiny settings)."""
import json

from cvforge.cli import main

TINY = "shapes:train=8,val=4,size=64,seed=3"


def _train(tmp_path, model, *extra):
    code = main(["train", "--task", "detect", "--model", model, "--data", TINY, "--epochs", "1", "--imgsz", "64",
                 "--batch", "4", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"), *extra])
    assert code == 0
    weights = tmp_path / "runs" / "train" / "weights" / "best.pt"
    assert weights.exists()
    return weights


def test_yolo_train_eval_predict(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = _train(tmp_path, "yolo-n", "--ema", "true", "--optimizer", "adamw", "--lr", "0.001")
    run = weights.parent.parent
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "metrics/mAP50-95" in header and "metrics/mAP50" in header
    assert (run / "plots" / "pr_curves.png").exists() and (run / "plots" / "confusion_matrix.png").exists()
    assert main(["eval", "--weights", str(weights), "--data", TINY, "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    assert "mAP50-95" in capsys.readouterr().out
    from cvforge.data import build_dataset
    image = build_dataset(TINY, "val", "detect").samples[0].image
    assert main(["predict", "--weights", str(weights), str(image), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "pred" / "coco_results.json").read_text())
    assert isinstance(results, list) and all(len(r["bbox"]) == 4 for r in results)
    assert (tmp_path / "pred" / "images").is_dir() and list((tmp_path / "pred" / "labels").glob("*.txt"))


def test_yolov1_trains_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train(tmp_path, "yolov1")
