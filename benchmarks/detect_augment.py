"""Time the detection training augmentation per sample: the scale/translate step as RandomZoomShift
(one resize + one paste, cvforge's) against torchvision's RandomAffine drawing the same (a resampling grid),
and the whole ``detect`` train pipeline with each, interleaved in one run on the same samples.

Two inputs: the demo's case (128-px shapes images as 128-px mosaics, what ``cvforge demo`` feeds yolo-n)
and 640x480 images to a 640 letterbox (the default ``imgsz``). One thread, decoded images (no JPEG cost).

    python benchmarks/detect_augment.py            # ~1 min on one core

Prints a Markdown table: input, step, ms per sample with RandomAffine, with RandomZoomShift, ratio.
"""
from __future__ import annotations

import argparse
import time

import torch
from _markdown import markdown_table  # benchmarks/_markdown.py
from torchvision import tv_tensors
from torchvision.transforms import v2

from cvforge.data import build_dataset
from cvforge.data.mosaic import MosaicDataset, mosaic
from cvforge.data.transforms import LETTERBOX_FILL, RandomZoomShift, build_transforms

SCALE, TRANSLATE = (0.5, 1.5), 0.1  # the detect preset's defaults


def random_affine() -> v2.RandomAffine:
    """What the detect preset used before RandomZoomShift: the same draws, done by a general warp."""
    return v2.RandomAffine(degrees=0.0, translate=(TRANSLATE, TRANSLATE), scale=SCALE,
                           interpolation=v2.InterpolationMode.BILINEAR,
                           fill={tv_tensors.Image: LETTERBOX_FILL, tv_tensors.Mask: 0})


def with_step(pipeline: v2.Compose, step: v2.Transform) -> v2.Compose:
    """The pipeline with its RandomZoomShift replaced by ``step``."""
    return v2.Compose([step if isinstance(op, RandomZoomShift) else op for op in pipeline.transforms])


def shapes_mosaics(count: int) -> list[tuple]:
    dataset = MosaicDataset(build_dataset("shapes", "train", "detect"), 128)
    return [mosaic([dataset.raw[(4 * i + k) % len(dataset)] for k in range(4)], 128) for i in range(count)]


def large_images(count: int) -> list[tuple]:
    samples = []
    for i in range(count):
        image = tv_tensors.Image(torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8))
        corners = torch.rand(6, 2) * torch.tensor([540.0, 380.0])
        boxes = torch.cat([corners, corners + 20 + torch.rand(6, 2) * 80], 1)
        samples.append((image, {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(480, 640)),
                                "labels": torch.arange(6), "image_id": torch.tensor(i)}))
    return samples


def ms_per_sample(transform, samples: list[tuple], rounds: int) -> float:
    """Median over ``rounds`` passes of the mean ms per sample."""
    passes = []
    for _ in range(rounds):
        start = time.perf_counter()
        for image, target in samples:
            transform(image, dict(target))
        passes.append(1000 * (time.perf_counter() - start) / len(samples))
    return sorted(passes)[len(passes) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker's setting; the demo's in-process loading shares 2 with training
    torch.manual_seed(0)
    rows = []
    for name, samples, imgsz in (("128-px mosaic -> 128", shapes_mosaics(args.samples), 128),
                                 ("640x480 -> 640", large_images(args.samples), 640)):
        pipeline = build_transforms("detect", True, imgsz)
        steps = {"scale/translate step": (random_affine(), RandomZoomShift(SCALE, TRANSLATE)),
                 "whole detect pipeline": (with_step(pipeline, random_affine()), pipeline)}
        for step, (affine, ours) in steps.items():
            affine_ms, ours_ms = [], []
            for _ in range(2):  # interleaved, so that a slow moment of the machine hits both
                affine_ms.append(ms_per_sample(affine, samples, args.rounds))
                ours_ms.append(ms_per_sample(ours, samples, args.rounds))
            a, o = min(affine_ms), min(ours_ms)
            rows.append({"input": name, "step": step, "RandomAffine ms": f"{a:.3f}",
                         "RandomZoomShift ms": f"{o:.3f}", "speed-up": f"{a / o:.1f}x"})
            print(markdown_table(rows[-1:], lambda key, value: str(value)), flush=True)
    print(markdown_table(rows, lambda key, value: str(value)))


if __name__ == "__main__":
    main()
