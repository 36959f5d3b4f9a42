"""The built-in shapes data set: drawing, determinism, the files it writes and reading them back."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvforge.data import synthetic
from cvforge.data.dataset import VisionDataset, rasterize
from cvforge.data.formats.coco import read_coco
from cvforge.data.formats.imagefolder import read_imagefolder
from cvforge.data.formats.masks import read_masks
from cvforge.data.formats.yolo import read_yolo
from cvforge.data.problems import Problems
from cvforge.data.synthetic import (
    CROP_VISIBLE,
    MIN_VISIBLE,
    SHAPES_CLASSES,
    draw_shapes_image,
    ensure_shapes,
    image_rng,
    is_clean,
    make_shapes,
    mask_polygons,
    semantic_mask,
)
from cvforge.errors import DataError

SMALL = {"train": 8, "val": 4, "size": 64, "seed": 0}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("gen") / "shapes", progress=False, **SMALL)


def _draw_many(count: int, size: int = 64, seed: int = 1):
    return [draw_shapes_image(image_rng(seed, "train", i), size) for i in range(count)]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- drawing

def test_each_image_is_regenerated_alone_from_seed_split_and_index():
    image, instances = draw_shapes_image(image_rng(3, "val", 5), 64)
    again, instances_again = draw_shapes_image(image_rng(3, "val", 5), 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, again)
    assert [i.label for i in instances] == [i.label for i in instances_again]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(instances, instances_again))
    assert not np.array_equal(image, draw_shapes_image(image_rng(3, "val", 6), 64)[0])
    assert not np.array_equal(image, draw_shapes_image(image_rng(3, "train", 5), 64)[0])


def test_instances_are_visible_clean_disjoint_and_occlusion_happens():
    drawn = _draw_many(150)
    fractions, labels, empty = [], set(), 0
    for _, instances in drawn:
        empty += not instances
        union = np.zeros((64, 64), dtype=np.int64)
        for inst in instances:
            assert inst.visible_fraction >= MIN_VISIBLE
            assert is_clean(inst.mask)  # no hole, no sliver: polygons can describe it
            union += inst.mask
            fractions.append(inst.visible_fraction)
            labels.add(inst.label)
        assert union.max() <= 1  # visible masks never overlap
    assert min(fractions) < 0.8, "expected some instances to be clearly occluded"
    assert sum(f < 1 for f in fractions) >= 0.05 * len(fractions)
    assert labels == set(range(len(SHAPES_CLASSES)))
    assert 1 <= empty <= 20  # about 5 % background images
    counts = [len(instances) for _, instances in drawn]
    assert max(counts) >= 5 and min(c for c in counts if c) == 1


def test_box_is_tight_and_polygons_rasterise_back_to_the_visible_mask():
    for _, instances in _draw_many(40):
        for inst in instances:
            x0, y0, x1, y1 = inst.box().astype(int)
            ys, xs = np.nonzero(inst.mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            polygons = mask_polygons(inst.mask)
            assert polygons and all(len(p) >= 6 for p in polygons)
            assert np.array_equal(rasterize(polygons, inst.box(), 64, 64).astype(bool), inst.mask)


def test_semantic_mask_paints_class_ids_plus_one():
    _, instances = next(d for d in _draw_many(20) if len(d[1]) >= 2)
    mask = semantic_mask(instances, 64)
    for inst in instances:
        assert (mask[inst.mask] == inst.label + 1).all()
    assert (mask[~np.any([i.mask for i in instances], axis=0)] == 0).all()


# ---------------------------------------------------------------------------------------------- files

def test_generation_is_byte_identical(shapes_dir, tmp_path):
    again = make_shapes(tmp_path / "again", progress=False, **SMALL)
    first, second = _files(shapes_dir), _files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    for name in ("README.txt", "shapes.json", "classes.txt", "data.yaml", "annotations/instances_val.json",
                 "images/train/00007.jpg", "masks/val/00003.png", "labels/train/00000.txt"):
        assert name in first
    other = make_shapes(tmp_path / "other", progress=False, **{**SMALL, "seed": 1})
    assert (other / "images/train/00000.jpg").read_bytes() != first["images/train/00000.jpg"]


def test_boxes_are_inside_and_tight_around_the_semantic_mask(shapes_dir):
    samples, classes = read_coco(shapes_dir / "annotations" / "instances_train.json", Problems())
    assert classes == list(SHAPES_CLASSES)
    assert len({int(label) for s in samples for label in s.labels}) >= 4
    for sample in samples:
        mask = np.asarray(Image.open(shapes_dir / "masks" / "train" / f"{sample.image.stem}.png"))
        covered = np.zeros_like(mask, dtype=bool)
        for box, label in zip(sample.boxes, sample.labels):
            x0, y0, x1, y1 = box.astype(int)
            assert np.array_equal(box, [x0, y0, x1, y1]) and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            inside = mask[y0:y1, x0:x1] == label + 1
            # every edge of the box touches a pixel of the instance's class
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y0:y1, x0:x1] |= inside
        assert np.array_equal(covered, mask > 0)  # every shape pixel lies in a box of its class


def test_coco_and_yolo_agree_and_masks_read_back(shapes_dir):
    problems = Problems()
    for split, count in (("train", 8), ("val", 4)):
        coco, _ = read_coco(shapes_dir / "annotations" / f"instances_{split}.json", problems)
        yolo, yolo_classes = read_yolo(shapes_dir / "data.yaml", split, problems)
        masks, mask_classes = read_masks(shapes_dir, split, problems)
        assert yolo_classes == list(SHAPES_CLASSES) and mask_classes == ["background", *SHAPES_CLASSES]
        assert len(coco) == len(yolo) == len(masks) == count
        for index, (c, y, m) in enumerate(zip(coco, yolo, masks)):
            assert c.image.resolve() == y.image.resolve() == m.image.resolve()
            assert c.labels.tolist() == y.labels.tolist()
            assert np.abs(c.boxes - y.boxes).max(initial=0) <= 1.01  # YOLO polygons run through pixel centres
            _, instances = draw_shapes_image(image_rng(0, split, index), 64)
            assert c.labels.tolist() == [inst.label for inst in instances]
            expected = semantic_mask(instances, 64)
            target = VisionDataset(masks, mask_classes, "segment").make_target(m, 64, 64)
            assert np.array_equal(target["mask"].numpy(), expected)
    assert not problems, problems.report()


def test_crops_read_back_as_an_imagefolder(shapes_dir):
    samples, classes = read_imagefolder(shapes_dir / "crops", "train", Problems())
    assert classes == list(SHAPES_CLASSES)
    expected = sum(inst.visible_fraction >= CROP_VISIBLE
                   for i in range(8) for inst in draw_shapes_image(image_rng(0, "train", i), 64)[1])
    assert len(samples) == expected > 0
    with Image.open(samples[0].image) as crop:
        assert crop.size == (64, 64)
    image, target = VisionDataset(samples, classes, "classify")[0]
    assert image.shape == (3, 64, 64) and int(target["label"]) == samples[0].label


def test_make_shapes_refuses_a_non_empty_folder_and_bad_options(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        make_shapes(tmp_path, progress=False, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="size"):
        make_shapes(tmp_path / "new", progress=False, train=1, val=1, size=8)
    with pytest.raises(DataError, match="train"):
        make_shapes(tmp_path / "new", progress=False, train=-1)


# ---------------------------------------------------------------------------------------------- cache

def test_ensure_shapes_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path))
    calls = []
    real = synthetic.make_shapes
    monkeypatch.setattr(synthetic, "make_shapes", lambda out, **kw: calls.append(out) or real(out, **kw))
    folder = ensure_shapes(train=3, val=2, size=32, seed=4, progress=False)
    assert folder == tmp_path / "datasets" / f"shapes-v{synthetic.SHAPES_VERSION}-3-2-32-4"
    assert (folder / "shapes.json").is_file() and len(list((folder / "images" / "train").iterdir())) == 3
    assert ensure_shapes(train=3, val=2, size=32, seed=4, progress=False) == folder
    assert len(calls) == 1 and calls[0] != folder  # generated beside, then renamed into place
    assert [p.name for p in (tmp_path / "datasets").iterdir() if "tmp" in p.name] == []


def test_ensure_shapes_never_trusts_a_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path))
    cache = synthetic.shapes_cache_dir()
    partial = cache / f"shapes-v{synthetic.SHAPES_VERSION}-2-1-32-0"
    (partial / "images" / "train").mkdir(parents=True)  # e.g. copied by hand, half done
    stale = cache / f".{partial.name}.tmp-999999"  # left by a crashed process
    (stale / "images").mkdir(parents=True)
    folder = ensure_shapes(train=2, val=1, size=32, seed=0, progress=False)
    assert folder == partial and (folder / "shapes.json").is_file()
    assert len(list((folder / "masks" / "val").iterdir())) == 1
    assert not stale.exists()


def _ensure_in_child(home: str, log: str, queue) -> None:
    import os
    os.environ["CVFORGE_HOME"] = home
    real = synthetic.make_shapes

    def logged(out, **kw):
        with open(log, "a") as f:
            f.write(f"{out}\n")
        return real(out, **kw)

    synthetic.make_shapes = logged
    queue.put(str(ensure_shapes(train=6, val=2, size=32, seed=2, progress=False)))


def test_ensure_shapes_is_safe_across_processes(tmp_path):
    context = multiprocessing.get_context("fork")
    queue, log = context.Queue(), tmp_path / "calls.log"
    workers = [context.Process(target=_ensure_in_child, args=(str(tmp_path), str(log), queue)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    folders = {queue.get(timeout=5) for _ in workers}
    assert len(folders) == 1 and (Path(folders.pop()) / "shapes.json").is_file()
    assert len(log.read_text().splitlines()) == 1  # generated by one process only
