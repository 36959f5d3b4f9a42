"""The training loop: one plain loop for every task (DESIGN §3-§4).

    trainer = Trainer(config, model, train_data, val_data, evaluator)
    trainer.resume("runs/classify/train/weights/last.pt")   # optional: continue exactly
    result = trainer.fit()

Per batch: ``losses = model(images, targets)`` (a dict of scalar tensors), ``loss = sum(losses)``,
backward; every ``accumulate`` batches one optimizer step: gradient clipping, optimizer, EMA,
scheduler (per iteration, after a linear warm-up). Every epoch: validation (with the EMA weights when
kept), ``metrics.csv``, ``weights/best.pt`` on the chosen metric, ``weights/last.pt``.

Faults cost at most the current step. SIGINT / SIGTERM set a flag; at the next optimizer-step
boundary the loop saves ``last.pt`` (mid-epoch, with the sampler position and RNG states) and returns
``TrainResult(stopped=True)``. A non-finite loss skips its step (gradients zeroed, counted);
``max_bad_steps`` of them in a row raise ``CvforgeError`` and leave ``last.pt`` as it was. Resuming
from ``last.pt`` reproduces the uninterrupted run bit for bit: data order and augmentation come from
the ``SeededSampler`` position, everything else from the checkpoint.

A time budget (``config.time`` minutes) sets the number of epochs after the first one: as many as fit,
counting validation (at least 1), timed by the first epoch's second half (its start pays once for warm-up
and cache filling), with the schedule fitted to them so that cosine still ends at its floor.
A first epoch that alone would overrun the budget ends where the budget is spent, with the schedule
fitted to the steps it got, so a slow model trains for the same time as a fast one. The epochs found are
saved in the config like any other setting, so a resumed run keeps them.

Callbacks are objects with any of ``on_train_start(trainer)``, ``on_step_end(trainer)``,
``on_epoch_end(trainer, metrics)``, ``on_train_end(trainer, result)``; they run on every rank.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import io
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cvforge.config import TrainConfig
from cvforge.data.io import write_text_atomically
from cvforge.data.loader import build_loader
from cvforge.engine import distributed as dist
from cvforge.engine.checkpoint import (FORMAT, IgnoreStopSignals, StopSignals, capture_rng, check_finite,
                                       load_checkpoint, load_model_state, next_run_dir, remove_stale_temps,
                                       restore_rng, save_checkpoint)
from cvforge.engine.optim import (LRFactor, ModelEMA, build_optimizer, resolve_device, seed_everything,
                                 to_device)
from cvforge.errors import CvforgeError

# The validation metric that picks best.pt when --metric is not given (first one the evaluator reports).
PRIMARY_METRICS = {"classify": ("top1",), "segment": ("mIoU",), "detect": ("mAP50-95", "mAP50"),
                   "instance": ("mask_mAP50-95", "mAP50-95", "mAP50")}


@dataclass
class TrainResult:
    """What ``fit`` returns. ``stopped``: a signal ended the run early; resume from ``last``."""

    save_dir: Path
    last: Path
    best: Path | None
    metric: str
    best_metric: float | None
    epochs: int
    stopped: bool
    history: list[dict] = field(default_factory=list)


def _epoch_sums() -> dict[str, Any]:
    return {"losses": {}, "batches": 0, "images": 0, "seconds": 0.0, "skipped": 0}


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``--amp-dtype name`` ("" = float16 on CUDA, bfloat16 elsewhere). float16 needs a
    GradScaler and can overflow (a Mask R-CNN on an H200 did: BENCHMARKS.md); bfloat16 keeps float32's range."""
    if not name:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if name == "float16" and device.type == "cpu":
        raise CvforgeError("float16 autocast on a CPU is emulated (minutes per step)", None,
                           "use --amp-dtype bfloat16 (native on CPUs with AMX), or --amp false")
    return getattr(torch, name)


