"""Image classification: a backbone, then global pooling, dropout and one Linear layer.

Transfer learning is three choices on this model (DESIGN §1):
- **linear probe**: ``freeze("probe")`` freezes the whole backbone (BatchNorm in eval mode, so its running
  statistics stay those of the pretraining data); only the head learns.
- **fine-tune**: ``freeze(0)`` and ``param_groups(lr, backbone_lr_mult=0.1)``, so the pretrained features
  move slower than the new head.
- **freeze N stages**: ``freeze(N)`` keeps the first N stages (the stem is stage 0), which hold the most
  generic features, and fine-tunes the rest.

The model owns normalisation: it takes uint8 images (or float in 0..1) and applies ImageNet's mean and
standard deviation, the statistics torchvision's pretrained weights expect.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cvforge.errors import CvforgeError
from cvforge.models.backbones import Backbone, Normalize, get_backbone, param_groups



class ClassifierHead(nn.Sequential):
    """float [B, C_in, h, w] -> logits float [B, num_classes]: global average pool, dropout, Linear."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__(OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            dropout=nn.Dropout(dropout),
            fc=nn.Linear(in_channels, num_classes),
        ))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small weights: a new head starts near uniform scores and does not disturb pretrained features.
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)


class Classifier(nn.Module):
    """``backbone`` -> ``head``.

    forward(images, targets=None):
        images: uint8 [B, 3, H, W] (or float in 0..1), or a list of B [3, H, W] images of one size.
        train mode: targets {"label": int64 [B]} (or a list of B {"label": int64 []})
                    -> {"loss_cls": float []} (cross-entropy with ``label_smoothing``)
        eval mode:  -> {"scores": float32 [B, num_classes]}, softmax probabilities.
    """

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(backbone.out_channels[-1], num_classes, dropout)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.normalize = Normalize()  # uint8 images in, ImageNet-normalised floats out

    def logits(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Unnormalised class scores, float [B, num_classes]."""
        return self.head(self.backbone.forward_features(self.normalize(images)))

    def forward(self, images: torch.Tensor | list[torch.Tensor],
                targets: dict[str, torch.Tensor] | list[dict] | None = None) -> dict[str, torch.Tensor]:
        logits = self.logits(images)
        if not self.training:
            return {"scores": logits.float().softmax(dim=1)}
        if targets is None:
            raise ValueError("Classifier in train mode needs targets {'label': int64 [B]}")
        labels = _labels(targets).to(logits.device)
        return {"loss_cls": F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)}

    def freeze(self, stages: int | str) -> None:
        """Freeze the backbone: "all" or "probe" (linear probe), N (the first N stages, stem = stage 0), 0 (none).

        The head always trains.
        """
        n_stages = len(self.backbone.stages)
        if stages in ("all", "probe"):
            count = n_stages
        elif isinstance(stages, int) or (isinstance(stages, str) and stages.isdigit()):
            count = int(stages)
        else:
            raise CvforgeError(f"bad --freeze value {stages!r}", None,
                               f"use probe (or all), or a number of stages 0..{n_stages}")
        self.backbone.freeze(count)

    def param_groups(self, lr: float, backbone_lr_mult: float = 1.0, weight_decay: float | None = None) -> list[dict]:
        """Trainable parameters in groups: backbone at ``lr * backbone_lr_mult``, head at ``lr``;
        biases and norm weights in groups with ``"weight_decay": 0.0`` (see ``backbones.param_groups``)."""
        return param_groups(self, lr, backbone_lr_mult, weight_decay)


def _labels(targets: dict[str, torch.Tensor] | list[dict]) -> torch.Tensor:
    """int64 [B] from a batched {"label": [B]} or a list of per-image {"label": []}."""
    if isinstance(targets, dict):
        return torch.as_tensor(targets["label"], dtype=torch.int64)
    return torch.stack([torch.as_tensor(t["label"], dtype=torch.int64) for t in targets])


def build_classifier(backbone: str, *, num_classes: int, dropout: float = 0.0,
                     label_smoothing: float = 0.0) -> Classifier:
    """A classifier on the torchvision backbone named ``backbone`` (randomly initialised).

    Pretrained weights and freezing are applied afterwards (``weights.load_pretrained``, ``freeze``),
    so that these arguments alone rebuild the architecture from a checkpoint.
    """
    return Classifier(get_backbone(backbone), num_classes, dropout=dropout, label_smoothing=label_smoothing)
