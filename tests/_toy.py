"""A tiny classification model, data set and evaluator for the engine's tests, plus the entry points
that child processes run (exact resume, crash safety, DDP).

Children start from a forkserver that has already imported torch and the engine (``forkserver()``),
so a child costs a fork instead of a fresh interpreter. Each child makes itself a process-group
leader, so the test can signal or kill it together with its DataLoader workers, and appends
progress markers (``step N``, ``save-begin``, ``save-end``, ``done``) to a progress file.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvforge.config import TrainConfig
from cvforge.engine import checkpoint as checkpoint_module
from cvforge.engine import trainer as trainer_module
from cvforge.engine.optim import seed_everything
from cvforge.engine.trainer import Trainer

CLASSES = 3
SIZE = 12
# Shuffling, augmentation, dropout, momentum, EMA, accumulation, warm-up + cosine: all must resume exactly.
TOY = dict(task="classify", epochs=3, batch=4, workers=0, device="cpu", lr=0.05, warmup_epochs=0.5,
           ema=True, ema_decay=0.9, accumulate=2, patience=0, seed=3, weight_decay=1e-3)


class ToyData(torch.utils.data.Dataset):
    """``n`` images [3, SIZE, SIZE] uint8 whose colour says the class; ``augment`` adds noise and
    random flips drawn from torch's global generator (which the loader seeds per sample)."""

    def __init__(self, n: int = 24, augment: bool = True):
        self.n, self.augment = n, augment
        self.classes = [f"c{i}" for i in range(CLASSES)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        label = index % CLASSES
        image = torch.full((3, SIZE, SIZE), 40, dtype=torch.uint8)
        image[label] = 200
        image[:, index % SIZE] = 120  # a stripe that tells samples apart
        if self.augment:
            image = (image.int() + torch.randint(-30, 31, image.shape)).clamp(0, 255).to(torch.uint8)
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, {"label": torch.tensor(label)}


class ToyModel(nn.Module):
    """conv -> BN -> ReLU -> pool -> dropout -> linear. Train mode: ``{"ce", "l2"}`` losses; eval mode:
    logits [B, CLASSES]. ``nan_calls``: train-mode forward calls (0-based) that return a NaN loss."""

    def __init__(self, nan_calls: set[int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, CLASSES)
        self.nan_calls, self.calls = set(nan_calls or ()), 0
        self.cvforge_spec = {"name": "toy", "task": "classify", "kwargs": {}}

    def forward(self, images: torch.Tensor, targets: dict | None = None) -> Any:
        x = images.float() / 255
        x = F.relu(self.norm(self.conv(x))).mean((2, 3))
        logits = self.head(self.drop(x))
        if not self.training:
            return logits
        self.calls += 1
        ce = F.cross_entropy(logits, targets["label"])
        if self.calls - 1 in self.nan_calls:
            ce = ce * float("nan")
        return {"ce": ce, "l2": 1e-3 * logits.pow(2).mean()}


class ToyEvaluator:
    def reset(self) -> None:
        self.right = self.total = 0

    def update(self, predictions: torch.Tensor, targets: dict) -> None:
        self.right += int((predictions.argmax(1) == targets["label"]).sum())
        self.total += len(predictions)

    def compute(self) -> dict[str, float]:
        return {"top1": self.right / max(1, self.total)}


class SignalAt:
    """Callback: send ``signal`` to this process (or its whole group) right after optimizer step ``step``."""

    def __init__(self, step: int, number: int = signal.SIGTERM, group: bool = False, rank: int | None = None):
        self.step, self.number, self.group, self.rank = step, number, group, rank

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.step and (self.rank is None or trainer.rank == self.rank):
            if self.group:
                os.killpg(os.getpgid(0), self.number)
            else:
                os.kill(os.getpid(), self.number)


class Marks:
    """Callback: append ``step N`` to a progress file after every optimizer step."""

    def __init__(self, progress: str | None):
        self.progress = progress

    def on_step_end(self, trainer: Trainer) -> None:
        mark(self.progress, f"step {trainer.global_step}")


def mark(progress: str | None, text: str) -> None:
    if progress:
        with open(progress, "a") as f:
            f.write(text + "\n")


def build(project: str | Path, *, nan_calls: set[int] | None = None, callbacks: list | None = None,
          **overrides: Any) -> Trainer:
    config = TrainConfig(**{**TOY, "project": str(project), **overrides})
    seed_everything(0)
    return Trainer(config, ToyModel(nan_calls), ToyData(24), ToyData(9, augment=False), ToyEvaluator(),
                   callbacks=callbacks or [])


def train(project: str | Path, resume: str | Path | None = None, callbacks: list | None = None, **overrides):
    """Build, optionally resume, fit; one thread so that every process computes bit-identically."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build(project, callbacks=callbacks, **overrides)
        if resume is not None:
            trainer.resume(resume)
        return trainer.fit()
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- child processes
def forkserver() -> multiprocessing.context.BaseContext:
    """A multiprocessing context whose children fork from a server that has imported torch and the
    engine. (This module itself is not preloadable: Python 3.11's forkserver ignores the test's sys.path.)"""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cvforge.engine.trainer"])
    return context


def _slow_saves(progress: str | None, seconds: float) -> None:
    """Make every torch.save in this process take ``seconds``, written in chunks, with markers."""
    original = torch.save

    def slow_save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data, chunks = buffer.getvalue(), 10
        mark(progress, "save-begin")
        size = -(-len(data) // chunks)
        for start in range(0, len(data), size):
            file.write(data[start:start + size])
            file.flush()
            time.sleep(seconds / chunks)
        mark(progress, "save-end")

    torch.save = slow_save
    assert checkpoint_module.torch.save is slow_save


def child(project: str, log: str, progress: str | None = None, resume: str | None = None,
          stop_at: int | None = None, group: bool = False, slow_save: float = 0.0, **overrides: Any) -> None:
    """Entry point of a training child: its own process group, output to ``log``."""
    os.setsid()
    # A forkserver child defaults to forkserver for its own children: DataLoader workers would each
    # go through a second, freshly started server. Fork them, as a normal Linux process does.
    multiprocessing.set_start_method("fork", force=True)
    sys.stdout = sys.stderr = open(log, "a", buffering=1)
    if slow_save:
        _slow_saves(progress, slow_save)
    callbacks: list = [Marks(progress)]
    if stop_at is not None:
        callbacks.append(SignalAt(stop_at, group=group))
    mark(progress, "started")
    result = train(project, resume, callbacks, **overrides)
    mark(progress, f"done stopped={result.stopped}")


def run_child(context: multiprocessing.context.BaseContext, timeout: float = 60, **kwargs: Any) -> str:
    """Run ``child(**kwargs)`` to the end; returns its log text (fails the test on a non-zero exit)."""
    process = context.Process(target=child, kwargs=kwargs)
    process.start()
    process.join(timeout)
    log = Path(kwargs["log"]).read_text() if Path(kwargs["log"]).exists() else ""
    if process.is_alive():
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"child did not finish in {timeout}s:\n{log}")
    assert process.exitcode == 0, f"child exited with {process.exitcode}:\n{log}"
    return log


def ddp_child(project: str, out: str, stop_at: int | None = None, resume: str | None = None,
              **overrides: Any) -> None:
    """One DDP rank (run by ``cvforge.engine.launch``): train, then save this rank's raw weights and
    progress to ``out/rank<R>.pt``. On ranks other than 0 every file-writing function raises."""
    rank = int(os.environ["RANK"])
    multiprocessing.set_start_method("fork", force=True)
    if rank != 0:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"rank {rank} tried to write a file")
        trainer_module.save_checkpoint = trainer_module._replace_text = refuse
        TrainConfig.save_yaml = refuse
    callbacks = [SignalAt(stop_at, rank=1)] if stop_at is not None else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = build(project, callbacks=callbacks, **overrides)
    if resume is not None:
        trainer.resume(resume)
    result = trainer.fit()
    torch.set_num_threads(threads)
    torch.save({"model": trainer.raw_model.state_dict(), "step": trainer.global_step, "stopped": result.stopped,
                "save_dir": str(result.save_dir)}, Path(out) / f"rank{rank}.pt")
