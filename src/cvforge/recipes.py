"""Training recipes: the settings each model trains best with, used wherever the user chose nothing.

``cvforge train`` with no arguments has to do the right thing, and so does ``cvforge train --model
fcn8s --data my_masks/``: a detector wants AdamW, warm-up and an EMA; a segmentation network at the
size of the user's images, not at 224. ``resolve_config`` turns what the user gave (CLI flags or
``cvforge.train`` keywords) into a complete ``TrainConfig`` in this order, later winning:

    TrainConfig defaults  <  the model family's RECIPE  <  what the user passed

and fills in the three blanks: the task (from the model, else from the data: ``shapes`` is detection),
the model (the task's default) and, for dense tasks, the image size (the data's own size, rounded up
to a multiple of 32, at most the recipe's ``imgsz``), so 128-px images are not blown up to 640.
"""
from __future__ import annotations

import statistics
from typing import Any

from cvforge.config import TrainConfig

# The model `cvforge train --task T` builds when --model is not given.
DEFAULT_MODELS = {"classify": "resnet18", "segment": "fcn8s", "detect": "yolo-n", "instance": "mask_rcnn"}

# Model-name prefix -> TrainConfig fields. imgsz is an upper bound for the tasks that follow the data's size.
RECIPES: dict[str, dict[str, Any]] = {
    # the modern YOLO recipe (short runs): AdamW, 3 warm-up epochs, weight EMA; mosaic is the model's hook.
    # lr 0.002: the demo's 4.5 minutes ended higher than at 0.003 in each of 4 seeds (mAP50 0.78 vs 0.66 on
    # average, BENCHMARKS.md); the GPU sweep's best 30-epoch variant had 0.002 too
    "yolo-": {"optimizer": "adamw", "lr": 0.002, "warmup_epochs": 3.0, "ema": True, "ema_decay": 0.9999,
              "imgsz": 640, "batch": 16},
    "yolov1": {"optimizer": "adamw", "lr": 0.001, "warmup_epochs": 2.0, "imgsz": 448},
    # FCN: AdamW converges in a CPU-sized run where the paper's SGD (lr 1e-4, batch 1) takes days
    "fcn": {"optimizer": "adamw", "lr": 0.004, "warmup_epochs": 1.0, "imgsz": 512, "batch": 8},
}
DATA_SIZED_TASKS = ("segment", "detect", "instance")
SIZE_STEP = 32  # every detector's and FCN's largest stride
# Families whose input side must be a multiple of more: YOLOv1 pools its stride-16 features to a 7 x 7 grid,
# exactly (and exportable to ONNX) only when the side is a multiple of 16 * 7.
SIZE_STEPS = {"yolov1": 112}


def recipe_for(model: str) -> dict[str, Any]:
    """The recipe of ``model``'s family (longest matching prefix), or {}."""
    family = _family(model, RECIPES)
    return dict(RECIPES[family]) if family else {}


def _family(model: str, table: dict[str, Any]) -> str | None:
    """The longest key of ``table`` that ``model`` starts with (a model family), or None."""
    return max((prefix for prefix in table if model.startswith(prefix)), key=len, default=None)


def resolve_config(options: dict[str, Any]) -> TrainConfig:
    """User options (TrainConfig field names) -> a complete config for a new run (module docstring)."""
    given = TrainConfig.from_dict(options)  # checks names and types before anything is read
    task, model = resolve_model(given.model, given.task, given.data)
    recipe = recipe_for(model)
    values = {**recipe, **options, "task": task, "model": model}
    if "imgsz" not in options and task in DATA_SIZED_TASKS:
        step = SIZE_STEPS.get(_family(model, SIZE_STEPS), SIZE_STEP)
        values["imgsz"] = data_imgsz(given.data, task, recipe.get("imgsz", TrainConfig.imgsz), step=step)
    return TrainConfig.from_dict(values)


def resolve_model(model: str, task: str, data: str) -> tuple[str, str]:
    """(task, model) with the blanks filled: the task from the model or the data, the task's default model."""
    task = task or _task_of(model, data)
    return task, model or DEFAULT_MODELS[task]


def _task_of(model: str, data: str) -> str:
    from cvforge.zoo import MODEL_TASKS
    if model in MODEL_TASKS:
        return MODEL_TASKS[model]
    if model:  # any other name is a torchvision classifier (the zoo says so if it is not)
        return "classify"
    from cvforge.data import resolve
    return resolve(data).default_task()


def data_imgsz(data: str, task: str, largest: int, probe: int = 64, step: int = SIZE_STEP) -> int:
    """The median longer side of up to ``probe`` training images, rounded up to a multiple of 32, capped at
    ``largest``, then down to a multiple of ``step`` if that is coarser (read from the image headers only)."""
    from cvforge.data import build_dataset
    from cvforge.data.io import image_size
    samples = build_dataset(data, "train", task).samples
    stride = max(1, len(samples) // probe)
    sides = [max(image_size(sample.image)) for sample in samples[::stride][:probe]]
    if not sides:
        return largest
    side = min(largest, -(-int(statistics.median(sides)) // SIZE_STEP) * SIZE_STEP)
    return max(step, side // step * step)  # a coarser step rounds down: 128-px images -> 112 for YOLOv1, not 224