class Trainer:
    """Trains ``model`` on ``train_data`` as ``config`` says (module docstring).

    model: ``model(images, targets) -> dict[str, Tensor]`` of scalar losses in train mode and
    ``model(images) -> predictions`` in eval mode; optional ``cvforge_spec`` (stored in checkpoints so
    the file alone rebuilds it) and ``param_groups(lr, backbone_lr_mult)``. Under DDP it must return
    losses connected to every trainable parameter on every batch (see ``engine/distributed.py``).
    train_data, val_data: Datasets of ``(image, target)`` for ``config.task``; batches come from
    ``cvforge.data.loader.build_loader``. evaluator: ``reset()``, ``update(predictions, targets)``,
    ``compute() -> dict[str, float]``; validation is skipped without one (best.pt then tracks the
    train loss). class_names: stored in checkpoints (default: ``train_data.classes``).
    ``config.batch`` is the batch over all processes; each of N processes loads ``batch // N``.
    """

    def __init__(self, config: TrainConfig, model: nn.Module, train_data: Any, val_data: Any = None,
                 evaluator: Any = None, *, class_names: Sequence[str] | None = None, callbacks: Sequence = ()):
        self.config, self.evaluator, self.callbacks = config, evaluator, list(callbacks)
        names = class_names if class_names is not None else getattr(train_data, "classes", None)
        self.class_names = list(names) if names is not None else None
        dist.init_from_env(use_cuda=config.device.strip().lower() != "cpu" and torch.cuda.is_available())
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device, dist.local_rank())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._pin = config.pin_memory if config.pin_memory is not None else self.device.type == "cuda"
        self._setup_model(model)
        self.train_loader = self._loader(train_data, train=True)
        self.val_loader = self._loader(val_data, train=False) if val_data is not None and self.is_main else None
        self.sampler = self.train_loader.sampler
        self.batches_per_epoch = len(self.train_loader)
        self._setup_optimization()
        self.epoch = self.batch_in_epoch = self.global_step = 0  # epochs done; batches done in this one
        self.bad_steps = self.bad_steps_total = self.bad_epochs = 0
        self.best: float | None = None
        self.metric_name, self.history, self.finished = config.metric, [], False
        self.save_dir: Path | None = None
        self._sums, self._pending_rng, self._signals = _epoch_sums(), None, StopSignals()
        self._window_bad = self._stop_now = False
        self._shown = self._val_seconds = 0.0
        self._cut_at = 0  # batch at which a time budget ended the first epoch (0: not cut)
        self._half_mark: tuple[int, float] | None = None  # (batch, training seconds) halfway through epoch 1
        seed_everything(config.seed + self.rank)  # the training stream (dropout, ...); api.train seeded the init

    # ----------------------------------------------------------------------- setup
    def _setup_model(self, model: nn.Module) -> None:
        # channels_last: conv kernels (oneDNN on CPU, cuDNN tensor cores) run faster on NHWC weights
        channels_last = self.config.channels_last
        if channels_last is None:
            channels_last = self.device.type == "cuda" and self.config.amp is not False
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.raw_model = model.to(self.device, memory_format=memory_format)
        self.model: nn.Module = self.raw_model
        if self.world_size > 1:  # DDP broadcasts rank 0's weights, so every rank starts equal
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw_model, device_ids=ids)
        # Only rank 0 validates and saves, so only it needs the average.
        self.ema = ModelEMA(self.raw_model, self.config.ema_decay) if self.config.ema and self.is_main else None

    def _setup_optimization(self) -> None:
        config = self.config
        self.optimizer = build_optimizer(self.raw_model, config)
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._steps_per_epoch = math.ceil(self.batches_per_epoch / config.accumulate)
        self.lr_factor = LRFactor(config.scheduler, *self._schedule(config.epochs * self._steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        amp = config.amp if config.amp is not None else self.device.type == "cuda"
        dtype = autocast_dtype(config.amp_dtype, self.device) if amp else None
        self._autocast = (functools.partial(torch.autocast, self.device.type, dtype=dtype) if dtype
                          else contextlib.nullcontext)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)

    def _schedule(self, steps: int) -> tuple[int, int]:
        """(optimizer steps, warm-up steps) of a schedule over ``steps``; under a time budget the warm-up
        takes at most half of the run, which the budget may have made shorter than the warm-up."""
        warmup = round(self.config.warmup_epochs * self._steps_per_epoch)
        return steps, min(warmup, steps // 2) if self.config.time else warmup

    def _loader(self, data: Any, train: bool) -> Any:
        config = self.config
        batch = config.batch // self.world_size if train else config.batch
        if batch < 1:
            raise CvforgeError(f"--batch {config.batch} is less than one image per process ({self.world_size})",
                               None, f"use --batch {self.world_size} or more")
        loader = build_loader(data, config.task, batch_size=batch, shuffle=train, num_workers=config.workers,
                              pin_memory=self._pin, drop_last=config.drop_last and train,
                              persistent_workers=config.persistent_workers, seed=config.seed,
                              rank=self.rank if train else 0, world_size=self.world_size if train else 1)
        if config.workers > 0:
            loader.worker_init_fn = IgnoreStopSignals(loader.worker_init_fn)
        if train and len(loader) == 0:
            raise CvforgeError(f"the training set ({len(data)} images) is smaller than one batch", None,
                               "lower --batch or turn off drop_last")
        return loader

    @property
    def weights_dir(self) -> Path:
        return Path(self.save_dir) / "weights"

    # ----------------------------------------------------------------------- resume
    def resume(self, path: str | os.PathLike) -> Trainer:
        """Restore everything from ``last.pt`` so that ``fit`` continues the run exactly where it stopped,
        in the run folder that holds the checkpoint."""
        path = Path(path)
        state = load_checkpoint(path)
        train = state.get("resume")
        if state.get("format") != FORMAT or not isinstance(train, dict):
            raise CvforgeError("checkpoint holds no training state to resume", path,
                               "resume from a run's weights/last.pt (best.pt holds weights only)")
        self._check_resumable(state, train, path)
        self._load_weights(state, train, path)
        self._load_optimization(train, path)
        self.epoch, self.global_step, self.batch_in_epoch = state["epoch"], state["step"], train["batch_in_epoch"]
        counters = train["bad_steps"], train["bad_steps_total"], train["bad_epochs"]
        self.bad_steps, self.bad_steps_total, self.bad_epochs = counters
        self.best, self.metric_name, self.history = state["best_metric"], state["metric"], list(state["history"])
        self._sums = copy.deepcopy(train["epoch_sums"])
        self.sampler.load_state_dict(train["sampler"])
        rngs = train["rng"]
        self._pending_rng = rngs[self.rank] if len(rngs) == self.world_size else rngs[0]
        self.save_dir = path.parent.parent if path.parent.name == "weights" else path.parent
        self._log(f"resuming {path} at epoch {self.epoch + 1}, step {self.global_step}")
        return self

    def _check_resumable(self, state: dict, train: dict, path: Path) -> None:
        before = state["train_config"]
        if state.get("finished") and self.config.epochs <= before.get("epochs", 0):
            raise CvforgeError(f"the run already finished ({state['epoch']} epochs)", path,
                               "raise --epochs to train longer, or start a new run from these weights")
        layout = before.get("batch"), before.get("accumulate"), train.get("world_size")
        same_batches = layout == (self.config.batch, self.config.accumulate, self.world_size)
        if train["batch_in_epoch"] and not same_batches:
            raise CvforgeError("cannot resume mid-epoch with another batch, accumulate or process count", path,
                               f"resume with --batch {before.get('batch')} and the same number of devices")
        self.finished = False

    def _load_weights(self, state: dict, train: dict, path: Path) -> None:
        # With an EMA, "model" holds the average (what users run) and the raw weights sit in "resume".
        raw = train["model"] if train.get("model") is not None else state["model"]
        load_model_state(self.raw_model, raw, path)
        if self.ema is not None:
            load_model_state(self.ema.module, state["model"], path)
            self.ema.updates = int(train.get("ema_updates", 0))

    def _load_optimization(self, train: dict, path: Path) -> None:
        check_finite(train["optimizer"], path, "optimizer state")
        try:
            self.optimizer.load_state_dict(train["optimizer"])
        except (ValueError, KeyError) as e:
            raise CvforgeError(f"optimizer state does not fit the model ({e})", path,
                               "resume with the run's --optimizer and --freeze") from None
        # Keep this config's schedule shape (e.g. more epochs); restore only the position in it.
        self.scheduler.load_state_dict({**train["scheduler"], "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
        if train.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(train["scaler"])

    # ----------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train until ``config.epochs`` (or early stopping, or a stop signal); see ``TrainResult``."""
        self._open_run()
        with self._signals:
            if self._pending_rng is not None:  # now, so nothing between resume() and here draws from it
                restore_rng(self._pending_rng)
                self._pending_rng = None
            self._call("on_train_start")
            while not self.finished:
                if not self._train_epoch():
                    return self._stopped(save=True)
                if self._end_epoch(self._validate() if self._validates() else None):
                    return self._stopped(save=False)
        result = self._result(stopped=False)
        self._call("on_train_end", result)
        return result

    def _open_run(self) -> None:
        if self.save_dir is None:
            fresh = next_run_dir(self.config.project_dir, self.config.name) if self.is_main else None
            self.save_dir = dist.broadcast_object(fresh)
        if self.is_main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.weights_dir)
            self.config.save_yaml(self.save_dir / "config.yaml")
            length = (f"a time budget of {self.config.time:g} min" if self._budget_open() else
                      f"{self.config.epochs} epochs")
            self._log(f"training {self.config.task} for {length} on {self.device} "
                      f"({self.world_size} process(es)), results in {self.save_dir}")

    def _train_epoch(self) -> bool:
        """The rest of the current epoch; False when a stop was requested at a step boundary."""
        self.sampler.set_epoch(self.epoch)
        self.model.train()
        started = time.perf_counter() - self._sums["seconds"]
        bar = tqdm(total=self.batches_per_epoch, initial=self.batch_in_epoch, leave=False, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{'?' if self._budget_open() else self.config.epochs}",
                   disable=not self.is_main)
        try:
            for images, targets in self.train_loader:
                self._forward_backward(images, targets)
                self.batch_in_epoch += 1
                if self.batch_in_epoch % self.config.accumulate and self.batch_in_epoch < self.batches_per_epoch:
                    continue
                self._optimizer_step()
                self._sums["seconds"] = time.perf_counter() - started
                self._show(bar)
                self._call("on_step_end")
                if self._stop_now or (self.world_size == 1 and self._signals.requested):
                    return False
                if self._budget_spent() and self.batch_in_epoch < self.batches_per_epoch:
                    self._cut_at = self.batch_in_epoch
                    break
        finally:
            bar.close()
        return True

    # ----------------------------------------------------------------------- time budget
    def _budget_open(self) -> bool:
        """A time-budgeted run whose number of epochs is not set yet (it is at the end of the first)."""
        return bool(self.config.time) and self.epoch == 0

    def _budget_spent(self) -> bool:
        """In the first epoch of a time-budgeted run: True once its training has used the whole budget (the
        epoch ends there). Once a tenth of the budget is spent and the epoch will clearly not fit, the
        schedule is fitted to the steps the budget allows at the speed so far (rank 0 decides for all).
        Also notes the training time halfway through the epoch, which ``_later_epoch_seconds`` uses."""
        if not self._budget_open():
            return False
        budget, spent = self.config.time * 60, self._sums["seconds"]
        if self._half_mark is None and self.batch_in_epoch >= self.batches_per_epoch // 2:
            self._half_mark = (self.batch_in_epoch, spent)
        projected = spent * self.batches_per_epoch / self.batch_in_epoch
        fit = spent >= budget / 10 and projected > budget
        steps = max(1, round(self.global_step * budget / spent)) if fit else 0  # 0: no change
        steps, over = dist.broadcast_object((steps, spent >= budget))
        if steps:
            self._refit_schedule(steps)
        return over

    def _refit_schedule(self, steps: int) -> None:
        """The schedule over ``steps`` optimizer steps in all; the next step's lr already follows it."""
        self.lr_factor.total, self.lr_factor.warmup = self._schedule(steps)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.lr_factor(self.scheduler.last_epoch)

    def _fit_to_budget(self, train_seconds: float) -> None:
        """After the first epoch (``train_seconds`` of training): as many epochs as fit in the budget, at least 1,
        and the schedule stretched or shrunk to them (the new epochs are saved with the config). The later
        epochs are timed by the first one's second half: its first batches pay once for warm-up and for
        filling the image cache (the demo's first epoch: 7.4 s, the next ones ~6 s)."""
        seconds = train_seconds + self._val_seconds
        later = max(self._later_epoch_seconds(train_seconds, seconds), 1e-9)
        # the last epoch is validated whatever val_period says: its validation beyond the average
        budget = self.config.time * 60 - self._val_seconds * (1 - 1 / self.config.val_period)
        epochs = dist.broadcast_object(max(1, 1 + int((budget - seconds) // later)))
        self.config = dataclasses.replace(self.config, epochs=epochs)
        if not self._cut_at:  # a cut epoch ends the run; its schedule was fitted while it ran
            self._refit_schedule(epochs * self._steps_per_epoch)
        if self.is_main:
            self.config.save_yaml(self.save_dir / "config.yaml")
        cut = (f", the first cut after {self._cut_at} of {self.batches_per_epoch} batches" if self._cut_at else
               f", the first took {seconds:.1f} s with validation, the next ~{later:.1f} s each")
        self._log(f"time budget {self.config.time:g} min: {epochs} epoch{'s' if epochs > 1 else ''}{cut}")

    def _later_epoch_seconds(self, train_seconds: float, first: float) -> float:
        """Expected seconds of an epoch after the first (with validation), from the first epoch's second half
        (``train_seconds``: its training time); ``first`` (the whole first epoch with validation) for a cut
        first epoch."""
        if self._half_mark is None or self._cut_at or self._half_mark[0] >= self.batches_per_epoch:
            return first
        batch, spent = self._half_mark
        per_batch = (train_seconds - spent) / (self.batches_per_epoch - batch)
        return per_batch * self.batches_per_epoch + self._val_seconds / self.config.val_period

    # ----------------------------------------------------------------------- one step
    def _forward_backward(self, images: Any, targets: Any) -> None:
        """Forward, backward (scaled by 1/accumulate) and the loss bookkeeping of one batch."""
        images = to_device(images, self.device, self._pin)
        targets = to_device(targets, self.device, self._pin)
        done = self.batch_in_epoch + 1
        boundary = done % self.config.accumulate == 0 or done == self.batches_per_epoch
        # Between optimizer steps DDP need not all-reduce gradients: they only add up locally.
        sync = self.model.no_sync() if self.world_size > 1 and not boundary else contextlib.nullcontext()
        with sync:
            with self._autocast():
                losses = self.model(images, targets)
            loss = sum(losses.values())
            if self.batch_in_epoch % self.config.accumulate == 0:
                # Free the last step's gradients only now, so that the memory they held is reused
                # by this backward instead of being returned to the OS and faulted back in.
                self.optimizer.zero_grad(set_to_none=True)
            if self.config.accumulate > 1:  # the step then sums the gradients of `accumulate` batches
                loss = loss / self.config.accumulate
            self.scaler.scale(loss).backward()
        values = torch.stack([value.detach().float() for value in losses.values()]).tolist()  # one sync
        sums = self._sums
        if all(math.isfinite(v) for v in values):
            for key, value in zip(losses, values, strict=True):
                sums["losses"][key] = sums["losses"].get(key, 0.0) + value
            sums["batches"] += 1
        else:
            self._window_bad = True
        sums["images"] += len(images)

    def _optimizer_step(self) -> None:
        """Clip, step, EMA and schedule, or skip the step when a loss in its window was not finite."""
        bad, stop = dist.sync_flags([self._window_bad, self._signals.requested], self.device)
        self._window_bad, self._stop_now = False, stop
        if stop:
            self._signals.request("a stop signal on another process")
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.bad_steps_total += 1
            self._sums["skipped"] += 1
            if self.bad_steps >= self.config.max_bad_steps:
                self._diverged()
        else:
            self.bad_steps = 0
            if self.config.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self._params, self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.raw_model)
        with warnings.catch_warnings():  # GradScaler skipped an inf float16 step: the schedule goes on anyway
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.global_step += 1

    def _diverged(self) -> None:
        last = self.weights_dir / "last.pt"
        where = last if last.exists() else self.save_dir
        raise CvforgeError(f"training diverged: {self.bad_steps} non-finite losses in a row "
                           f"(epoch {self.epoch + 1}, step {self.global_step + 1}); last good checkpoint kept",
                           where, "resume from it with a lower --lr (or without --amp), and check the data")

    def _show(self, bar: tqdm) -> None:
        bar.update(self.batch_in_epoch - bar.n)
        now = time.perf_counter()
        if self.is_main and now - self._shown >= 0.5:  # formatting every step would cost throughput
            self._shown = now
            sums = self._sums
            loss = sum(sums["losses"].values()) / max(1, sums["batches"])
            speed = sums["images"] * self.world_size / max(sums["seconds"], 1e-9)
            bar.set_postfix_str(f"loss {loss:.4g}  lr {self._lr():.3g}  {speed:.0f} img/s", refresh=False)

    def _lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _validates(self) -> bool:
        """Whether the epoch just trained is validated: the first (a time budget needs its cost), every
        ``val_period``-th and the last."""
        done = self.epoch + 1
        return done == 1 or done % self.config.val_period == 0 or done >= self.config.epochs

    @torch.inference_mode()
    def _validate(self) -> dict[str, float]:
        """Metrics of the EMA (or raw) weights on the validation set, on rank 0; ``{}`` elsewhere."""
        self._val_seconds, started = 0.0, time.perf_counter()
        if self.val_loader is None or self.evaluator is None:
            return {}
        model = self.ema.module if self.ema is not None else self.raw_model
        model.eval()
        self.evaluator.reset()
        for images, targets in tqdm(self.val_loader, desc="validating", leave=False, dynamic_ncols=True):
            with self._autocast():
                predictions = model(to_device(images, self.device, self._pin))
            self.evaluator.update(to_device(predictions, "cpu"), targets)
        metrics = {key: float(value) for key, value in self.evaluator.compute().items()}
        self._val_seconds = time.perf_counter() - started
        return metrics

    # ----------------------------------------------------------------------- end of epoch, saving
    def _end_epoch(self, metrics: dict[str, float] | None) -> bool:
        """Record the epoch, save best.pt / last.pt / metrics.csv; True when a signal asks to stop.
        metrics: None when this epoch was not validated (``val_period``)."""
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        row = self._history_row(metrics or {})
        self.history.append(row)
        if self.config.time and self.epoch == 1:
            self._fit_to_budget(row["time"])
        improved = self._track_best(row, metrics)
        if improved and self.is_main:
            save_checkpoint(self.weights_dir / "best.pt", self._checkpoint())
        patience_over = bool(self.config.patience) and self.bad_epochs >= self.config.patience
        early, stop = dist.sync_flags([patience_over, self._signals.requested], self.device)
        self.finished = self.epoch >= self.config.epochs or early
        self._save_last()
        if self.is_main:
            period = self.config.save_period
            if period and self.epoch % period == 0:
                save_checkpoint(self.weights_dir / f"epoch{self.epoch}.pt", self._checkpoint())
            write_text_atomically(self.save_dir / "metrics.csv", _csv(self.history), replace=True)
            self._log(self._summary(row, improved))
            if early and self.epoch < self.config.epochs:
                self._log(f"stopping early: no improvement of {self.metric_name} for {self.bad_epochs} epochs")
        self._call("on_epoch_end", metrics)
        return stop and not self.finished

    def _history_row(self, metrics: dict[str, float]) -> dict[str, Any]:
        """One metrics.csv row; resets the epoch's running sums."""
        sums, self._sums = self._sums, _epoch_sums()
        losses = {f"train/{k}": v / max(1, sums["batches"]) for k, v in sums["losses"].items()}
        row: dict[str, Any] = {"epoch": self.epoch, **losses, "train/loss": sum(losses.values())}
        row.update({f"metrics/{k}": v for k, v in metrics.items()})
        row.update({"lr": self._lr(), "images_per_s": sums["images"] * self.world_size / max(sums["seconds"], 1e-9),
                    "time": sums["seconds"], "skipped_steps": sums["skipped"]})
        return row

    def _track_best(self, row: dict[str, Any], metrics: dict[str, float] | None) -> bool:
        """Update the best value of the chosen metric (rank 0); True when this epoch is the new best.
        An epoch without validation (metrics None) is one more without improvement, except for --metric loss."""
        if not self.is_main:
            return False
        if metrics is None and self.metric_name != "loss":  # the first epoch is always validated: name known
            self.bad_epochs += 1
            return False
        metrics = metrics or {}
        if not self.metric_name:
            found = [m for m in PRIMARY_METRICS[self.config.task] if m in metrics]
            self.metric_name = found[0] if found else next(iter(metrics), "loss")
        if self.metric_name != "loss" and self.metric_name not in metrics:
            raise CvforgeError(f"metric {self.metric_name!r} is not reported by the evaluator", None,
                               f"use --metric with one of: {', '.join([*metrics, 'loss'])}")
        lower = self.metric_name == "loss"  # train loss: lower is better; every metric: higher is better
        value = row["train/loss"] if lower else metrics[self.metric_name]
        if math.isnan(value):  # nothing was measured (e.g. an empty validation set): no improvement
            self.bad_epochs += 1
            return False
        if self.best is None or (value < self.best if lower else value > self.best):
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    def _summary(self, row: dict[str, Any], improved: bool) -> str:
        scores = f"loss {row['train/loss']:.4g}"  # with --metric loss the train loss is the metric: shown once
        if f"metrics/{self.metric_name}" in row:
            scores += f"  {self.metric_name} {row[f'metrics/{self.metric_name}']:.4g}"
        scores += " (best)" if improved else ""
        return (f"epoch {self.epoch}/{self.config.epochs}  {scores}  lr {row['lr']:.3g}  "
                f"{row['images_per_s']:.0f} img/s  {row['time']:.1f}s")

    def _save_last(self) -> None:
        dist.broadcast_buffers(self.raw_model)
        rng = dist.gather_objects(capture_rng())  # every rank's generators, so each resumes its own stream
        if self.is_main:
            save_checkpoint(self.weights_dir / "last.pt", self._checkpoint(rng))

    def _checkpoint(self, rng: list | None = None) -> dict[str, Any]:
        """The checkpoint dict (``checkpoint.py`` docstring); with ``rng``, also the state to resume."""
        from cvforge import __version__  # the package imports the engine: import its version lazily
        run_weights = self.ema.module if self.ema is not None else self.raw_model
        state = {"format": FORMAT, "cvforge_version": __version__, "model": run_weights.state_dict(),
                 "model_spec": getattr(self.raw_model, "cvforge_spec", None), "class_names": self.class_names,
                 "train_config": self.config.to_dict(), "epoch": self.epoch, "step": self.global_step,
                 "finished": self.finished, "metric": self.metric_name, "best_metric": self.best,
                 "history": self.history}
        if rng is not None:
            state["resume"] = {
                "model": self.raw_model.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema_updates": self.ema.updates if self.ema else 0,
                "rng": rng, "sampler": self.sampler.state_dict(), "batch_in_epoch": self.batch_in_epoch,
                "bad_steps": self.bad_steps, "bad_steps_total": self.bad_steps_total,
                "bad_epochs": self.bad_epochs, "epoch_sums": self._sums, "world_size": self.world_size}
        return state

    def _stopped(self, save: bool) -> TrainResult:
        if save:
            self._save_last()
        epoch = self.epoch + 1 if self.batch_in_epoch else self.epoch
        self._log(f"stopped at epoch {epoch} step {self.global_step}; "
                  f"resume with: cvforge train --resume {self.weights_dir / 'last.pt'}")
        result = self._result(stopped=True)
        self._call("on_train_end", result)
        return result

    def _result(self, stopped: bool) -> TrainResult:
        best = self.weights_dir / "best.pt"
        return TrainResult(save_dir=Path(self.save_dir), last=self.weights_dir / "last.pt",
                           best=best if best.exists() else None, metric=self.metric_name,
                           best_metric=self.best, epochs=self.epoch, stopped=stopped, history=self.history)

    def _call(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, name, None)
            if method is not None:
                method(self, *args)

    def _log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stdout)


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
