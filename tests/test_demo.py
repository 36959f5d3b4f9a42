"""`make demo` end to end on a tiny built-in data set: train the default detector, report, draw."""
from PIL import Image

from cvforge.demo import demo

TINY = "shapes:train=8,val=4,size=64,seed=3"


def test_demo_trains_the_default_detector_and_writes_its_pictures(tmp_path, capsys):
    assert demo(TINY, epochs=1, project=tmp_path, workers=0, batch=4) == 0
    out = capsys.readouterr().out
    run = tmp_path / "train"
    assert "yolo-n" in (run / "config.yaml").read_text()
    assert "mAP50" in out and "trained 1 epochs" in out
    for picture in ("predictions.png", "data_preview.png", "plots/pr_curves.png", "plots/confusion_matrix.png"):
        with Image.open(run / picture) as image:
            assert min(image.size) > 64  # a grid of tiles, not an empty file
