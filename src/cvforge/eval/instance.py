"""Instance segmentation evaluation: COCO mask AP (pycocotools, iouType "segm") beside box AP.

    evaluator = InstanceEvaluator(classes)
    evaluator.update(predictions, targets)   # per batch
    metrics = evaluator.compute()            # DetectionEvaluator's keys + "mask_mAP50-95", "mask_mAP50", ...

predictions: per image {"boxes" [K, 4], "scores" [K], "labels" [K], "masks" [K, H, W] (0/1 or
probabilities, thresholded at 0.5)}; targets: the data set's dicts with "masks" uint8 [N, H, W] in the
same (original image) pixels. Everything about boxes is ``DetectionEvaluator``'s, unchanged. Masks are
run-length encoded (pycocotools) as they arrive, so a split's masks cost little memory. Mask AP is
reported only when every image had masks on both sides (a detector without a mask branch evaluated on
an instance data set gets box AP alone). The mask numbers are ``COCOeval`` with iouType "segm" (object
area = mask area) from the same backend as box AP (``detection.coco_backend``: faster-coco-eval, else
pycocotools; the test checks them against pycocotools' own), keyed as the box ones with a ``mask_`` prefix.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch

from cvforge.boxes import xyxy_to_xywh
from cvforge.eval.detection import COCO_KEYS, DetectionEvaluator, _coco, coco_backend

MASK_THRESHOLD = 0.5  # a probability mask becomes binary here


class InstanceEvaluator(DetectionEvaluator):
    """Box metrics from ``DetectionEvaluator`` plus COCO mask AP (module doc)."""

    def reset(self) -> None:
        super().reset()
        self.segments: list[tuple[list, list] | None] = []  # per image: (gt RLEs, prediction RLEs) or None
        self.mask_stats = np.full(12, -1.0)

    def update(self, predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        super().update(predictions, targets)
        for prediction, target in zip(predictions, targets):
            if "masks" in prediction and "masks" in target:
                self.segments.append((encode_masks(target["masks"]), encode_masks(prediction["masks"])))
            else:
                self.segments.append(None)

    def compute(self) -> dict[str, float]:
        metrics = super().compute()
        if not self.segments or any(s is None for s in self.segments):
            return metrics
        self.mask_stats = coco_mask_evaluate(self.images, self.segments, len(self.classes))
        for key, value in zip(COCO_KEYS, self.mask_stats):
            metrics[f"mask_{key}"] = float(value) if value >= 0 else math.nan
        return metrics


def encode_masks(masks: Any) -> list[dict]:
    """[N, H, W] (uint8/bool 0/1, or float probabilities) -> N compressed COCO RLEs."""
    from pycocotools import mask as mask_utils
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        masks = (masks.float() >= MASK_THRESHOLD) if masks.is_floating_point() else masks != 0
        masks = masks.numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def coco_mask_evaluate(images: list[dict[str, np.ndarray]], segments: list[tuple[list, list]],
                       num_classes: int) -> np.ndarray:
    """COCOeval's 12 summary numbers of mask AP. images: ``DetectionEvaluator.images`` (labels,
    scores, boxes, crowd flags); segments: per image (gt RLEs, prediction RLEs) in the same order."""
    from pycocotools import mask as mask_utils
    COCO, make_eval = coco_backend()
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    gt: dict[str, list] = {"images": [], "annotations": [], "categories": categories}
    dets: list[dict] = []
    for image_id, (image, (gt_rles, det_rles)) in enumerate(zip(images, segments), start=1):
        height, width = next(iter(gt_rles or det_rles or [{"size": [0, 0]}]))["size"]
        gt["images"].append({"id": image_id, "height": height, "width": width})  # read by annToRLE
        rows = zip(gt_rles, xyxy_to_xywh(torch.from_numpy(image["gt_boxes"])).tolist(),
                   image["gt_labels"].tolist(), image["iscrowd"].tolist())
        for rle, box, label, crowd in rows:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "bbox": box,
                                      "segmentation": rle, "area": float(mask_utils.area(rle)),
                                      "category_id": label + 1, "iscrowd": int(crowd)})
        rows = zip(det_rles, xyxy_to_xywh(torch.from_numpy(image["boxes"])).tolist(),
                   image["scores"].tolist(), image["labels"].tolist())
        for rle, box, score, label in rows:
            dets.append({"id": len(dets) + 1, "image_id": image_id, "bbox": box, "score": score,
                         "segmentation": rle, "area": float(mask_utils.area(rle)),
                         "category_id": label + 1, "iscrowd": 0})
    evaluator = make_eval(_coco(COCO, gt), _coco(COCO, {**gt, "annotations": dets}), "segm")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:12], dtype=np.float64)  # faster-coco-eval appends more
