"""The whole model registry: one dict from model name to builder, and the task each model serves.

    model = build_model("resnet18", task="classify", num_classes=5)
    model.cvforge_spec  # {"name": "resnet18", "task": "classify", "kwargs": {"num_classes": 5}}

A builder takes keyword arguments whose defaults are the paper's values (the signature is the config)
and returns an ``nn.Module`` following DESIGN §3. ``cvforge_spec`` holds plain values only, so a
checkpoint stores it and ``build_model(spec["name"], task=spec["task"], **spec["kwargs"])`` rebuilds
the architecture from the file alone.

For ``classify``, any torchvision classification model name works (resnet18, mobilenet_v3_small,
efficientnet_b0, ...); the names listed below are the ones ``cvforge models`` shows.
To add a model: write its builder in its own file, then add one line to MODELS and one to MODEL_TASKS.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

from torch import nn

from cvforge.config import TASKS
from cvforge.errors import CvforgeError
from cvforge.models.backbones import classification_model_names
from cvforge.models.classifier import build_classifier
from cvforge.models.detection.fast_rcnn import fast_rcnn
from cvforge.models.detection.faster_rcnn import faster_rcnn, faster_rcnn_fpn
from cvforge.models.detection.mask_rcnn import mask_rcnn
from cvforge.models.detection.rcnn import rcnn
from cvforge.models.detection.sppnet import sppnet
from cvforge.models.detection.yolo import yolo_n, yolo_s
from cvforge.models.detection.yolov1 import build_yolov1
from cvforge.models.fcn import fcn8s, fcn16s, fcn32s


# Classifiers shown by `cvforge models` (small to large); every other torchvision name builds as well.
LISTED_CLASSIFIERS = (
    "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b3", "efficientnet_v2_s",
    "regnet_y_400mf", "regnet_y_1_6gf", "convnext_tiny", "vgg16_bn",
)

# name -> builder(*, num_classes, **kwargs) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(build_classifier, name) for name in LISTED_CLASSIFIERS},
    "fcn32s": fcn32s, "fcn16s": fcn16s, "fcn8s": fcn8s,  # segment (models/fcn.py)
    "yolo-n": yolo_n, "yolo-s": yolo_s, "yolov1": build_yolov1,  # detect (models/detection/yolo*.py)
    "faster_rcnn": faster_rcnn, "faster_rcnn_fpn": faster_rcnn_fpn,  # detect (models/detection/faster_rcnn.py)
    "mask_rcnn": mask_rcnn,  # instance (models/detection/mask_rcnn.py)
    "rcnn": rcnn, "sppnet": sppnet, "fast_rcnn": fast_rcnn,  # detect (models/detection/rcnn.py, sppnet.py, fast_rcnn.py)
}

# name -> the task its builder serves (same keys as MODELS)
MODEL_TASKS: dict[str, str] = {
    **{name: "classify" for name in LISTED_CLASSIFIERS},
    "fcn32s": "segment", "fcn16s": "segment", "fcn8s": "segment",
    "yolo-n": "detect", "yolo-s": "detect", "yolov1": "detect",
    "rcnn": "detect", "sppnet": "detect", "fast_rcnn": "detect",
    "faster_rcnn": "detect", "faster_rcnn_fpn": "detect", "mask_rcnn": "instance",
}

PLAIN_TYPES = (bool, int, float, str, type(None))


def builder_for(name: str, task: str) -> Callable[..., nn.Module]:
    """The builder of ``name`` for ``task``, or a CvforgeError saying what exists."""
    if task not in TASKS:
        raise CvforgeError(f"unknown task {task!r}", None, f"use one of {', '.join(TASKS)}")
    if MODEL_TASKS.get(name) == task:
        return MODELS[name]
    if task == "classify" and name in classification_model_names():
        return partial(build_classifier, name)
    names = ", ".join(n for n, t in list_models(task))
    hint = "; any torchvision classification model name also works" if task == "classify" else ""
    where = f"it is a {MODEL_TASKS[name]} model" if name in MODEL_TASKS else None
    raise CvforgeError(f"unknown {task} model {name!r}", where,
                       f"use one of {names or '(none yet)'}{hint} — `cvforge models` lists them")


def builder_options(name: str, task: str) -> dict[str, Any]:
    """The options model ``name`` takes besides num_classes, with their defaults. A builder's ``**kwargs``
    are passed on to the class it returns (its return annotation), so that class's options count too."""
    builder = builder_for(name, task)
    signature = inspect.signature(builder, eval_str=True)
    options = {n: p.default for n, p in signature.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    returned = signature.return_annotation
    if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()) and inspect.isclass(returned):
        forwarded = inspect.signature(returned.__init__).parameters.items()
        options |= {n: p.default for n, p in forwarded if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                    and n not in options}
    options.pop("num_classes", None)
    return options


def build_model(name: str, *, task: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``task``; sets ``model.cvforge_spec`` so a checkpoint can rebuild it.

    kwargs: the builder's keyword arguments; plain values only (bool, int, float, str, None, and
    lists/tuples/dicts of them), since they are stored in checkpoints loaded with weights_only=True.
    """
    builder = builder_for(name, task)
    for key, value in kwargs.items():
        if not _is_plain(value):
            raise CvforgeError(f"model option {key}={value!r} is not a plain value", None,
                               "pass numbers, strings, booleans or lists of them")
    try:
        inspect.signature(builder).bind(num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise CvforgeError(f"bad options for model {name} ({error})", None,
                           f"its builder takes {inspect.signature(builder)}") from None
    model = builder(num_classes=num_classes, **kwargs)
    model.cvforge_spec = {"name": name, "task": task, "kwargs": {"num_classes": num_classes, **kwargs}}
    return model


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return isinstance(value, PLAIN_TYPES)


def list_models(task: str | None = None) -> list[tuple[str, str]]:
    """(name, task) of every listed model, for one task or all, in registry order."""
    return [(name, t) for name, t in MODEL_TASKS.items() if task is None or t == task]
