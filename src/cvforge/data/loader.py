"""Reproducible, resumable data loading: samplers, collate functions and the DataLoader factory.

The key idea: randomness is attached to a *slot of the epoch*, not to a worker process.
``SeededSampler`` yields ``(index, seed)`` pairs, where ``seed = derive_seed(base seed, epoch,
position)`` and ``position`` is the slot's place in the epoch's global (all ranks) order.
``SeededDataset`` seeds Python ``random``, NumPy and torch from that seed just before it calls the
wrapped dataset (and restores the previous generator states afterwards). The augmentation of a
sample therefore depends only on (seed, epoch, position) — not on how many workers there are or
which worker happens to load it. That is what makes

* ``num_workers=0`` and ``num_workers=2`` produce identical batches, and
* a resumed run reproduce an uninterrupted one exactly: restore ``sampler.load_state_dict(...)``
  (or call ``sampler.skip(n)``) and the remaining batches of the epoch are the same tensors.

Usage::

    loader = build_loader(dataset, "detect", batch_size=8, shuffle=True, num_workers=2, seed=0)
    loader.sampler.load_state_dict(checkpoint["sampler"])   # when resuming
    for epoch in range(start_epoch, epochs):
        loader.sampler.set_epoch(epoch)                      # required every epoch
        for images, targets in loader:
            ...
            checkpoint["sampler"] = loader.sampler.state_dict()  # epoch + samples consumed

``build_loader`` returns a ``SeededLoader``: a DataLoader that reports each batch it hands to the
training loop back to the sampler (``sampler.advance``), so ``state_dict()`` counts the samples the
loop has *consumed*, not the ones prefetching workers have already been asked for.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cvforge.config import TASKS
from cvforge.data.dataset import IGNORE
from cvforge.errors import CvforgeError


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from non-negative integers (NumPy ``SeedSequence`` hashing, so nearby
    inputs such as (seed, epoch) and (seed + 1, epoch - 1) give unrelated seeds)."""
    words = np.random.SeedSequence([v & 0xFFFF_FFFF_FFFF_FFFF for v in values]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python ``random``, NumPy's global generator and torch's CPU generator; restore them after.

    Restoring keeps the caller's random stream (dropout, model init) independent of data loading
    when ``num_workers=0`` runs the dataset in the training process itself.
    """
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: leave CUDA generators alone
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededSampler(Sampler):
    """Yields ``(index, seed)`` for this rank's share of one epoch (DDP-aware, resumable).

    Per epoch the order is a permutation drawn from a torch.Generator seeded by (seed, epoch), or
    0..length-1 when ``shuffle`` is False. Like ``DistributedSampler``, the order is padded by
    repeating its start to a multiple of ``world_size`` (or truncated when ``drop_last``) and rank r
    takes positions r, r + world_size, ... ``seed`` of each pair is derived from (seed, epoch,
    global position). ``len()`` is the number of samples per rank.

    State: ``epoch`` and ``position`` (samples of this rank consumed in the epoch, advanced by the
    loader). Call ``set_epoch(e)`` before each epoch; changing the epoch resets the position.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise CvforgeError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})", None,
                               "pass the process's rank and the number of processes")
        self.length, self.shuffle, self.seed = int(length), shuffle, int(seed)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.position, self._skip = 0, 0, 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.length // self.world_size
        return math.ceil(self.length / self.world_size)

    def global_order(self) -> list[int]:
        """The epoch's indices over all ranks, padded or truncated to ``len(self) * world_size``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = len(self) * self.world_size
        while order and len(order) < total:  # pad by wrapping round (repeats if length < world_size)
            order += order[: total - len(order)]
        return order[:total]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, start = self.global_order(), self._skip
        self.position = start
        for i in range(start, len(self)):
            position = self.rank + i * self.world_size
            yield order[position], derive_seed(self.seed, self.epoch, position)
        self._skip = 0  # a skip applies to one full pass only

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order and seeds. Must be called at the start of every epoch; keeps a
        pending skip (e.g. from ``load_state_dict``) only when the epoch does not change."""
        if epoch != self.epoch:
            self.position, self._skip = 0, 0
        self.epoch = int(epoch)

    def skip(self, n: int) -> None:
        """Start the next pass of this epoch after this rank's first ``n`` samples."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot skip {n} of {len(self)} samples")
        self._skip = self.position = int(n)

    def advance(self, n: int) -> None:
        """Record that the training loop consumed ``n`` more samples (called by ``SeededLoader``)."""
        self.position = min(self.position + n, len(self))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next pass of epoch ``state["epoch"]`` starts after ``state["position"]`` samples."""
        self.epoch = int(state["epoch"])
        self.skip(int(state["position"]))


class SeededDataset(Dataset):
    """``dataset[(index, seed)]`` = ``self.dataset[index]`` computed with all RNGs seeded by ``seed``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with seeded_rngs(seed):
            return self.dataset[index]


class SeededLoader(DataLoader):
    """A DataLoader that tells its ``SeededSampler`` about every batch handed to the loop, so that
    ``sampler.state_dict()`` is exact even while workers prefetch ahead."""

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        for batch in super().__iter__():
            sampler.advance(self.batch_size)
            yield unpack_batch(batch)


def _plain(tensor: Any) -> Any:
    """A tv_tensor as a plain Tensor (cheaper ops in the model; metadata is not needed past here)."""
    return tensor.as_subclass(torch.Tensor) if isinstance(tensor, torch.Tensor) else tensor


def collate_classify(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (uint8 [B, 3, H, W], {"label": int64 [B]}); all images must have one size."""
    images = torch.stack([_plain(image) for image, _ in batch])
    labels = torch.as_tensor([int(target["label"]) for _, target in batch], dtype=torch.int64)
    return images, {"label": labels}


