"""Per-task augmentation presets on ``torchvision.transforms.v2``.

``build_transforms(task, train)`` returns a callable ``(image, target) -> (image, target)`` that a
``VisionDataset`` applies to each sample (DESIGN §3). Images stay uint8 ``tv_tensors.Image`` [3, H, W]
(the model normalises); boxes (``tv_tensors.BoundingBoxes``) and masks (``tv_tensors.Mask``, moved
with nearest interpolation) follow every geometric op because v2 dispatches on their types.

Presets (train / eval):
    classify  RandomResizedCrop(imgsz, scale=(0.35, 1)) + HFlip + mild ColorJitter /
              Resize(imgsz / 0.875) + CenterCrop(imgsz)  (the ImageNet evaluation ratio)
    segment   scale jitter + pad (image 0, mask 255 = ignore) + RandomCrop(imgsz) + HFlip /
              identity (full-size images; the segment collate pads the batch)
    detect,   HSV jitter (RandomHSV) + HFlip + random scale/translate affine + letterbox to imgsz /
    instance  identity (detectors resize inside the model)

Detection targets carry per-box plain tensors (``labels``, ``iscrowd``, ``difficult``) beside the
boxes; after the geometric ops ``SanitizeBoundingBoxes`` drops boxes that became degenerate (smaller
than 1 px at the output size, or pushed off the canvas: the affine clamps them to zero width, which
the letterbox keeps) together with those tensors (``per_box_tensors``) and the instance masks
(torchvision filters any ``Mask`` whose first dimension is N by itself). Once, at the end: each call
costs ~0.1 ms, a tenth of a small image's whole augmentation.
``image_id`` (a 0-d tensor) passes through untouched. An image with no boxes is fine everywhere.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cvforge.config import TASKS
from cvforge.data.dataset import IGNORE
from cvforge.errors import CvforgeError

LETTERBOX_FILL = 114  # mid-grey: padding close to the data mean, the usual detector convention

Transform = Callable[..., Any]


def build_transforms(task: str, train: bool, imgsz: int = 640, *, hflip: float = 0.5,
                     scale: tuple[float, float] = (0.5, 1.5), hsv: bool = True,
                     translate: float = 0.1) -> Transform:
    """The preset for ``task`` (module docstring) as a callable ``(image, target) -> (image, target)``.

    imgsz: output side of training crops / letterbox canvas (and of classify evaluation);
    hflip: probability of a horizontal flip; scale: range of the random scale (segment scale jitter,
    detection affine); hsv: colour jitter on or off (classify, detect, instance);
    translate: largest detection shift as a fraction of width/height.
    """
    if task not in TASKS:
        raise CvforgeError(f"unknown task {task!r}", None, f"choose one of {', '.join(TASKS)}")
    if task == "classify":
        return classify_train(imgsz, hflip, hsv) if train else classify_eval(imgsz)
    if not train:
        return v2.Identity()  # full-size images: segment collate pads, detectors resize themselves
    if task == "segment":
        return segment_train(imgsz, hflip, scale)
    return detect_train(imgsz, hflip, scale, hsv, translate)


def classify_train(imgsz: int, hflip: float, hsv: bool) -> Transform:
    """Inception-style random crop of 35-100 % of the image, flip, mild colour jitter."""
    ops = [v2.RandomResizedCrop(imgsz, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(hflip)]
    if hsv:
        ops.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    return v2.Compose(ops)


def classify_eval(imgsz: int) -> Transform:
    """Resize the short side to imgsz / 0.875, then take the central imgsz x imgsz."""
    return v2.Compose([v2.Resize(int(imgsz / 0.875), antialias=True), v2.CenterCrop(imgsz)])


def segment_train(imgsz: int, hflip: float, scale: tuple[float, float]) -> Transform:
    """Scale jitter around an imgsz x imgsz fit, pad what is smaller than the crop, random crop, flip.

    Padded pixels are 0 in the image and IGNORE in the mask, so no loss is computed on them.
    """
    return v2.Compose([
        v2.ScaleJitter(target_size=(imgsz, imgsz), scale_range=scale, antialias=True),
        v2.RandomCrop(imgsz, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
        v2.RandomHorizontalFlip(hflip),
    ])


def detect_train(imgsz: int, hflip: float, scale: tuple[float, float], hsv: bool,
                 translate: float) -> Transform:
    """HSV-like colour jitter, flip, random scale/translate, letterbox; then degenerate boxes removed."""
    ops: list[Transform] = [RandomHSV()] if hsv else []
    return v2.Compose([
        *ops,
        v2.RandomHorizontalFlip(hflip),
        # bilinear for the image; v2 always warps masks with nearest
        v2.RandomAffine(degrees=0.0, translate=(translate, translate), scale=scale,
                        interpolation=v2.InterpolationMode.BILINEAR,
                        fill={tv_tensors.Image: LETTERBOX_FILL, tv_tensors.Mask: 0}),
        Letterbox(imgsz),
        sanitize_boxes(),
    ])


def sanitize_boxes() -> v2.SanitizeBoundingBoxes:
    """Drop boxes under 1 px (or off the canvas) with their per-box tensors and instance masks."""
    return v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=per_box_tensors)


def per_box_tensors(inputs: Any) -> list[torch.Tensor]:
    """``labels_getter`` for SanitizeBoundingBoxes: every plain tensor of the target with a first
    dimension (``labels``, ``iscrowd``, ``difficult``, ``area``...).

    tv_tensors are left out: BoundingBoxes and Mask are filtered by torchvision itself, and a
    0-d tensor such as ``image_id`` is not per box. A 1-d+ tensor whose length is not N makes
    torchvision raise, which is what we want (a misaligned target is a bug, not data to drop).
    """
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    if not isinstance(target, dict):
        return []
    return [v for v in target.values() if type(v) is torch.Tensor and v.ndim >= 1]


# RGB -> YIQ (luma, two chroma axes). In YIQ a hue shift is a rotation of the chroma plane and a
# saturation gain a scaling of it, so hue, saturation and value jitter compose into one 3x3 matrix.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def hsv_matrix(hue: float, saturation: float, value: float) -> torch.Tensor:
    """float32 [3, 3] acting on RGB column vectors: rotate hue by ``hue`` turns, scale saturation
    (chroma; 0 = grey) and value (brightness) by the given gains."""
    angle = torch.tensor(2 * torch.pi * hue, dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # this sense of rotation turns red towards green, as HSV's hue does
    chroma = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]], dtype=torch.float64)
    chroma[1:] *= saturation
    return (value * _YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ).to(torch.float32)


class RandomHSV(v2.Transform):
    """Random hue shift (uniform in +-``hue`` of the colour circle), saturation and value gains
    (uniform in 1 +- ``saturation`` / ``value``): the HSV augmentation of one-stage detectors, with
    their usual defaults, done as one colour matrix in YIQ space.

    Saturation and value act exactly like ColorJitter's saturation and brightness; the hue rotation
    approximates HSV's. Ten times faster than ColorJitter's hue on a 640x480 image (no per-pixel
    HSV round trip). Only images change: boxes and masks pass through.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, hue: float = 0.015, saturation: float = 0.7, value: float = 0.4):
        super().__init__()
        self.hue, self.saturation, self.value = hue, saturation, value

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        dh, ds, dv = (torch.rand(3) * 2 - 1).tolist()
        return {"matrix": hsv_matrix(dh * self.hue, 1 + ds * self.saturation, 1 + dv * self.value)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        pixels = inpt.as_subclass(torch.Tensor)
        mixed = params["matrix"] @ pixels.reshape(3, -1).float()
        out = mixed.round_().clamp_(0, 255).to(torch.uint8).reshape(pixels.shape)
        return tv_tensors.wrap(out, like=inpt)


class Letterbox(v2.Transform):
    """Resize so the longer side is ``size`` (aspect ratio kept), then pad to ``size`` x ``size``,
    centred. Image padding is ``LETTERBOX_FILL``, mask padding 0; boxes are scaled and shifted."""

    def __init__(self, size: int, fill: dict[type, int] | None = None):
        super().__init__()
        self.size = size
        self.fill = fill if fill is not None else {tv_tensors.Image: LETTERBOX_FILL, tv_tensors.Mask: 0}

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        ratio = self.size / max(height, width)
        new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        padding = [left, top, self.size - new_w - left, self.size - new_h - top]
        return {"size": [new_h, new_w], "padding": padding}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = F.resize(inpt, params["size"], antialias=True)
        return F.pad(out, params["padding"], fill=self.fill.get(type(inpt), 0))
