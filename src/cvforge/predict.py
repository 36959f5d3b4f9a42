"""``cvforge predict``: run a trained model on images and folders, print and save what it sees.

Per task, ``describe`` turns a model's raw output into plain per-image records, and ``save_records``
writes them (classification: ``predictions.csv`` and ``predictions.json`` with the top-k classes).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from cvforge.data.io import is_image_file, read_image
from cvforge.errors import CvforgeError


def as_image(image: Any) -> tv_tensors.Image:
    """A path, PIL image or uint8 [3, H, W] tensor -> uint8 ``tv_tensors.Image`` [3, H, W]."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return tv_tensors.Image(TF.pil_to_tensor(image.convert("RGB")))
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return tv_tensors.Image(image)
    raise CvforgeError(f"cannot read an image from {type(image).__name__}", None,
                       "pass a file path, a PIL image or a uint8 [3, H, W] tensor")


def image_files(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by SOURCE arguments: files, and folders searched recursively (sorted)."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p))
        elif source.is_file():
            files.append(source)
        else:
            raise CvforgeError("source not found", source, "pass image files or folders")
    if not files:
        raise CvforgeError("no images found", ", ".join(map(str, sources)), "pass image files or folders of images")
    return files


def describe(task: str, output: Any, classes: list[str], top: int = 5) -> list[dict[str, Any]]:
    """A model's batched output -> one plain record per image."""
    if task == "classify":
        return _describe_classes(output["scores"], classes, top)
    raise CvforgeError(f"prediction for task {task!r} is not available yet", None, "use a classification model")


def _describe_classes(scores: torch.Tensor, classes: list[str], top: int) -> list[dict[str, Any]]:
    """scores: float [B, C] probabilities -> [{"label", "name", "score", "top": [{"name", "score"}, ...]}]."""
    k = min(top, scores.shape[1])
    values, indices = scores.float().cpu().topk(k, dim=1)
    records = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist()):
        ranked = [{"label": i, "name": classes[i], "score": round(v, 6)} for v, i in zip(row_values, row_indices)]
        records.append({**ranked[0], "top": ranked})
    return records


def save_records(task: str, records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write prediction records; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "predictions.json"
    json_path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    written = [json_path]
    if task == "classify":
        csv_path = out / "predictions.csv"
        with open(csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "rank", "label", "name", "score"])
            for record in records:
                for rank, guess in enumerate(record["top"], 1):
                    writer.writerow([record["image"], rank, guess["label"], guess["name"], guess["score"]])
        written.append(csv_path)
    return written


def write_eval_plots(task: str, evaluator: Any, classes: list[str], out: Path) -> list[Path]:
    """The task's evaluation pictures (classification: the confusion matrix)."""
    from cvforge import viz
    if task == "classify":
        return [viz.plot_confusion_matrix(evaluator.confusion, classes, Path(out) / "confusion_matrix.png")]
    return []


def predict(weights: str | os.PathLike, sources: Iterable[str | os.PathLike], *, out: str | os.PathLike | None = None,
            top: int = 5, device: str = "auto", batch: int = 16) -> tuple[list[dict[str, Any]], list[Path]]:
    """Predict every image of ``sources``; returns the records and the files written to ``out``
    (default: a new ``runs/<task>/predict`` folder)."""
    from cvforge.api import load
    from cvforge.engine.checkpoint import next_run_dir
    from cvforge.engine.optim import to_device
    model = load(weights, device)
    files = image_files(sources)
    records = []
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            images = torch.stack([model.transforms(read_image(f), {})[0] for f in chunk])
            output = model.module(to_device(images, model.device))
            for path, record in zip(chunk, describe(model.task, output, model.classes, top)):
                records.append({"image": str(path), **record})
    out = Path(out) if out else next_run_dir(Path("runs") / model.task, "predict")
    return records, save_records(model.task, records, out)
