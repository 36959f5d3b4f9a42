"""Detection end to end through the command line: train -> eval -> predict (tiny settings)."""
from _detect_cli import train_eval_predict

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
    from cvforge.data import build_dataset
    image = build_dataset(TINY, "val", "detect").samples[0].image
    written = train_eval_predict(tmp_path, capsys, "detect", "yolo-n", TINY, image,
                                 "--ema", "true", "--optimizer", "adamw", "--lr", "0.001")
    assert "metrics/mAP50-95" in written["header"] and "metrics/mAP50" in written["header"]
    plots = written["run"] / "plots"
    assert (plots / "pr_curves.png").exists() and (plots / "confusion_matrix.png").exists()
    assert "mAP50-95" in written["eval"]
    assert list((written["pred"] / "labels").glob("*.txt"))


def test_yolov1_trains_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train(tmp_path, "yolov1")
