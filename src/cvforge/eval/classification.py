"""Classification metrics: top-1, top-k and per-class accuracy from a confusion matrix.

    evaluator = ClassificationEvaluator(num_classes=5, class_names=[...])
    for images, targets in loader:
        evaluator.update(model(images), targets)   # {"scores": [B, C]}, {"label": [B]}
    evaluator.sync()                               # under DDP: sum the counts of every rank
    metrics = evaluator.compute()                  # {"top1", "top5", "per_class/<name>"}

Everything accumulates in integer tensors (a [C, C] confusion matrix and a top-k hit count), so the
result does not depend on batch sizes and DDP needs one all_reduce per tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class ClassificationEvaluator:
    """Accumulates predictions of a ``num_classes``-way classifier.

    ``confusion``: int64 [C, C], rows = true class, columns = predicted (top-1) class.
    ``topk_hits``: int64 [], images whose true class is among the ``k = min(5, C)`` highest scores.
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.k = min(5, num_classes)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.topk_hits = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self, predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | list[dict]) -> None:
        """predictions {"scores": float [B, C]}; targets {"label": int64 [B]} or B dicts {"label": int64 []}."""
        scores = predictions["scores"].detach().float().cpu()
        if isinstance(targets, dict):
            labels = torch.as_tensor(targets["label"]).reshape(-1)
        else:
            labels = torch.stack([torch.as_tensor(t["label"]).reshape(()) for t in targets])
        labels = labels.to(torch.int64).cpu()
        if scores.shape != (len(labels), self.num_classes):
            raise ValueError(f"scores of shape {tuple(scores.shape)} for {len(labels)} labels "
                             f"and {self.num_classes} classes")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}")
        predicted = scores.argmax(dim=1)
        self.confusion += torch.bincount(labels * self.num_classes + predicted,
                                         minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)
        topk = scores.topk(self.k, dim=1).indices
        self.topk_hits += (topk == labels[:, None]).any(dim=1).sum()

    def sync(self) -> None:
        """Sum the counts of all ranks (no-op unless torch.distributed is initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        for name in ("confusion", "topk_hits"):
            tensor = getattr(self, name).to(device)
            dist.all_reduce(tensor)
            setattr(self, name, tensor.cpu())

    def compute(self) -> dict[str, float]:
        """{"top1", "top5" (top-min(5, C)), "per_class/<name>": accuracy of that class}, fractions in 0..1.

        NaN where there is nothing to count (no images at all, or none of that class).
        """
        total = int(self.confusion.sum())
        per_class_total = self.confusion.sum(dim=1)
        metrics = {
            "top1": self.confusion.trace().item() / total if total else float("nan"),
            "top5": self.topk_hits.item() / total if total else float("nan"),
        }
        for i, name in enumerate(self.class_names):
            count = int(per_class_total[i])
            metrics[f"per_class/{name}"] = int(self.confusion[i, i]) / count if count else float("nan")
        return metrics
