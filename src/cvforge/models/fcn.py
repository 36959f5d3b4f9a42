"""Fully convolutional networks for semantic segmentation (Long, Shelhamer & Darrell, CVPR 2015).

What the paper changed, and why:
- **Convolutionalise the classifier.** A classification net's fully connected layers are convolutions
  whose kernels cover their whole input, so the net takes any input size and outputs a coarse map of
  class scores (one 1x1 ``score`` convolution per class) instead of one vector: dense prediction in
  one forward pass, trained end to end on whole images with a per-pixel loss.
- **Upsample in the network.** The score map has stride 32; a transposed convolution ("deconvolution")
  initialised to bilinear interpolation brings it back to the input's pixels, so the loss is computed
  at full resolution and the upsampling can be learned.
- **Skip architecture.** Stride-32 scores are coarse. FCN-16s adds scores predicted from the stride-16
  features (a zero-initialised 1x1 ``score_16``, so training starts from FCN-32s exactly) to the x2
  upsampled stride-32 scores; FCN-8s does it again with the stride-8 features. Fine layers say
  *where*, deep layers say *what*.

As built here:
- ``variant``: "32s" | "16s" | "8s". ``upsample="deconv"``: the x2 steps are learned ``ConvTranspose2d``
  (kernel 4, stride 2, C -> C) initialised to bilinear; the final x8 / x16 / x32 step is a *fixed*
  per-class bilinear deconvolution (kernel 2f, stride f), as in the paper's released models.
  ``upsample="bilinear"``: every step is ``F.interpolate(mode="bilinear")`` (no parameters).
- Any input size, odd included: the normalised input is zero-padded at the bottom/right to a multiple
  of the backbone's stride (the paper pads by 100 and crops instead), so every map divides exactly,
  and the final scores are cropped back to the input's H x W.
- Skip taps are each stride's *last* backbone feature map (ResNet layer2/layer3; for VGG16 relu4_3 /
  relu5_3 rather than the paper's pool3 / pool4: the same strides, one conv block deeper).
- VGG16's fc6 / fc7 are *reduced*: a 3x3 conv and a 1x1 conv with ``fc_channels`` (1024) outputs, each
  with ReLU and dropout, instead of the paper's 7x7 x 4096 and 1x1 x 4096. Other backbones score their
  last stage directly (their classifier is global pooling + one Linear, whose conv form is the 1x1
  score layer). ``fc_channels`` sets this for any backbone (0 = none).
- Score layers are zero-initialised (paper §4.3). Normalisation (ImageNet mean / std) is inside the
  model, which takes a padded uint8 batch.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cvforge.data.dataset import IGNORE
from cvforge.errors import CvforgeError
from cvforge.models.backbones import Backbone, Normalize, get_backbone

VARIANTS = {"32s": 1, "16s": 2, "8s": 3}  # how many backbone strides feed scores (32; 32+16; 32+16+8)
UPSAMPLES = ("deconv", "bilinear")


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """float32 [channels, channels, k, k]: the weight of a ``ConvTranspose2d(channels, channels, k,
    stride=k // 2, padding=k // 4)`` that upsamples each channel by k // 2 with bilinear interpolation
    (identity across channels: channel c reads only channel c). For a grouped (depthwise) layer take
    ``[:, :1]`` of the diagonal, i.e. ``bilinear_kernel(1, k).expand(channels, 1, k, k)``."""
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float64) - centre).abs() / factor
    filt = (taps[:, None] * taps[None, :]).float()
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt
    return weight


class Upsample(nn.Module):
    """x2 (learned, bilinear-initialised) or final x``factor`` (fixed bilinear) upsampling of a score map.

    forward(x, size): float [B, C, h, w] -> float [B, C, *size], where size is at most (factor*h, factor*w)
    (the deconvolution gives exactly factor*h; the excess, if any, is cropped as in the paper).
    """

    def __init__(self, channels: int, factor: int, mode: str, learnable: bool):
        super().__init__()
        self.factor, self.mode = factor, mode
        self.deconv: nn.ConvTranspose2d | None = None
        if mode == "deconv" and learnable:
            self.deconv = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2,
                                             bias=False)
            with torch.no_grad():
                self.deconv.weight.copy_(bilinear_kernel(channels, 2 * factor))
        elif mode == "deconv":  # fixed: a buffer, one bilinear filter per class (grouped)
            kernel = bilinear_kernel(1, 2 * factor).expand(channels, 1, 2 * factor, 2 * factor).clone()
            self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.mode == "bilinear":
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if self.deconv is not None:
            x = self.deconv(x)
        else:
            x = F.conv_transpose2d(x, self.kernel.to(x.dtype), stride=self.factor, padding=self.factor // 2,
                                   groups=x.shape[1])
        return x[..., :size[0], :size[1]]


class ScoreHead(nn.Sequential):
    """The convolutionalised classifier on the last stage: [fc6, fc7 as convs, then] a 1x1 ``score``.

    float [B, in_channels, h, w] -> float [B, num_classes, h, w].
    """

    def __init__(self, in_channels: int, num_classes: int, fc_channels: int = 0, dropout: float = 0.5):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if fc_channels:
            layers.update(fc6=nn.Conv2d(in_channels, fc_channels, 3, padding=1), relu6=nn.ReLU(inplace=True),
                          drop6=nn.Dropout2d(dropout), fc7=nn.Conv2d(fc_channels, fc_channels, 1),
                          relu7=nn.ReLU(inplace=True), drop7=nn.Dropout2d(dropout))
            in_channels = fc_channels
        layers["score"] = zero_conv(in_channels, num_classes)
        super().__init__(layers)


def zero_conv(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A 1x1 score layer with zero weights and bias (paper §4.3; for skips: start as the coarser net)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCN(nn.Module):
    """FCN-32s / 16s / 8s on a ``Backbone`` (module docstring).

    forward(images, targets=None):
        images: uint8 [B, 3, H, W] (or float in 0..1), any H and W; a padded batch is fine.
        train mode: targets {"mask": int64 [B, H, W]} (255 = ignore), or a list of B {"mask": [H, W]}
                    -> {"loss_seg": float []}, per-pixel cross-entropy over the non-ignored pixels.
        eval mode:  -> {"masks": int64 [B, H, W] argmax class ids,
                        "scores": float32 [B, num_classes, H, W] softmax probabilities}.
    ``logits(images)``: the raw float [B, num_classes, H, W] scores before softmax.
    """

    def __init__(self, backbone: Backbone, num_classes: int, variant: str = "8s", upsample: str = "deconv",
                 fc_channels: int = 0):
        super().__init__()
        if variant not in VARIANTS or upsample not in UPSAMPLES:
            raise CvforgeError(f"unknown FCN variant {variant!r} / upsample {upsample!r}", None,
                               f"use variant {'|'.join(VARIANTS)} and upsample {'|'.join(UPSAMPLES)}")
        self.backbone, self.num_classes, self.variant = backbone, num_classes, variant
        self.taps = _tap_stages(backbone, VARIANTS[variant])  # stage indices, coarsest first
        self.stride = backbone.strides[self.taps[0]]
        self.head = ScoreHead(backbone.out_channels[self.taps[0]], num_classes, fc_channels)
        # score_16, score_8: 1x1 scores of the finer stages, zero at init so 16s/8s start as 32s/16s.
        self.skip_scores = nn.ModuleList(zero_conv(backbone.out_channels[i], num_classes) for i in self.taps[1:])
        self.skip_upsamples = nn.ModuleList(Upsample(num_classes, 2, upsample, learnable=True) for _ in self.taps[1:])
        final = backbone.strides[self.taps[-1]]
        self.final_upsample = Upsample(num_classes, final, upsample, learnable=False)
        self.normalize = Normalize()  # uint8 images in, ImageNet-normalised floats out

    def logits(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """float [B, num_classes, H, W]: the paper's figure, coarse scores refined by each skip."""
        x = self.normalize(images)
        height, width = x.shape[-2:]
        # Pad to a multiple of the coarsest stride, so that every feature map divides exactly.
        x = F.pad(x, (0, (-width) % self.stride, 0, (-height) % self.stride))
        features = self.backbone(x)
        scores = self.head(features[self.taps[0]])
        for tap, score, upsample in zip(self.taps[1:], self.skip_scores, self.skip_upsamples):
            fine = score(features[tap])
            scores = upsample(scores, fine.shape[-2:]) + fine  # fuse by summing
        scores = self.final_upsample(scores, x.shape[-2:])
        return scores[..., :height, :width]

    def forward(self, images: torch.Tensor | list[torch.Tensor],
                targets: dict[str, torch.Tensor] | list[dict] | None = None) -> dict[str, torch.Tensor]:
        logits = self.logits(images)
        if not self.training:
            scores = logits.float().softmax(dim=1)
            return {"masks": scores.argmax(dim=1), "scores": scores}
        if targets is None:
            raise ValueError("FCN in train mode needs targets {'mask': int64 [B, H, W]}")
        return {"loss_seg": segmentation_loss(logits, _masks(targets).to(logits.device))}


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel cross-entropy of logits float [B, C, H, W] against masks int64 [B, H, W],
    over pixels whose label is not IGNORE (255). 0 (still connected to the graph) when all are ignored."""
    valid = masks != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps every parameter in the graph (DDP needs that)
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE)


def _masks(targets: dict[str, torch.Tensor] | list[dict]) -> torch.Tensor:
    """int64 [B, H, W] from a batched {"mask": [B, H, W]} or a list of per-image {"mask": [H, W]}."""
    if isinstance(targets, dict):
        return torch.as_tensor(targets["mask"]).long()
    return torch.stack([torch.as_tensor(t["mask"]).long() for t in targets])


def _tap_stages(backbone: Backbone, count: int) -> list[int]:
    """Indices of the last stage of the coarsest stride S and, for 16s / 8s, of strides S/2 and S/4."""
    last = {stride: i for i, stride in enumerate(backbone.strides)}
    coarsest = backbone.strides[-1]
    wanted = [coarsest // 2 ** k for k in range(count)]
    missing = [s for s in wanted if s not in last]
    if missing:
        raise CvforgeError(f"backbone {backbone.name} has no feature map at stride {missing[0]}", None,
                           "use fcn32s, or a backbone with stride-8/16/32 stages (vgg16, resnet, mobilenet)")
    return [last[s] for s in wanted]


def build_fcn(variant: str, *, num_classes: int, backbone: str = "resnet18", upsample: str = "deconv",
              fc_channels: int | None = None) -> FCN:
    """FCN-``variant`` on the torchvision ``backbone`` (randomly initialised; pretrained weights are
    loaded afterwards, so these arguments alone rebuild the architecture from a checkpoint).

    backbone: "resnet18" by default (fast enough to train on a CPU); "vgg16" is the paper's;
    resnet34 / resnet50 / mobilenet_v3_large and other CNNs work too. fc_channels: width of the reduced
    fc6 / fc7; None = 1024 for VGG (the paper keeps its fc layers), 0 for the others.
    """
    if fc_channels is None:
        fc_channels = 1024 if backbone.startswith("vgg") else 0
    return FCN(get_backbone(backbone), num_classes, variant=variant, upsample=upsample, fc_channels=fc_channels)


def fcn32s(*, num_classes: int, backbone: str = "resnet18", upsample: str = "deconv",
           fc_channels: int | None = None) -> FCN:
    """FCN-32s: stride-32 scores upsampled x32."""
    return build_fcn("32s", num_classes=num_classes, backbone=backbone, upsample=upsample, fc_channels=fc_channels)


def fcn16s(*, num_classes: int, backbone: str = "resnet18", upsample: str = "deconv",
           fc_channels: int | None = None) -> FCN:
    """FCN-16s: stride-32 scores x2 + stride-16 scores, upsampled x16."""
    return build_fcn("16s", num_classes=num_classes, backbone=backbone, upsample=upsample, fc_channels=fc_channels)


def fcn8s(*, num_classes: int, backbone: str = "resnet18", upsample: str = "deconv",
          fc_channels: int | None = None) -> FCN:
    """FCN-8s: FCN-16s's fused scores x2 + stride-8 scores, upsampled x8."""
    return build_fcn("8s", num_classes=num_classes, backbone=backbone, upsample=upsample, fc_channels=fc_channels)
