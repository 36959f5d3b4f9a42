"""`make demo` end to end on a tiny built-in data set: train the default detector, report, draw."""
import torch
from PIL import Image

from cvforge.demo import cpu_numerics, demo

TINY = "shapes:train=8,val=4,size=64,seed=3"


def test_demo_trains_the_default_detector_and_writes_its_pictures(tmp_path, capsys):
    assert demo(TINY, epochs=1, project=tmp_path, workers=0, batch=4) == 0
    out = capsys.readouterr().out
    run = tmp_path / "train"
    config = (run / "config.yaml").read_text()
    assert "yolo-n" in config and "val_period: 5" in config  # the demo validates every 5th epoch
    assert "mAP50" in out and "trained 1 epochs" in out
    for picture in ("predictions.png", "data_preview.png", "plots/pr_curves.png", "plots/confusion_matrix.png"):
        with Image.open(run / picture) as image:
            assert min(image.size) > 64  # a grid of tiles, not an empty file


def test_bfloat16_only_where_the_cpu_has_amx_and_there_is_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_numerics() == {"amp": True, "channels_last": True}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu_numerics() == {}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_numerics() == {}  # CUDA: the trainer's own AMP default
