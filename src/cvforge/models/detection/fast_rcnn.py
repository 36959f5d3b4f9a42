"""Fast R-CNN (Girshick, 2015): the CNN runs once per image, RoI pooling cuts each proposal's window out of
the feature map, and one network is trained end to end with one multi-task loss.

What the paper changed, against R-CNN and SPPNet:
- One pass of the CNN per image (as SPPNet) and a single-level 7 x 7 RoI max pooling (``region_pool.RoIPool``)
  whose gradient flows into the convolutional layers, so they are fine-tuned too (SPPNet could not).
- One stage of training: softmax classifier and class-specific box regressor learnt together by
  ``roi_head.fast_rcnn_loss`` (no SVMs, no separate regressors, no features written to disk).
- Hierarchical sampling: a mini-batch is N = 2 images x R / N = 64 RoIs, 25 % foreground (IoU >= 0.5 with a
  ground-truth box), the rest background with IoU in [0.1, 0.5); RoIs of one image share its computation.
Here the backbone is any torchvision CNN cut at stride 16 (``resnet18`` by default, the paper's VGG16 conv5 is
also stride 16), RoIAlign is an option (``pooler="roi_align"``), and proposals come from selective search
(``proposals.py``), precomputed per image and cached.

    model = fast_rcnn(num_classes=5)
    losses = model(images, targets)     # train: {"cls", "box"}; targets may carry "proposals" [N, 4]
    detections = model(images)          # eval: per image {"boxes", "scores", "labels"} in original pixels
    outputs = model.forward_raw(x, regions)  # the network alone (what ONNX exports): canvas, regions -> scores, deltas
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cvforge.boxes import BoxCoder, letterbox_params, unletterbox
from cvforge.errors import CvforgeError
from cvforge.models.backbones import Backbone, Normalize, get_backbone
from cvforge.models.detection.matching import BalancedSampler, Matcher, sample_regions
from cvforge.models.detection.proposals import ProposalDataset, build_proposal_source
from cvforge.models.detection.region_pool import Regions, RoIAlign, RoIPool
from cvforge.models.detection.roi_head import BoxPredictor, TwoFCHead, fast_rcnn_loss, postprocess
from cvforge.models.detection.yolo import letterbox_batch


def truncated_backbone(name: str, stride: int = 16, pretrained: str | None = None,
                       trainable_stages: int | None = None) -> Backbone:
    """``get_backbone(name)`` cut after its last stage of stride <= ``stride`` (the later stages are deleted,
    so they hold no weights). ``trainable_stages``: how many of the kept last stages train (None: all)."""
    backbone = get_backbone(name, pretrained=pretrained)
    keep = sum(s <= stride for s in backbone.strides)
    if keep == 0:
        raise CvforgeError(f"{name} has no stage of stride <= {stride}", None, "choose a larger feature stride")
    kept_paths = {p for paths in backbone.stage_paths[:keep] for p in paths}
    for paths in backbone.stage_paths[keep:]:
        for path in reversed(paths):
            parent, _, child = path.rpartition(".")
            owner = backbone.body.get_submodule(parent) if parent else backbone.body
            if path not in kept_paths:
                owner._modules.pop(child)
    backbone.stage_paths = backbone.stage_paths[:keep]
    backbone.out_channels, backbone.strides = backbone.out_channels[:keep], backbone.strides[:keep]
    if trainable_stages is not None:
        backbone.freeze(keep - min(trainable_stages, keep))
    return backbone


class ProposalDetector(nn.Module):
    """Plumbing the proposal-based detectors share (not their forward): the input side (letterbox to
    ``input_size``, ImageNet normalisation), the proposal source, the training data recipe, and mapping
    detections back to the original pixels."""

    def init_plumbing(self, imgsz: int, proposals: str, max_proposals: int) -> None:
        self.normalize = Normalize()
        self.proposal_spec, self.max_proposals = proposals, max_proposals
        self.source = build_proposal_source(proposals, max_proposals)
        # the side it trained at (saved with the weights), so a checkpoint predicts at that size
        self.register_buffer("input_size", torch.tensor(imgsz))

    def prepare(self, images: list[torch.Tensor], targets: list[dict] | None
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[dict] | None]:
        """uint8 images [3, H_i, W_i] -> (letterboxed canvas float [B, 3, S, S] in [0, 1], proposals per image
        [N_i, 4] and targets with "boxes", both in canvas pixels). Proposals: ``targets[i]["proposals"]`` when
        given, else from the proposal source (cached). ``forward_raw`` normalises the canvas itself."""
        size, device = int(self.input_size), self.input_size.device
        if targets is not None and all("proposals" in t for t in targets):
            proposals = [t["proposals"] for t in targets]
        else:
            proposals = [self.source(image.cpu()) for image in images]
        x, _ = letterbox_batch(images, size, None, device)
        moved = [to_canvas(p.to(device), image.shape[-2:], size) for p, image in zip(proposals, images)]
        if targets is not None:
            targets = [{**t, "boxes": to_canvas(t["boxes"].to(device), i.shape[-2:], size)}
                       for t, i in zip(targets, images)]
        return x, moved, targets

    def init_region_head(self, in_features: int, hidden: int, num_classes: int, rois_per_image: int,
                         fg_fraction: float, fg_iou: float, bg_low: float, score_thresh: float, nms: float,
                         max_det: int) -> None:
        """fc6, fc7 and the (C + 1)-way classifier + box regressor on pooled regions of ``in_features`` values;
        Fast R-CNN's sampling (``rois_per_image``, ``fg_fraction`` foreground at IoU >= ``fg_iou``, background
        in [``bg_low``, ``fg_iou``)) and the test-time threshold, NMS and detection limit."""
        self.head = TwoFCHead(in_features, hidden)
        self.predictor = BoxPredictor(hidden, num_classes)
        self.matcher, self.sampler = Matcher(fg_iou, fg_iou), BalancedSampler(rois_per_image, fg_fraction)
        self.coder, self.bg_low = BoxCoder(), bg_low
        self.score_thresh, self.nms, self.max_det = score_thresh, nms, max_det

    def classify_regions(self, x: torch.Tensor, proposals: list[torch.Tensor], targets: list[dict] | None,
                         images: list[torch.Tensor]) -> Any:
        """The canvas and its regions through ``forward_raw``. Train: on sampled regions, the multi-task loss
        {"cls", "box"}; eval: on every proposal, detections in original pixels."""
        if self.training:
            regions, labels, regression_targets = sample_regions(
                proposals, targets, self.matcher, self.sampler, self.coder, bg_low=self.bg_low)
            outputs = self.forward_raw(x, regions)
            return fast_rcnn_loss(outputs["class_logits"], outputs["box_deltas"], labels, regression_targets)
        outputs = self.forward_raw(x, proposals)
        size = int(self.input_size)
        detections = postprocess(outputs["class_logits"], outputs["box_deltas"], proposals,
                                 [(size, size)] * len(images), self.coder, self.score_thresh, self.nms, self.max_det)
        return self.to_original(detections, images)

    def predict_regions(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled regions [R, ...] -> fc6, fc7 -> {"class_logits" [R, C + 1], "box_deltas" [R, 4 (C + 1)]}."""
        class_logits, box_deltas = self.predictor(self.head(pooled))
        return {"class_logits": class_logits, "box_deltas": box_deltas}

    def to_original(self, detections: list[dict], images: list[torch.Tensor]) -> list[dict]:
        size = int(self.input_size)
        return [{**d, "boxes": unletterbox(d["boxes"], *image.shape[-2:], size)}
                for d, image in zip(detections, images)]

    def wrap_train_data(self, dataset: Any, config: Any) -> tuple[Any, list]:
        """Proposals on the un-augmented images, horizontal flips only (as the papers); input side = --imgsz."""
        self.input_size.fill_(int(config.imgsz))
        return ProposalDataset(dataset, self.source), []

    def freeze(self, stages: int | str) -> None:
        """Freeze the first ``stages`` backbone stages ("all": every one); the region head always trains."""
        self.backbone.freeze(len(self.backbone.stage_paths) if stages == "all" else int(stages))


