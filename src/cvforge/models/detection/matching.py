"""Which region learns what: the IoU matcher, the balanced sampler, and per-image region sampling.

Shared by every region-based detector (R-CNN, SPPNet, Fast/Faster R-CNN, the RPN):

    matcher = Matcher(high=0.5, low=0.5)             # Fast R-CNN: IoU >= 0.5 foreground, below background
    sampler = BalancedSampler(per_image=64, positive_fraction=0.25)
    regions, labels, deltas = sample_regions(proposals, targets, matcher, sampler, BoxCoder(), bg_low=0.1)

Label convention inside the region-based models: 0 = background, class id + 1 = foreground, -1 = ignore.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

from cvforge.boxes import BoxCoder


class Matcher:
    """Assigns each proposal the ground-truth box it overlaps most, if the overlap is high enough.

    For IoU matrix ``iou`` [M gt, N proposals] returns int64 [N]: the index of the matched gt where the best
    IoU >= ``high``; ``BELOW_LOW`` (-1) where it is < ``low``; ``BETWEEN`` (-2) where ``low`` <= IoU < ``high``.
    With M = 0 every proposal is ``BELOW_LOW``. ``allow_low_quality`` (Faster R-CNN's RPN) also matches, for
    each gt, the proposals with the highest IoU with it (ties included), even below ``high``, so every
    object gets at least one positive.
    """

    BELOW_LOW = -1
    BETWEEN = -2

    def __init__(self, high: float, low: float, allow_low_quality: bool = False):
        if low > high:
            raise ValueError(f"Matcher needs low <= high, got low={low}, high={high}")
        self.high, self.low, self.allow_low_quality = high, low, allow_low_quality

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), self.BELOW_LOW, dtype=torch.int64, device=iou.device)
        best, matched = iou.max(dim=0)
        result = matched.clone()
        result[best < self.high] = self.BETWEEN
        result[best < self.low] = self.BELOW_LOW
        if self.allow_low_quality:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            _, prop_idx = ((iou == best_per_gt) & (best_per_gt > 0)).nonzero(as_tuple=True)
            result[prop_idx] = matched[prop_idx]  # the proposal's own best gt, as torchvision does
        return result


class BalancedSampler:
    """Draws at most ``per_image`` regions, at most ``positive_fraction`` of them foreground, the rest
    background (filling up when foreground is scarce), uniformly at random (torch's global generator).

    ``sampler(labels)`` with labels int64 [N] (>0 foreground, 0 background, -1 ignore) returns
    (positive indices int64 [P], negative indices int64 [Q]), P + Q <= per_image.
    """

    def __init__(self, per_image: int, positive_fraction: float):
        self.per_image, self.positive_fraction = per_image, positive_fraction

    def __call__(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positive = (labels > 0).nonzero().squeeze(1)
        negative = (labels == 0).nonzero().squeeze(1)
        num_pos = min(positive.numel(), int(self.per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.per_image - num_pos)
        pick_pos = torch.randperm(positive.numel())[:num_pos].to(positive.device)
        pick_neg = torch.randperm(negative.numel())[:num_neg].to(negative.device)
        return positive[pick_pos], negative[pick_neg]


def label_proposals(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, matcher: Matcher,
                    bg_low: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: proposals [N, 4], gt_boxes [M, 4] xyxy, gt_labels [M] (0-based) ->
    (labels int64 [N]: 0 background, class + 1 foreground, -1 ignore; matched gt index int64 [N], -1 if none).

    Matcher ``BELOW_LOW`` is background and ``BETWEEN`` ignored. ``bg_low`` (Fast R-CNN: 0.1) also ignores
    proposals whose best IoU is under it, when the image has objects (an image without any keeps all its
    proposals as background).
    """
    iou = box_iou(gt_boxes.float(), proposals.float())
    matched = matcher(iou)
    labels = gt_labels.to(torch.int64)[matched.clamp(min=0)] + 1 if gt_boxes.numel() else torch.zeros_like(matched)
    labels = torch.where(matched >= 0, labels, torch.zeros_like(labels))
    labels[matched == Matcher.BETWEEN] = -1
    if gt_boxes.numel() and bg_low > 0:
        labels[(iou.max(dim=0).values < bg_low) & (matched < 0)] = -1
    return labels, torch.where(matched >= 0, matched, torch.full_like(matched, -1))


def sample_regions(proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], matcher: Matcher,
                   sampler: BalancedSampler, coder: BoxCoder, add_gt: bool = True, bg_low: float = 0.0,
                   return_matched: bool = False) -> tuple:
    """The training regions of a batch (Fast R-CNN's hierarchical sampling: R / N regions per image).

    proposals: per image [N_i, 4] xyxy; targets: per image {"boxes" [M_i, 4] xyxy, "labels" [M_i] 0-based}, in
    the same pixels as the proposals. ``add_gt`` adds the ground-truth boxes to the proposals (each is a
    perfect positive). Returns (regions: per image [R_i, 4], labels int64 [R] (0 background, class + 1
    foreground), regression targets float [R, 4] (``coder.encode`` of the matched gt; 0 for background)),
    R = sum R_i, concatenated in image order; with ``return_matched`` also the matched gt index per region,
    per image int64 [R_i] (-1 for background; e.g. for mask targets).
    """
    regions, labels, deltas, matches = [], [], [], []
    for props, target in zip(proposals, targets):
        gt = target["boxes"].to(props.device, torch.float32).reshape(-1, 4)
        props = props.float().reshape(-1, 4)
        if add_gt:
            props = torch.cat([props, gt])
        lab, matched = label_proposals(props, gt, target["labels"].to(props.device), matcher, bg_low)
        positive, negative = sampler(lab)
        keep = torch.cat([positive, negative])
        lab, matched, props = lab[keep], matched[keep], props[keep]
        lab[positive.numel():] = 0
        matched[positive.numel():] = -1
        target_boxes = gt[matched.clamp(min=0)] if gt.numel() else props
        delta = coder.encode(target_boxes, props) if props.numel() else props.new_zeros(0, 4)
        regions.append(props)
        labels.append(lab)
        deltas.append(delta * (lab > 0)[:, None])
        matches.append(matched)
    result = (regions, torch.cat(labels), torch.cat(deltas))
    return (*result, matches) if return_matched else result
