"""Backbones: any torchvision classification CNN, cut into stages of feature maps.

One contract for every backbone (as timm's ``forward_features``/``feature_info``):

    backbone = get_backbone("resnet18")
    feats = backbone(images)            # list of per-stage maps, feats[i]: float [B, out_channels[i], H/s_i, W/s_i]
    backbone.out_channels, backbone.strides   # one entry per stage, s_i = strides[i]
    backbone.forward_features(images)   # the last map only
    backbone.freeze(2)                  # first two stages (the stem is stage 0) frozen, their BN in eval

A stage is the run of consecutive blocks whose output has the same stride, so a stage ends where the
next downsampling begins (resnet18: stem at 2, maxpool+layer1 at 4, layer2..4 at 8, 16, 32). Stages
are found by one dry run through the torchvision model's top-level blocks, which works for every CNN
whose forward is a plain chain of its children (all families below); transformers are refused.

The torchvision modules are kept under ``body`` with their own names, so a torchvision state_dict
loads with its keys unchanged (``layer1.0.conv1.weight`` -> ``body.layer1.0.conv1.weight``).
"""
from __future__ import annotations

import math
import warnings

import torch
import torchvision
from torch import nn

from cvforge.errors import CvforgeError

# Children of a torchvision classifier that belong to its head or to auxiliary heads, not to features.
HEAD_CHILDREN = ("fc", "classifier", "avgpool", "dropout", "aux1", "aux2", "AuxLogits")
# Containers whose children are the blocks of the chain (mobilenet/efficientnet/vgg/convnext/densenet
# "features", mnasnet "layers", regnet "trunk_output").
CHAIN_CONTAINERS = ("features", "layers", "trunk_output")
# Families without feature maps a chain of children can produce.
UNSUPPORTED = ("vit_", "swin_", "maxvit_")
PROBE_SIZE = 128  # side of the dry-run image; large enough for alexnet/inception, small enough to be fast
LIST_HINT = "run `cvforge models` (or torchvision.models.list_models()) to see the names"


def classification_model_names() -> list[str]:
    """Every torchvision classification model name (resnet18, efficientnet_b0, ...)."""
    return torchvision.models.list_models(module=torchvision.models)


class Backbone(nn.Module):
    """A chain of stages; ``forward(x)`` returns every stage's output.

    x: float [B, 3, H, W], already normalised (the task model owns normalisation).
    Attributes: ``name`` (torchvision model name), ``body`` (the torchvision modules, their names kept),
    ``stage_paths`` (per stage, the paths of its blocks inside body), ``stages`` (per stage, an
    ``nn.Sequential`` of those blocks), ``out_channels``, ``strides`` (one int per stage),
    ``frozen_stages`` (how many leading stages are frozen), ``block_channels`` (path -> output channels of
    every block, for a consumer that taps a map inside a stage: ``forward_blocks``).
    """

    def __init__(self, name: str, body: nn.ModuleDict, stage_paths: list[list[str]],
                 out_channels: list[int], strides: list[int], block_channels: dict[str, int]):
        super().__init__()
        self.name = name
        self.body = body
        # Stages are found by path on every use rather than held as modules: each module is registered
        # once, under ``body`` (state_dict keys stay torchvision's), and a module swapped in later
        # (SyncBatchNorm conversion, deepcopy for EMA) is the one that runs.
        self.stage_paths = stage_paths
        self.out_channels = out_channels
        self.strides = strides
        self.block_channels = block_channels
        self.frozen_stages = 0

    @property
    def stages(self) -> list[nn.Sequential]:
        return [nn.Sequential(*(self.body.get_submodule(p) for p in paths)) for paths in self.stage_paths]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_blocks(x, [paths[-1] for paths in self.stage_paths])  # each stage's last block

    def forward_blocks(self, x: torch.Tensor, paths: list[str]) -> list[torch.Tensor]:
        """The outputs of the blocks named by ``paths`` (in chain order), float [B, C, H/s, W/s] each; the
        chain stops after the last of them. torchvision's mobilenet FPN, for one, reads a map from inside
        the last stage (the block that first reaches stride 32) beside the stage's output."""
        wanted, features = set(paths), []
        for path in (p for stage in self.stage_paths for p in stage):
            x = self.body.get_submodule(path)(x)
            if path in wanted:
                features.append(x)
                if len(features) == len(wanted):
                    break
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map, float [B, out_channels[-1], H/strides[-1], W/strides[-1]]."""
        return self.forward(x)[-1]

    def freeze(self, stages: int) -> None:
        """Freeze the first ``stages`` stages (0: none, len(self.stages): all), unfreeze the rest.

        Frozen stages get ``requires_grad=False`` and stay in eval mode (BatchNorm running stats and
        stochastic depth do not move), also after ``model.train()``.
        """
        if not 0 <= stages <= len(self.stages):
            raise CvforgeError(f"cannot freeze {stages} stages of {self.name}", None,
                               f"use 0..{len(self.stages)} (it has {len(self.stages)} stages, the stem is stage 0)")
        self.frozen_stages = stages
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for stage in self.stages[:self.frozen_stages]:
            stage.eval()
        return self


def get_backbone(name: str, pretrained: str | None = None, trainable_stages: int | None = None) -> Backbone:
    """The torchvision model ``name`` as a ``Backbone`` (its classifier head dropped).

    pretrained: a torchvision weight name or a local file, loaded by ``weights.load_pretrained``.
    trainable_stages: how many of the last stages train; None trains all, 0 freezes every stage.
    """
    if name not in classification_model_names():
        raise CvforgeError(f"unknown backbone {name!r}", None, LIST_HINT)
    if name.startswith(UNSUPPORTED):
        raise CvforgeError(f"{name} is a vision transformer without a feature-map pyramid", None,
                           "choose a CNN backbone (resnet, mobilenet, efficientnet, regnet, convnext, ...)")
    with warnings.catch_warnings():  # googlenet/inception warn about their future default init
        warnings.simplefilter("ignore", FutureWarning)
        model = torchvision.models.get_model(name, weights=None)
    backbone = _cut_into_stages(name, model)
    if pretrained:
        from cvforge.models.weights import load_pretrained  # weights.py needs no backbone; avoid a cycle
        load_pretrained(backbone, pretrained)
    if trainable_stages is not None:
        backbone.freeze(len(backbone.stages) - min(trainable_stages, len(backbone.stages)))
    return backbone


def _chain(model: nn.Module) -> tuple[nn.ModuleDict, list[str]]:
    """(body, block paths): the feature children of ``model`` and the paths of their chain's blocks, in order."""
    body = nn.ModuleDict({n: m for n, m in model.named_children() if n not in HEAD_CHILDREN and m is not None})
    paths: list[str] = []
    for child_name, child in body.items():
        if child_name in CHAIN_CONTAINERS and isinstance(child, nn.Sequential):
            paths.extend(f"{child_name}.{name}" for name, _ in child.named_children())
        else:
            paths.append(child_name)
    return body, paths


