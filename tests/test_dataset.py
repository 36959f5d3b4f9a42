"""The format-independent part of the data side: cleaning boxes, painting masks, building targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cvforge.data.dataset import IGNORE, Sample, VisionDataset, clean_boxes, rasterize
from cvforge.data.problems import Problems
from cvforge.errors import DataError


def test_clean_boxes_clips_drops_and_counts():
    boxes = np.array([[5, 5, 20, 20],       # fine
                      [-4, 2, 10, 50],      # partly outside: clipped
                      [10, 10, 10, 30],     # zero width: dropped
                      [np.nan, 0, 5, 5],    # NaN: dropped
                      [1, 1, 4, 4],         # class 9 unknown: dropped
                      [50, 50, 60, 60]],    # entirely outside: dropped
                     dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 9, 0])
    problems = Problems()
    keep = clean_boxes(boxes, labels, width=40, height=30, num_classes=2,
                       where=[f"f.txt:{i + 1}" for i in range(6)], problems=problems)
    assert keep.tolist() == [True, True, False, False, False, False]
    assert boxes[1].tolist() == [0, 2, 10, 30]
    assert problems.counts["box partly outside image"] == 2  # the clipped one and the one outside
    assert problems.counts["box of zero or negative size"] == 2
    assert problems.counts["non-finite box coordinates"] == 1
    assert problems.counts["unknown class id"] == 1
    assert "f.txt:5" in problems.places["unknown class id"][0]
    assert problems.errors == 2


def test_rasterize_polygon_rle_and_box():
    from pycocotools import mask as mask_utils
    square = [[2, 2, 8, 2, 8, 8, 2, 8]]
    polygon = rasterize(square, np.array([2, 2, 8, 8]), 10, 12)
    assert polygon.shape == (10, 12) and polygon[5, 5] == 1 and polygon[0, 0] == 0
    rle = mask_utils.encode(np.asfortranarray(polygon))
    rle["counts"] = rle["counts"].decode()
    assert np.array_equal(rasterize(rle, np.zeros(4), 10, 12), polygon)
    from_box = rasterize(None, np.array([1, 1, 4, 3]), 10, 12)
    assert from_box.sum() == 3 * 2


def _sample(tmp_path):
    Image.new("RGB", (32, 24), (10, 20, 30)).save(tmp_path / "img.png")
    return Sample(tmp_path / "img.png", image_id=7,
                  boxes=np.array([[0, 0, 20, 20], [10, 10, 16, 16]], dtype=np.float32),
                  labels=np.array([1, 0]), iscrowd=np.array([False, True]),
                  segments=[None, None])


def test_detection_and_instance_targets(tmp_path):
    sample = _sample(tmp_path)
    image, target = VisionDataset([sample], ["a", "b"], "instance")[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 24, 32)
    assert target["boxes"].canvas_size == (24, 32) and target["labels"].tolist() == [1, 0]
    assert target["image_id"].item() == 7 and target["iscrowd"].tolist() == [False, True]
    assert tuple(target["masks"].shape) == (2, 24, 32)


def test_semantic_mask_from_instances_paints_small_on_top_and_ignores_crowd(tmp_path):
    sample = _sample(tmp_path)
    sample.iscrowd = np.array([False, False])
    _, target = VisionDataset([sample], ["background", "a", "b"], "segment")[0]
    mask = target["mask"]
    assert mask.dtype == torch.int64
    assert mask[12, 12].item() == 1  # small box (class 0 -> 1) painted over the large one
    assert mask[2, 2].item() == 2 and mask[22, 30].item() == 0
    sample.iscrowd = np.array([False, True])
    _, target = VisionDataset([sample], ["background", "a", "b"], "segment")[0]
    assert target["mask"][12, 12].item() == IGNORE


def test_empty_image_is_a_valid_sample(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "bg.png")
    _, target = VisionDataset([Sample(tmp_path / "bg.png")], ["a"], "instance")[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 16, 16)


def test_image_cache_keeps_decoded_images_within_its_budget(tmp_path):
    from cvforge.data.dataset import ImageCache
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 10, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(path)
    cache = ImageCache(budget_mb=2 * 8 * 10 * 3 / 2**20)  # room for two of the three images
    first = [cache.read(p) for p in paths]
    assert sorted(cache.images) == [str(paths[0]), str(paths[1])]
    first[0].fill_(255)  # a transform writing into its image must not change the cached one
    for path in paths:
        path.write_bytes(b"not an image any more")
    again = cache.read(paths[0])
    assert again.shape == (3, 8, 10) and int(again.max()) == 0  # from RAM, as decoded
    with pytest.raises(DataError):
        cache.read(paths[2])  # over budget: decoded from the file every time
    off = ImageCache(budget_mb=0)
    with pytest.raises(DataError):
        off.read(paths[1])
