"""The region-based lineage on the same data: R-CNN, SPPNet, Fast R-CNN (later issues add Faster R-CNN).

The backbone (resnet18) is first pretrained as a classifier on the built-in shapes crops
(``--pretrain-epochs``; 0 trains the detectors from random weights), standing in for the papers' ImageNet
pretraining, which cannot be downloaded here; every detector starts from that same ``best.pt``.
For each model: train with the real engine (``cvforge.train``, the CLI's options and the model's defaults),
then on the val split measure test seconds per image without proposal time (the proposal cache is filled
first, so the model only reads it) and the selective search seconds per image (computed afresh, not
cached), and evaluate the best checkpoint with the shared evaluator (mAP50, mAP50-95).
One JSON line per model goes to ``--results``; ``--table`` prints the markdown table of a results file.

    python benchmarks/lineage.py --models rcnn,sppnet,fast_rcnn --train 128 --val 32 --epochs 4
    python benchmarks/lineage.py --table --results runs/lineage/results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import cvforge
from cvforge.data import build_dataset
from cvforge.models.detection.proposals import SelectiveSearch

PAPER_ORDER = ("rcnn", "sppnet", "fast_rcnn", "faster_rcnn")
PRETRAIN_DATA = "shapes:train=400,val=60,size=96"  # object crops, as in benchmarks/transfer_learning.py


def pretrain(args: argparse.Namespace) -> str | None:
    """A resnet18 classifier on the shapes crops; its best.pt (the detectors load its backbone)."""
    if args.pretrained or not args.pretrain_epochs:
        return args.pretrained
    result = cvforge.train(task="classify", model="resnet18", data=PRETRAIN_DATA, epochs=args.pretrain_epochs,
                           imgsz=32, optimizer="adamw", weight_decay=0.05, lr=3e-3, workers=0, device="cpu",
                           seed=args.seed, project=str(Path(args.project) / "pretrain"), name="train")
    return str(result.best or result.last)


def test_seconds(weights: Path, data: str, limit: int) -> tuple[float, float]:
    """(model seconds per image with proposals cached, selective search seconds per image) on val; models
    that make their own proposals (Faster R-CNN's RPN, YOLO) spend 0 s on selective search."""
    model = cvforge.load(weights, device="cpu").module.eval()
    source = getattr(model, "source", None)
    dataset = build_dataset(data, "val", "detect")
    images = [dataset[i][0] for i in range(min(limit, len(dataset)))]
    with torch.inference_mode():
        model([images[0]])  # warm-up, and fills the cache for every image below
        for image in images if source is not None else []:
            source(image)
        start = time.perf_counter()
        for image in images:
            model([image])
        model_time = (time.perf_counter() - start) / len(images)
    if source is None:
        return model_time, 0.0
    search = SelectiveSearch(source.mode, source.max_proposals, cache=False)
    start = time.perf_counter()
    for image in images:
        search(image)
    return model_time, (time.perf_counter() - start) / len(images)


def run(name: str, args: argparse.Namespace, pretrained: str | None) -> dict:
    data = f"shapes:train={args.train},val={args.val},size={args.size},seed={args.seed}"
    start = time.perf_counter()
    result = cvforge.train(task="detect", model=name, data=data, epochs=args.epochs, imgsz=args.imgsz or args.size,
                           batch=args.batch, workers=0, device="cpu", lr=args.lr, seed=args.seed,
                           pretrained=pretrained or "", project=str(Path(args.project) / name), name="train")
    train_seconds = time.perf_counter() - start
    metrics = cvforge.evaluate(result.best or result.last, data=data, split="val", device="cpu", quiet=True,
                               out=Path(args.project) / name / "eval")
    weights = result.best or result.last
    model_s, proposal_s = test_seconds(weights, data, args.time_images)
    return {"model": name, "weights": str(weights), "data": data, "imgsz": args.imgsz or args.size, "epochs": args.epochs, "train_s_per_epoch": train_seconds / args.epochs,
            "test_s_per_image": model_s, "proposal_s_per_image": proposal_s,
            "mAP50": metrics.get("metrics/mAP50", metrics.get("mAP50")),
            "mAP50-95": metrics.get("metrics/mAP50-95", metrics.get("mAP50-95")), "threads": torch.get_num_threads(),
            "pretrained": bool(pretrained)}


def table(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: PAPER_ORDER.index(r["model"]) if r["model"] in PAPER_ORDER else 99)
    header = "| model | --imgsz | train s / epoch | test s / image (no proposals) | test s / image (with proposals) "
    lines = [header + "| mAP50 | mAP50-95 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        with_proposals = r["test_s_per_image"] + r["proposal_s_per_image"]
        lines.append(f"| {r['model']} | {r.get('imgsz', '')} | {r['train_s_per_epoch']:.0f} | {r['test_s_per_image']:.4f} | "
                     f"{with_proposals:.4f} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} |")
    lines.append("")
    for slow in (r for r in rows if r["model"] == "rcnn"):
        for fast in (r for r in rows if r["model"] == "fast_rcnn"):
            lines.append(f"R-CNN (--imgsz {slow.get('imgsz')}) / Fast R-CNN (--imgsz {fast.get('imgsz')}) test time, "
                         f"no proposals: {slow['test_s_per_image'] / fast['test_s_per_image']:.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rcnn,sppnet,fast_rcnn")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="image side of the shapes copy and --imgsz")
    parser.add_argument("--imgsz", type=int, default=0, help="--imgsz of training (default: --size)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="images per step (Fast R-CNN's N = 2)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="backbone pretraining on crops (0: none)")
    parser.add_argument("--pretrained", help="use this backbone checkpoint instead of pretraining one")
    parser.add_argument("--time-images", type=int, default=16, help="val images timed per model")
    parser.add_argument("--project", default="runs/lineage")
    parser.add_argument("--results", default="runs/lineage/results.jsonl")
    parser.add_argument("--table", action="store_true", help="only print the table of --results")
    parser.add_argument("--retime", action="store_true",
                        help="re-measure the test times of every row of --results, one model after another")
    args = parser.parse_args()
    results = Path(args.results)
    if args.retime:  # runs trained side by side share the CPU; time them again alone, in one process
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        for row in rows:
            row["test_s_per_image"], row["proposal_s_per_image"] = test_seconds(
                Path(row["weights"]), row["data"], args.time_images)
        results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif not args.table:
        results.parent.mkdir(parents=True, exist_ok=True)
        pretrained = pretrain(args)
        for name in args.models.split(","):
            row = run(name, args, pretrained)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    print(table(rows))
    print(f"\n    {shlex.join([Path(sys.executable).name, *sys.argv])}  # {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
