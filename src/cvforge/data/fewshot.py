"""A small, *different* data set for transfer-learning experiments (issue 3).

The built-in ``shapes`` set (``synthetic.py``) has circles, crosses, squares, stars and triangles on
textured backgrounds. This one has four other classes, ``FEWSHOT_CLASSES``, drawn on plain noise:

    arrow     a filled seven-point arrow
    ellipse   a filled ellipse with axes 2:1
    hexagon   a filled regular hexagon
    ring      an unfilled circle with a thick outline

each in a random colour that contrasts with the background, at a random place, size and angle. A model
pretrained on ``shapes`` has seen edges, fills and outlines but none of these classes, which is what a
fine-tuning experiment needs: a few labelled images of new classes, and features worth reusing.

    make_fewshot(Path("fewshot"))   # fewshot/train/<class>/00000.png (20 per class), fewshot/val/... (50)
    build_dataset("fewshot", "train", "classify")

Deterministic: the same ``seed`` gives byte-identical PNGs; train and val are drawn from independent
streams of that seed, so they never share an image.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cvforge.data.formats.imagefolder import write_imagefolder
from cvforge.errors import DataError

# Sorted, because ImageFolder numbers classes by sorted folder name: class id = index here.
FEWSHOT_CLASSES = ("arrow", "ellipse", "hexagon", "ring")

# Filled outlines on the unit circle (x right, y down), rotated and scaled when drawn.
_OUTLINES = {
    "arrow": [(-1, -0.25), (0, -0.25), (0, -0.7), (1, 0), (0, 0.7), (0, 0.25), (-1, 0.25)],
    "ellipse": [(math.cos(t), 0.5 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40)],
    "hexagon": [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)],
}
_SPLIT_STREAMS = {"train": 0, "val": 1}


def draw_fewshot_image(rng: np.random.Generator, label: int, size: int = 64) -> torch.Tensor:
    """One image of class ``FEWSHOT_CLASSES[label]``: uint8 [3, size, size].

    Background: one random colour plus Gaussian noise (sigma 25). Shape: centre in the middle 20 % of
    the image, radius 28-42 % of ``size``, any angle, colour the background's complement +-40.
    Every label draws the same numbers from ``rng``, so images depend on their position in the stream only.
    """
    if not 0 <= label < len(FEWSHOT_CLASSES):
        raise ValueError(f"label {label} is outside 0..{len(FEWSHOT_CLASSES) - 1}")
    base = rng.integers(0, 256, 3)
    image = Image.fromarray(np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in (255 - base + rng.integers(-40, 40, 3)) % 256)
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    r, a = rng.uniform(0.28, 0.42) * size, rng.uniform(0, 2 * math.pi)
    name = FEWSHOT_CLASSES[label]
    if name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 4)))
    else:
        cos, sin = math.cos(a), math.sin(a)
        draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _OUTLINES[name]],
                     fill=colour)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def fewshot_split(per_class: int, rng: np.random.Generator, size: int = 64) -> list[tuple[np.ndarray, int]]:
    """``per_class`` images of every class, class by class: ``(uint8 [size, size, 3], class id)`` pairs."""
    return [(draw_fewshot_image(rng, label, size).permute(1, 2, 0).numpy(), label)
            for label in range(len(FEWSHOT_CLASSES)) for _ in range(per_class)]


def make_fewshot(out: str | Path, *, train_per_class: int = 20, val_per_class: int = 50, size: int = 64,
                 seed: int = 0) -> Path:
    """Write the few-shot set as an ImageFolder and return ``out``:

        out/train/<class>/<index:05d>.png   train_per_class images per class
        out/val/<class>/<index:05d>.png     val_per_class images per class

    Raises DataError if ``out`` exists and is not empty (a data set is never written over).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder is not empty", out, "choose a new folder or delete this one")
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
        write_imagefolder(fewshot_split(per_class, rng, size), list(FEWSHOT_CLASSES), out, split)
    return out
