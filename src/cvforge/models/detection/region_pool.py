"""From a region of the image to a fixed-size input for the region head: the three answers of the lineage.

- ``crop_and_warp`` (R-CNN): cut each region out of the *image*, with context padding, and warp it to a
  fixed square; the CNN then runs once per region (thousands of times per image).
- ``SpatialPyramidPool`` (SPPNet): the CNN runs once per image; each region's window on the *feature map*
  is max-pooled into 1x1, 2x2, 3x3 and 6x6 bins, so any region size gives the same vector length.
- ``RoIPool`` (Fast R-CNN): the one-level special case, a 7x7 grid of max-pooled bins, which lets the
  loss train every layer below it; ``RoIAlign`` (Mask R-CNN) samples bilinearly without rounding.

All take the regions either per image, a list of [R_i, 4] xyxy boxes in input pixels, or as one float
[R, 5] tensor of rows (image index in the batch, x1, y1, x2, y2) (``as_rois``; what an exported ONNX graph
takes, ``export.py``), and return one tensor for all regions, in that order. They stand on
``torchvision.ops.roi_pool`` / ``roi_align``, which accept both forms.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align, roi_pool

Regions = list[torch.Tensor] | torch.Tensor  # per image [R_i, 4] xyxy, or [R, 5] (image index, x1, y1, x2, y2)


def as_rois(regions: Regions, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-image regions [R_i, 4] -> float [R, 5] rows (image index, x1, y1, x2, y2); [R, 5] stays as it is."""
    if isinstance(regions, torch.Tensor):
        return regions.to(dtype)
    rows = [torch.cat([r.new_full((len(r), 1), i), r.reshape(-1, 4)], 1) for i, r in enumerate(regions)]
    return torch.cat(rows).to(dtype) if rows else torch.zeros(0, 5, dtype=dtype)


def _boxes(regions: Regions, dtype: torch.dtype) -> Regions:
    """The regions in the features' dtype, in the form given (torchvision's poolers take both)."""
    return regions.to(dtype) if isinstance(regions, torch.Tensor) else [r.to(dtype) for r in regions]


class RoIPool(nn.Module):
    """Fast R-CNN's RoI max pooling: features float [B, C, H, W] (stride 1 / ``spatial_scale``), regions in
    input pixels (module doc) -> float [R, C, output_size, output_size]."""

    def __init__(self, output_size: int = 7, spatial_scale: float = 1 / 16):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, features: torch.Tensor, regions: Regions) -> torch.Tensor:
        return roi_pool(features, _boxes(regions, features.dtype), self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIAlign(RoIPool):
    """RoIAlign (He et al., 2017): like ``RoIPool`` but each bin averages ``sampling_ratio``^2 bilinear
    samples at exact (unrounded) positions; same shapes as ``RoIPool``."""

    def __init__(self, output_size: int = 7, spatial_scale: float = 1 / 16, sampling_ratio: int = 2):
        super().__init__(output_size, spatial_scale)
        self.sampling_ratio = sampling_ratio

    def forward(self, features: torch.Tensor, regions: Regions) -> torch.Tensor:
        return roi_align(features, _boxes(regions, features.dtype), self.output_size, self.spatial_scale,
                         self.sampling_ratio, aligned=True)


class SpatialPyramidPool(nn.Module):
    """SPPNet's pooling (He et al., 2014): each region's window on the feature map max-pooled into n x n bins
    for every n in ``levels``, flattened and concatenated.

    features float [B, C, H, W], regions in input pixels (module doc) -> float [R, C * sum(n^2)]
    (C * 50 for the paper's levels {1, 2, 3, 6}), whatever each region's size. ``out_features(C)`` gives
    the length. Each level is one ``roi_pool`` with an n x n grid: the paper's bins of ceil/floor size.
    """

    def __init__(self, levels: tuple[int, ...] = (1, 2, 3, 6), spatial_scale: float = 1 / 16):
        super().__init__()
        self.levels, self.spatial_scale = tuple(int(n) for n in levels), spatial_scale

    def out_features(self, channels: int) -> int:
        return channels * sum(n * n for n in self.levels)

    def forward(self, features: torch.Tensor, regions: Regions) -> torch.Tensor:
        boxes = _boxes(regions, features.dtype)
        pooled = [roi_pool(features, boxes, n, self.spatial_scale).flatten(1) for n in self.levels]
        return torch.cat(pooled, dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, spatial_scale={self.spatial_scale}"


def context_boxes(regions: torch.Tensor, size: int, context: int) -> torch.Tensor:
    """R-CNN's context padding: [R, 4] xyxy -> [R, 4] the larger boxes which, warped to ``size`` x ``size``,
    show the region in the central (size - 2 * context) square and ``context`` pixels of its surroundings
    on each side."""
    inner = max(size - 2 * context, 1)
    wh = (regions[:, 2:] - regions[:, :2]).clamp(min=1.0)
    pad = (wh * context / inner).repeat(1, 2)
    return regions + pad * regions.new_tensor([-1.0, -1.0, 1.0, 1.0])


def crop_and_warp(images: torch.Tensor, regions: Regions, size: int = 227, context: int = 16) -> torch.Tensor:
    """R-CNN's region input: images float [B, 3, H, W] (normalised), regions (module doc) ->
    float [R, 3, size, size], each region with ``context`` pixels of padding (at the output scale; the paper's
    16 at 227) warped anisotropically to the square. Outside the image the crop is 0, the image mean after
    normalisation, as in the paper. Bilinear sampling by ``roi_align`` (2 x 2 samples per output pixel)."""
    rois = as_rois(regions, images.dtype).to(images.device)
    rois = torch.cat([rois[:, :1], context_boxes(rois[:, 1:], size, context)], 1)  # the image index stays
    return roi_align(images, rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
