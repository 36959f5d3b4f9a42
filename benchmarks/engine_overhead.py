"""Training throughput of cvforge's engine against a plain hand-written PyTorch loop doing the same work.

Both train the same small CNN on the same in-memory data through the same ``build_loader``, with SGD
(momentum, weight decay), a per-iteration cosine schedule and ``loss.item()`` every step, on the
same device in the same process. Repeats alternate engine / plain (and which goes first) so that
drift in the machine's load hits both alike. The engine's time is its whole ``fit()`` of one epoch:
progress bar, bookkeeping, non-finite checks, metrics.csv and last.pt included.
Target: overhead <= 5 %.

    python benchmarks/engine_overhead.py                      # CPU, a few minutes at most
    python benchmarks/engine_overhead.py --threads 1          # steadier on a busy machine
    python benchmarks/engine_overhead.py --device cuda --batch 128 --imgsz 96
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from cvforge.config import TrainConfig
from cvforge.data.loader import build_loader
from cvforge.engine.optim import resolve_device, seed_everything
from cvforge.engine.trainer import Trainer


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (stride 2) and a linear head; losses ``{"ce"}`` in train mode."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor, targets: dict | None = None):
        logits = self.head(self.features(images.float() / 255).mean((2, 3)))
        return {"ce": F.cross_entropy(logits, targets["label"])} if self.training else logits


class InMemory(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, classes: int = 10):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], {"label": self.labels[i]}


def config_for(args: argparse.Namespace, project: str) -> TrainConfig:
    # The work both loops do: no EMA, no clipping, no AMP, no warm-up, no validation.
    return TrainConfig(task="classify", epochs=1, batch=args.batch, workers=0, device=args.device, lr=0.01,
                       momentum=0.9, weight_decay=5e-4, scheduler="cosine", warmup_epochs=0.0, amp=False,
                       grad_clip=0.0, ema=False, patience=0, project=project, seed=0)


def engine_epoch(args: argparse.Namespace, data: InMemory, project: str) -> float:
    seed_everything(0)
    trainer = Trainer(config_for(args, project), SmallCNN(), data)
    _sync(trainer.device)
    clock = Clock()
    trainer.fit()
    _sync(trainer.device)
    return clock.rates(len(data))


def plain_epoch(args: argparse.Namespace, data: InMemory) -> float:
    seed_everything(0)
    device = resolve_device(args.device)
    model = SmallCNN().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = build_loader(data, "classify", batch_size=args.batch, shuffle=True, pin_memory=device.type == "cuda")
    total = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / total))))
    _sync(device)
    clock = Clock()
    loader.sampler.set_epoch(0)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()  # what any loop logs
    _sync(device)
    return clock.rates(len(data))


class Clock:
    """Wall time, and this process's CPU time: on a shared machine other processes slow the wall
    clock of either loop at random, while CPU time counts only the work this process did."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, images: int) -> tuple[float, float]:
        """(images per wall second, images per CPU second)."""
        return images / (time.perf_counter() - self.wall), images / (time.process_time() - self.cpu)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--imgsz", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100, help="batches per measured epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = InMemory(args.batch * args.batches, args.imgsz)
    rows = []
    with tempfile.TemporaryDirectory() as project:
        engine_epoch(args, data, project), plain_epoch(args, data)  # warm-up: allocator, kernels, caches
        for repeat in range(args.repeats):
            if repeat % 2:  # alternate which one runs first, too
                plain, engine = plain_epoch(args, data), engine_epoch(args, data, project)
            else:
                engine, plain = engine_epoch(args, data, project), plain_epoch(args, data)
            rows.append((engine, plain))
            print(f"repeat {repeat + 1}: engine {engine[0]:8.1f} img/s ({engine[1]:8.1f} per CPU s)   "
                  f"plain {plain[0]:8.1f} img/s ({plain[1]:8.1f} per CPU s)", flush=True)
    print("\n| device | batch | imgsz | images/epoch | clock | engine img/s | plain img/s | overhead |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for clock, k in (("wall", 0), ("CPU", 1)):
        engine, plain = statistics.median(r[0][k] for r in rows), statistics.median(r[1][k] for r in rows)
        paired = statistics.median(100 * (p[k] - e[k]) / p[k] for e, p in rows)
        print(f"| {args.device} | {args.batch} | {args.imgsz} | {len(data)} | {clock} | {engine:.1f} | {plain:.1f} "
              f"| {paired:+.1f} % |")
    print(f"\noverhead: median over {args.repeats} alternating pairs of (plain - engine) / plain; target <= 5 %")


if __name__ == "__main__":
    main()
