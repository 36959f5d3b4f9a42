"""Semantic segmentation metrics, all from one confusion matrix over pixels (FCN paper §5):

    evaluator = SegmentationEvaluator(num_classes=6, class_names=[...])
    for images, targets in loader:
        evaluator.update(model(images), targets)   # {"masks": [B, H, W]}, {"mask": [B, H, W]}
    evaluator.sync()                               # under DDP: sum the counts of every rank
    metrics = evaluator.compute()

With n_ij the pixels of true class i predicted as j, t_i = sum_j n_ij and p_j = sum_i n_ij:
    pixel_acc = sum_i n_ii / sum_i t_i
    mean_acc  = mean_i n_ii / t_i                        over classes present in the ground truth
    IoU_i     = n_ii / (t_i + p_i - n_ii)
    mIoU      = mean_i IoU_i                              over classes present in the ground truth *or*
                                                          the prediction (absent from both: 0/0, left out)
    fwIoU     = sum_i t_i IoU_i / sum_i t_i              (frequency-weighted IoU)
Pixels labelled 255 (IGNORE) are not counted at all. A class predicted but never present in the
ground truth has IoU 0 and counts in mIoU (false positives are mistakes); its accuracy is undefined
(0/0) and it is left out of mean_acc. Per-class values that are 0/0 are NaN.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from cvforge.data.dataset import IGNORE

SUMMARY_KEYS = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")


class SegmentationEvaluator:
    """Accumulates ``confusion``: int64 [C, C], rows = true class, columns = predicted class."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | list[dict]) -> None:
        """predictions {"masks": int64 [B, H, W]} (or only {"scores": float [B, C, H, W]}, argmax taken);
        targets {"mask": int64 [B, H, W]} or B dicts {"mask": [H, W]}, 255 = ignore."""
        predicted = predictions["masks"] if "masks" in predictions else predictions["scores"].argmax(dim=1)
        if isinstance(targets, dict):
            truth = torch.as_tensor(targets["mask"])
        else:
            truth = torch.stack([torch.as_tensor(t["mask"]) for t in targets])
        predicted, truth = predicted.detach().cpu().long(), truth.detach().cpu().long()
        if predicted.shape != truth.shape:
            raise ValueError(f"predicted masks {tuple(predicted.shape)} and true masks {tuple(truth.shape)} differ")
        valid = truth != IGNORE
        truth, predicted = truth[valid], predicted[valid]
        c = self.num_classes
        if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= c):
            raise ValueError(f"true labels must be in 0..{c - 1} or {IGNORE}, got {int(truth.max())}")
        self.confusion += torch.bincount(truth * c + predicted, minlength=c * c).view(c, c)

    def sync(self) -> None:
        """Sum the counts of all ranks (no-op unless torch.distributed is initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = self.confusion.to(device)
        dist.all_reduce(tensor)
        self.confusion = tensor.cpu()

    def per_class(self) -> dict[str, torch.Tensor]:
        """float64 [C] tensors: "IoU", "acc" (NaN where 0/0), "pixels" (true pixels per class)."""
        n = self.confusion.double()
        hits, true, predicted = n.diagonal(), n.sum(dim=1), n.sum(dim=0)
        union = true + predicted - hits
        nan = torch.full_like(hits, math.nan)
        iou = torch.where(union > 0, hits / union.clamp(min=1), nan)
        acc = torch.where(true > 0, hits / true.clamp(min=1), nan)
        return {"IoU": iou, "acc": acc, "pixels": true}

    def compute(self) -> dict[str, float]:
        """{"mIoU", "pixel_acc", "mean_acc", "fwIoU", "IoU/<name>", "acc/<name>"}, fractions in 0..1;
        NaN where nothing was counted."""
        classes = self.per_class()
        iou, acc, true = classes["IoU"], classes["acc"], classes["pixels"]
        total = float(true.sum())
        present = ~iou.isnan()
        metrics = {
            "mIoU": float(iou[present].mean()) if present.any() else math.nan,
            "pixel_acc": float(self.confusion.diagonal().sum()) / total if total else math.nan,
            "mean_acc": float(acc[~acc.isnan()].mean()) if total else math.nan,
            "fwIoU": float((true * iou.nan_to_num(0.0)).sum()) / total if total else math.nan,
        }
        for i, name in enumerate(self.class_names):
            metrics[f"IoU/{name}"] = float(iou[i])
        for i, name in enumerate(self.class_names):
            metrics[f"acc/{name}"] = float(acc[i])
        return metrics
