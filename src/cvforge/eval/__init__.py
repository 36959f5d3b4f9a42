"""Evaluators, one per task, each with ``reset()``, ``update(predictions, targets)``, ``compute()``."""
from __future__ import annotations

from typing import Any

from cvforge.errors import CvforgeError
from cvforge.eval.classification import ClassificationEvaluator

__all__ = ["ClassificationEvaluator", "build_evaluator"]


def build_evaluator(task: str, classes: list[str]) -> Any:
    """The evaluator of a task; ``classes`` are the data set's class names (0-based ids)."""
    if task == "classify":
        return ClassificationEvaluator(len(classes), classes)
    if task == "segment":
        from cvforge.eval.segmentation import SegmentationEvaluator
        return SegmentationEvaluator(len(classes), classes)
    if task == "detect":
        from cvforge.eval.detection import DetectionEvaluator
        return DetectionEvaluator(classes)
    if task == "instance":  # box AP and, when predictions carry masks, COCO mask AP
        from cvforge.eval.instance import InstanceEvaluator
        return InstanceEvaluator(classes)
    raise CvforgeError(f"task {task!r} has no evaluator yet", None, "use --task classify")
