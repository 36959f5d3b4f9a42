"""Seeded loading: identical batches for any worker count, exact resume, DDP sharding, collates."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cvforge.data.loader import SeededDataset, SeededSampler, build_loader, collate_detect, collate_for, collate_segment
from cvforge.errors import CvforgeError

BATCH = 3


class NoisyDataset(Dataset):
    """Tiny in-memory classify data set whose samples use all three random generators."""

    def __init__(self, n: int = 10):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        image = torch.full((3, 8, 8), index * 10, dtype=torch.uint8)
        image += torch.randint(0, 5, (3, 8, 8), dtype=torch.uint8)  # torch
        if random.random() < 0.5:  # python
            image = image.flip(-1)
        image += int(np.random.randint(0, 3))  # numpy
        return tv_tensors.Image(image), {"label": torch.tensor(index)}


def epoch_batches(loader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def assert_same(batches_a: list, batches_b: list) -> None:
    assert len(batches_a) == len(batches_b)
    for (images_a, targets_a), (images_b, targets_b) in zip(batches_a, batches_b):
        assert torch.equal(images_a, images_b) and torch.equal(targets_a["label"], targets_b["label"])


def make(num_workers: int = 0, **kwargs):
    options = dict(batch_size=BATCH, shuffle=True, num_workers=num_workers, seed=5)
    return build_loader(NoisyDataset(), "classify", **(options | kwargs))


def test_same_batches_for_0_and_2_workers():
    serial = epoch_batches(make(0), epoch=1)
    parallel = epoch_batches(make(2), epoch=1)
    assert_same(serial, parallel)
    labels = torch.cat([t["label"] for _, t in serial])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))


def test_augmentation_changes_with_epoch_and_seed():
    first = torch.cat([images for images, _ in epoch_batches(make(0, shuffle=False), epoch=0)])
    again = torch.cat([images for images, _ in epoch_batches(make(0, shuffle=False), epoch=0)])
    later = torch.cat([images for images, _ in epoch_batches(make(0, shuffle=False), epoch=1)])
    other = torch.cat([images for images, _ in epoch_batches(make(0, shuffle=False, seed=6), epoch=0)])
    assert torch.equal(first, again)
    assert not torch.equal(first, later) and not torch.equal(first, other)


@pytest.mark.parametrize("k", [1, 3])
def test_skip_yields_the_tail_of_the_epoch(k):
    full = epoch_batches(make(0), epoch=2)
    loader = make(0)
    loader.sampler.set_epoch(2)
    loader.sampler.skip(k * BATCH)
    assert_same(list(loader), full[k:])
    assert_same(list(loader), full)  # the skip applies to one pass only


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict_mid_epoch(num_workers):
    full = epoch_batches(make(0), epoch=1)
    loader = make(num_workers)
    loader.sampler.set_epoch(1)
    for step, _ in enumerate(loader):
        if step == 1:  # "checkpoint" after two batches, while workers have prefetched further
            state = loader.sampler.state_dict()
            break
    assert state == {"epoch": 1, "position": 2 * BATCH}
    resumed = make(num_workers)
    resumed.sampler.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # the training loop's call for the resumed epoch keeps the skip
    assert_same(list(resumed), full[2:])
    assert resumed.sampler.state_dict() == {"epoch": 1, "position": 10}
    resumed.sampler.set_epoch(2)
    assert resumed.sampler.state_dict() == {"epoch": 2, "position": 0}
    assert_same(list(resumed), epoch_batches(make(0), epoch=2))


@pytest.mark.parametrize("length,drop_last", [(10, False), (9, True)])
def test_two_ranks_are_disjoint_and_cover(length, drop_last):
    ranks = [SeededSampler(length, shuffle=True, seed=3, rank=r, world_size=2, drop_last=drop_last)
             for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    indices = [[i for i, _ in sampler] for sampler in ranks]
    assert len(indices[0]) == len(indices[1]) == len(ranks[0]) == length // 2
    assert not set(indices[0]) & set(indices[1])
    assert len(set(indices[0]) | set(indices[1])) == 2 * (length // 2)
    seeds = [s for sampler in ranks for _, s in sampler]
    assert len(set(seeds)) == len(seeds)


def test_uneven_length_is_padded_for_every_rank():
    ranks = [SeededSampler(5, shuffle=False, seed=0, rank=r, world_size=2) for r in range(2)]
    indices = [[i for i, _ in sampler] for sampler in ranks]
    assert indices == [[0, 2, 4], [1, 3, 0]]


def test_order_depends_on_epoch_only():
    sampler = SeededSampler(20, shuffle=True, seed=1)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in first]


def test_loading_leaves_the_callers_random_state_alone():
    loader = make(0)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    list(loader)
    after = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    assert after == (torch.rand(1), random.random(), np.random.rand())


def test_seeded_dataset_wraps():
    wrapped = SeededDataset(NoisyDataset(4))
    assert len(wrapped) == 4 and isinstance(wrapped.dataset, NoisyDataset)
    assert torch.equal(wrapped[(2, 99)][0], wrapped[(2, 99)][0])
    assert not torch.equal(wrapped[(2, 99)][0], wrapped[(2, 100)][0])


def test_segment_collate_pads_with_ignore():
    small = (tv_tensors.Image(torch.full((3, 4, 6), 9, dtype=torch.uint8)),
             {"mask": tv_tensors.Mask(torch.ones((4, 6), dtype=torch.int64))})
    large = (tv_tensors.Image(torch.full((3, 5, 3), 7, dtype=torch.uint8)),
             {"mask": tv_tensors.Mask(torch.full((5, 3), 2, dtype=torch.int64))})
    images, target = collate_segment([small, large])
    masks = target["mask"]
    assert images.shape == (2, 3, 5, 6) and images.dtype == torch.uint8
    assert masks.shape == (2, 5, 6) and masks.dtype == torch.int64
    assert (masks[0, 4:] == 255).all() and (masks[0, :4] == 1).all() and (images[0, :, 4:] == 0).all()
    assert (masks[1, :, 3:] == 255).all() and (masks[1, :, :3] == 2).all() and (images[1, :, :, 3:] == 0).all()


def test_classify_and_detect_collates():
    images, target = collate_for("classify")([(torch.zeros(3, 4, 4, dtype=torch.uint8), {"label": torch.tensor(i)})
                                               for i in range(3)])
    assert images.shape == (3, 3, 4, 4) and target["label"].tolist() == [0, 1, 2]
    assert target["label"].dtype == torch.int64
    boxes = tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(4, 5))
    sample = (tv_tensors.Image(torch.zeros(3, 4, 5, dtype=torch.uint8)), {"boxes": boxes, "labels": torch.zeros(0)})
    images, targets = collate_detect([sample, sample])
    assert len(images) == 2 and type(images[0]) is torch.Tensor and type(targets[0]["boxes"]) is torch.Tensor
    assert collate_for("instance") is collate_detect


def test_bad_options():
    with pytest.raises(CvforgeError):
        collate_for("pose")
    with pytest.raises(CvforgeError):
        SeededSampler(4, shuffle=False, seed=0, rank=2, world_size=2)
    with pytest.raises(CvforgeError):
        make(0, batch_size=0)


def test_persistent_workers_only_with_workers():
    assert not make(0, persistent_workers=True).persistent_workers
    assert make(2, persistent_workers=True).persistent_workers


class DetectDataset(Dataset):
    """Detection samples with 0-3 boxes each; odd indices have another image size (no stacking then)."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, index: int):
        n, width = index % 4, 6 if index % 2 else 5
        boxes = tv_tensors.BoundingBoxes(torch.rand(n, 4) * 4, format="XYXY", canvas_size=(4, width))
        image = tv_tensors.Image(torch.randint(0, 255, (3, 4, width), dtype=torch.uint8))
        return image, {"boxes": boxes, "labels": torch.arange(n), "image_id": torch.tensor(index)}


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_detect_batches_from_workers_equal_in_process_ones(batch_size):
    """Workers send a batch packed (one tensor per key); the loop gets the lists collate_detect makes."""
    def batches(workers):
        loader = build_loader(DetectDataset(), "detect", batch_size=batch_size, shuffle=True, num_workers=workers)
        return epoch_batches(loader, epoch=0)
    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == -(-7 // batch_size)
    for (images_a, targets_a), (images_b, targets_b) in zip(serial, parallel):
        assert isinstance(images_b, list) and isinstance(targets_b, list) and len(images_b) == len(images_a)
        for image_a, image_b, target_a, target_b in zip(images_a, images_b, targets_a, targets_b):
            assert torch.equal(image_a, image_b) and target_a.keys() == target_b.keys()
            assert all(torch.equal(target_a[k], target_b[k]) for k in target_a)
            assert target_b["image_id"].dim() == 0 and target_b["boxes"].shape[1:] == (4,)


def test_pack_keeps_what_cannot_share_a_tensor():
    from cvforge.data.loader import PackedTensors, pack
    mixed = [torch.zeros(2, 4), torch.zeros(3, 5)]
    assert pack(mixed) is mixed
    packed = pack([torch.ones(2, 4), torch.zeros(0, 4), torch.ones(1, 4)])
    assert isinstance(packed, PackedTensors) and packed.lengths == [2, 0, 1]
    assert [t.shape[0] for t in packed.unpack()] == [2, 0, 1]
