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
    detect,   HSV jitter (RandomHSV) + HFlip + random scale/translate (RandomZoomShift) + letterbox to imgsz /
    instance  identity (detectors resize inside the model)

Detection targets carry per-box plain tensors (``labels``, ``iscrowd``, ``difficult``) beside the
boxes; after the geometric ops ``SanitizeBoundingBoxes`` drops boxes that became degenerate (smaller
than 1 px at the output size, or pushed off the canvas: RandomZoomShift clips them to zero width, which
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

from cvforge.boxes import clip_boxes, letterbox_params
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
        RandomZoomShift(scale, translate),
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


class RandomZoomShift(v2.Transform):
    """Scale about the image centre by a factor uniform in ``scale`` and shift by up to ``translate`` of
    the width / height (whole pixels), on a canvas of the input's size: the scale/translate augmentation
    of one-stage detectors (``RandomAffine(degrees=0, translate, scale)`` draws the same).

    A scale-and-shift needs no general warp, so it is done as one resize and one paste, 2-4 times faster
    than RandomAffine's resampling grid (``benchmarks/detect_augment.py``): images bilinear
    (antialiased when shrinking), masks nearest; the uncovered border is ``LETTERBOX_FILL`` for images
    and 0 for masks; boxes are scaled and shifted like the pixels, then clipped to the canvas.
    """

    def __init__(self, scale: tuple[float, float] = (0.5, 1.5), translate: float = 0.1):
        super().__init__()
        self.scale, self.translate = scale, translate

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = float(torch.empty(1).uniform_(*self.scale))
        new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
        shift_x, shift_y = (round(float(torch.empty(1).uniform_(-self.translate, self.translate)) * side)
                            for side in (width, height))
        # where the scaled image's top-left corner lands: centred on the canvas, then shifted
        top, left = (height - new_h) // 2 + shift_y, (width - new_w) // 2 + shift_x
        return {"size": [new_h, new_w], "top": top, "left": left, "canvas": (height, width)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = params["canvas"]
        top, left = params["top"], params["left"]
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            boxes = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            scaled = F.resize(boxes, params["size"]).as_subclass(torch.Tensor)
            moved = clip_boxes(scaled + scaled.new_tensor([left, top, left, top]), height, width)
            xyxy = tv_tensors.BoundingBoxes(moved, format="XYXY", canvas_size=(height, width))
            return F.convert_bounding_box_format(xyxy, new_format=inpt.format)
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        fill = LETTERBOX_FILL if isinstance(inpt, tv_tensors.Image) else 0
        return tv_tensors.wrap(paste(F.resize(inpt, params["size"], antialias=True).as_subclass(torch.Tensor),
                                     (height, width), top, left, fill), like=inpt)


def paste(pixels: torch.Tensor, canvas: tuple[int, int], top: int, left: int, fill: int) -> torch.Tensor:
    """pixels [..., h, w] placed with their top-left corner at (top, left) (either may be negative) on a
    new ``fill``-valued canvas [..., H, W] of the same dtype; what falls outside the canvas is cut off."""
    out = pixels.new_full((*pixels.shape[:-2], *canvas), fill)
    paste_into(out, pixels, top, left)
    return out


def paste_into(canvas: torch.Tensor, pixels: torch.Tensor, top: int, left: int) -> None:
    """Copy pixels [..., h, w] into ``canvas`` [..., H, W] in place, their top-left corner at (top, left)
    (either may be negative); what falls outside the canvas is cut off."""
    (height, width), (h, w) = canvas.shape[-2:], pixels.shape[-2:]
    y1, x1, y2, x2 = max(top, 0), max(left, 0), min(top + h, height), min(left + w, width)
    if y2 > y1 and x2 > x1:
        canvas[..., y1:y2, x1:x2] = pixels[..., y1 - top:y2 - top, x1 - left:x2 - left]


class Letterbox(v2.Transform):
    """Resize so the longer side is ``size`` (aspect ratio kept), then pad to ``size`` x ``size``,
    centred. Image padding is ``LETTERBOX_FILL``, mask padding 0; boxes are scaled and shifted."""

    def __init__(self, size: int, fill: dict[type, int] | None = None):
        super().__init__()
        self.size = size
        self.fill = fill if fill is not None else {tv_tensors.Image: LETTERBOX_FILL, tv_tensors.Mask: 0}

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        _, new_h, new_w, top, left = letterbox_params(height, width, self.size)
        padding = [left, top, self.size - new_w - left, self.size - new_h - top]
        return {"size": [new_h, new_w], "padding": padding, "unchanged": height == width == self.size}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["unchanged"]:  # already size x size (a mosaic, most of the 128-px shapes)
            return inpt
        out = F.resize(inpt, params["size"], antialias=True)
        return F.pad(out, params["padding"], fill=self.fill.get(type(inpt), 0))