def to_canvas(boxes: torch.Tensor, hw: tuple[int, int], size: int) -> torch.Tensor:
    """[N, 4] xyxy original pixels -> the same boxes on the ``size`` letterbox canvas (``letterbox_batch``)."""
    height, width = int(hw[0]), int(hw[1])
    _, new_h, new_w, top, left = letterbox_params(height, width, size)
    scale = boxes.new_tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
    return boxes.float().reshape(-1, 4) * scale + scale.new_tensor([left, top] * 2)


class FastRCNN(ProposalDetector):
    """Backbone (stride 16) -> RoIPool 7 x 7 -> fc6, fc7 -> (C + 1)-way softmax and class-specific boxes."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", pretrained: str | None = None,
                 trainable_stages: int | None = None, pooler: str = "roi_pool", pool_size: int = 7,
                 hidden: int = 1024, imgsz: int = 600, proposals: str = "selective_search_fast",
                 max_proposals: int = 2000, rois_per_image: int = 64, fg_fraction: float = 0.25,
                 fg_iou: float = 0.5, bg_low: float = 0.1, score_thresh: float = 0.05, nms: float = 0.3,
                 max_det: int = 100):
        super().__init__()
        self.init_plumbing(imgsz, proposals, max_proposals)
        self.backbone = truncated_backbone(backbone, 16, pretrained, trainable_stages)
        if pooler not in ("roi_pool", "roi_align"):
            raise CvforgeError(f"unknown pooler {pooler!r}", None, "use roi_pool or roi_align")
        pool_type = RoIPool if pooler == "roi_pool" else RoIAlign
        self.pool = pool_type(pool_size, 1 / self.backbone.strides[-1])
        self.init_region_head(self.backbone.out_channels[-1] * pool_size ** 2, hidden, num_classes, rois_per_image,
                              fg_fraction, fg_iou, bg_low, score_thresh, nms, max_det)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        x, proposals, targets = self.prepare(images, targets if self.training else None)
        return self.classify_regions(x, proposals, targets, images)

    def forward_raw(self, x: torch.Tensor, regions: Regions) -> dict[str, torch.Tensor]:
        """The network (what ONNX exports): canvas float [B, 3, S, S] in [0, 1], regions in its pixels
        (``region_pool``: per image [R_i, 4], or [R, 5] with the image index) -> {"class_logits" [R, C + 1],
        "box_deltas" [R, 4 (C + 1)]}."""
        features = self.backbone.forward_features(self.normalize(x))
        return self.predict_regions(self.pool(features, regions))


def fast_rcnn(*, num_classes: int, **kwargs: Any) -> FastRCNN:
    """Fast R-CNN with the paper's settings (RoIPool 7 x 7, 2 x 64 RoIs, 25 % foreground, NMS 0.3);
    kwargs: ``FastRCNN``'s."""
    return FastRCNN(num_classes, **kwargs)
