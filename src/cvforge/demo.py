"""``make demo``: the first thing a new user runs — train the default detector and look at what it sees.

1. generates the built-in ``shapes`` data set (once, cached) and prints its statistics;
2. trains the default model (``yolo-n``, with its recipe) as ``cvforge train`` with no arguments
   would, for as many epochs as fit in ``DEMO_MINUTES`` (the trainer's time budget: it times the first
   epoch and fits the rest and the schedule to the budget) and with the data loaded in the main process
   (``workers=0``), so that it ends within 5 minutes on any machine, with the best model that time buys
   (on a CPU with AMX in bfloat16, ``cpu_numerics``: more epochs in the same minutes; validation after
   every ``DEMO_VAL_PERIOD``-th epoch only, the first and the last, for the same reason);
3. prints the validation metrics and writes ``predictions.png``: val images with the detections
   drawn, beside ``data_preview.png`` (training samples with their annotations).
Everything lands in one new run folder under ``runs/demo``; nothing earlier is overwritten.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid, save_image

from cvforge.data import build_dataset
from cvforge.data.check import check, format_stats

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
DEMO_MINUTES = 4.5  # of training; with the data check before and the pictures after, under 5 minutes
DEMO_VAL_PERIOD = 5  # a validation costs ~15 % of a demo epoch (0.7 of 4.9 s): 4 in 5 of them go to training


def draw_targets(image: torch.Tensor, target: dict, classes: list[str]) -> torch.Tensor:
    """uint8 [3, H, W] with the target's instance masks and labelled boxes drawn on it."""
    colors = [PALETTE[int(c) % len(PALETTE)] for c in target["labels"]]
    if "masks" in target and len(target["masks"]):
        image = draw_segmentation_masks(image, target["masks"].bool(), alpha=0.35, colors=colors)
    if len(target["boxes"]):
        names = [classes[int(c)] for c in target["labels"]]
        image = draw_bounding_boxes(image, target["boxes"], labels=names, colors=colors, width=1)
    return image


def save_grid(tiles: list[torch.Tensor], path: Path, columns: int = 4) -> Path:
    """uint8 [3, H, W] tiles (same size) -> one PNG grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=columns, padding=2).float() / 255, path)
    return path


def preview(spec: str, path: Path, count: int = 16) -> Path:
    """Write a grid of ``count`` training samples with their annotations drawn."""
    dataset = build_dataset(spec, "train", "instance")
    return save_grid([draw_targets(*dataset[i], dataset.classes) for i in range(min(count, len(dataset)))], path)


def predictions_grid(weights: Path, spec: str, path: Path, count: int = 16) -> Path:
    """Write a grid of ``count`` val images with the model's detections (score >= 0.25) drawn."""
    from cvforge.api import load
    from cvforge.predict import describe, draw_detections
    model = load(weights, "cpu")
    dataset = build_dataset(spec, "val", model.task)
    images = [dataset[i][0] for i in range(min(count, len(dataset)))]
    with torch.inference_mode():
        records = describe(model.task, model.module(images), model.classes)
    return save_grid([draw_detections(image, r["detections"]) for image, r in zip(images, records)], path)


def best_epoch_metrics(result) -> dict[str, float]:
    """The validation metrics (metrics.csv's ``metrics/*`` columns) of the epoch best.pt was saved at."""
    key = f"metrics/{result.metric}"
    row = next(r for r in result.history if r.get(key) == result.best_metric)
    return {k.removeprefix("metrics/"): v for k, v in row.items() if k.startswith("metrics/")}


def cpu_numerics() -> dict[str, bool]:
    """Training numerics for the demo: bfloat16 autocast + NHWC weights on a CPU that multiplies bfloat16
    natively (Intel AMX) and has no CUDA device, else {} (the trainer's defaults). On the 2-core AMX machine of
    BENCHMARKS.md this fits 52-54 epochs in the budget instead of 40 (mAP50 0.86 and 0.58 in two seeds, float32
    0.48 and 0.56); the gradients agree with float32's (median cosine 0.998). Without AMX there are no native
    bfloat16 kernels (on an AVX2-only CPU convolutions fall back to a reference path: yolov1's training step
    31 -> 3 img/s), and NHWC alone does not pay in float32 there (21 vs 24 demo epochs), hence {}."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return {"amp": True, "channels_last": True} if amx and not torch.cuda.is_available() else {}


def demo(spec: str = "shapes", epochs: int = 0, minutes: float = DEMO_MINUTES, project: Path = Path("runs/demo"),
         **options) -> int:
    """Steps 1-3 of the module docstring: ``epochs`` epochs if given, else a ``minutes`` budget; ``options``
    go to ``cvforge.train`` (e.g. batch=32)."""
    from cvforge.api import train
    from cvforge.predict import format_eval
    print(f"cvforge demo: the built-in data set {spec!r}")
    _, stats = check(spec, "detect")
    print(format_stats(stats, "detect"))
    start = time.perf_counter()
    # 128-px images load in a few ms: on a 2-core laptop, loader workers would only take cores from the
    # two compute threads (79 vs 56 img/s, BENCHMARKS.md)
    options.setdefault("workers", 0)
    options.setdefault("val_period", DEMO_VAL_PERIOD)
    numerics = cpu_numerics()
    if numerics and "amp" not in options:
        print("this CPU multiplies bfloat16 natively (AMX): training in bfloat16 autocast with NHWC weights")
    for key, value in numerics.items():
        options.setdefault(key, value)
    length = {"epochs": epochs} if epochs else {"time": minutes}
    result = train(data=spec, project=str(project), **length, **options)
    if result.stopped:
        return 130
    elapsed = (time.perf_counter() - start) / 60
    weights = result.best or result.last
    metrics = best_epoch_metrics(result)  # the training's own validation of best.pt (plots drawn already)
    print(format_eval(metrics))
    preview(spec, result.save_dir / "data_preview.png")
    shown = predictions_grid(weights, spec, result.save_dir / "predictions.png")
    print(f"trained {result.epochs} epochs in {elapsed:.1f} min: mAP50 {metrics['mAP50']:.3f}, "
          f"mAP50-95 {metrics['mAP50-95']:.3f}")
    print(f"predictions on val images: {shown}\nplots: {result.save_dir / 'plots'}\n"
          f"next: cvforge predict --weights {weights} YOUR_IMAGES")
    return 0
