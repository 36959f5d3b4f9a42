"""Folding batch norm into the convolution before it, for inference.

In eval mode a BatchNorm2d is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma
+ beta``, so it can be folded into the preceding convolution's weights and bias: one op instead of two,
the same outputs up to float rounding. ``cvforge.load`` does this for every ``conv -> bn`` pair that sits
next to each other in an ``nn.Sequential`` (YOLO's ConvBNAct, YOLOv1's conv blocks, torchvision's
``downsample`` branches); the checkpoint on disk keeps the unfused weights.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold each ``Conv2d`` followed by a ``BatchNorm2d`` in the same ``nn.Sequential`` into one conv
    (the norm becomes ``nn.Identity``), in place; the model must be in eval mode. Returns the count."""
    if model.training:
        raise ValueError("fuse_conv_bn folds the running statistics: call model.eval() first")
    fused = 0
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequence._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = sequence._modules[first], sequence._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                sequence._modules[first] = fuse_conv_bn_eval(conv, norm)
                sequence._modules[second] = nn.Identity()
                fused += 1
    return fused
