"""Modern anchor-free YOLO: the default detector (``yolo-n``, ``yolo-s``).

What the line from YOLOv1 to today changed, and why:
- Anchor-free, dense: every cell centre at strides 8, 16 and 32 predicts the distances from itself to
  the four sides of a box (no anchor boxes to tune per data set) and a score per class.
- CSP backbone + PAN neck (``yolo_parts.py``): cheap blocks with many gradient paths; features fused
  top-down and bottom-up, so small objects are found on the fine grid and large ones on the coarse.
- Decoupled head: classification and box regression get separate branches (they want different
  features), and the class score (sigmoid, BCE) doubles as the confidence — no objectness.
- Distribution focal loss (Li et al., 2020): each side's distance is a softmax over ``reg_max`` bins,
  trained towards the two bins around the true distance; together with CIoU on the decoded box.
- Task-aligned assignment (``assigner.py``) picks the positives from the current predictions.
- Recipe: mosaic (``data/mosaic.py``) switched off for the last epochs, HSV, flip, scale/translate, EMA, warm-up.

``model(images, targets)`` in train mode returns {"box", "cls", "dfl"}; ``model(images)`` in eval mode
returns per image {"boxes" [N, 4] xyxy in original pixels, "scores" [N], "labels" [N]} (confidence
0.001, class-wise NMS at IoU 0.7, at most 300). images: list of uint8 [3, H, W] (any sizes) or a
uint8 [B, 3, H, W] batch; the model letterboxes them to its input size and normalises them itself.
``model.input_size`` (a buffer saved with the weights) is the side it last trained at, so a checkpoint
predicts at its training resolution.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from cvforge.boxes import letterbox_params, paired_iou, unletterbox
from cvforge.data.transforms import LETTERBOX_FILL
from cvforge.models.detection.assigner import TaskAlignedAssigner
from cvforge.models.detection.yolo_parts import CSPBackbone, DecoupledHead, PANNeck, anchor_points

SIZES = {"n": (0.25, 0.33), "s": (0.50, 0.33), "m": (0.75, 0.67)}  # (width, depth) multipliers
MAX_STRIDE = 32


class YOLO(nn.Module):
    """Backbone -> neck -> head; own loss and decoding (module docstring)."""

    def __init__(self, num_classes: int, width: float = 0.25, depth: float = 0.33, reg_max: int = 16,
                 imgsz: int = 640, conf: float = 0.001, iou: float = 0.7, max_det: int = 300,
                 box_gain: float = 7.5, cls_gain: float = 0.5, dfl_gain: float = 1.5, close_mosaic: int = 10):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.conf, self.iou, self.max_det, self.close_mosaic = conf, iou, max_det, close_mosaic
        self.backbone = CSPBackbone(width, depth)
        self.neck = PANNeck(self.backbone.out_channels, depth)
        self.head = DecoupledHead(self.backbone.out_channels, num_classes, reg_max, self.backbone.strides)
        self.head.reset_bias(imgsz)
        self.loss = YOLOLoss(num_classes, reg_max, box_gain, cls_gain, dfl_gain)
        self.register_buffer("input_size", torch.tensor(_round_up(imgsz)))
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)

    def forward(self, images: Any, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if self.training:
            size = _round_up(max(max(image.shape[-2:]) for image in images))
            self.input_size.fill_(size)
            x, boxes = letterbox_batch(images, size, [t["boxes"] for t in targets], self.input_size.device)
            raw = self.forward_raw(x)
            with float32(raw):
                return self.loss(raw, self.anchors(size, raw), [{**t, "boxes": b} for t, b in zip(targets, boxes)])
        size = int(self.input_size)
        x, _ = letterbox_batch(images, size, None, self.input_size.device)
        raw = self.forward_raw(x)
        with float32(raw):
            return self.postprocess(raw, size, [tuple(image.shape[-2:]) for image in images])

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float [B, 3, S, S] -> raw head outputs [B, A, 4 * reg_max + C] (what ONNX exports)."""
        return self.head(self.neck(self.backbone(x)))

    def anchors(self, size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = [(size // s, size // s) for s in self.head.strides]
        return anchor_points(sizes, self.head.strides, like.device, torch.float32)

    def decode_boxes(self, distances: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
        """Distance logits [B, A, 4 * reg_max] -> xyxy [B, A, 4] in input pixels (expected bin of each side)."""
        b, a, _ = distances.shape
        expected = distances.view(b, a, 4, self.reg_max).softmax(-1) @ self.bins.to(distances.dtype)
        ltrb = expected * strides
        return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)

    @torch.no_grad()
    def postprocess(self, raw: torch.Tensor, size: int, image_sizes: list[tuple[int, int]]) -> list[dict]:
        """Raw head outputs -> per image {"boxes", "scores", "labels"} in original pixels (module doc)."""
        points, strides = self.anchors(size, raw)
        raw = raw.float()
        boxes = self.decode_boxes(raw[..., :4 * self.reg_max], points, strides)
        scores = raw[..., 4 * self.reg_max:].sigmoid()
        return [self._select(b, s, size, hw) for b, s, hw in zip(boxes, scores, image_sizes)]

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor, size: int, image_size: tuple[int, int]) -> dict:
        """One image: every (point, class) above ``conf`` (a point may propose several classes), NMS per class."""
        flat = scores.flatten()
        keep = (flat > self.conf).nonzero().squeeze(1)
        if len(keep) > 30 * self.max_det:  # NMS cost grows with candidates; the rest would not survive
            keep = keep[flat[keep].topk(30 * self.max_det).indices]
        point, label = keep // self.num_classes, keep % self.num_classes
        chosen, confidence = boxes[point], flat[keep]
        kept = batched_nms(chosen, confidence, label, self.iou)[: self.max_det]
        return {"boxes": unletterbox(chosen[kept], *image_size, size), "scores": confidence[kept],
                "labels": label[kept]}

    def wrap_train_data(self, dataset: Any, config: Any) -> tuple[Any, list]:
        """The training recipe's data side: mosaic of four images, switched off for the last
        ``close_mosaic`` epochs. Returns (dataset, trainer callbacks)."""
        from cvforge.data.mosaic import MosaicDataset, MosaicSwitch
        mosaic = MosaicDataset(dataset, config.imgsz)
        return mosaic, [MosaicSwitch(mosaic, self.close_mosaic)]


def float32(like: torch.Tensor) -> torch.autocast:
    """A context in which AMP is off: mixed precision is for the network; box decoding, the assigner and
    the losses need float32: under bfloat16 autocast the expected distance (softmax @ bins, a matmul) is
    off by up to 1/16 of a bin (2 px at stride 32), and the assigner ranks anchors by IoU^6 of those boxes."""
    return torch.autocast(like.device.type, enabled=False)


def letterbox_batch(images: Any, size: int, boxes: list[torch.Tensor] | None = None,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 images [3, H_i, W_i] -> float [B, 3, size, size] in [0, 1], each letterboxed (longer side
    scaled to ``size``, centred, grey padding); ``boxes`` (xyxy per image) move with their image."""
    batch = torch.full((len(images), 3, size, size), float(LETTERBOX_FILL), device=device)
    moved = []
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        _, new_h, new_w, top, left = letterbox_params(height, width, size)
        pixels = image.to(device).float()
        if (new_h, new_w) != (height, width):
            pixels = F.interpolate(pixels[None], (new_h, new_w), mode="bilinear", antialias=True,
                                   align_corners=False)[0]
        batch[i, :, top:top + new_h, left:left + new_w] = pixels
        if boxes is not None:
            scale = boxes[i].new_tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
            moved.append(boxes[i].float() * scale + scale.new_tensor([left, top] * 2))
    return batch / 255.0, moved


class YOLOLoss(nn.Module):
    """Task-aligned targets; BCE on class scores, CIoU and distribution focal loss on boxes.

    Each term is normalised by the sum of the soft class targets (the number of positives, weighted by
    quality), so it does not depend on the batch size or the number of objects.
    """

    def __init__(self, num_classes: int, reg_max: int, box_gain: float, cls_gain: float, dfl_gain: float):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.gains = {"box": box_gain, "cls": cls_gain, "dfl": dfl_gain}
        self.assigner = TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0)
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)

    def forward(self, raw: torch.Tensor, anchors: tuple[torch.Tensor, torch.Tensor],
                targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """raw: [B, A, 4 * reg_max + C]; anchors: ([A, 2], [A, 1]); targets: boxes in input pixels."""
        points, strides = anchors
        raw = raw.float()
        distances, logits = raw[..., :4 * self.reg_max], raw[..., 4 * self.reg_max:]
        b, a, _ = distances.shape
        probs = distances.view(b, a, 4, self.reg_max).softmax(-1)
        ltrb = (probs @ self.bins) * strides
        pred_boxes = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
        gt_labels, gt_boxes, gt_valid = pad_targets(targets, raw.device)
        assigned = self.assigner.assign(logits.detach().sigmoid(), pred_boxes.detach(), points,
                                        gt_labels, gt_boxes, gt_valid)
        norm = assigned.scores.sum().clamp(min=1.0)
        cls = F.binary_cross_entropy_with_logits(logits, assigned.scores, reduction="sum") / norm
        fg = assigned.foreground
        weight = assigned.scores.sum(-1)[fg]
        ciou = paired_iou(pred_boxes[fg], assigned.boxes[fg], ciou=True)
        box = ((1.0 - ciou) * weight).sum() / norm
        target_ltrb = torch.cat([points - assigned.boxes[..., :2], assigned.boxes[..., 2:] - points], -1) / strides
        dfl = (distribution_focal_loss(distances.view(b, a, 4, self.reg_max)[fg], target_ltrb[fg])
               * weight).sum() / norm
        # Zero-weighted: keeps every head parameter in the graph when a batch has no object (DDP).
        touch = 0.0 * distances.sum()
        return {"box": self.gains["box"] * box + touch, "cls": self.gains["cls"] * cls,
                "dfl": self.gains["dfl"] * dfl + touch}


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL: logits [N, 4, R], target distances [N, 4] in bins -> [N] (mean over the four sides).

    The true distance t falls between bins l = floor(t) and l + 1; cross-entropy towards both, weighted
    by closeness, makes the distribution's expected value t without forcing a one-hot guess.
    """
    reg_max = logits.shape[-1]
    target = target.clamp(0, reg_max - 1 - 0.01)
    left = target.long()
    w_left = (left + 1) - target
    log_probs = logits.log_softmax(-1)
    loss = -(log_probs.gather(-1, left[..., None])[..., 0] * w_left
             + log_probs.gather(-1, (left + 1)[..., None])[..., 0] * (1 - w_left))
    return loss.mean(-1)


def pad_targets(targets: list[dict[str, torch.Tensor]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image targets -> (labels int64 [B, M], boxes [B, M, 4], valid bool [B, M]), M = most objects."""
    most = max((len(t["labels"]) for t in targets), default=0)
    labels = torch.zeros(len(targets), most, dtype=torch.long, device=device)
    boxes = torch.zeros(len(targets), most, 4, device=device)
    valid = torch.zeros(len(targets), most, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        labels[i, :n], boxes[i, :n], valid[i, :n] = t["labels"], t["boxes"], True
    return labels, boxes, valid


def _round_up(size: int) -> int:
    return int(-(-int(size) // MAX_STRIDE) * MAX_STRIDE)


def build_yolo(*, num_classes: int, size: str = "n", **kwargs: Any) -> YOLO:
    """``yolo-<size>``: size n | s | m picks the (width, depth) multipliers; kwargs: ``YOLO``'s options."""
    width, depth = SIZES[size]
    return YOLO(num_classes, width=width, depth=depth, **kwargs)


def yolo_n(*, num_classes: int, **kwargs: Any) -> YOLO:
    return build_yolo(num_classes=num_classes, size="n", **kwargs)


def yolo_s(*, num_classes: int, **kwargs: Any) -> YOLO:
    return build_yolo(num_classes=num_classes, size="s", **kwargs)
