"""Box maths shared by every detector: conversions and overlaps, as pure tensor functions.

One convention outside box coders (DESIGN §3): ``xyxy`` = (x1, y1, x2, y2) in absolute pixels of the
original, upright image. These are thin wrappers over ``torchvision.ops`` where it has the op
(``box_iou``, ``complete_box_iou``, ``box_convert``), plus the few pieces it lacks: element-wise
(paired) IoU and CIoU for losses, and mapping boxes from a letterboxed canvas back to the image.
"""
from __future__ import annotations

import math

import torch
from torchvision import ops

EPS = 1e-7


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> (x, y, w, h) with (x, y) the top-left corner (COCO's bbox)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> (cx, cy, w, h)."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...] areas (0 for degenerate boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: a [N, 4], b [M, 4] xyxy -> [N, M] (``torchvision.ops.box_iou``)."""
    return ops.box_iou(a, b)


def paired_iou(a: torch.Tensor, b: torch.Tensor, ciou: bool = False) -> torch.Tensor:
    """Element-wise IoU (or complete IoU) of boxes that correspond one to one: a, b [..., 4] xyxy -> [...].

    CIoU (Zheng et al., 2020) = IoU - centre distance^2 / enclosing diagonal^2 - alpha * v, where v
    measures the aspect-ratio mismatch; unlike IoU it still has a gradient when boxes do not overlap.
    torchvision's ``complete_box_iou`` is pairwise (N x M); losses need the diagonal only.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    wb, hb = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    union = wa * ha + wb * hb - inter + EPS
    iou = inter / union
    if not ciou:
        return iou
    enclose = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    diagonal = enclose.pow(2).sum(-1) + EPS
    centre = ((a[..., :2] + a[..., 2:]) - (b[..., :2] + b[..., 2:])).pow(2).sum(-1) / 4
    v = (4 / torch.pi**2) * (torch.atan(wb / (hb + EPS)) - torch.atan(wa / (ha + EPS))).pow(2)
    with torch.no_grad():  # alpha is a trade-off weight, not part of the gradient (as in the paper)
        alpha = v / (v - iou + (1 + EPS))
    return iou - centre / diagonal - alpha * v


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., 4] xyxy clipped to an image of ``height`` x ``width``."""
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def letterbox_params(height: int, width: int, size: int) -> tuple[float, int, int, int, int]:
    """(ratio, new_h, new_w, top, left) of a letterbox onto a ``size`` x ``size`` canvas: the longer
    side scaled to ``size``, aspect ratio kept, centred (``data.transforms.Letterbox`` uses it too)."""
    ratio = size / max(height, width)
    new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    return ratio, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def unletterbox(boxes: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """[N, 4] xyxy on the letterboxed ``size`` canvas -> xyxy pixels of the original ``height`` x
    ``width`` image, clipped to it."""
    _, new_h, new_w, top, left = letterbox_params(height, width, size)
    shift = boxes.new_tensor([left, top, left, top])
    scale = boxes.new_tensor([width / new_w, height / new_h, width / new_w, height / new_h])
    return clip_boxes((boxes - shift) * scale, height, width)


class BoxCoder:
    """R-CNN's box regression parametrisation (Girshick et al., 2014, appendix C), shared by the region-based
    detectors: a box is coded relative to a reference box P (a proposal or an anchor) as

        tx = wx * (gx - px) / pw    ty = wy * (gy - py) / ph    tw = ww * log(gw / pw)    th = wh * log(gh / ph)

    with (x, y) centres and (w, h) sizes. The scale-invariant translation and log-space size make one
    regressor fit boxes of every size; ``weights`` (10, 10, 5, 5) scale the deltas to roughly unit variance
    (Fast R-CNN's target normalisation). ``decode`` clamps tw, th at ``log(1000 / 16)`` so an untrained
    regressor cannot produce an overflowing box.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 clamp: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.clamp = clamp

    def encode(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Targets: reference_boxes (ground truth) [N, 4] xyxy, proposals [N, 4] xyxy -> deltas [N, 4]."""
        wx, wy, ww, wh = self.weights
        p = xyxy_to_cxcywh(proposals.float())
        g = xyxy_to_cxcywh(reference_boxes.float())
        pw, ph = p[:, 2].clamp(min=EPS), p[:, 3].clamp(min=EPS)
        return torch.stack([wx * (g[:, 0] - p[:, 0]) / pw, wy * (g[:, 1] - p[:, 1]) / ph,
                            ww * torch.log(g[:, 2].clamp(min=EPS) / pw),
                            wh * torch.log(g[:, 3].clamp(min=EPS) / ph)], dim=1)

    def decode(self, deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """deltas [N, 4k] (k boxes per proposal, e.g. one per class), proposals [N, 4] xyxy -> boxes [N, 4k] xyxy."""
        wx, wy, ww, wh = self.weights
        n, k = deltas.shape[0], deltas.shape[1] // 4  # k spelled out: with N = 0 a -1 would be ambiguous
        d = deltas.float().reshape(n, k, 4)
        p = xyxy_to_cxcywh(proposals.float())[:, None, :]
        cx = d[..., 0] / wx * p[..., 2] + p[..., 0]
        cy = d[..., 1] / wy * p[..., 3] + p[..., 1]
        w = torch.exp((d[..., 2] / ww).clamp(max=self.clamp)) * p[..., 2]
        h = torch.exp((d[..., 3] / wh).clamp(max=self.clamp)) * p[..., 3]
        return cxcywh_to_xyxy(torch.stack([cx, cy, w, h], dim=-1)).reshape(n, 4 * k)
