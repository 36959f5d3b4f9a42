"""One Dataset for every format and task.

A reader (``data/formats/*.py``) parses its annotation files into a list of ``Sample`` records,
cheap plain values with boxes already in cvforge's convention (XYXY, absolute pixels of the upright
image, class ids 0..C-1). ``VisionDataset`` turns a record into ``(image, target)`` for a task
(DESIGN §3), so that every format yields exactly the same tensors and the transforms, loaders
and models never see a format.

Targets per task:
    classify  {"label": int64 []}
    segment   {"mask": int64 [H, W], 255 = ignore}
    detect    {"boxes": BoundingBoxes [N, 4] XYXY, "labels": int64 [N], "image_id": int64 [],
               "iscrowd": bool [N], "difficult": bool [N]}
    instance  detect's keys + {"masks": tv_tensors.Mask uint8 [N, H, W]}
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors

from cvforge.config import TASKS
from cvforge.data.io import read_image
from cvforge.data.problems import Problems
from cvforge.errors import DataError

IGNORE = 255  # label of pixels that no loss or metric counts


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _no_flags() -> np.ndarray:
    return np.zeros((0,), dtype=bool)


@dataclass
class Sample:
    """Annotations of one image, parsed but not loaded.

    boxes: float32 [N, 4] XYXY in pixels of the upright image; labels: int64 [N] in 0..C-1;
    segments: one entry per box, each a list of polygons (flat [x0, y0, x1, y1, ...] in pixels),
    a COCO RLE dict, or None; mask: path of a class-index PNG (semantic); label: class id (classify).
    """

    image: Path
    image_id: int = 0
    boxes: np.ndarray = field(default_factory=_no_boxes)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    iscrowd: np.ndarray = field(default_factory=_no_flags)
    difficult: np.ndarray = field(default_factory=_no_flags)
    segments: list[Any] = field(default_factory=list)
    mask: Path | None = None
    label: int | None = None


def clean_boxes(boxes: np.ndarray, labels: np.ndarray, width: int, height: int, num_classes: int,
                where: list[str], problems: Problems) -> np.ndarray:
    """Which boxes to keep, after clipping boxes in place to the image.

    boxes: float [N, 4] XYXY (modified in place: clipped to [0, width] x [0, height]);
    where: N place strings (``file:line``) for the report. Returns a bool keep-mask [N].
    """
    keep = np.ones(len(boxes), dtype=bool)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        if not np.all(np.isfinite(box)):
            problems.add("non-finite box coordinates", where[i])
            keep[i] = False
        elif not 0 <= label < num_classes:
            problems.add("unknown class id", f"{where[i]} (class {label}, expected 0..{num_classes - 1})")
            keep[i] = False
        elif box[2] <= box[0] or box[3] <= box[1]:
            problems.add("box of zero or negative size", where[i])
            keep[i] = False
        else:
            clipped = np.clip(box, 0, [width, height, width, height])
            if not np.array_equal(clipped, box):
                problems.add("box partly outside image", where[i])
                box[:] = clipped
            if box[2] <= box[0] or box[3] <= box[1]:
                problems.add("box of zero or negative size", f"{where[i]} (entirely outside the image)")
                keep[i] = False
    return keep


def rasterize(segment: Any, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """One instance's mask, uint8 [H, W] in {0, 1}, from polygons, an RLE dict, or (None) its box."""
    if isinstance(segment, dict):
        from pycocotools import mask as mask_utils
        rle = segment
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, rle["size"][0], rle["size"][1])
        decoded = mask_utils.decode(rle)
        if decoded.shape != (height, width):
            decoded = np.asarray(Image.fromarray(decoded).resize((width, height), Image.NEAREST))
        return decoded.astype(np.uint8)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if segment:
        for polygon in segment:
            if len(polygon) >= 6:
                draw.polygon([(float(x), float(y)) for x, y in zip(polygon[0::2], polygon[1::2])], fill=1)
    else:
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """A class-index PNG (palette or grayscale) -> int64 [H, W]; values >= num_classes other than 255
    become 255 (ignore)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"mask must be a palette or grayscale PNG of class indices, got mode {image.mode}",
                                path, "save class ids as pixel values (0 = background, 255 = ignore)")
            mask = np.asarray(image, dtype=np.int64)
    except (OSError, SyntaxError) as e:
        raise DataError(f"mask is unreadable ({e})", path, "re-export the mask PNG") from None
    mask = mask.copy()
    mask[(mask >= num_classes) & (mask != IGNORE)] = IGNORE
    return mask


class ImageCache:
    """Decoded images kept in RAM, up to ``budget_mb`` megabytes (then new images are decoded every time).

    Decoding is a third of a small image's loading time (0.66 of ~2 ms for a 128-px JPEG with the
    detection augmentation), and a training run decodes every image once per epoch. Only the main process
    fills the cache: DataLoader workers are forked afresh each epoch, so what they cached would be lost,
    and N workers would hold N copies. Copies of a data set (e.g. mosaic's untransformed view) share it.
    """

    def __init__(self, budget_mb: float | None = None):
        if budget_mb is None:
            budget_mb = float(os.environ.get("CVFORGE_CACHE_MB", 512))
        self.images: dict[str, torch.Tensor] = {}
        self.room = int(budget_mb * 2**20)  # bytes left (uint8 images: one byte per element)

    def read(self, path: str | Path) -> tv_tensors.Image:
        """``read_image(path)``, from RAM when cached; a fresh tensor every time (transforms may write to it)."""
        key = str(path)
        cached = self.images.get(key)
        if cached is None:
            cached = read_image(path).as_subclass(torch.Tensor)
            if cached.numel() <= self.room and torch.utils.data.get_worker_info() is None:
                self.images[key], self.room = cached, self.room - cached.numel()
        return tv_tensors.Image(cached.clone())


class VisionDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (image, target)`` for one task over records from any reader.

    classes: names indexed by class id (for ``segment``: index 0 is "background");
    transforms: a callable ``(image, target) -> (image, target)`` (see ``data/transforms.py``).
    Decoded images are kept in RAM up to ``CVFORGE_CACHE_MB`` (default 512) per data set (``ImageCache``;
    0 turns it off).
    """

    def __init__(self, samples: list[Sample], classes: list[str], task: str, *,
                 transforms: Callable | None = None, source: str = "", fmt: str = "",
                 problems: Problems | None = None):
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}", None, f"choose one of {', '.join(TASKS)}")
        self.samples, self.classes, self.task = samples, list(classes), task
        self.transforms, self.source, self.format = transforms, source, fmt
        self.problems = problems if problems is not None else Problems()
        self.images = ImageCache()

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"VisionDataset(format={self.format}, task={self.task}, images={len(self)}, "
                f"classes={len(self.classes)}, source={self.source})")

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        sample = self.samples[index]
        image = self.images.read(sample.image)
        target = self.make_target(sample, image.shape[-2], image.shape[-1])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def make_target(self, sample: Sample, height: int, width: int) -> dict[str, Any]:
        """The task's target dict (module docstring) for an image of the given size."""
        if self.task == "classify":
            return {"label": torch.tensor(sample.label, dtype=torch.int64)}
        if self.task == "segment":
            return {"mask": tv_tensors.Mask(torch.from_numpy(self.semantic_mask(sample, height, width)))}
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(sample.boxes.copy()).reshape(-1, 4),
                                              format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(sample.labels.copy()).to(torch.int64),
            "image_id": torch.tensor(sample.image_id, dtype=torch.int64),
            "iscrowd": torch.from_numpy(per_box_flags(sample.iscrowd, len(sample.boxes))),
            "difficult": torch.from_numpy(per_box_flags(sample.difficult, len(sample.boxes))),
        }
        if self.task == "instance":
            segments = sample.segments or [None] * len(sample.boxes)
            masks = [rasterize(s, b, height, width) for s, b in zip(segments, sample.boxes)]
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        return target

    def semantic_mask(self, sample: Sample, height: int, width: int) -> np.ndarray:
        """int64 [H, W]: from the sample's mask PNG, or painted from its instances (class id + 1,
        background 0, crowd regions ignored) when the format has instance annotations only."""
        if sample.mask is not None:
            mask = read_mask(sample.mask, len(self.classes))
            if mask.shape != (height, width):
                raise DataError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}",
                                sample.mask, "export the mask at the image's size")
            return mask
        mask = np.zeros((height, width), dtype=np.int64)
        segments = sample.segments or [None] * len(sample.boxes)
        # Paint large instances first so that smaller ones in front of them stay visible.
        areas = (sample.boxes[:, 2] - sample.boxes[:, 0]) * (sample.boxes[:, 3] - sample.boxes[:, 1])
        crowd = per_box_flags(sample.iscrowd, len(sample.boxes))
        for i in np.argsort(-areas, kind="stable"):
            pixels = rasterize(segments[i], sample.boxes[i], height, width).astype(bool)
            mask[pixels] = IGNORE if crowd[i] else int(sample.labels[i]) + 1
        return mask


def per_box_flags(flags: np.ndarray, n: int) -> np.ndarray:
    """bool [n]: a sample's per-box flags (iscrowd, difficult), or all False where it has none."""
    return np.asarray(flags).astype(bool) if len(flags) == n else np.zeros((n,), dtype=bool)
