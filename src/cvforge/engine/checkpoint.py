"""Checkpoints that survive crashes and never run code (DESIGN §4), and the run folders that hold them.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)`` and ``cvforge.load(path)`` rebuilds the model from the file alone:

    format          "cvforge-checkpoint" ; cvforge_version: str
    model           state_dict of the weights to run (the EMA when training kept one)
    model_spec      {"name": str, "task": str, "kwargs": dict} or None (from ``model.cvforge_spec``)
    class_names     list[str] or None
    train_config    TrainConfig.to_dict()
    epoch           epochs completed ; step: optimizer steps taken ; finished: bool
    best_metric     float or None ; metric: its name ; history: one dict per epoch (the metrics.csv rows)
    resume          only in last.pt: everything else an exact resume needs (see ``Trainer``): the raw
                    weights when an EMA is kept, optimizer, scheduler, grad scaler, EMA, RNG states,
                    sampler position, batches done in the current epoch, counters.

Writes are atomic: a temporary file in the same folder, flush + fsync, ``os.replace``, fsync of the
folder, so ``last.pt`` is always either the previous complete file or the new complete file.
Also here: turning SIGINT / SIGTERM into a flag the training loop checks at step boundaries.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import random
import re
import signal
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cvforge.config import TrainConfig
from cvforge.errors import CvforgeError

FORMAT = "cvforge-checkpoint"
_TEMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------- saving and loading
def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; a crash at any moment leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Delete temporary files left in ``folder`` by a save that was killed half-way."""
    for temp in Path(folder).glob(f".*{_TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """The dict stored at ``path`` (any dict: a cvforge checkpoint or a plain state_dict), on the CPU.

    Only tensors and plain values are unpickled (``weights_only=True``); a file that would run code, a
    truncated or corrupt file, or one that does not hold a dict raises a one-line ``CvforgeError``
    naming the file. There is no fallback to unsafe loading.
    """
    path = Path(path)
    if not path.is_file():
        raise CvforgeError("checkpoint not found", path, "check the path (runs keep weights/last.pt and best.pt)")
    mmap = mmap and zipfile.is_zipfile(path)  # only torch.save's zip format maps; others load plainly
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; our error says enough
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CvforgeError(f"refused to load: the file holds more than tensors and plain values "
                           f"({_unpickling_detail(e)})", path,
                           "cvforge never runs code from checkpoints; re-save the weights as a state_dict") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        detail = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:120] or type(e).__name__
        raise CvforgeError(f"checkpoint is truncated or corrupt ({detail})", path,
                           "use another checkpoint, e.g. weights/best.pt or an epoch file") from None
    if not isinstance(state, dict):
        raise CvforgeError(f"checkpoint holds a {type(state).__name__}, not a dict", path,
                           "save a dict such as model.state_dict()")
    return state


def _unpickling_detail(error: Exception) -> str:
    text = str(error)
    found = re.search(r"unsupported GLOBAL [\w.]+|Unsupported global: [\w. ]+|Unsupported operand \d+", text)
    return found.group(0) if found else "not a weights-only pickle"


def check_finite(values: Any, where: str | os.PathLike | None, what: str = "checkpoint") -> None:
    """Raise ``CvforgeError`` listing the entries of a (nested) dict/list holding NaN or inf."""
    bad = [name for name, tensor in _tensors(values, "")
           if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CvforgeError(f"{what} has non-finite values (NaN/inf) in {_some(bad)}", where,
                           "use an earlier checkpoint; this one was saved after training diverged")


def _tensors(values: Any, prefix: str):
    if isinstance(values, torch.Tensor):
        yield prefix, values
    elif isinstance(values, dict):
        for key, value in values.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            yield from _tensors(value, f"{prefix}[{i}]")


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor],
                     where: str | os.PathLike | None = None) -> None:
    """Load ``state_dict`` into ``model`` after checking every key, shape and value.

    Missing keys, unexpected keys, shape mismatches and non-finite values are all reported in one
    ``CvforgeError``; nothing is loaded then (never a silent ``strict=False``).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and isinstance(state_dict[k], torch.Tensor)
                  and state_dict[k].shape != own[k].shape]
    problems = [f"{label}: {_some(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if names]
    if problems:
        raise CvforgeError(f"weights do not fit the model ({'; '.join(problems)})", where,
                           "build the model with the name and arguments the checkpoint was trained with")
    check_finite(state_dict, where, "weights")
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- random number generators
def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng`` (CUDA states only when the same number of GPUs is visible)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- run folders
def next_run_dir(project: str | os.PathLike, name: str) -> Path:
    """Create and return ``project/name``, or ``name-2``, ``name-3``, ... if taken: never overwrites.

    ``mkdir`` without ``exist_ok`` claims the folder atomically, so two runs started at once get two folders.
    """
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        candidate = project / (name if i == 1 else f"{name}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def find_last_run(project: str | os.PathLike) -> Path:
    """``weights/last.pt`` of the newest run under ``project`` that loads and has not finished
    (for ``--resume`` without a path)."""
    project = Path(project)
    candidates = sorted(project.glob("**/weights/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            state = load_checkpoint(path, mmap=True)
        except CvforgeError:
            continue
        if "resume" in state and not state.get("finished", False):
            return path
    raise CvforgeError("no unfinished run with a readable weights/last.pt", project,
                       "pass the checkpoint with --resume PATH, or start a new run")


def resume_target(resume: str, project: str | os.PathLike) -> tuple[Path, TrainConfig]:
    """What ``--resume`` continues: ``resume`` is a path to last.pt, or ``auto`` for the newest
    unfinished run under ``project`` (``find_last_run``). Returns the checkpoint and the config the run
    was trained with (its ``resume`` field set to the checkpoint), from which to rebuild model and data."""
    path = find_last_run(project) if resume == "auto" else Path(resume)
    state = load_checkpoint(path, mmap=True)
    if not isinstance(state.get("train_config"), dict) or "resume" not in state:
        raise CvforgeError("checkpoint holds no training state to resume", path,
                           "resume from a run's weights/last.pt (best.pt holds weights only)")
    config = TrainConfig.from_dict(state["train_config"], path)
    return path, dataclasses.replace(config, resume=str(path))


# --------------------------------------------------------------------------- graceful stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager turning SIGINT / SIGTERM into a flag (``.requested``) that the training loop
    checks at step boundaries, so the run saves and exits cleanly instead of dying mid-write.

    Handlers are installed only in the main thread (Python allows no other) and the previous ones are
    restored on exit. A second SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once. The handler
    only sets the flag: printing there could re-enter a stream the progress bar is writing.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def request(self, reason: str) -> None:
        """Ask for a stop without a signal (e.g. another rank received one)."""
        self.signal = self.signal or reason

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(number).name


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn`` wrapper: workers ignore SIGINT / SIGTERM.

    Ctrl-C or ``kill -TERM`` of a process group reaches the workers too; a worker dying then would
    make the loader raise in the main process while it is saving. The main process decides when
    to stop and shuts the workers down itself.
    """

    def __init__(self, inner: Callable[[int], None] | None = None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)
