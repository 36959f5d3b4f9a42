"""Plots written as PNG files: confusion matrix, training curves.

Figures are made with ``matplotlib.figure.Figure`` directly (the Agg canvas), never through pyplot, so
plotting changes no global backend, needs no display and is safe in worker threads.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

CELL_TEXT_MAX_CLASSES = 20  # above this a confusion matrix has no room for numbers in its cells


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def plot_confusion_matrix(confusion: torch.Tensor | np.ndarray, class_names: list[str], path: str | os.PathLike,
                          normalize: bool = True, unit: str = "images") -> Path:
    """Write the confusion matrix (int [C, C], rows = true, columns = predicted) as a PNG; returns the path.

    normalize: colour by each row's share (recall per class) instead of raw counts; cells show counts.
    unit: what one count is (images, pixels, boxes), for the title and the colour bar.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(counts)
    rows = counts.sum(axis=1, keepdims=True)
    values = counts / np.maximum(rows, 1) if normalize else counts
    side = min(4 + 0.45 * n, 24)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(int(counts.max()), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class" if normalize else unit)
    fontsize = 9 if n <= 10 else 7
    ax.set_xticks(range(n), labels=class_names, rotation=45 if n <= 10 else 90, ha="right" if n <= 10 else "center",
                  fontsize=fontsize)
    ax.set_yticks(range(n), labels=class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({int(counts.sum())} {unit})")
    if n <= CELL_TEXT_MAX_CLASSES:
        threshold = values.max() / 2
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=fontsize,
                    color="white" if values[i, j] > threshold else "black")
    return _save(fig, path)


def _read_columns(csv_path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a CSV as float lists (blank or non-numeric cells are NaN)."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, text in row.items():
            try:
                value = float(text)
            except (TypeError, ValueError):
                value = math.nan
            columns.setdefault(key, []).append(value)
    return columns


def plot_metrics_csv(csv_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Plot a run's ``metrics.csv`` (columns epoch, train/<loss>, val/<loss>, metrics/<key>, lr...) as a PNG.

    One panel each for losses, metrics (per-class columns left out) and learning rates, against epoch.
    """
    columns = _read_columns(csv_path)
    x = columns.get("epoch") or list(range(1, 1 + max((len(v) for v in columns.values()), default=0)))
    panels = {
        "loss": [k for k in columns if k.startswith(("train/", "val/"))],
        "metric": [k for k in columns if k.startswith("metrics/") and "per_class" not in k],
        "learning rate": [k for k in columns if k == "lr" or k.startswith("lr/")],
    }
    panels = {title: keys for title, keys in panels.items() if keys}
    fig = Figure(figsize=(5 * max(len(panels), 1), 4))
    for index, (title, keys) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, len(panels), index)
        for key in keys:  # blank cells (e.g. epochs without validation, --val-period) are left out
            points = [(epoch, value) for epoch, value in zip(x, columns[key]) if not math.isnan(value)]
            ax.plot(*zip(*points) if points else ([], []), marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_path)
