"""Data-parallel training on several processes: DistributedDataParallel under ``torchrun`` or
``cvforge train --devices N`` (``launch``), gloo on CPU and NCCL on CUDA.

What the trainer relies on:

* every rank gets the same number of batches per epoch (``SeededSampler`` pads the order), so all
  ranks reach every optimizer step and every collective together;
* only rank 0 writes files, validates and shows progress; the others wait for its decisions;
* a stop request (SIGINT / SIGTERM on any rank) and a non-finite loss on any rank are combined with
  one ``all_reduce`` per optimizer step (``sync_flags``), so all ranks stop or skip the same step.

Models: DDP runs with ``find_unused_parameters=False``, so every trainable parameter must receive a
gradient on every rank at every step. A model whose batch holds no objects (no boxes on this rank)
must still return losses connected to all its parameters, e.g. ``sum(p.sum() for p in params) * 0``
added to a zero loss; otherwise the other ranks would wait for gradients that never come.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cvforge.errors import CvforgeError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def init_from_env(use_cuda: bool) -> bool:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)
    unless one is already initialised. Returns whether training is distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    """Leave the process group (call once at the end of a ``torchrun`` script)."""
    if is_distributed():
        dist.destroy_process_group()


def sync_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all_reduce); unchanged without DDP."""
    if not is_distributed():
        return flags
    device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward, so the last forward leaves each rank with its
    own; doing it before a checkpoint makes every rank hold exactly what rank 0 saves.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the run folder it created)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# --------------------------------------------------------------------------- local launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(index: int, fn: Callable[..., Any], args: tuple, world: int, port: int, backend: str) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(index)
    dist.init_process_group(backend, rank=index, world_size=world)
    try:
        fn(*args)
    except CvforgeError as e:
        print(f"cvforge: error: {e.line()}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], devices: int, *args: Any, backend: str | None = None,
           start_method: str = "spawn") -> None:
    """Run ``fn(*args)`` in ``devices`` local processes joined in one process group.

    ``fn`` must be importable (a module-level function); each process sees ``RANK``/``WORLD_SIZE`` like
    under ``torchrun`` and builds its own model and ``Trainer``. Backend: NCCL when CUDA is available,
    else gloo. While the processes run, SIGTERM sent to this launcher is forwarded to them (they save
    and stop together); SIGINT from a terminal already reaches them all, so it is not forwarded.
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and devices > torch.cuda.device_count():
        raise CvforgeError(f"--devices {devices} but only {torch.cuda.device_count()} GPU(s) are visible", None,
                           "lower --devices, or use --device cpu for gloo processes")
    context = mp.start_processes(_worker, args=(fn, args, devices, _free_port(), backend), nprocs=devices,
                                 join=False, start_method=start_method)
    previous = _forward_signals(context.processes)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        raise CvforgeError(f"training process {e.error_index} exited with status {e.exit_code}", None,
                           "see its message above") from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _forward_signals(processes: list) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(number: int, frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, number)

    return {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
