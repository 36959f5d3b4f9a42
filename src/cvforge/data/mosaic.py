"""Mosaic augmentation (YOLOv4): four training images tiled around a random centre, one sample out.

Each sample then shows objects from four contexts, cut at the tile borders, at their own scale, so a
small batch sees many objects and backgrounds. Real images never look like that, so the recipe turns
mosaic off for the last epochs (``MosaicSwitch``) and lets the model settle on whole images.

    mosaic = MosaicDataset(train_set, imgsz)        # train_set keeps its own transforms
    trainer = Trainer(..., mosaic, ..., callbacks=[MosaicSwitch(mosaic, last_epochs=10)])

How one sample is made: the four images (sample i and three drawn at random) are scaled so their
longer side is ``imgsz`` and placed with a corner at a random centre of a 2*imgsz canvas (grey
``LETTERBOX_FILL`` elsewhere); the central imgsz x imgsz window is cut out, boxes shifted and
clipped, and boxes left with under ``MIN_VISIBLE`` of their area (or under 2 px) dropped. The
dataset's own transforms (HSV, flip, scale/translate, letterbox) then run on that window as on any image.

Randomness comes from Python's ``random`` and torch's generator, which ``SeededDataset`` seeds per
sample slot, so mosaics are reproducible and resumable like every other augmentation.
"""
from __future__ import annotations

import copy
import random
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from cvforge.data.transforms import LETTERBOX_FILL, paste_into

MIN_VISIBLE = 0.3  # a box cut by the mosaic keeps at least this share of its area, or is dropped
PER_BOX = ("labels", "iscrowd", "difficult")


class MosaicDataset(Dataset):
    """``dataset[i]`` as a mosaic of four images while ``enabled``, else ``dataset[i]`` unchanged.

    dataset: a detection ``VisionDataset`` with its train transforms; its transforms run after the
    mosaic. probability: share of samples that are mosaics while enabled.
    """

    def __init__(self, dataset: Any, imgsz: int, probability: float = 1.0):
        self.dataset, self.imgsz, self.probability = dataset, imgsz, probability
        self.raw = copy.copy(dataset)  # the same records without transforms
        self.raw.transforms = None
        self.enabled = True
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # source, problems, task... of the wrapped data set
        if name in ("dataset", "raw"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        if not self.enabled or random.random() >= self.probability:
            return self.dataset[index]
        indices = [index] + [random.randrange(len(self)) for _ in range(3)]
        image, target = mosaic([self.raw[i] for i in indices], self.imgsz)
        transforms = self.dataset.transforms
        return transforms(image, target) if transforms is not None else (image, target)


def mosaic(samples: list[tuple[torch.Tensor, dict]], size: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """Four (image, target) -> one ``size`` x ``size`` (image, target) (module docstring).

    Only the central window of the 2 * size canvas is kept, so only that window is built: each tile is
    pasted at its canvas place shifted by the window's corner, clipped to the window (the boxes are placed
    on the whole canvas first, as the module docstring describes, then cut by the window)."""
    offset = size // 2  # the window's top-left corner on the canvas
    window = torch.full((3, size, size), LETTERBOX_FILL, dtype=torch.uint8)
    cx, cy = (int(random.uniform(size / 2, 3 * size / 2)) for _ in range(2))
    boxes, areas, fields = [], [], {key: [] for key in PER_BOX}
    for corner, (image, target) in enumerate(samples):
        image, scaled = _fit(image, target["boxes"], size)
        h, w = image.shape[-2:]
        # canvas region (a) and image region (b) of this tile: the image's inner corner sits at (cx, cy)
        x1a, x2a = (max(cx - w, 0), cx) if corner in (0, 2) else (cx, min(cx + w, 2 * size))
        y1a, y2a = (max(cy - h, 0), cy) if corner in (0, 1) else (cy, min(cy + h, 2 * size))
        x1b = w - (x2a - x1a) if corner in (0, 2) else 0
        y1b = h - (y2a - y1a) if corner in (0, 1) else 0
        tile = image[:, y1b:y1b + y2a - y1a, x1b:x1b + x2a - x1a]
        paste_into(window, tile, y1a - offset, x1a - offset)
        shifted = scaled + torch.tensor([x1a - x1b, y1a - y1b] * 2, dtype=torch.float32)
        areas.append((shifted[:, 2:] - shifted[:, :2]).prod(1))
        low, high = torch.tensor([x1a, y1a], dtype=torch.float32), torch.tensor([x2a, y2a], dtype=torch.float32)
        boxes.append(torch.cat([shifted[:, :2].clamp(low, high), shifted[:, 2:].clamp(low, high)], 1))
        for key in PER_BOX:
            fields[key].append(_per_box(target, key, len(scaled)))
    boxes_all = (torch.cat(boxes) - offset).clamp(0, size)
    wh = boxes_all[:, 2:] - boxes_all[:, :2]
    keep = (wh.min(1).values >= 2) & (wh.prod(1) >= MIN_VISIBLE * torch.cat(areas))
    target = {"boxes": tv_tensors.BoundingBoxes(boxes_all[keep], format="XYXY", canvas_size=(size, size)),
              **{key: torch.cat(values)[keep] for key, values in fields.items()},
              "image_id": samples[0][1]["image_id"]}
    return tv_tensors.Image(window), target


def _fit(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scaled so its longer side is ``size``; boxes float [N, 4] scaled with it."""
    h, w = image.shape[-2:]
    boxes = boxes.as_subclass(torch.Tensor).float().reshape(-1, 4)
    if max(h, w) == size:
        return image.as_subclass(torch.Tensor), boxes
    ratio = size / max(h, w)
    new = (max(1, round(h * ratio)), max(1, round(w * ratio)))
    image = F.resize(image.as_subclass(torch.Tensor), list(new), antialias=True)
    return image, boxes * torch.tensor([new[1] / w, new[0] / h] * 2)


def _per_box(target: dict, key: str, n: int) -> torch.Tensor:
    value = target.get(key)
    if value is None:
        return torch.zeros(n, dtype=torch.int64 if key == "labels" else torch.bool)
    return value.as_subclass(torch.Tensor)


class MosaicSwitch:
    """Trainer callback: mosaic off for the run's ``last_epochs`` epochs, on before (also right after a
    resume). The run's length is read when it is needed: a time budget sets it after the first epoch.
    Workers get the new setting when the next epoch starts them."""

    def __init__(self, dataset: MosaicDataset, last_epochs: int):
        self.dataset, self.last_epochs = dataset, last_epochs

    def on_train_start(self, trainer: Any) -> None:
        self._set(trainer)

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        self._set(trainer)

    def _set(self, trainer: Any) -> None:
        enabled = trainer.epoch < trainer.config.epochs - self.last_epochs
        if enabled != self.dataset.enabled:
            self.dataset.enabled = enabled
            # persistent workers hold a copy of the data set: drop them so the next epoch starts fresh ones
            if getattr(trainer.train_loader, "persistent_workers", False):
                trainer.train_loader._iterator = None
