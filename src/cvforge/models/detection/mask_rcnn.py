"""Mask R-CNN (He et al., 2017): Faster R-CNN with a third output per region, the object's mask.

What the paper changed, and why:
- A small fully convolutional branch beside the box head predicts, for every region, a 28 x 28 mask
  per class; only the mask of the class the box head picks is used, so masks do not compete between
  classes (a per-pixel sigmoid, not a softmax over classes: segmentation decoupled from classification).
- RoIAlign replaces RoIPool: RoIPool rounds the region and its bins to the feature grid, which moves
  features by up to a stride — harmless for boxes, ruinous for pixel-accurate masks. RoIAlign samples
  bilinearly at exact positions (``region_pool.RoIAlign``; with an FPN ``MultiScaleRoIAlign``).
- The mask loss is the mean binary cross-entropy over the 28 x 28 cells of the true class's mask, on
  the foreground regions only; the target is the ground-truth mask cropped to the region by RoIAlign.

    images -> backbone (+ FPN) -> RPN -> proposals -> RoIAlign 7x7  -> box head -> scores, boxes
                                                   -> RoIAlign 14x14 -> 4 convs -> deconv -> 28x28 masks

``model(images, targets)`` (train; targets carry "masks" uint8 [N, H, W] in the original image's
pixels) returns {"rpn_obj", "rpn_box", "cls", "box", "mask"}; ``model(images)`` (eval) returns per image
{"boxes", "scores", "labels", "masks" uint8 [K, H, W] (0/1, the original image's pixels)}.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign, roi_align

from cvforge.errors import CvforgeError
from cvforge.models.detection.faster_rcnn import FasterRCNN, check_options, to_original

MASK_THRESHOLD = 0.5  # a pixel belongs to the object where the mask probability is at least this


class MaskHead(nn.Sequential):
    """Pooled region features float [R, C, 14, 14] -> mask logits [R, num_classes, 28, 28]:
    ``convs`` 3x3 conv + ReLU layers, a 2x2 stride-2 transposed conv + ReLU, a 1x1 conv per class."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, convs: int = 4):
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.ReLU(inplace=True),
                   nn.Conv2d(channels, num_classes, 1)]
        super().__init__(*layers)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)


