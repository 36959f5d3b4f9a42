"""Detection evaluation shared by every detector: COCO mAP through pycocotools, VOC AP, PR curves and a
confusion matrix.

    evaluator = DetectionEvaluator(classes)
    evaluator.update(predictions, targets)   # per batch
    metrics = evaluator.compute()            # {"mAP50-95", "mAP50", "mAP75", ..., "AP/<class>", "VOC07_AP50", ...}

predictions: list of per-image dicts {"boxes" float [N, 4] xyxy in original pixels, "scores" float [N],
"labels" int64 [N] 0-based}; targets: the data set's dicts {"boxes" [M, 4], "labels" [M], optional
"iscrowd" bool [M], "difficult" bool [M]}, in the same pixels.

COCO numbers are ``COCOeval`` on an in-memory COCO object (ground-truth area = box area, since a
detection data set need not have masks): faster-coco-eval's C++ port of pycocotools when it is
installed (a dependency; ~6x faster on 128 images x 300 detections, which makes it ~1 s of a small
detector's epoch), else pycocotools' own; both give the same numbers (``tests/test_eval_detection.py``
checks cvforge's against pycocotools' directly), so they are exactly what pycocotools reports:
``coco_stats`` keeps its 12 summary numbers (-1 where nothing of that area exists); ``compute``
reports them under readable keys, with -1 as NaN. VOC AP (IoU 0.5, "difficult" boxes ignored, as in
the VOC devkit) is computed here: the 11-point interpolation of VOC2007 and the all-point area of
VOC2010+.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch

from cvforge.boxes import box_iou, xyxy_to_xywh

# pycocotools' summary numbers, in its order.
COCO_KEYS = ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
             "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
CONFUSION_CONF = 0.25  # the confusion matrix counts detections at least this confident
CONFUSION_IOU = 0.45


class DetectionEvaluator:
    """Accumulates predictions and ground truth over a data split; ``compute`` scores them (module doc)."""

    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        self.reset()

    def reset(self) -> None:
        self.images: list[dict[str, np.ndarray]] = []  # per image: gt + predictions as numpy
        self.coco_stats = np.full(12, -1.0)
        self.per_class_ap = np.full(len(self.classes), math.nan)
        self.curves: list[tuple[np.ndarray, np.ndarray]] = []  # per class (recall, precision) at IoU 0.5
        n = len(self.classes) + 1  # last row / column: background (missed object / false detection)
        self.confusion = np.zeros((n, n), dtype=np.int64)

    def update(self, predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        for prediction, target in zip(predictions, targets, strict=True):
            gt_boxes = _numpy(target["boxes"], np.float64).reshape(-1, 4)
            n = len(gt_boxes)
            self.images.append({
                "gt_boxes": gt_boxes, "gt_labels": _numpy(target["labels"], np.int64).reshape(-1),
                "iscrowd": _flags(target.get("iscrowd"), n), "difficult": _flags(target.get("difficult"), n),
                "boxes": _numpy(prediction["boxes"], np.float64).reshape(-1, 4),
                "scores": _numpy(prediction["scores"], np.float64).reshape(-1),
                "labels": _numpy(prediction["labels"], np.int64).reshape(-1),
            })
            self._update_confusion(self.images[-1])

    def compute(self) -> dict[str, float]:
        """COCO summary (12 numbers), per-class AP@[.5:.95], VOC07 11-point and all-point AP50."""
        metrics: dict[str, float] = {}
        self.coco_stats, self.per_class_ap = coco_evaluate(self.images, len(self.classes))
        for key, value in zip(COCO_KEYS, self.coco_stats):
            metrics[key] = float(value) if value >= 0 else math.nan
        for name, ap in zip(self.classes, self.per_class_ap):
            metrics[f"AP/{name}"] = float(ap)
        voc07, voc12, self.curves = [], [], []
        for k in range(len(self.classes)):
            recall, precision, has_gt = class_pr(self.images, k)
            self.curves.append((recall, precision))
            if has_gt:
                voc07.append(voc_ap(recall, precision, eleven_point=True))
                voc12.append(voc_ap(recall, precision, eleven_point=False))
        metrics["VOC07_AP50"] = float(np.mean(voc07)) if voc07 else math.nan
        metrics["VOC_AP50"] = float(np.mean(voc12)) if voc12 else math.nan
        return metrics

    def _update_confusion(self, image: dict[str, np.ndarray]) -> None:
        """Greedy one-to-one matching of confident detections to objects at IoU >= CONFUSION_IOU, any class."""
        background = len(self.classes)
        keep = image["scores"] >= CONFUSION_CONF
        boxes, labels = image["boxes"][keep], image["labels"][keep]
        gt_labels = image["gt_labels"]
        matched_gt, matched_det = set(), set()
        if len(boxes) and len(gt_labels):
            iou = box_iou(torch.from_numpy(image["gt_boxes"]), torch.from_numpy(boxes)).numpy()
            for flat in np.argsort(-iou, axis=None):
                g, d = divmod(int(flat), iou.shape[1])
                if iou[g, d] < CONFUSION_IOU:
                    break
                if g in matched_gt or d in matched_det:
                    continue
                matched_gt.add(g)
                matched_det.add(d)
                self.confusion[gt_labels[g], labels[d]] += 1
        for g in set(range(len(gt_labels))) - matched_gt:
            self.confusion[gt_labels[g], background] += 1
        for d in set(range(len(labels))) - matched_det:
            self.confusion[background, labels[d]] += 1


def _numpy(value: Any, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
        return value.numpy().astype(dtype)
    return np.asarray(value, dtype=dtype)


def _flags(value: Any, n: int) -> np.ndarray:
    if value is None:
        return np.zeros(n, dtype=bool)
    flags = _numpy(value, bool).reshape(-1)
    return flags if len(flags) == n else np.zeros(n, dtype=bool)


# --------------------------------------------------------------------------------------------- COCO
def coco_backend() -> tuple[type, Any]:
    """(COCO class, ``make_eval(gt, dt, iou_type)``): faster-coco-eval's when installed, else pycocotools'."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    return COCO, lambda gt, dt, iou_type: COCOeval_faster(gt, dt, iou_type, print_function=_quiet)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval's print function: nothing (its summary would interleave with the progress bars)."""


