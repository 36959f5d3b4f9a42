"""The few-shot data set for transfer learning: deterministic, readable as an ImageFolder, never written over."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cvforge.data import build_dataset
from cvforge.data.fewshot import FEWSHOT_CLASSES, draw_fewshot_image, make_fewshot
from cvforge.errors import DataError


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_classes_are_sorted_as_imagefolder_numbers_them():
    assert list(FEWSHOT_CLASSES) == sorted(FEWSHOT_CLASSES) and len(set(FEWSHOT_CLASSES)) == 4


def test_draw_is_deterministic_and_classes_differ():
    images = [draw_fewshot_image(np.random.default_rng(7), label, size=48) for label in range(4)]
    again = draw_fewshot_image(np.random.default_rng(7), 2, size=48)
    assert images[0].shape == (3, 48, 48) and images[0].dtype == torch.uint8
    assert torch.equal(images[2], again)
    # Same random numbers for every label: only the shape differs, so the images must differ.
    assert all(not torch.equal(images[a], images[b]) for a in range(4) for b in range(a + 1, 4))
    with pytest.raises(ValueError):
        draw_fewshot_image(np.random.default_rng(0), 4)


def test_make_fewshot_writes_an_imagefolder(tmp_path):
    out = make_fewshot(tmp_path / "a", train_per_class=3, val_per_class=2, size=32, seed=5)
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == list(FEWSHOT_CLASSES)
        assert all(len(list((out / split / name).glob("*.png"))) == count for name in FEWSHOT_CLASSES)
    train = build_dataset(out, "train", "classify")
    val = build_dataset(out, "val", "classify")
    assert train.classes == list(FEWSHOT_CLASSES) == val.classes
    assert len(train) == 12 and len(val) == 8
    image, target = train[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and int(target["label"]) == 1
    assert sorted(int(t["label"]) for _, t in train) == [c for c in range(4) for _ in range(3)]
    # Train and val come from independent streams: no image is shared.
    train_pixels = {bytes(image.numpy()) for image, _ in train}
    assert not train_pixels & {bytes(image.numpy()) for image, _ in val}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    settings = {"train_per_class": 2, "val_per_class": 1, "size": 32}
    a = _files(make_fewshot(tmp_path / "a", seed=3, **settings))
    b = _files(make_fewshot(tmp_path / "b", seed=3, **settings))
    c = _files(make_fewshot(tmp_path / "c", seed=4, **settings))
    assert a == b and len(a) == 12
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_a_non_empty_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "out").mkdir()
    keep = tmp_path / "out" / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make_fewshot(tmp_path / "out", train_per_class=1, val_per_class=1, size=32)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"] and keep.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_fewshot(empty, train_per_class=1, val_per_class=1, size=32) == empty
