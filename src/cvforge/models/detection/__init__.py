"""Detectors. Each file holds one method (its docstring says what the paper changed); shared parts live
beside them: ``assigner.py`` (task-aligned assignment), ``yolo_parts.py`` (CSP backbone, PAN neck,
decoupled head). Build them by name through ``cvforge.zoo``."""
from cvforge.models.detection.yolo import YOLO, build_yolo, yolo_n, yolo_s
from cvforge.models.detection.yolov1 import YOLOv1, build_yolov1

__all__ = ["YOLO", "YOLOv1", "build_yolo", "build_yolov1", "yolo_n", "yolo_s"]
