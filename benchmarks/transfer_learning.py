"""Transfer learning, honestly (issue 3), through the real engine: ``cvforge.train(...)`` only.

1. Pretrain resnet18 on the built-in shapes crops (circle, cross, square, star, triangle).
2. Make a *different* few-shot set (``cvforge.data.fewshot``: arrow, ellipse, hexagon, ring on noise;
   20 train images per class, 50 held-out val images per class).
3. Fine-tune from the pretrain's ``best.pt`` (a cvforge checkpoint; its 5-class head is re-initialised
   for 4 classes): a linear probe (``freeze=-1``), then full fine-tuning from the probe's ``last.pt``
   with ``backbone_lr_mult`` < 1.
4. Train the same model from scratch with the same budget (probe + fine-tune epochs over the same 80
   images), at each of two learning rates, and keep the better one.

The few-shot val split is the test set here, so every figure is the *last* epoch's top-1 (no picking
of best.pt on it); the scratch run's learning rate is picked on it, which can only favour scratch.
Every run writes into a temporary folder (``project=``), and the data set cache too (``CVFORGE_HOME``)
unless ``--keep-data``.

Pretraining runs 15 epochs: the engine's classify augmentation (RandomResizedCrop of 35-100 %, colour
jitter, centre-crop evaluation) is heavier than a flip-only loop, and after 6 epochs the backbone is
still weak (shapes top-1 ~0.45) and transfers little (fine-tuned beat scratch by only 0.005-0.03, within
noise for 200 test images); see BENCHMARKS.md.

    python benchmarks/transfer_learning.py                 # 2-core CPU: ~5 minutes
    python benchmarks/transfer_learning.py --seed 1 --device cuda
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import cvforge
from cvforge.data.fewshot import make_fewshot

PRETRAIN_DATA = "shapes:train=400,val=60,size=96"
COMMON = {"task": "classify", "model": "resnet18", "imgsz": 32, "optimizer": "adamw", "weight_decay": 0.05,
          "workers": 0}


def run(label: str, project: Path, **options) -> dict:
    """One ``cvforge.train`` call; its last epoch's top-1, wall-clock seconds and checkpoints."""
    started = time.perf_counter()
    result = cvforge.train(**COMMON, project=str(project), name=label, **options)
    seconds = time.perf_counter() - started
    last = result.history[-1]
    return {"label": label, "top1": float(last["metrics/top1"]), "seconds": seconds, "best": result.best,
            "last": result.last, "epochs": result.epochs,
            "max_top1": max(float(row["metrics/top1"]) for row in result.history)}


def experiment(args: argparse.Namespace, work: Path) -> list[dict]:
    """The four stages of the module docstring; returns one row per stage (scratch: the better lr)."""
    base = {"device": args.device, "seed": args.seed, "batch": args.batch}
    pretrain = run("pretrain", work / "runs", data=PRETRAIN_DATA, epochs=args.pretrain_epochs, lr=3e-3,
                   **{**base, "batch": 64})
    fewshot = str(make_fewshot(work / "fewshot", train_per_class=args.per_class, seed=args.seed))
    probe = run("probe", work / "runs", data=fewshot, epochs=args.probe_epochs, lr=1e-2, freeze=-1,
                pretrained=str(pretrain["best"]), **base)
    finetune = run("finetune", work / "runs", data=fewshot, epochs=args.finetune_epochs, lr=1e-3,
                   backbone_lr_mult=0.3, pretrained=str(probe["last"]), **base)
    finetune["seconds"] += probe["seconds"]
    finetune["label"] = (f"fine-tuned: probe {args.probe_epochs} ep (lr 1e-2) + fine-tune "
                         f"{args.finetune_epochs} ep (lr 1e-3, backbone x0.3)")
    budget = args.probe_epochs + args.finetune_epochs
    scratch = [run(f"scratch-lr{lr:g}", work / "runs", data=fewshot, epochs=budget, lr=lr, **base)
               for lr in args.scratch_lrs]
    for row in scratch:
        print(f"scratch lr {row['label'][10:]}: top1 {row['top1']:.3f}")
    best_scratch = max(scratch, key=lambda row: row["top1"])
    best_scratch["label"] = f"from scratch: {budget} ep, best of lr {', '.join(f'{lr:g}' for lr in args.scratch_lrs)} " \
                            f"(lr {best_scratch['label'][10:]})"
    best_scratch["seconds"] = sum(row["seconds"] for row in scratch)
    pretrain["label"] = f"pretrain on {PRETRAIN_DATA} crops: {args.pretrain_epochs} ep (lr 3e-3)"
    return [pretrain, finetune, best_scratch]


def table(rows: list[dict], per_class: int) -> str:
    lines = ["| run | top-1 (last epoch) | best epoch's top-1* | seconds |", "| --- | ---: | ---: | ---: |"]
    for i, row in enumerate(rows):
        where = "shapes val" if i == 0 else f"4 new classes, {per_class}/class"
        lines.append(f"| {row['label']} | {row['top1']:.3f} ({where}) | {row['max_top1']:.3f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--scratch-lrs", type=float, nargs=2, default=[1e-3, 3e-3])
    parser.add_argument("--per-class", type=int, default=20, help="few-shot training images per class")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--keep-data", action="store_true", help="use the normal CVFORGE_HOME data cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cvforge-transfer-") as tmp:
        if not args.keep_data:
            os.environ["CVFORGE_HOME"] = str(Path(tmp) / "home")
        rows = experiment(args, Path(tmp))
    print("\n" + table(rows, args.per_class))
    print("\n* the best epoch is picked on the test split itself: for reference only, not a result.")
    print(f"fine-tuned minus scratch: {rows[1]['top1'] - rows[2]['top1']:+.3f} top-1")
    print(f"command: python {shlex.join(['benchmarks/transfer_learning.py', *sys.argv[1:]])} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
