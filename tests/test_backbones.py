"""Backbones: every family yields per-stage maps with the channels and strides it declares."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from cvforge.errors import CvforgeError
from cvforge.models.backbones import get_backbone, param_groups

# One member of each family; the last two go through the generic chain of children.
FAMILIES = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
            "regnet_x_400mf", "vgg11_bn", "convnext_tiny", "shufflenet_v2_x0_5", "mnasnet0_5"]
LARGE = ["resnext50_32x4d", "wide_resnet50_2", "densenet121"]  # slow to initialise


def _check_contract(name: str) -> None:
    backbone = get_backbone(name).eval()
    n = len(backbone.stages)
    assert n >= 4 and len(backbone.out_channels) == n and len(backbone.strides) == n
    assert backbone.strides == sorted(backbone.strides) and backbone.strides[-1] == 32
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone(x)
        last = backbone.forward_features(x)
    assert len(features) == n
    for feature, channels, stride in zip(features, backbone.out_channels, backbone.strides):
        assert feature.shape == (2, channels, 64 // stride, 64 // stride)
    assert torch.equal(last, features[-1])
    # every parameter of the body belongs to exactly one stage (freezing reaches all of them)
    in_stages = [id(p) for stage in backbone.stages for p in stage.parameters()]
    assert sorted(in_stages) == sorted(id(p) for p in backbone.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_family_contract(name):
    _check_contract(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_family_contract(name):
    _check_contract(name)


def test_resnet_stages_and_torchvision_names():
    backbone = get_backbone("resnet18")
    assert backbone.out_channels == [64, 64, 128, 256, 512]
    assert backbone.strides == [2, 4, 8, 16, 32]
    tv_keys = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert {k.removeprefix("body.") for k in backbone.state_dict()} == tv_keys


def test_unknown_and_unsupported_names():
    with pytest.raises(CvforgeError, match="cvforge models"):
        get_backbone("resnet19")
    with pytest.raises(CvforgeError, match="transformer"):
        get_backbone("vit_b_16")


def test_trainable_stages_freezes_the_first_ones():
    backbone = get_backbone("resnet18", trainable_stages=2)
    trainable = [all(p.requires_grad for p in s.parameters()) for s in backbone.stages]
    frozen = [not any(p.requires_grad for p in s.parameters()) for s in backbone.stages]
    assert frozen[:3] == [True] * 3 and trainable[3:] == [True, True]
    backbone.train()
    assert not backbone.body["bn1"].training and backbone.body["layer4"].training
    with pytest.raises(CvforgeError, match="0..5"):
        backbone.freeze(6)


def test_deepcopy_keeps_stages_on_the_copy():
    """EMA copies the model with deepcopy: the copy's stages must run the copy's weights."""
    backbone = get_backbone("resnet18").eval()
    twin = copy.deepcopy(backbone)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    x = torch.rand(1, 3, 32, 32)
    assert twin.forward_features(x).abs().sum() == 0
    assert backbone.forward_features(x).abs().sum() > 0


def test_swapped_modules_are_the_ones_that_run():
    """DDP converts BatchNorm to SyncBatchNorm by replacing modules: stages must follow."""
    backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(get_backbone("resnet18"))
    assert isinstance(backbone.stages[0][1], torch.nn.SyncBatchNorm)
    assert isinstance(backbone.body["bn1"], torch.nn.SyncBatchNorm)


def test_param_groups_split_backbone_and_decay():
    model = torch.nn.Module()
    model.backbone = get_backbone("resnet18")
    model.head = torch.nn.Linear(512, 3)
    model.backbone.freeze(2)
    groups = {g["name"]: g for g in param_groups(model, lr=0.1, backbone_lr_mult=0.1, weight_decay=5e-4)}
    assert set(groups) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["head"]["lr"] == 0.1
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 5e-4
    assert all(p.ndim <= 1 for p in groups["backbone/no_decay"]["params"])
    listed = {id(p) for g in groups.values() for p in g["params"]}
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.backbone.body["conv1"].weight) not in listed  # frozen: not given to the optimizer
