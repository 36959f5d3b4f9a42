"""R-CNN (Girshick et al., 2014): "Regions with CNN features" — classify each proposal with a CNN.

What the paper did: take ~2000 class-agnostic proposals (selective search), warp each one, with 16 px of
context at 227 x 227, to the CNN's fixed input (``region_pool.crop_and_warp``), and run the whole CNN on every
crop. The CNN, pre-trained on ImageNet, is fine-tuned as a (C + 1)-way classifier on proposals (IoU >= 0.5 with
a ground-truth box positive; mini-batches of 32 positives and 96 background). Then one linear SVM per class
is trained on the fc7 features (positives: the ground-truth boxes only; negatives: proposals with IoU < 0.3;
hard-negative mining), and a class-specific linear box regressor on proposals with IoU >= 0.6. At test time:
SVM scores, regressed boxes, per-class NMS. The CNN per region is what made it slow (SPPNet, Fast R-CNN).

Here all three stages train in the one training loop, each on its own targets: the CNN + softmax by
cross-entropy; the SVMs by the hinge loss on detached fc7 features, the negatives being the hardest
``hard_negatives`` of each batch (online hard-negative mining, instead of the paper's cached feature files);
the regressor by smooth L1 on detached features. ``scores="softmax"`` uses the fine-tuned softmax instead
of the SVMs (the paper's ablation). The crops are cut from the image letterboxed to the input size
(``--imgsz``) and warped to ``warp`` x ``warp``: the paper's 227 by default, or the input size where that is
smaller (a 128-px data set warps to 128), with the context padding scaled along (16 px at 227).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from cvforge.boxes import BoxCoder
from cvforge.errors import CvforgeError
from cvforge.models.backbones import get_backbone
from cvforge.models.detection.fast_rcnn import ProposalDetector
from cvforge.models.detection.matching import BalancedSampler, Matcher, sample_regions
from cvforge.models.detection.region_pool import Regions, crop_and_warp
from cvforge.models.detection.roi_head import TwoFCHead, postprocess

PAPER_WARP, PAPER_CONTEXT = 227, 16
EVAL_CHUNK = 64  # crops through the CNN at once at test time (bounds memory at 227 x 227)


class RCNN(ProposalDetector):
    """Warped proposal crops -> CNN -> fc6, fc7 -> softmax (fine-tuning) / linear SVMs, box regressor."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", pretrained: str | None = None,
                 trainable_stages: int | None = None, warp: int = 0, hidden: int = 1024, imgsz: int = 600,
                 proposals: str = "selective_search_fast", max_proposals: int = 2000, scores: str = "svm",
                 regions_per_image: int = 64, fg_fraction: float = 0.25, svm_neg_iou: float = 0.3,
                 hard_negatives: int = 64, box_iou_min: float = 0.6, score_thresh: float = 0.05,
                 nms: float = 0.3, max_det: int = 100):
        super().__init__()
        if scores not in ("svm", "softmax"):
            raise CvforgeError(f"unknown R-CNN scores {scores!r}", None, "use svm or softmax")
        self.init_plumbing(imgsz, proposals, max_proposals)
        self.backbone = get_backbone(backbone, pretrained=pretrained, trainable_stages=trainable_stages)
        self.head = TwoFCHead(self.backbone.out_channels[-1], hidden)
        self.classifier = nn.Linear(hidden, num_classes + 1)  # fc8 of the fine-tuning
        self.svm = nn.Linear(hidden, num_classes)  # one linear SVM per class on fc7
        self.regressor = nn.Linear(hidden, 4 * (num_classes + 1))
        nn.init.normal_(self.regressor.weight, std=0.001)
        nn.init.zeros_(self.regressor.bias)
        self.warp_side, self.scores = warp, scores
        self.matcher, self.sampler = Matcher(0.5, 0.5), BalancedSampler(regions_per_image, fg_fraction)
        self.coder, self.svm_neg_iou, self.box_iou_min = BoxCoder(), svm_neg_iou, box_iou_min
        self.hard_negatives = hard_negatives
        self.score_thresh, self.nms, self.max_det = score_thresh, nms, max_det

    @property
    def warp(self) -> int:
        """Side of the warped crops: ``warp``, else the paper's 227 or the input size if smaller."""
        return int(self.warp_side) if self.warp_side else min(PAPER_WARP, int(self.input_size))

    def features(self, x: torch.Tensor, regions: Regions) -> torch.Tensor:
        """Canvas float [B, 3, S, S] in [0, 1], regions in its pixels (``region_pool``: per image [R_i, 4], or
        [R, 5] with the image index) -> each region cut (with context) from the normalised canvas, warped,
        through the CNN and fc6, fc7 -> [R, hidden]."""
        context = round(PAPER_CONTEXT * self.warp / PAPER_WARP)
        crops = crop_and_warp(self.normalize(x), regions, self.warp, context)
        return self.head(self.backbone.forward_features(crops).mean((2, 3)))

    def forward_raw(self, x: torch.Tensor, regions: Regions) -> dict[str, torch.Tensor]:
        """The network (what ONNX exports), ``features`` and every output layer on fc7: {"class_logits"
        [R, C + 1] (fine-tuning softmax), "box_deltas" [R, 4 (C + 1)], "svm_scores" [R, C] (SVM margins)}."""
        fc7 = self.features(x, regions)
        return {"class_logits": self.classifier(fc7), "box_deltas": self.regressor(fc7), "svm_scores": self.svm(fc7)}

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        x, proposals, targets = self.prepare(images, targets if self.training else None)
        if self.training:
            regions, labels, regression_targets, matched = sample_regions(
                proposals, targets, self.matcher, self.sampler, self.coder, return_matched=True)
            gt = [t["boxes"].float().reshape(-1, 4) for t in targets]
            if not len(labels) and not sum(map(len, gt)):  # nothing to learn from: zero losses, still connected
                zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0
                return {"cls": zero, "svm": zero, "box": zero}
            fc7 = self.features(x, [torch.cat([r, g]) for r, g in zip(regions, gt)])
            fc7, gt_fc7 = split_gt(fc7, [len(r) for r in regions], [len(g) for g in gt])
            losses = {"cls": F.cross_entropy(self.classifier(fc7), labels) if len(labels) else fc7.sum() * 0}
            losses["svm"] = self.svm_loss(fc7.detach(), gt_fc7.detach(), regions, targets)
            losses["box"] = self.box_loss(fc7.detach(), regions, labels, regression_targets, matched, gt)
            return losses
        with torch.no_grad():  # one image, at most EVAL_CHUNK crops at a time: memory stays bounded
            pieces = [self.forward_raw(x[i:i + 1], [piece]) for i, p in enumerate(proposals)
                      for piece in p.split(EVAL_CHUNK) if len(piece)]
            pieces = pieces or [self.forward_raw(x[:1], [x.new_zeros(0, 4)])]  # no proposal at all
        return self.detect({k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}, proposals, images)

    def svm_loss(self, fc7: torch.Tensor, gt_fc7: torch.Tensor, regions: list[torch.Tensor],
                 targets: list[dict]) -> torch.Tensor:
        """One-vs-rest hinge loss: ground-truth boxes positive for their class; regions with IoU < svm_neg_iou
        with every box of a class negative for it; only the ``hard_negatives`` highest-scoring negatives count."""
        gt_labels = torch.cat([t["labels"] for t in targets]).to(fc7.device)
        negative = torch.cat([self.negatives_for(r, t) for r, t in zip(regions, targets)])  # [R, C] bool
        pos_scores = self.svm(gt_fc7).gather(1, gt_labels[:, None]).squeeze(1)
        neg_scores = self.svm(fc7)[negative]
        hard = neg_scores.topk(min(self.hard_negatives, neg_scores.numel())).values
        hinge = torch.cat([F.relu(1 - pos_scores), F.relu(1 + hard)])
        return hinge.mean() if hinge.numel() else fc7.sum() * 0 + self.svm.weight.sum() * 0

    def negatives_for(self, regions: torch.Tensor, target: dict) -> torch.Tensor:
        """[R, 4], one image's target -> bool [R, C]: region is an SVM negative of class c."""
        num_classes = self.svm.out_features
        boxes, labels = target["boxes"].float().reshape(-1, 4), target["labels"].to(regions.device)
        iou = box_iou(regions, boxes) if len(boxes) else regions.new_zeros(len(regions), 0)
        index = labels[None, :].expand(len(regions), -1)
        per_class = regions.new_zeros(len(regions), num_classes).scatter_reduce(1, index, iou, "amax")
        return per_class < self.svm_neg_iou

    def box_loss(self, fc7: torch.Tensor, regions: list[torch.Tensor], labels: torch.Tensor,
                 regression_targets: torch.Tensor, matched: list[torch.Tensor], gt: list[torch.Tensor]) -> torch.Tensor:
        """Smooth L1 of the class-specific regressor on foreground regions with IoU >= box_iou_min to their box."""
        overlaps = torch.cat([box_iou(r, g[m.clamp(min=0)]).diagonal() if len(g) else r.new_zeros(len(r))
                              for r, g, m in zip(regions, gt, matched)]) if len(labels) else labels.float()
        use = ((labels > 0) & (overlaps >= self.box_iou_min)).nonzero().squeeze(1)
        if use.numel() == 0:
            return self.regressor.weight.sum() * 0
        deltas = self.regressor(fc7[use]).reshape(len(use), -1, 4)[torch.arange(len(use)), labels[use]]
        return F.smooth_l1_loss(deltas, regression_targets[use], reduction="mean")

    def detect(self, outputs: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               images: list[torch.Tensor]) -> list[dict]:
        """``forward_raw``'s outputs -> scores (SVM margins squashed by a sigmoid, or softmax), regressed boxes,
        per-class NMS; detections in original pixels."""
        if self.scores == "svm":
            svm = torch.sigmoid(outputs["svm_scores"])
            scores, softmax = torch.cat([svm.new_zeros(len(svm), 1), svm], 1), False
        else:
            scores, softmax = outputs["class_logits"], True
        size = int(self.input_size)
        detections = postprocess(scores, outputs["box_deltas"], proposals, [(size, size)] * len(images), self.coder,
                                 self.score_thresh, self.nms, self.max_det, softmax=softmax)
        return self.to_original(detections, images)


def split_gt(features: torch.Tensor, regions: list[int], gts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[sum(regions_i + gts_i), D] in per-image (regions, gt) order -> (regions' [R, D], ground truths' [G, D])."""
    parts = features.split([n for pair in zip(regions, gts) for n in pair])
    return torch.cat(parts[0::2]), torch.cat(parts[1::2])


def rcnn(*, num_classes: int, **kwargs: Any) -> RCNN:
    """R-CNN with the paper's recipe (warp with 16 px context, 32 + 96 regions per mini-batch, SVM scores);
    kwargs: ``RCNN``'s."""
    return RCNN(num_classes, **kwargs)
