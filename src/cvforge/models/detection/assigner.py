"""Task-aligned assignment (TOOD, Feng et al., 2021), as used by anchor-free YOLO heads.

Which anchor points learn which object? A fixed rule (IoU with an anchor box, centre sampling)
ignores what the network currently predicts. The task-aligned assigner scores each (object, point)
pair by how well the point already does *both* tasks:

    t = s ** alpha * u ** beta

with s the predicted probability of the object's class and u the IoU of the predicted box with the
object. Among the points whose centre lies inside the object, the ``topk`` with the largest t are its
positives; a point claimed by several objects keeps the one it overlaps most. The classification
target of a positive is not 1 but t rescaled so that each object's best point gets that object's
best IoU — so the class score learns to rank boxes by localisation quality, which is what NMS and AP
reward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cvforge.boxes import paired_iou

EPS = 1e-9


@dataclass
class Assignment:
    """Targets per anchor point: labels int64 [B, A], boxes float [B, A, 4] (xyxy, input pixels),
    scores float [B, A, C] (soft class targets), foreground bool [B, A]."""

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    foreground: torch.Tensor


class TaskAlignedAssigner:
    """``assign(pred_scores, pred_boxes, points, gt_labels, gt_boxes, gt_valid) -> Assignment`` (module doc).

    pred_scores: [B, A, C] probabilities; pred_boxes: [B, A, 4] xyxy; points: [A, 2] (x, y);
    gt_labels: int64 [B, M]; gt_boxes: [B, M, 4] xyxy; gt_valid: bool [B, M] (batches are padded to M).
    Everything in the same (input) pixels; no gradients flow through the assignment.
    """

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0):
        self.topk, self.alpha, self.beta = topk, alpha, beta

    @torch.no_grad()
    def assign(self, pred_scores: torch.Tensor, pred_boxes: torch.Tensor, points: torch.Tensor,
               gt_labels: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor) -> Assignment:
        batch, anchors, classes = pred_scores.shape
        if gt_boxes.shape[1] == 0:  # no object in the whole batch: everything is background
            return Assignment(torch.zeros(batch, anchors, dtype=torch.long, device=points.device),
                              pred_boxes.new_zeros(batch, anchors, 4),
                              pred_scores.new_zeros(batch, anchors, classes),
                              torch.zeros(batch, anchors, dtype=torch.bool, device=points.device))
        inside = points_in_boxes(points, gt_boxes) & gt_valid[..., None]  # [B, M, A]
        metric, overlaps = self.alignment(pred_scores, pred_boxes, gt_labels, gt_boxes, inside)
        positive = self.top_candidates(metric, inside)
        positive, owner = resolve_conflicts(positive, overlaps)
        foreground = positive.any(1)  # [B, A]
        labels = gt_labels.gather(1, owner)  # [B, A]
        boxes = gt_boxes.gather(1, owner[..., None].expand(-1, -1, 4))
        # soft target: t / max t of the object * max IoU of the object, over its positives
        metric = metric * positive
        best_metric = metric.amax(2, keepdim=True)
        best_overlap = (overlaps * positive).amax(2, keepdim=True)
        quality = (metric * best_overlap / (best_metric + EPS)).amax(1)  # [B, A]
        scores = torch.zeros_like(pred_scores)
        scores.scatter_(2, labels[..., None], 1.0)
        scores = scores * (quality * foreground)[..., None]
        return Assignment(labels, boxes, scores, foreground)

    def alignment(self, pred_scores: torch.Tensor, pred_boxes: torch.Tensor, gt_labels: torch.Tensor,
                  gt_boxes: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B, M, A], IoU [B, M, A]), zero outside the candidate points."""
        cls_score = pred_scores.gather(2, gt_labels[:, None, :].expand(-1, pred_scores.shape[1], -1))
        cls_score = cls_score.transpose(1, 2)  # [B, M, A]: score of object m's class at point a
        overlaps = paired_iou(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]).clamp(min=0) * inside
        metric = cls_score.pow(self.alpha) * overlaps.pow(self.beta) * inside
        return metric, overlaps

    def top_candidates(self, metric: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """bool [B, M, A]: each object's ``topk`` points by t, among the points inside it."""
        k = min(self.topk, metric.shape[-1])
        top = metric.topk(k, dim=-1).indices
        chosen = torch.zeros_like(inside).scatter_(-1, top, True)
        return chosen & inside


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """bool [B, M, A]: point a lies strictly inside box m (points [A, 2], boxes [B, M, 4] xyxy)."""
    lt = points[None, None] - boxes[..., None, :2]
    rb = boxes[..., None, 2:] - points[None, None]
    return torch.cat([lt, rb], -1).amin(-1) > EPS


def resolve_conflicts(positive: torch.Tensor, overlaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A point claimed by several objects keeps the one with the highest IoU.

    positive: bool [B, M, A]; overlaps: [B, M, A]. Returns (positive with one object per point at
    most, owner int64 [B, A]: the object index of each point, 0 where it has none).
    """
    claims = positive.sum(1, keepdim=True)  # [B, 1, A]
    best = (overlaps * positive).argmax(1, keepdim=True)  # [B, 1, A]
    single = torch.zeros_like(positive).scatter_(1, best, True)
    positive = torch.where(claims > 1, single & positive, positive)
    owner = positive.to(torch.uint8).argmax(1)
    return positive, owner
