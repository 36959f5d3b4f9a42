"""``cvforge models``: every listed model with its task, parameters and FLOPs (``cvforge.complexity``)."""
from __future__ import annotations

import pytest

from cvforge.cli import main
from cvforge.complexity import FLOPS_PROPOSALS, params_and_flops
from cvforge.zoo import build_model, list_models


def table(capsys, *args: str) -> dict[str, dict]:
    """``cvforge models ARGS`` -> {model: {"task", "params", "gflops", "imgsz", "note"}}."""
    assert main(["models", *args]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        words = line.split(maxsplit=5)
        if len(words) >= 5 and words[3].replace(".", "").isdigit():
            rows[words[1]] = {"task": words[0], "params": float(words[2]), "gflops": float(words[3]),
                              "imgsz": int(words[4]), "note": words[5] if len(words) > 5 else ""}
    return rows


def test_models_lists_every_detector_with_params_and_flops_that_grow_with_imgsz(capsys):
    small = table(capsys, "--task", "detect", "--imgsz", "64")
    large = table(capsys, "--task", "detect", "--imgsz", "96")
    assert list(small) == [name for name, _ in list_models("detect")] == list(large)
    for name in small:
        assert small[name]["task"] == "detect" and small[name]["imgsz"] == 64 and large[name]["imgsz"] == 96
        assert small[name]["params"] == large[name]["params"] > 0
        assert large[name]["gflops"] > small[name]["gflops"] > 0, name
    assert f"{FLOPS_PROPOSALS} proposals" in small["fast_rcnn"]["note"] and not small["yolo-n"]["note"]
    assert large["yolo-n"]["gflops"] == pytest.approx(2.25 * small["yolo-n"]["gflops"], rel=0.1)  # ~ the area


def test_params_and_flops_match_resnet18s_known_cost():
    model = build_model("resnet18", task="classify", num_classes=1000)
    params, flops = params_and_flops(model, 224)
    assert params == 11_689_512  # torchvision's resnet18
    assert flops == pytest.approx(2 * 1.814e9, rel=0.01)  # 1.81 G multiply-adds, 2 FLOPs each
    assert model.training  # the count runs in eval mode and leaves the mode as it was


def test_an_unknown_task_or_a_tiny_size_is_a_one_line_error(capsys):
    assert main(["models", "--imgsz", "8"]) == 2
    assert "--imgsz must be at least 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["models", "--task", "track"])
