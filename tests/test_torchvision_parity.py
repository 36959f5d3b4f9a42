"""cvforge's Faster R-CNN and Mask R-CNN compute what torchvision's compute, given the same weights and settings.

torchvision's detection models are the reference of issue 7 (``benchmarks/vs_torchvision.py`` trains the two
side by side). Training differs by random draws (initialisation, region sampling), so the accuracy benchmark
alone cannot tell an implementation difference from noise; here torchvision's weights are copied into
cvforge's model (the two have the same parameters, in the same order) and both must return the same detections.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import box_iou

from cvforge.models.detection.roi_head import fast_rcnn_loss
from cvforge.zoo import build_model

SIDE = 128
TV_ANCHORS = [32, 64, 128, 256, 512]  # torchvision's anchor sizes, in input pixels
TV_PROPOSALS = (2000, 1000)  # torchvision keeps 1000 proposals at test (cvforge: the paper's 300)


def copy_torchvision_weights(reference: nn.Module, model: nn.Module) -> None:
    """Load ``reference``'s state into ``model``, tensor by tensor in order (the names differ, the shapes may
    not; torchvision's mask predictor has a channel for the background class, which cvforge does not)."""
    source = list(reference.state_dict().items())
    target = [(k, v) for k, v in model.state_dict().items() if k != "input_size"]
    assert len(source) == len(target)
    state = {}
    for (source_key, value), (key, like) in zip(source, target):
        if "mask_predictor" in source_key and value.shape[0] == like.shape[0] + 1:
            value = value[1:]
        assert value.shape == like.shape, (source_key, key)
        state[key] = value
    assert model.load_state_dict(state, strict=False).missing_keys == ["input_size"]


def images(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(3, SIDE, SIDE, generator=generator) * 255).to(torch.uint8) for _ in range(count)]


@torch.no_grad()
def assert_same_detections(reference: nn.Module, model: nn.Module) -> None:
    """Same boxes, scores and labels (as sets: equal scores may come in another order); same masks."""
    reference.eval(), model.eval()
    batch = images()
    for ours, theirs in zip(model(batch), reference([image.float() / 255 for image in batch])):
        assert len(ours["boxes"]) == len(theirs["boxes"]) > 0
        iou = box_iou(theirs["boxes"], ours["boxes"])
        same_score = (theirs["scores"][:, None] - ours["scores"][None]).abs() < 1e-5
        same_label = (theirs["labels"][:, None] - 1) == ours["labels"][None]
        match = ((iou > 0.9999) & same_score & same_label).float()
        assert match.any(1).all() and match.any(0).all()
        if "masks" in theirs:  # torchvision's masks are probabilities [K, 1, H, W]
            pairs = match.argmax(1)
            agreement = ((theirs["masks"][:, 0] >= 0.5) == ours["masks"][pairs].bool()).float().mean()
            assert agreement > 0.999


def test_faster_rcnn_mobilenet_fpn_matches_torchvisions_with_its_weights():
    torch.manual_seed(0)
    reference = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                            min_size=SIDE, max_size=SIDE)
    model = build_model("faster_rcnn_fpn", task="detect", num_classes=3, backbone="mobilenet_v3_large", imgsz=SIDE,
                        fpn_blocks=["features.13", "features.16"], anchor_sizes=[TV_ANCHORS] * 3,
                        anchor_reference=SIDE, rpn_score_thresh=0.05, post_nms_top_n=TV_PROPOSALS)
    copy_torchvision_weights(reference, model)
    assert_same_detections(reference, model)


def test_mask_rcnn_resnet_fpn_matches_torchvisions_with_its_weights():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d)
    reference = detection.MaskRCNN(backbone, num_classes=4, min_size=SIDE, max_size=SIDE)
    model = build_model("mask_rcnn", task="instance", num_classes=3, backbone="resnet18", imgsz=SIDE,
                        anchor_sizes=TV_ANCHORS, anchor_reference=SIDE, post_nms_top_n=TV_PROPOSALS)
    copy_torchvision_weights(reference, model)
    assert_same_detections(reference, model)


def test_box_head_loss_is_torchvisions_at_its_beta():
    """torchvision's box loss is smooth L1 with beta 1/9; cvforge's default is Fast R-CNN's 1 (``box_beta``)."""
    generator = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(64, 4, generator=generator), torch.randn(64, 16, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    targets = torch.randn(64, 4, generator=generator)
    cls, box = fastrcnn_loss(logits, deltas, [labels], [targets])
    ours = fast_rcnn_loss(logits, deltas, labels, targets, beta=1 / 9)
    assert torch.allclose(ours["cls"], cls) and torch.allclose(ours["box"], box)
    assert not torch.allclose(fast_rcnn_loss(logits, deltas, labels, targets)["box"], box)
