"""``make demo``: the first thing a new user runs.

Generates the built-in ``shapes`` data set (once), prints its statistics and writes a preview image of
training samples with their boxes and instance masks drawn, so a user sees what the data looks like
before training on it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid, save_image

from cvforge.data import build_dataset
from cvforge.data.check import check, format_stats

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


def draw_targets(image: torch.Tensor, target: dict, classes: list[str]) -> torch.Tensor:
    """uint8 [3, H, W] with the target's instance masks and labelled boxes drawn on it."""
    colors = [PALETTE[int(c) % len(PALETTE)] for c in target["labels"]]
    if "masks" in target and len(target["masks"]):
        image = draw_segmentation_masks(image, target["masks"].bool(), alpha=0.35, colors=colors)
    if len(target["boxes"]):
        names = [classes[int(c)] for c in target["labels"]]
        image = draw_bounding_boxes(image, target["boxes"], labels=names, colors=colors, width=1)
    return image


def preview(spec: str, path: Path, count: int = 16) -> Path:
    """Write a grid of ``count`` training samples with their annotations drawn."""
    dataset = build_dataset(spec, "train", "instance")
    tiles = [draw_targets(*dataset[i], dataset.classes) for i in range(min(count, len(dataset)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=4, padding=2).float() / 255, path)
    return path


def demo(spec: str = "shapes", out: Path = Path("runs/demo")) -> int:
    print(f"cvforge demo: the built-in data set {spec!r}")
    problems, stats = check(spec, "detect")
    print(format_stats(stats, "detect"))
    print("data check: " + ("no problems found" if not problems else problems.summary()))
    path = preview(spec, out / "shapes_preview.png")
    print(f"preview of training samples with their boxes and masks: {path}")
    return 0
