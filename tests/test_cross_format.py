"""The same small data set written as COCO, Pascal VOC and YOLO reads back identically through the three readers."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cvforge.data import build_dataset
from cvforge.data.dataset import Sample
from cvforge.data.formats.coco import write_coco
from cvforge.data.formats.voc import write_voc
from cvforge.data.formats.yolo import write_yolo

CLASSES = ["cat", "dog", "bird"]


def _samples(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    samples = []
    for i in range(6):
        width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        path = folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        n = i % 4  # image 0 and 4 have no objects
        x0 = rng.integers(0, width // 2, n)
        y0 = rng.integers(0, height // 2, n)
        boxes = np.stack([x0, y0, x0 + rng.integers(4, width // 2, n), y0 + rng.integers(4, height // 2, n)], 1)
        samples.append(Sample(path, image_id=i, boxes=boxes.astype(np.float32).reshape(-1, 4),
                              labels=rng.integers(0, len(CLASSES), n).astype(np.int64)))
    return samples


@pytest.fixture()
def three_formats(tmp_path):
    samples = _samples(tmp_path / "source")
    write_coco(samples, CLASSES, tmp_path / "source" / "instances.json", tmp_path / "source")
    write_voc(samples, CLASSES, tmp_path / "voc", "train")
    yaml_path = write_yolo(samples, CLASSES, tmp_path / "yolo", "train")
    # VOC files do not list their classes: a data YAML names them (and their order).
    (tmp_path / "voc.yaml").write_text("format: voc\npath: voc\nnames: [cat, dog, bird]\ntrain: train\n")
    return samples, {"coco": tmp_path / "source" / "instances.json", "voc": tmp_path / "voc.yaml", "yolo": yaml_path}


def _by_stem(dataset):
    out = {}
    for i, sample in enumerate(dataset.samples):
        _, target = dataset[i]
        out[sample.image.stem] = (target["boxes"].numpy(), target["labels"].numpy())
    return out


def test_coco_voc_yolo_read_back_identically(three_formats):
    samples, specs = three_formats
    read = {name: build_dataset(spec, "train", "detect", problems=None) for name, spec in specs.items()}
    voc = read["voc"]
    assert voc.classes == read["coco"].classes == read["yolo"].classes == CLASSES
    results = {name: _by_stem(ds) for name, ds in read.items()}
    for sample in samples:
        stem = sample.image.stem
        for name, per_image in results.items():
            boxes, labels = per_image[stem]
            assert np.array_equal(labels, sample.labels), (name, stem)
            atol = 1e-2 if name == "yolo" else 0  # YOLO stores normalised coordinates with 6 decimals
            np.testing.assert_allclose(boxes, sample.boxes, atol=atol, err_msg=f"{name} {stem}")
    assert not any(ds.problems.errors for ds in read.values())