class MaskRCNN(FasterRCNN):
    """Faster R-CNN (``faster_rcnn.py``) + RoIAlign 14x14 + ``MaskHead`` (module doc).

    mask_pool_size: RoIAlign side of the mask branch (its output is twice that); mask_channels,
    mask_convs: the head's width and depth. Other options: ``FasterRCNN``'s.
    """

    def __init__(self, num_classes: int, mask_pool_size: int = 14, mask_channels: int = 256, mask_convs: int = 4,
                 **options: Any):
        super().__init__(num_classes, **options)
        self.mask_pool = MultiScaleRoIAlign(self.features.pooled_levels, mask_pool_size, sampling_ratio=2)
        self.mask_head = MaskHead(self.features.out_channels, num_classes, mask_channels, mask_convs)

    def forward(self, images: Any, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if self.training:  # Faster R-CNN's losses, then the mask branch on its foreground regions
            losses, sampled = self.training_pass(images, _check_masks(targets))
            positive = [r[m >= 0] for r, m in zip(sampled.regions, sampled.matched)]
            mask_logits = self.mask_head(self.pooled(sampled.features, positive, sampled.batch, self.mask_pool))
            classes = sampled.labels[sampled.labels > 0] - 1
            losses["mask"] = mask_loss(mask_logits, classes, positive, sampled.matched, sampled.targets, sampled.scales)
            return losses
        batch, scales, sizes = self.resize(images)
        detections = []
        for d, scale, image in zip(self.forward_raw(batch, sizes), scales, images):
            boxes = to_original({k: v for k, v in d.items() if k != "mask_probs"}, scale, image.shape[-2:])
            detections.append(paste_masks(boxes, d["mask_probs"], image.shape[-2:]))
        return detections

    def forward_raw(self, batch: torch.Tensor, sizes: list[tuple[Any, Any]],
                    score_thresh: float | torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """The eval network (what ONNX exports, for one image): ``FasterRCNN.forward_raw``'s detections in input
        pixels, each with "mask_probs" float [K, M, M], the mask probabilities of its detected class in its box."""
        features, detections = self.detect(batch, sizes, score_thresh)
        boxes = [d["boxes"] for d in detections]
        probabilities = self.mask_head(self.pooled(features, boxes, batch, self.mask_pool)).sigmoid()
        # one image (as in an exported graph): no split, whose sizes a trace would freeze
        per_image = [probabilities] if len(boxes) == 1 else probabilities.split([len(b) for b in boxes])
        return [{**d, "mask_probs": p[torch.arange(p.shape[0], device=p.device), d["labels"]]}
                for d, p in zip(detections, per_image)]


def _check_masks(targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    if any("masks" not in t for t in targets):
        raise CvforgeError("mask_rcnn needs instance masks in its targets", None,
                           "train it with --task instance on a data set with polygons, RLE or mask labels")
    return targets


def mask_loss(mask_logits: torch.Tensor, classes: torch.Tensor, regions: list[torch.Tensor],
              matched: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], scales: list[float]) -> torch.Tensor:
    """Mean per-pixel binary cross-entropy of each foreground region's mask for its true class.

    mask_logits [P, C, M, M]; classes int64 [P] 0-based; regions per image [P_i, 4] xyxy in input pixels
    (the foreground ones, in the order of ``mask_logits``); matched per image int64 [R_i] (the
    sampled regions' gt index, -1 background; ``sample_regions`` puts foreground first); targets per
    image {"masks" uint8 [N_i, H_i, W_i] in original pixels}; scales: input / original per image.
    The target is the gt mask RoIAligned onto the region (mapped back to original pixels), M x M in [0, 1].
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    size = mask_logits.shape[-1]
    cropped = []
    for boxes, match, target, scale in zip(regions, matched, targets, scales):
        if len(boxes):
            gt = target["masks"][match[match >= 0]].to(mask_logits.device, torch.float32)[:, None]
            index = torch.arange(len(boxes), device=gt.device, dtype=gt.dtype)[:, None]
            rois = torch.cat([index, boxes.to(gt.dtype) / scale], 1)
            cropped.append(roi_align(gt, rois, size, 1.0, sampling_ratio=2, aligned=True)[:, 0])
    mask_targets = torch.cat(cropped)
    logits = mask_logits[torch.arange(len(classes), device=classes.device), classes]
    return F.binary_cross_entropy_with_logits(logits.float(), mask_targets)


def paste_masks(detections: dict[str, torch.Tensor], probabilities: torch.Tensor,
                image_size: Any) -> dict[str, torch.Tensor]:
    """Detections with boxes in original pixels + mask probabilities [K, M, M] (or [K, C, M, M]: the detected
    class's is used) -> the detections with "masks" uint8 [K, H, W] (image_size = (H, W)): each M x M mask
    resized into its box."""
    height, width = int(image_size[0]), int(image_size[1])
    chosen = probabilities
    if probabilities.ndim == 4:
        labels = detections["labels"]
        chosen = probabilities[torch.arange(len(labels), device=probabilities.device), labels]
    if len(chosen) == 0:
        return {**detections, "masks": torch.zeros((0, height, width), dtype=torch.uint8, device=chosen.device)}
    pasted = paste_masks_in_image(chosen[:, None].float(), detections["boxes"].float(), (height, width), padding=1)
    return {**detections, "masks": (pasted[:, 0] >= MASK_THRESHOLD).to(torch.uint8)}


def mask_rcnn(*, num_classes: int, backbone: str = "resnet18", fpn: bool = True, **options: Any) -> MaskRCNN:
    """``mask_rcnn``: ResNet-18-FPN by default, like the lineage's other models here, so that a CPU trains
    it (the paper's best: ResNet-50/101-FPN, ``backbone="resnet50"``). options: ``MaskRCNN``'s,
    ``FasterRCNN``'s and ``RPN``'s keyword arguments."""
    check_options(options, MaskRCNN, FasterRCNN)
    return MaskRCNN(num_classes, backbone=backbone, fpn=fpn, **options)