def collate_segment(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (uint8 [B, 3, H, W], {"mask": int64 [B, H, W]}), padded at the bottom/right to the batch's
    largest H and W: images with 0, masks with IGNORE (255) so padding is never scored."""
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros((len(batch), 3, height, width), dtype=torch.uint8)
    masks = torch.full((len(batch), height, width), IGNORE, dtype=torch.int64)
    for i, (image, target) in enumerate(batch):
        h, w = image.shape[-2:]
        images[i, :, :h, :w] = _plain(image)
        masks[i, :h, :w] = _plain(target["mask"])
    return images, {"mask": masks}


def collate_detect(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """-> (list of uint8 [3, H_i, W_i], list of target dicts as plain tensors); sizes may differ.

    In a worker process the lists leave packed (``PackedTensors``) and ``SeededLoader`` unpacks them."""
    images = [_plain(image) for image, _ in batch]
    targets = [{key: _plain(value) for key, value in target.items()} for _, target in batch]
    if get_worker_info() is None:
        return images, targets
    return pack(images), _pack_targets(targets)


# ------------------------------------------------------------------------------- worker -> main transfer
# Every tensor a worker sends to the main process travels as its own shared-memory segment and file
# descriptor. A detection batch of 8 images has ~50 of them (boxes, labels, flags and id per image),
# and receiving them cost the main process 2-3x more than the images themselves (BENCHMARKS.md, data
# loading). Packed, a batch crosses as one tensor per key; unpacking makes views, no copies.

@dataclass
class PackedTensors:
    """Tensors that agree in dtype and trailing shape, concatenated along dim 0 (``lengths`` = each one's
    first dim) or, for 0-dim tensors or equal shapes, stacked (``lengths`` None)."""

    data: torch.Tensor
    lengths: list[int] | None

    def unpack(self) -> list[torch.Tensor]:
        return list(self.data.unbind(0) if self.lengths is None else self.data.split(self.lengths))

    def pin_memory(self) -> PackedTensors:  # DataLoader(pin_memory=True) calls this on batch elements
        return PackedTensors(self.data.pin_memory(), self.lengths)


def pack(tensors: list[torch.Tensor]) -> PackedTensors | list[torch.Tensor]:
    """A list of tensors as one ``PackedTensors`` where they can share one tensor, else unchanged."""
    first = tensors[0] if tensors else None
    if first is None or any(t.dtype != first.dtype or t.dim() != first.dim() or t.shape[1:] != first.shape[1:]
                            for t in tensors):
        return tensors
    if first.dim() == 0 or all(t.shape == first.shape for t in tensors):
        return PackedTensors(torch.stack(tensors), None)
    return PackedTensors(torch.cat(tensors), [len(t) for t in tensors])


def _pack_targets(targets: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    """A list of target dicts with the same tensor keys -> {key: packed values}; anything else unchanged."""
    keys = set(targets[0]) if targets else set()
    if not keys or any(set(t) != keys or not all(isinstance(v, torch.Tensor) for v in t.values()) for t in targets):
        return targets
    return {key: pack([t[key] for t in targets]) for key in targets[0]}


def unpack_batch(batch: Any) -> Any:
    """The inverse of the worker-side packing: (images, targets) as ``collate_detect`` returns them in
    the main process. Batches of other tasks pass unchanged."""
    if not (isinstance(batch, tuple) and len(batch) == 2):
        return batch
    images, targets = batch
    if isinstance(images, PackedTensors):
        images = images.unpack()
    if isinstance(targets, dict) and targets and all(isinstance(v, (PackedTensors, list)) for v in targets.values()):
        columns = {key: value.unpack() if isinstance(value, PackedTensors) else value for key, value in targets.items()}
        targets = [dict(zip(columns, row)) for row in zip(*columns.values(), strict=True)]
    return images, targets


def collate_for(task: str) -> Callable[[list], Any]:
    """The collate function of a task (classify, segment, detect, instance)."""
    collates = {"classify": collate_classify, "segment": collate_segment,
                "detect": collate_detect, "instance": collate_detect}
    if task not in collates:
        raise CvforgeError(f"unknown task {task!r}", None, f"choose one of {', '.join(TASKS)}")
    return collates[task]


def _one_thread(worker_id: int) -> None:
    # N workers each running a multi-threaded op would oversubscribe the cores N-fold.
    torch.set_num_threads(1)


def build_loader(dataset: Dataset, task: str, *, batch_size: int, shuffle: bool, num_workers: int = 0,
                 pin_memory: bool = False, drop_last: bool = False, persistent_workers: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> SeededLoader:
    """A DataLoader over ``dataset`` with a ``SeededSampler`` (``loader.sampler``) and the task's collate.

    Call ``loader.sampler.set_epoch(epoch)`` at the start of every epoch (new order and new
    augmentation). ``drop_last`` drops the last incomplete batch, and under DDP also the tail that
    would need padding to share the data evenly. ``persistent_workers`` applies only with workers.
    """
    if batch_size < 1 or num_workers < 0:
        raise CvforgeError(f"invalid loader options batch={batch_size} workers={num_workers}", None,
                           "use a batch size >= 1 and workers >= 0")
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank,
                            world_size=world_size, drop_last=drop_last)
    return SeededLoader(
        SeededDataset(dataset), batch_size=batch_size, sampler=sampler, collate_fn=collate_for(task),
        num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=_one_thread if num_workers > 0 else None,
        # A private generator: iterating the loader never draws from the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )
