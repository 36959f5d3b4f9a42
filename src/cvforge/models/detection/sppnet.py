"""SPPNet (He et al., 2014): run the CNN once per image and pool each proposal's window of the feature map
with a spatial pyramid, instead of R-CNN's thousands of warped crops through the CNN.

What the paper changed: a spatial pyramid pooling layer (``region_pool.SpatialPyramidPool``, levels
{1, 2, 3, 6}) max-pools any window into a fixed-length vector (C x 50 values), so the convolutional layers see
the whole image once, at any size, and only the fc layers run per region: about 100x faster than R-CNN at
test time with similar accuracy. Fine-tuning (as in the paper) trains the fc layers only, because the
gradient of SPP over many overlapping windows is costly (Fast R-CNN's RoI pooling later removed that limit);
``trainable_stages`` fine-tunes more of the backbone.

Here the fc head is trained with Fast R-CNN's sampling (25 % foreground at IoU >= 0.5, background in [0.1, 0.5))
and one softmax + box-regression loss rather than the paper's post-hoc SVMs and regressors (R-CNN's
``rcnn.py`` keeps those); the backbone is any torchvision CNN cut at stride 16 (the paper's ZF-5 conv5).

    model = sppnet(num_classes=5, levels=(1, 2, 4))    # fewer, smaller levels for small inputs
"""
from __future__ import annotations

from typing import Any

import torch

from cvforge.models.detection.fast_rcnn import ProposalDetector, truncated_backbone
from cvforge.models.detection.region_pool import Regions, SpatialPyramidPool


class SPPNet(ProposalDetector):
    """Backbone once per image -> spatial pyramid pooling per proposal -> fc6, fc7 -> classes and boxes."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", pretrained: str | None = None,
                 trainable_stages: int | None = 0, levels: tuple[int, ...] = (1, 2, 3, 6), hidden: int = 1024,
                 imgsz: int = 600, proposals: str = "selective_search_fast", max_proposals: int = 2000,
                 rois_per_image: int = 64, fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_low: float = 0.1,
                 score_thresh: float = 0.05, nms: float = 0.3, max_det: int = 100):
        super().__init__()
        self.init_plumbing(imgsz, proposals, max_proposals)
        self.backbone = truncated_backbone(backbone, 16, pretrained, trainable_stages)
        self.spp = SpatialPyramidPool(tuple(levels), 1 / self.backbone.strides[-1])
        self.init_region_head(self.spp.out_features(self.backbone.out_channels[-1]), hidden, num_classes,
                              rois_per_image, fg_fraction, fg_iou, bg_low, score_thresh, nms, max_det)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        x, proposals, targets = self.prepare(images, targets if self.training else None)
        return self.classify_regions(x, proposals, targets, images)

    def forward_raw(self, x: torch.Tensor, regions: Regions) -> dict[str, torch.Tensor]:
        """The network (what ONNX exports): canvas float [B, 3, S, S] in [0, 1], regions in its pixels
        (``region_pool``: per image [R_i, 4], or [R, 5] with the image index) -> {"class_logits" [R, C + 1],
        "box_deltas" [R, 4 (C + 1)]}."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # fc-only fine-tuning: no conv graph
            features = self.backbone.forward_features(self.normalize(x))
        return self.predict_regions(self.spp(features, regions))


def sppnet(*, num_classes: int, **kwargs: Any) -> SPPNet:
    """SPPNet with the paper's pyramid {1, 2, 3, 6} and fc-only fine-tuning (``trainable_stages=0``);
    kwargs: ``SPPNet``'s."""
    return SPPNet(num_classes, **kwargs)
