"""Faster R-CNN (Ren et al., 2015): Fast R-CNN with a region proposal network as its proposal source.

What the paper changed, and why: Fast R-CNN had made the detector one network, but still waited
seconds per image for selective search on the CPU. Faster R-CNN computes the proposals from the same
convolutional features the detector uses (``rpn.py``): a small conv net over the feature map scores
anchors and regresses them to boxes, so proposals cost ~10 ms and improve with training. Both stages
are trained together ("approximate joint training": one backward through the summed RPN and
Fast R-CNN losses; no gradient flows through the proposal coordinates).

With ``fpn=True`` (Lin et al., 2017) a feature pyramid over the backbone's last stages gives every
level semantically strong features; the RPN puts one anchor scale on each level and each region is
pooled from the level that suits its size (``torchvision.ops.MultiScaleRoIAlign``).

    images -> resize (longer side = input_size) -> normalise -> backbone (+ FPN)
           -> RPN -> proposals -> RoIAlign 7x7 -> two fc layers -> class scores + per-class box deltas

``model(images, targets)`` (train) returns {"rpn_obj", "rpn_box", "cls", "box"}; ``model(images)``
(eval) returns per image {"boxes" [K, 4] xyxy in the original image's pixels, "scores" [K],
"labels" [K] 0-based}. images: list of uint8 [3, H_i, W_i] (any sizes) or a uint8 [B, 3, H, W] batch.
``input_size`` (a buffer saved with the weights) is the longer side the model last trained at; at
test each image is resized so that its longer side is ``input_size``. ``forward_raw(batch, sizes)``, the eval
network after the resizing (boxes still in input pixels), is what ``cvforge export`` writes to ONNX.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cvforge.boxes import BoxCoder, clip_boxes
from cvforge.errors import CvforgeError
from cvforge.models.backbones import Backbone, Normalize, get_backbone
from cvforge.models.detection.matching import BalancedSampler, Matcher, sample_regions
from cvforge.models.detection.region_pool import RoIPool
from cvforge.models.detection.roi_head import BoxPredictor, TwoFCHead, fast_rcnn_loss, postprocess
from cvforge.models.detection.rpn import RPN

SIZE_DIVISOR = 32  # padded batch sides are multiples of the coarsest stride


class Features(nn.Module):
    """Normalised images [B, 3, H, W] -> feature maps, list of float [B, C, H/s, W/s] (module doc).

    Without an FPN: the backbone's last stage whose stride is at most ``max_stride`` (later stages
    are removed; the paper's VGG-16 conv5_3 / ResNet C4 at stride 16). With an FPN: pyramid levels
    over the last ``fpn_levels`` stages of the backbone, ``fpn_channels`` each, plus a max-pooled
    coarser level used by the RPN only (as in the FPN paper). ``fpn_blocks`` names the FPN's inputs
    by block path instead (``backbone.block_channels`` lists them), e.g. torchvision's mobilenet_v3 FPN:
    ``["features.13", "features.16"]``, two stride-32 maps, the first from inside the last stage; blocks
    after the last one named are removed. ``out_channels``, ``num_levels`` and ``pooled_levels`` (the
    names RoIAlign reads) describe the output.
    """

    def __init__(self, backbone: Backbone, fpn: bool, max_stride: int = 16, fpn_levels: int = 4,
                 fpn_channels: int = 256, fpn_blocks: list[str] | None = None):
        super().__init__()
        if fpn_blocks and not fpn:
            raise CvforgeError("fpn_blocks needs an FPN", None, "use faster_rcnn_fpn / mask_rcnn, or drop fpn_blocks")
        if not fpn:
            _truncate(backbone, max_stride)
        self.fpn_blocks = _chain_order(backbone, fpn_blocks) if fpn_blocks else None
        if self.fpn_blocks:
            _truncate_after(backbone, self.fpn_blocks[-1])
            fpn_levels = len(self.fpn_blocks)
        self.backbone, self.fpn_levels = backbone, fpn_levels if fpn else 1
        if fpn:
            inputs = ([backbone.block_channels[p] for p in self.fpn_blocks] if self.fpn_blocks
                      else backbone.out_channels[-fpn_levels:])
            self.fpn = FeaturePyramidNetwork(inputs, fpn_channels, LastLevelMaxPool())
        else:
            self.fpn = None
        self.out_channels = fpn_channels if fpn else backbone.out_channels[-1]
        self.num_levels = fpn_levels + 1 if fpn else 1
        self.pooled_levels = [str(i) for i in range(self.fpn_levels)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fpn_blocks:
            maps = self.backbone.forward_blocks(x, self.fpn_blocks)
        else:
            maps = self.backbone(x)[-self.fpn_levels:]
        if self.fpn is None:
            return maps
        return list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(maps))).values())


def _chain_order(backbone: Backbone, blocks: list[str]) -> list[str]:
    """``blocks`` sorted in the order the backbone runs them; a clear error for a name it does not have."""
    order = list(backbone.block_channels)
    unknown = [b for b in blocks if b not in backbone.block_channels]
    if unknown or len(set(blocks)) != len(blocks):
        raise CvforgeError(f"fpn_blocks {blocks} are not distinct blocks of {backbone.name}", None,
                           f"name blocks among {', '.join(order[-8:])} (the last ones; any of its {len(order)})")
    return sorted(blocks, key=order.index)


def _truncate(backbone: Backbone, max_stride: int) -> None:
    """Drop the stages whose stride exceeds ``max_stride`` (their modules too: no unused parameters)."""
    keep = sum(1 for s in backbone.strides if s <= max_stride)
    _truncate_after(backbone, backbone.stage_paths[keep - 1][-1])


def _truncate_after(backbone: Backbone, last: str) -> None:
    """Drop the blocks after the block ``last``, their modules too (a stage cut inside ends there, with that
    block's channels)."""
    keep = next(i for i, paths in enumerate(backbone.stage_paths) if last in paths)
    cut = backbone.stage_paths[keep].index(last) + 1
    for path in backbone.stage_paths[keep][cut:] + [p for paths in backbone.stage_paths[keep + 1:] for p in paths]:
        parent, _, name = path.rpartition(".")
        delattr(backbone.body.get_submodule(parent) if parent else backbone.body, name)
        del backbone.block_channels[path]
    backbone.stage_paths = backbone.stage_paths[:keep] + [backbone.stage_paths[keep][:cut]]
    backbone.out_channels = backbone.out_channels[:keep] + [backbone.block_channels[last]]
    backbone.strides = backbone.strides[:keep + 1]


def resize_batch(images: Any, side: int, device: torch.device) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
    """uint8 images [3, H_i, W_i] -> (float batch [B, 3, H, W] in [0, 1], per-image scale, per-image
    (h, w) inside the batch). Each image is resized so its longer side is ``side`` and placed at the
    top left (so a box maps back by dividing by the scale); H and W are multiples of SIZE_DIVISOR."""
    scales, sizes = [], []
    for image in images:
        h, w = image.shape[-2:]
        scales.append(side / max(h, w))
        sizes.append((max(1, round(h * scales[-1])), max(1, round(w * scales[-1]))))
    height = -(-max(s[0] for s in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
    width = -(-max(s[1] for s in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
    batch = torch.zeros((len(sizes), 3, height, width), device=device)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        pixels = image.to(device).float()
        if (h, w) != tuple(image.shape[-2:]):
            pixels = F.interpolate(pixels[None], (h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        batch[i, :, :h, :w] = pixels
    return batch / 255.0, scales, sizes


def scale_targets(targets: list[dict[str, torch.Tensor]], scales: list[float]) -> list[dict[str, torch.Tensor]]:
    """Targets with their boxes in input pixels; crowd regions left out (they are neither object nor
    background for training). Other keys (e.g. "masks", still in original pixels) are filtered alike."""
    moved = []
    for target, scale in zip(targets, scales):
        keep = ~target["iscrowd"].bool() if "iscrowd" in target else torch.ones(len(target["boxes"]), dtype=torch.bool)
        keep = keep.to(target["boxes"].device)
        out = {k: v[keep] for k, v in target.items() if isinstance(v, torch.Tensor) and v.ndim >= 1
               and len(v) == len(keep)}
        out["boxes"] = out["boxes"].float() * scale
        moved.append(out)
    return moved


@dataclass
class SampledRegions:
    """One training batch's regions of interest and what they came from (``FasterRCNN.training_pass``).

    batch: the resized images float [B, 3, H, W]; features: the pyramid's maps; scales: input / original
    per image; targets: per image, boxes in input pixels; regions: per image [R_i, 4] xyxy in input
    pixels, foreground first; labels: int64 [R] (0 background, class + 1); matched: per image int64 [R_i],
    the gt index of each region (-1 background).
    """

    batch: torch.Tensor
    features: list[torch.Tensor]
    scales: list[float]
    targets: list[dict[str, torch.Tensor]]
    regions: list[torch.Tensor]
    labels: torch.Tensor
    matched: list[torch.Tensor]


class FasterRCNN(nn.Module):
    """Backbone (+ FPN) -> RPN -> RoIAlign -> two-fc head -> predictor (module doc).

    Options (paper defaults): rpn_options go to ``RPN`` (anchor sizes, IoUs 0.7 / 0.3, 256 anchors,
    NMS 0.7, 2000 / 300 proposals); regions per image 128 (FPN: 512), at most 25 % foreground, foreground IoU
    >= 0.5, background below; at test score >= ``score_thresh``, class-wise NMS ``nms``, ``max_det``.
    roi_pool: "align" (RoIAlign, the default: better boxes at no cost) or "max" (the paper's RoIPool,
    one feature map only). box_beta: the smooth L1 transition of the box loss (Fast R-CNN's 1.0; torchvision
    uses 1/9, which weights small errors 9x more).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet18", fpn: bool = False, imgsz: int = 640,
                 pretrained: str | None = None, max_stride: int = 16, fpn_levels: int = 4,
                 fpn_channels: int = 256, fpn_blocks: list[str] | None = None, pool_size: int = 7, hidden: int = 1024,
                 regions_per_image: int | None = None, positive_fraction: float = 0.25, fg_iou: float = 0.5,
                 score_thresh: float = 0.05, nms: float = 0.5, max_det: int = 100, roi_pool: str = "align",
                 box_beta: float = 1.0, **rpn_options: Any):
        super().__init__()
        self.num_classes, self.score_thresh, self.nms, self.max_det = num_classes, score_thresh, nms, max_det
        self.box_beta = box_beta
        self.normalize = Normalize()
        self.features = Features(get_backbone(backbone, pretrained), fpn, max_stride, fpn_levels, fpn_channels,
                                 fpn_blocks)
        self.rpn = RPN(self.features.out_channels, self.features.num_levels, **rpn_options)
        if roi_pool not in ("align", "max") or (roi_pool == "max" and fpn):
            raise CvforgeError(f"roi_pool={roi_pool!r} is not available{' with an FPN' * fpn}", None,
                               "use roi_pool='align' (RoIAlign), or 'max' (Fast R-CNN's RoIPool) without an FPN")
        self.pool = (RoIPool(pool_size, 1 / self.backbone.strides[-1]) if roi_pool == "max" else
                     MultiScaleRoIAlign(self.features.pooled_levels, pool_size, sampling_ratio=2))
        self.box_head = TwoFCHead(self.features.out_channels * pool_size ** 2, hidden)
        self.box_predictor = BoxPredictor(hidden, num_classes)
        self.matcher = Matcher(fg_iou, fg_iou, allow_low_quality=False)
        # 128 regions per image in the paper's code (py-faster-rcnn); 512 in the FPN paper's (Detectron)
        self.sampler = BalancedSampler(regions_per_image or (512 if fpn else 128), positive_fraction)
        self.coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.register_buffer("input_size", torch.tensor(int(imgsz)))

    @property
    def backbone(self) -> Backbone:
        return self.features.backbone

    def forward(self, images: Any, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if self.training:
            return self.training_pass(images, targets)[0]
        batch, scales, sizes = self.resize(images)
        detections = self.forward_raw(batch, sizes)
        return [to_original(d, scale, image.shape[-2:]) for d, scale, image in zip(detections, scales, images)]

    def training_pass(self, images: Any, targets: list[dict[str, torch.Tensor]]) -> tuple[dict, SampledRegions]:
        """The training forward: (losses {"rpn_obj", "rpn_box", "cls", "box"}, the sampled regions with what
        they were computed from, for a head that trains on the same regions, e.g. Mask R-CNN's mask branch)."""
        batch, scales, sizes = self.resize(images)
        features = self.features(self.normalize(batch))
        targets = scale_targets(targets, scales)
        proposals, rpn_losses = self.rpn(batch, features, sizes, int(self.input_size), targets)
        regions, labels, regression_targets, matched = sample_regions(
            [p.detach() for p in proposals], targets, self.matcher, self.sampler, self.coder, return_matched=True)
        class_logits, box_deltas = self.box_predictor(self.box_head(self.pooled(features, regions, batch)))
        losses = {**rpn_losses, **fast_rcnn_loss(class_logits, box_deltas, labels, regression_targets,
                                                 beta=self.box_beta)}
        return losses, SampledRegions(batch, features, scales, targets, regions, labels, matched)

    def forward_raw(self, batch: torch.Tensor, sizes: list[tuple[Any, Any]],
                    score_thresh: float | torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """The eval network, NMS included (what ONNX exports, for one image): ``resize_batch``'s padded batch
        float [B, 3, H, W] in [0, 1] and each image's (h, w) inside it -> per image {"boxes" [K, 4] xyxy in
        input pixels, "scores" [K], "labels" int64 [K] 0-based}. score_thresh: default ``self.score_thresh``
        (an input of the exported graph, so that its parity check can see detections on a noise image)."""
        return self.detect(batch, sizes, score_thresh)[1]

    def resize(self, images: Any) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
        """``resize_batch`` to ``input_size``: (padded batch in [0, 1], per-image scales, per-image sizes
        inside the batch). In training the longest side seen becomes ``input_size``."""
        if self.training:
            self.input_size.fill_(max(max(image.shape[-2:]) for image in images))
        return resize_batch(images, int(self.input_size), self.input_size.device)

    def detect(self, batch: torch.Tensor, sizes: list[tuple[Any, Any]], score_thresh: float | torch.Tensor | None = None
               ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Backbone (+ FPN), RPN, box head, postprocess: (feature maps, per-image detections in input pixels)."""
        features = self.features(self.normalize(batch))
        proposals = self.propose(batch, features, sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(self.pooled(features, proposals, batch)))
        score_thresh = self.score_thresh if score_thresh is None else score_thresh
        return features, postprocess(class_logits, box_deltas, proposals, sizes, self.coder,
                                     score_thresh, self.nms, self.max_det)

    def propose(self, batch: torch.Tensor, features: list[torch.Tensor], sizes: list[tuple[Any, Any]]
                ) -> list[torch.Tensor]:
        """Eval-mode proposals per image [P_i, 4] in input pixels (sizes may be 0-dim tensors: the ONNX
        graph's ``image_size`` input)."""
        return self.rpn(batch, features, list(sizes), int(self.input_size))[0]

    def pooled(self, features: list[torch.Tensor], regions: list[torch.Tensor], batch: torch.Tensor,
               pool: nn.Module | None = None) -> torch.Tensor:
        """RoIAlign (or RoIPool) of every region with ``pool`` (default: the box head's): float
        [R, C, pool, pool]; with an FPN each region is pooled from the level that suits its size."""
        pool = pool or self.pool
        if isinstance(pool, RoIPool):  # one feature map, fixed stride
            return pool(features[0], regions)
        named = OrderedDict((str(i), f) for i, f in enumerate(features))
        return pool(named, regions, [tuple(batch.shape[-2:])] * len(regions))

    def freeze(self, stages: Any) -> None:
        """Freeze the first ``stages`` backbone stages ("all": the whole backbone)."""
        self.backbone.freeze(len(self.backbone.stages) if stages == "all" else int(stages))


def to_original(detections: dict[str, torch.Tensor], scale: float, image_size: Any) -> dict[str, torch.Tensor]:
    """Boxes from input pixels back to the original image's pixels (``resize_batch`` placed it at the
    top left, so dividing by the scale is exact), clipped to it."""
    height, width = int(image_size[0]), int(image_size[1])
    return {**detections, "boxes": clip_boxes(detections["boxes"] / scale, height, width)}


def check_options(options: dict[str, Any], *classes: type) -> None:
    """Refuse an option that neither ``classes`` nor the RPN takes, naming the ones that exist (the
    builders pass RPN options through ``**``, so ``build_model``'s signature check cannot see them)."""
    known = {name for cls in (*classes, RPN) for name, p in inspect.signature(cls).parameters.items()
             if p.kind is not inspect.Parameter.VAR_KEYWORD} - {"num_classes", "in_channels", "num_levels"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CvforgeError(f"unknown model option(s) {', '.join(unknown)}", None,
                           f"use any of {', '.join(sorted(known))}")


def faster_rcnn(*, num_classes: int, backbone: str = "resnet18", fpn: bool = False, **options: Any) -> FasterRCNN:
    """``faster_rcnn``: one stride-16 feature map, 3 scales x 3 ratios of anchors (the paper). The backbone
    is resnet18, as for the rest of the region-based lineage here, so that a CPU trains it (the paper: VGG-16).
    options: ``FasterRCNN``'s and ``RPN``'s keyword arguments."""
    check_options(options, FasterRCNN)
    return FasterRCNN(num_classes, backbone=backbone, fpn=fpn, **options)


def faster_rcnn_fpn(*, num_classes: int, backbone: str = "resnet18", **options: Any) -> FasterRCNN:
    """``faster_rcnn_fpn``: with a feature pyramid (one anchor scale per level)."""
    check_options(options, FasterRCNN)
    return FasterRCNN(num_classes, backbone=backbone, fpn=True, **options)
