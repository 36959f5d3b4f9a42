"""The region head shared by SPPNet, Fast R-CNN and Faster R-CNN (and R-CNN's fine-tuning classifier):
pooled region features -> two fc layers -> (C + 1)-way class scores and class-specific box deltas.

    head = TwoFCHead(in_features=256 * 7 * 7, hidden=1024)
    predictor = BoxPredictor(1024, num_classes)                     # adds the background class itself
    logits, deltas = predictor(head(pooled))                        # [R, C + 1], [R, 4 (C + 1)]
    losses = fast_rcnn_loss(logits, deltas, labels, targets)        # {"cls", "box"}
    detections = postprocess(logits, deltas, regions, sizes, BoxCoder(), 0.05, 0.5, 100)

Fast R-CNN's multi-task loss (Girshick, 2015, eq. 1): L = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v), with
log loss over C + 1 classes and smooth L1 on the deltas of the true class u, both averaged over the R regions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, remove_small_boxes

from cvforge.boxes import BoxCoder, clip_boxes


class TwoFCHead(nn.Sequential):
    """Pooled features [R, ...] (flattened to [R, in_features]) -> [R, hidden]: fc -> ReLU -> fc -> ReLU
    (fc6 and fc7 of the papers' VGG/AlexNet), with optional dropout after each ReLU as in those nets."""

    def __init__(self, in_features: int, hidden: int = 1024, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.out_features = hidden


class BoxPredictor(nn.Module):
    """[R, hidden] -> (class_logits [R, C + 1], box_deltas [R, 4 (C + 1)]); column 0 is background,
    class c (0-based) is column c + 1. Initialised as Fast R-CNN: N(0, 0.01) scores, N(0, 0.001) deltas."""

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(hidden, num_classes + 1)
        self.bbox_pred = nn.Linear(hidden, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
                   regression_targets: torch.Tensor, box_weight: float = 1.0,
                   beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Multi-task loss: class_logits [R, C + 1], box_deltas [R, 4 (C + 1)], labels int64 [R] (0 background,
    class + 1 foreground), regression_targets [R, 4] -> {"cls": cross-entropy, "box": box_weight x smooth L1
    (``beta``; the paper's 1.0) on the true class's deltas of foreground regions}, both divided by R.
    R = 0 gives zero losses that still backpropagate (an image batch with nothing sampled)."""
    if labels.numel() == 0:
        zero = class_logits.sum() * 0 + box_deltas.sum() * 0
        return {"cls": zero, "box": zero}
    cls = F.cross_entropy(class_logits.float(), labels)
    foreground = (labels > 0).nonzero().squeeze(1)
    deltas = box_deltas.float().reshape(labels.numel(), -1, 4)[foreground, labels[foreground]]
    box = F.smooth_l1_loss(deltas, regression_targets[foreground].float(), beta=beta, reduction="sum")
    return {"cls": cls, "box": box_weight * box / labels.numel()}


@torch.no_grad()
def postprocess(class_logits: torch.Tensor, box_deltas: torch.Tensor | None, regions: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], coder: BoxCoder, score_thresh: float | torch.Tensor = 0.05,
                nms: float = 0.5, max_det: int = 100, softmax: bool = True) -> list[dict[str, torch.Tensor]]:
    """Detections per image: scores, class-specific boxes, per-class NMS.

    class_logits [R, C + 1] (``softmax=False``: already scores, e.g. R-CNN's SVM outputs squashed to 0..1),
    box_deltas [R, 4 (C + 1)] or None (no regression: the region itself), regions per image [R_i, 4] and
    image_sizes per image (H, W), both in the frame the regions are in (boxes are clipped to it; ints, or
    0-dim tensors in an ONNX trace).
    Returns per image {"boxes" float [K, 4] xyxy, "scores" [K], "labels" int64 [K] 0-based}, K <= max_det,
    sorted by score.
    """
    scores = class_logits.float().softmax(-1) if softmax else class_logits.float()
    all_regions = torch.cat(regions) if regions else class_logits.new_zeros(0, 4)
    if box_deltas is None:
        boxes = all_regions.float()[:, None, :].expand(-1, scores.shape[1], -1)
    else:  # shapes from tensors, not len(): an ONNX trace keeps them dynamic
        boxes = coder.decode(box_deltas, all_regions).reshape(-1, scores.shape[1], 4)
    if len(regions) == 1:  # one image (as in an exported graph): no split, whose sizes a trace would freeze
        per_image = [(scores, boxes)]
    else:
        counts = [len(r) for r in regions]
        per_image = list(zip(scores.split(counts), boxes.split(counts)))
    return [_select(s, clip_boxes(b, *size), score_thresh, nms, max_det)
            for (s, b), size in zip(per_image, image_sizes)]


def _select(scores: torch.Tensor, boxes: torch.Tensor, score_thresh: float | torch.Tensor, nms: float,
            max_det: int) -> dict[str, torch.Tensor]:
    """One image: scores [R, C + 1], boxes [R, C + 1, 4] -> its detections (background column dropped)."""
    num_classes = scores.shape[1] - 1
    labels = torch.arange(num_classes, device=scores.device).expand(scores.shape[0], -1)
    scores, boxes, labels = scores[:, 1:].reshape(-1), boxes[:, 1:].reshape(-1, 4), labels.reshape(-1)
    keep = (scores > score_thresh).nonzero().squeeze(1)
    scores, boxes, labels = scores[keep], boxes[keep], labels[keep]
    keep = remove_small_boxes(boxes, 1e-2)
    scores, boxes, labels = scores[keep], boxes[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms)[:max_det]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
