"""The layers of the modern anchor-free YOLO (``yolo.py``): a CSP backbone, a PAN neck and a decoupled head.

Written from the published descriptions of the YOLOv5 → YOLOv8 line:
- ``ConvBNAct``: every convolution is conv + batch norm + SiLU.
- ``CSPBlock`` (cross-stage partial): a 1x1 conv splits the features in two halves; one half runs
  through ``n`` residual bottlenecks, each bottleneck's output is kept, and all pieces are
  concatenated and fused by a 1x1 conv — rich gradient paths at a low cost.
- ``SPPF``: three chained 5x5 max-pools (receptive fields 5, 9, 13) concatenated, for context.
- ``CSPBackbone``: stem + four stride-2 stages, returning C3, C4, C5 (strides 8, 16, 32).
- ``PANNeck``: top-down (FPN) then bottom-up (PAN) fusion, so every level sees both fine detail
  and deep semantics.
- ``DecoupledHead``: per level, separate box and class branches (the "decoupled" head). The box
  branch predicts, for each of the four sides, a distribution over ``reg_max`` bins of distance
  (distribution focal loss); there are no anchor boxes, only anchor *points* (cell centres).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def scaled(channels: int, width: float, max_channels: int = 1024) -> int:
    """Channels times the width multiplier, rounded up to a multiple of 8 (hardware friendly)."""
    return int(math.ceil(min(channels, max_channels) * width / 8) * 8)


def repeats(n: int, depth: float) -> int:
    """Blocks times the depth multiplier, at least one."""
    return max(round(n * depth), 1)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + SiLU; 'same' padding for odd kernels."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03), nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    """Two 3x3 convs with an optional residual connection."""

    def __init__(self, channels: int, shortcut: bool = True):
        super().__init__()
        self.conv1, self.conv2 = ConvBNAct(channels, channels, 3), ConvBNAct(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPBlock(nn.Module):
    """Cross-stage partial block: [B, c_in, H, W] -> [B, c_out, H, W] (module docstring)."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.hidden = c_out // 2
        self.split = ConvBNAct(c_in, 2 * self.hidden)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(n))
        self.fuse = ConvBNAct((2 + n) * self.hidden, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = list(self.split(x).chunk(2, dim=1))
        for block in self.blocks:
            pieces.append(block(pieces[-1]))
        return self.fuse(torch.cat(pieces, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: 1x1 reduce, three chained 5x5 max-pools, concat, 1x1."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in // 2
        self.reduce, self.fuse = ConvBNAct(c_in, hidden), ConvBNAct(4 * hidden, c_out)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = [self.reduce(x)]
        for _ in range(3):
            pieces.append(self.pool(pieces[-1]))
        return self.fuse(torch.cat(pieces, dim=1))


class CSPBackbone(nn.Module):
    """[B, 3, H, W] -> [C3 (stride 8), C4 (16), C5 (32)]; ``out_channels`` lists their channels."""

    def __init__(self, width: float, depth: float):
        super().__init__()
        c = [scaled(x, width) for x in (64, 128, 256, 512, 1024)]
        self.stem = ConvBNAct(3, c[0], 3, 2)
        self.stage2 = nn.Sequential(ConvBNAct(c[0], c[1], 3, 2), CSPBlock(c[1], c[1], repeats(3, depth)))
        self.stage3 = nn.Sequential(ConvBNAct(c[1], c[2], 3, 2), CSPBlock(c[2], c[2], repeats(6, depth)))
        self.stage4 = nn.Sequential(ConvBNAct(c[2], c[3], 3, 2), CSPBlock(c[3], c[3], repeats(6, depth)))
        self.stage5 = nn.Sequential(ConvBNAct(c[3], c[4], 3, 2), CSPBlock(c[4], c[4], repeats(3, depth)),
                                    SPPF(c[4], c[4]))
        self.out_channels, self.strides = (c[2], c[3], c[4]), (8, 16, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage3(self.stage2(self.stem(x)))
        c4 = self.stage4(c3)
        return [c3, c4, self.stage5(c4)]


class PANNeck(nn.Module):
    """Path aggregation: [C3, C4, C5] -> [P3, P4, P5] with the same channels (module docstring)."""

    def __init__(self, channels: tuple[int, int, int], depth: float):
        super().__init__()
        c3, c4, c5 = channels
        n = repeats(3, depth)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = CSPBlock(c5 + c4, c4, n, shortcut=False)
        self.top_down3 = CSPBlock(c4 + c3, c3, n, shortcut=False)
        self.down3, self.bottom_up4 = ConvBNAct(c3, c3, 3, 2), CSPBlock(c3 + c4, c4, n, shortcut=False)
        self.down4, self.bottom_up5 = ConvBNAct(c4, c4, 3, 2), CSPBlock(c4 + c5, c5, n, shortcut=False)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = features
        t4 = self.top_down4(torch.cat([self.up(c5), c4], 1))
        p3 = self.top_down3(torch.cat([self.up(t4), c3], 1))
        p4 = self.bottom_up4(torch.cat([self.down3(p3), t4], 1))
        p5 = self.bottom_up5(torch.cat([self.down4(p4), c5], 1))
        return [p3, p4, p5]


class DecoupledHead(nn.Module):
    """Per level: box branch -> 4 * reg_max distance logits, class branch -> num_classes logits.

    forward: list of [B, C_l, H_l, W_l] -> [B, A, 4 * reg_max + num_classes], A = sum of H_l * W_l,
    levels in order, each flattened row-major (the order of ``anchor_points``).
    """

    def __init__(self, channels: tuple[int, ...], num_classes: int, reg_max: int = 16,
                 strides: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, strides
        box_c, cls_c = max(16, channels[0] // 4, 4 * reg_max), max(channels[0], min(num_classes, 100))
        self.box = nn.ModuleList(nn.Sequential(ConvBNAct(c, box_c, 3), ConvBNAct(box_c, box_c, 3),
                                               nn.Conv2d(box_c, 4 * reg_max, 1)) for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(ConvBNAct(c, cls_c, 3), ConvBNAct(cls_c, cls_c, 3),
                                               nn.Conv2d(cls_c, num_classes, 1)) for c in channels)

    def reset_bias(self, image_size: int = 640) -> None:
        """Start every class at a low prior (about 5 objects per image spread over the level's cells),
        so the first steps are not swamped by the loss of millions of easy negatives."""
        for box, cls, stride in zip(self.box, self.cls, self.strides):
            nn.init.constant_(box[-1].bias, 1.0)
            cells = (image_size / stride) ** 2
            nn.init.constant_(cls[-1].bias, math.log(5 / self.num_classes / cells))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        outputs = [torch.cat([box(x), cls(x)], 1).flatten(2) for x, box, cls in zip(features, self.box, self.cls)]
        return torch.cat(outputs, 2).transpose(1, 2)


def anchor_points(sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level, in input pixels: ([A, 2] (x, y), [A, 1] stride of each point)."""
    points, point_strides = [], []
    for (h, w), stride in zip(sizes, strides):
        y, x = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                              torch.arange(w, device=device, dtype=dtype), indexing="ij")
        points.append((torch.stack([x, y], -1).reshape(-1, 2) + 0.5) * stride)
        point_strides.append(torch.full((h * w, 1), float(stride), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)
