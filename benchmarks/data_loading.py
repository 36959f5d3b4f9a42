"""Throughput of the detection training input pipeline (decode + augment + collate), in images/s.

Generates a folder of JPEG images with a few boxes each into a temporary directory, builds a
``VisionDataset`` from ``Sample`` records directly (no format reader involved), and times
``build_loader`` with 0 and with N worker processes: one warm-up batch (worker start-up, first
decode), then a fixed number of timed batches; each configuration runs ``--repeats`` times,
interleaved, and keeps its best rate (other load on the machine can only slow a run down).
In-process loading (0 workers) is timed with torch's default thread count and with one thread,
as each worker has, and the ratio is given against both. Prints a markdown table and the command.

    python benchmarks/data_loading.py --images 64 --imgsz 640
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cvforge.data.dataset import ImageCache, Sample, VisionDataset
from cvforge.data.loader import build_loader
from cvforge.data.transforms import build_transforms

CLASSES = ["box", "disc", "bar"]


def make_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Sample]:
    """``count`` textured JPEGs with 2-6 filled shapes each, and their Sample records."""
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        noise = np.random.default_rng(seed + i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((width // 8, height // 8)).resize((width, height))
        draw = ImageDraw.Draw(image)
        boxes, labels = [], []
        for _ in range(rng.randint(2, 6)):
            w, h = rng.randint(20, width // 3), rng.randint(20, height // 3)
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            label = rng.randrange(len(CLASSES))
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.rectangle if label != 1 else draw.ellipse)([x0, y0, x0 + w - 1, y0 + h - 1], fill=colour)
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        samples.append(Sample(image=path, image_id=i, boxes=np.asarray(boxes, dtype=np.float32),
                              labels=np.asarray(labels, dtype=np.int64)))
    return samples


def images_per_second(dataset: VisionDataset, workers: int, batch: int, batches: int, threads: int) -> float:
    """Images/s over ``batches`` timed batches after one warm-up batch (epochs repeat as needed),
    with ``threads`` torch threads in the main process (workers always use 1)."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    loader = build_loader(dataset, "detect", batch_size=batch, shuffle=True, num_workers=workers,
                          persistent_workers=True, seed=0)
    seen, epoch, start = -1, 0, 0.0  # batch -1 is the warm-up
    while seen < batches:
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            if seen == 0:
                start = time.perf_counter()
            seen += 1
            if seen == batches + 1:
                break
        epoch += 1
    torch.set_num_threads(default_threads)
    # `start` was taken when timed batch 0 arrived, so `batches` batches were produced since.
    return batches * batch / (time.perf_counter() - start)


def _spin(n: int) -> None:
    total = 0
    for i in range(n):
        total += i * i


def cpu_ceiling(processes: int, n: int = 5_000_000) -> float:
    """Speed-up of ``processes`` CPU-bound processes over one on this machine right now: the most
    any loader with that many workers can reach (shared or throttled cores show here)."""
    import multiprocessing
    start = time.perf_counter()
    _spin(n)
    one = time.perf_counter() - start
    with multiprocessing.Pool(processes) as pool:
        pool.map(_spin, [1000] * processes)  # start the processes outside the timing
        start = time.perf_counter()
        pool.map(_spin, [n] * processes, chunksize=1)
        many = time.perf_counter() - start
    return processes * one / many


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="number of generated JPEG images")
    parser.add_argument("--imgsz", type=int, default=640, help="letterbox size of the training pipeline")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per configuration")
    parser.add_argument("--workers", type=int, default=2, help="worker processes to compare with 0")
    parser.add_argument("--cache-mb", type=float, default=0.0,
                        help="decoded-image RAM cache (main process only); 0: every image decoded every time, as "
                             "with a data set larger than the cache (the pipeline's full cost)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per configuration, interleaved; the best is kept (noise only slows a run down)")
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    # (workers, main-process threads): in-process loading is timed both with torch's default thread
    # count and with 1 thread (what each worker gets).
    configs = [(0, threads), (0, 1), (args.workers, threads)] if threads > 1 else [(0, 1), (args.workers, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_images(Path(tmp), args.images, args.width, args.height)
        dataset = VisionDataset(samples, CLASSES, "detect", transforms=build_transforms("detect", True, args.imgsz))
        dataset.images = ImageCache(args.cache_mb)
        rates, ceiling = dict.fromkeys(configs, 0.0), 0.0
        for _ in range(args.repeats):
            ceiling = max(ceiling, cpu_ceiling(args.workers))
            for workers, main_threads in configs:
                rate = images_per_second(dataset, workers, args.batch, args.batches, main_threads)
                rates[workers, main_threads] = max(rates[workers, main_threads], rate)

    print(f"Detection training pipeline (decode + augment + collate), {args.images} JPEGs "
          f"{args.width}x{args.height} -> {args.imgsz} px letterbox, batch {args.batch}, "
          f"{args.batches} timed batches after 1 warm-up batch, best of {args.repeats}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()})\n")
    print("| num_workers | torch threads per loading process | images/s |\n| ---: | ---: | ---: |")
    for (workers, main_threads), rate in rates.items():
        print(f"| {workers} | {1 if workers else main_threads} | {rate:.1f} |")
    parallel = rates[configs[-1]]
    print(f"\nratio {args.workers} workers / 0 workers, 1 thread: {parallel / rates[0, 1]:.2f}")
    if threads > 1:
        print(f"ratio {args.workers} workers / 0 workers, {threads} threads: {parallel / rates[0, threads]:.2f}")
    print(f"CPU ceiling ({args.workers} busy processes / 1, same machine, best of {args.repeats}): {ceiling:.2f}")
    print(f"command: python {shlex.join(['benchmarks/data_loading.py', *(sys.argv[1:] if argv is None else argv)])}")


if __name__ == "__main__":
    main()