@torch.no_grad()
def _probe(name: str, blocks: list[nn.Module]) -> list[tuple[int, int]]:
    """(channels, stride) of each block's output, from one dry run in eval mode on a PROBE_SIZE image."""
    x = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)
    shapes = []
    try:
        for block in blocks:
            x = block(x)
            if x.dim() != 4:
                raise ValueError(f"block output has shape {tuple(x.shape)}")
            shapes.append((x.shape[1], 2 ** round(math.log2(PROBE_SIZE / x.shape[-1]))))
    except (RuntimeError, ValueError, TypeError) as error:
        raise CvforgeError(f"cannot cut {name} into stages of feature maps ({error})", None,
                           "choose another backbone (resnet, mobilenet, efficientnet, regnet, convnext, ...)")
    return shapes


def _cut_into_stages(name: str, model: nn.Module) -> Backbone:
    """Group the chain's blocks by output stride; each group is one stage."""
    body, paths = _chain(model)
    was_training = body.training
    body.eval()  # the dry run must not move BatchNorm running stats
    shapes = _probe(name, [body.get_submodule(p) for p in paths])
    body.train(was_training)
    groups: list[list[str]] = []
    channels, strides = [], []
    for path, (ch, stride) in zip(paths, shapes):
        if strides and strides[-1] == stride:
            groups[-1].append(path)
            channels[-1] = ch
        else:
            groups.append([path])
            channels.append(ch)
            strides.append(stride)
    block_channels = {path: ch for path, (ch, _) in zip(paths, shapes)}
    return Backbone(name, body, groups, channels, strides, block_channels)


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 1.0,
                 weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups: ``model.backbone`` at ``lr * backbone_lr_mult``, the rest at ``lr``.

    Only trainable parameters are listed. Biases, norm weights and ConvNeXt layer scales go to groups
    with ``"weight_decay": 0.0`` (decaying them only hurts); the other groups carry ``weight_decay``
    when given, else no key, so the optimizer's default applies. Each group has a ``"name"``
    (backbone, backbone/no_decay, head, head/no_decay) for logging; empty groups are left out.
    """
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    buckets: dict[str, list[nn.Parameter]] = {"backbone": [], "backbone/no_decay": [], "head": [], "head/no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if id(p) in backbone_ids else "head"
        no_decay = p.ndim <= 1 or name.endswith("layer_scale")
        buckets[part + "/no_decay" * no_decay].append(p)
    groups = []
    for name, params in buckets.items():
        if not params:
            continue
        group = {"name": name, "params": params, "lr": lr * (backbone_lr_mult if name.startswith("backbone") else 1.0)}
        if name.endswith("no_decay"):
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """The input side of every model: uint8 [B, 3, H, W] (or float 0..1, or a list of same-size
    [3, H, W] images) -> float32 normalised with the ImageNet statistics the backbones were trained on."""

    def __init__(self, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean) / self.std