def coco_objects(images: list[dict[str, np.ndarray]], num_classes: int, COCO: type) -> tuple[Any, Any]:
    """(ground truth, detections) as ``COCO`` objects (pycocotools' or faster-coco-eval's class); image
    ids 1..N in update order, category ids 1..C (COCO's are positive), bbox xywh, area = box area."""
    gt = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    dets = []
    for image_id, image in enumerate(images, start=1):
        gt["images"].append({"id": image_id})
        for box, label, crowd in zip(xyxy_to_xywh(torch.from_numpy(image["gt_boxes"])).tolist(),
                                     image["gt_labels"].tolist(), image["iscrowd"].tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "bbox": box,
                                      "category_id": label + 1, "area": box[2] * box[3], "iscrowd": int(crowd)})
        for box, score, label in zip(xyxy_to_xywh(torch.from_numpy(image["boxes"])).tolist(),
                                     image["scores"].tolist(), image["labels"].tolist()):
            dets.append({"id": len(dets) + 1, "image_id": image_id, "bbox": box, "score": score,
                         "category_id": label + 1, "area": box[2] * box[3], "iscrowd": 0})
    return _coco(COCO, gt), _coco(COCO, {**gt, "annotations": dets})


def _coco(COCO: type, dataset: dict) -> Any:
    """A COCO object from a dict, without pycocotools' prints (``COCO.loadRes`` refuses an empty list,
    so detections are built the same way as ground truth)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def coco_evaluate(images: list[dict[str, np.ndarray]], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(COCOeval's 12 summary numbers, per-class AP@[.5:.95] [C], NaN for a class without ground truth)."""
    if not images:
        return np.full(12, -1.0), np.full(num_classes, math.nan)
    COCO, make_eval = coco_backend()
    gt, dt = coco_objects(images, num_classes, COCO)
    evaluator = make_eval(gt, dt, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: [T iou thresholds, R recall points, K classes, A areas, M max dets]; area "all", 100 dets
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = np.full(num_classes, math.nan)
    for k, category in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        if (values > -1).any():
            per_class[category - 1] = float(values[values > -1].mean())
    return np.asarray(evaluator.stats[:12], dtype=np.float64), per_class


# --------------------------------------------------------------------------------------------- VOC
def class_pr(images: list[dict[str, np.ndarray]], k: int, iou_threshold: float = 0.5
             ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(recall, precision) over the detections of class ``k`` sorted by score, and whether the class has
    ground truth. VOC devkit rules: each object matches at most one detection (the most confident
    first); a detection on a "difficult" (or crowd) object is neither true nor false positive."""
    scores, hits, positives = [], [], 0
    for image in images:
        is_k = image["gt_labels"] == k
        gt = image["gt_boxes"][is_k]
        ignore = (image["difficult"] | image["iscrowd"])[is_k]
        positives += int((~ignore).sum())
        mine = image["labels"] == k
        order = np.argsort(-image["scores"][mine], kind="stable")
        boxes, image_scores = image["boxes"][mine][order], image["scores"][mine][order]
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).numpy() if len(gt) else None
        taken = np.zeros(len(gt), dtype=bool)
        for d in range(len(boxes)):
            g = int(iou[d].argmax()) if iou is not None else -1
            if g >= 0 and iou[d, g] >= iou_threshold and ignore[g]:
                continue
            hit = g >= 0 and iou[d, g] >= iou_threshold and not taken[g]
            if hit:
                taken[g] = True
            scores.append(image_scores[d])
            hits.append(hit)
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.cumsum(np.asarray(hits, dtype=np.float64)[order])
    fp = np.cumsum(1.0 - np.asarray(hits, dtype=np.float64)[order])
    recall = tp / max(positives, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, positives > 0


def voc_ap(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """Average precision from a PR curve: VOC2007's mean of the best precision at recall >= 0, 0.1, ..., 1
    (``eleven_point``), or the area under the monotone (interpolated) curve of VOC2010+."""
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope: best precision at any higher recall
    changes = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[changes + 1] - r[changes]) * p[changes + 1]))


# --------------------------------------------------------------------------------------------- plots
def plot_pr_curves(curves: list[tuple[np.ndarray, np.ndarray]], classes: list[str], path: Any) -> Any:
    """Write the precision-recall curve of each class at IoU 0.5 (all-point AP in the legend) as a PNG."""
    from matplotlib.figure import Figure
    from pathlib import Path
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for name, (recall, precision) in zip(classes, curves):
        if len(recall):
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            ax.plot(recall, envelope, label=f"{name} {voc_ap(recall, precision):.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall, IoU 0.5")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path
