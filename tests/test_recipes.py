"""Recipes fill what the user did not choose; the model's own options come from unknown train flags."""
import argparse

import pytest
from PIL import Image

from cvforge.cli import build_parser, model_options
from cvforge.errors import CvforgeError
from cvforge.recipes import recipe_for, resolve_config
from cvforge.zoo import build_model, builder_options

TINY = "shapes:train=8,val=4,size=64,seed=3"


def test_no_options_train_the_default_detector_with_its_recipe():
    config = resolve_config({"data": TINY})
    assert (config.task, config.model) == ("detect", "yolo-n")
    assert (config.optimizer, config.ema, config.lr) == ("adamw", True, recipe_for("yolo-n")["lr"])
    assert config.imgsz == 64  # the data's own size, not the recipe's 640


def test_yolov1_input_is_a_multiple_of_its_grid_times_stride():
    # 64-px images: YOLOv1's 7 x 7 grid over stride-16 features needs a multiple of 112 (exact pooling, ONNX)
    assert resolve_config({"data": TINY, "model": "yolov1"}).imgsz == 112


def test_user_options_win_over_the_recipe():
    config = resolve_config({"data": TINY, "lr": 0.1, "optimizer": "sgd", "imgsz": 96})
    assert (config.lr, config.optimizer, config.imgsz) == (0.1, "sgd", 96)


def test_task_follows_the_model_and_classifiers_keep_224():
    assert resolve_config({"model": "fcn8s", "data": TINY}).task == "segment"
    config = resolve_config({"model": "mobilenet_v3_small", "data": TINY})
    assert (config.task, config.imgsz, config.optimizer) == ("classify", 224, "sgd")


def test_image_size_is_the_median_side_rounded_up_to_32_and_capped(tmp_path):
    for folder, mode in (("images", "RGB"), ("masks", "L")):
        (tmp_path / folder).mkdir()
        for i, size in enumerate([(200, 100), (210, 90), (90, 60)]):
            Image.new(mode, size).save(tmp_path / folder / f"{i}.png")
    assert resolve_config({"model": "fcn8s", "data": str(tmp_path)}).imgsz == 224  # median side 200 -> 224


def test_image_size_is_capped_by_the_recipe(tmp_path):
    for folder, mode in (("images", "RGB"), ("masks", "L")):
        (tmp_path / folder).mkdir()
        Image.new(mode, (1200, 900)).save(tmp_path / folder / "big.png")
    assert resolve_config({"model": "fcn8s", "data": str(tmp_path)}).imgsz == recipe_for("fcn8s")["imgsz"]


def test_builder_options_follow_kwargs_to_the_model_class():
    options = builder_options("yolo-n", "detect")
    assert options["close_mosaic"] == 10 and "num_classes" not in options
    assert builder_options("fcn8s", "segment")["upsample"] == "deconv"


def test_unknown_train_flags_become_typed_model_options():
    args = argparse.Namespace(model="yolo-n")
    assert model_options(args, ["--close-mosaic", "3", "--conf=0.25"]) == {"close_mosaic": 3, "conf": 0.25}
    assert model_options(argparse.Namespace(model="fcn16s"), ["--upsample", "bilinear"]) == {"upsample": "bilinear"}


def test_a_model_option_that_prefixes_a_train_flag_reaches_the_model():
    # --backbone is a prefix of train's --backbone-lr-mult: argparse must not take one for the other
    args, extra = build_parser().parse_known_args(
        ["train", "--model", "faster_rcnn_fpn", "--backbone", "mobilenet_v3_large", "--fpn-blocks", "[features.16]"])
    assert not hasattr(args, "backbone_lr_mult")
    assert model_options(args, extra) == {"backbone": "mobilenet_v3_large", "fpn_blocks": ["features.16"]}


@pytest.mark.parametrize("extra, message", [(["--nope", "1"], "unknown option --nope for model yolo-n"),
                                            (["--close-mosaic", "x"], "expects a int"),
                                            (["--close-mosaic"], "needs a value")])
def test_bad_model_options_say_what_the_model_takes(extra, message):
    with pytest.raises(CvforgeError, match=message):
        model_options(argparse.Namespace(model="yolo-n"), extra)


def test_model_options_are_stored_so_a_checkpoint_rebuilds_the_same_model():
    model = build_model("fcn8s", task="segment", num_classes=3, upsample="bilinear")
    assert model.cvforge_spec["kwargs"]["upsample"] == "bilinear"
