"""``cvforge data check`` and ``cvforge data stats``: look at every image and label of a data set.

``check`` reads each split through its format's reader (which counts annotation problems), then decodes
every image and mask, so that what training would trip over is found before training starts. Nothing
is modified. ``stats`` summarises classes, instances, boxes per image and image sizes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from cvforge.data import DataSource, build_dataset, resolve, splits_of
from cvforge.data.dataset import VisionDataset
from cvforge.data.io import verify_image
from cvforge.data.problems import Problems
from cvforge.errors import DataError


@dataclass
class SplitStats:
    """What one split holds. sizes: (width, height) per image; boxes: box count per image."""

    name: str
    classes: list[str]
    images: int = 0
    instances: Counter = field(default_factory=Counter)
    boxes_per_image: list[int] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)


def check(spec: str, task: str | None = None, *, progress: bool = True) -> tuple[Problems, list[SplitStats]]:
    """Read and decode every sample of every split; returns the problems found and per-split stats."""
    source = resolve(spec)
    problems = Problems()
    stats = []
    for split in splits_of(source):
        dataset = _build(source, split, task, problems)
        stats.append(_scan(dataset, split, problems, progress))
    return problems, stats


def _build(source: DataSource, split: str, task: str | None, problems: Problems) -> VisionDataset:
    return build_dataset(source, split="train" if split == "all" else split, task=task, problems=problems)


def _scan(dataset: VisionDataset, split: str, problems: Problems, progress: bool) -> SplitStats:
    stats = SplitStats(split, dataset.classes, images=len(dataset))
    for sample in tqdm(dataset.samples, desc=f"check {split}", disable=not progress, leave=False):
        try:
            width, height = verify_image(sample.image)
        except DataError as e:
            problems.add("missing image" if "not found" in e.what else "unreadable image",
                         f"{sample.image} ({e.what})")
            continue
        stats.sizes[(width, height)] += 1
        if dataset.task == "classify":
            stats.instances[dataset.classes[sample.label]] += 1
        elif sample.mask is not None:
            _check_mask(dataset, sample, height, width, problems, stats)
        else:
            stats.boxes_per_image.append(len(sample.boxes))
            stats.instances.update(dataset.classes[_class_index(dataset, i)] for i in sample.labels)
    return stats


def _class_index(dataset: VisionDataset, label: int) -> int:
    return label + 1 if dataset.task == "segment" else label  # segment classes start with background


def _check_mask(dataset: VisionDataset, sample, height: int, width: int, problems: Problems,
                stats: SplitStats) -> None:
    from PIL import Image
    try:
        with Image.open(sample.mask) as image:
            mask = np.asarray(image)
    except (OSError, SyntaxError) as e:
        problems.add("mask missing" if not sample.mask.exists() else "unreadable image", f"{sample.mask} ({e})")
        return
    if mask.shape[:2] != (height, width):
        problems.add("image and mask differ in size",
                     f"{sample.mask} ({mask.shape[1]}x{mask.shape[0]} vs image {width}x{height})")
        return
    values, counts = np.unique(mask, return_counts=True)
    bad = [int(v) for v in values if v >= len(dataset.classes) and v != 255]
    if bad:
        problems.add("mask value out of range", f"{sample.mask} (values {bad[:5]}, {len(dataset.classes)} classes)")
    for value, count in zip(values, counts):
        if value < len(dataset.classes):
            stats.instances[dataset.classes[int(value)]] += int(count)  # pixels per class


def format_stats(stats: list[SplitStats], task: str) -> str:
    """A plain-text report of ``SplitStats`` for the terminal."""
    lines = []
    unit = "pixels" if task == "segment" else ("images" if task == "classify" else "instances")
    for s in stats:
        lines.append(f"split {s.name}: {s.images} images, {len(s.classes)} classes")
        width = max((len(c) for c in s.classes), default=5)
        for name in s.classes:
            lines.append(f"  {name:<{width}}  {s.instances.get(name, 0):>9} {unit}")
        if s.boxes_per_image:
            b = np.asarray(s.boxes_per_image)
            lines.append(f"  boxes per image: min {b.min()}, mean {b.mean():.2f}, max {b.max()}; "
                         f"{int((b == 0).sum())} background images")
        if s.sizes:
            (w, h), n = s.sizes.most_common(1)[0]
            ws = [size[0] for size in s.sizes.elements()]
            hs = [size[1] for size in s.sizes.elements()]
            lines.append(f"  image sizes: {min(ws)}-{max(ws)} x {min(hs)}-{max(hs)} px; most common {w}x{h} ({n})")
    return "\n".join(lines)
