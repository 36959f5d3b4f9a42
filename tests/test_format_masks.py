"""Image + mask PNG folders: layouts, class names, missing masks, size checks."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvforge.data.dataset import IGNORE, VisionDataset
from cvforge.data.formats.masks import read_masks, write_masks
from cvforge.data.problems import Problems
from cvforge.errors import DataError


def make_image(path: Path, width: int = 36, height: int = 28) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 120, 60)).save(path)
    return path


def make_mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def snapshot(root: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def example_mask(top_class: int = 2) -> np.ndarray:
    mask = np.zeros((28, 36), np.uint8)
    mask[2:10, 3:20] = 1
    mask[12:20, 5:30] = top_class
    mask[0, :] = IGNORE
    return mask


def test_write_read_round_trip_with_split_and_classes_txt(tmp_path):
    sources = [make_image(tmp_path / "src" / f"{name}.jpg") for name in ("b", "a")]
    mask = example_mask()
    write_masks([(sources[0], mask), (sources[1], mask * 0)], ["background", "road", "car"], tmp_path / "ds", "train")
    assert (tmp_path / "ds/classes.txt").read_text() == "background\nroad\ncar\n"
    with Image.open(tmp_path / "ds/masks/train/b.png") as png:
        assert png.mode == "L"
    before = snapshot(tmp_path / "ds")
    problems = Problems()
    samples, classes = read_masks(tmp_path / "ds", "train", problems)
    assert classes == ["background", "road", "car"] and not problems
    assert [s.image.name for s in samples] == ["a.jpg", "b.jpg"] and [s.image_id for s in samples] == [0, 1]
    _, target = VisionDataset(samples, classes, "segment")[1]
    assert target["mask"].dtype == torch.int64 and target["mask"].shape == (28, 36)
    assert torch.equal(target["mask"], torch.from_numpy(mask.astype(np.int64)))
    assert snapshot(tmp_path / "ds") == before


def test_no_split_level_and_class_names_counted_from_masks(tmp_path):
    make_image(tmp_path / "images/x.png")
    make_image(tmp_path / "images/y.jpg")
    make_mask(tmp_path / "masks/x.png", example_mask(top_class=4))  # 255 is not a class
    make_mask(tmp_path / "masks/y.png", example_mask(top_class=1))
    (tmp_path / "images/readme.txt").write_text("ignored")
    samples, classes = read_masks(tmp_path, "val", Problems())
    assert classes == ["class0", "class1", "class2", "class3", "class4"]
    assert len(samples) == 2 and samples[0].mask == tmp_path / "masks/x.png"


def test_class_names_from_data_yaml(tmp_path):
    make_image(tmp_path / "images/train/a.jpg")
    make_mask(tmp_path / "masks/train/a.png", example_mask())
    (tmp_path / "data.yaml").write_text("names:\n  0: sky\n  1: tree\n  2: house\n")
    assert read_masks(tmp_path, "train", Problems())[1] == ["sky", "tree", "house"]
    (tmp_path / "data.yaml").write_text("names: [sky, grass]\n")
    assert read_masks(tmp_path, "train", Problems())[1] == ["sky", "grass"]
    (tmp_path / "classes.txt").write_text("bg\n\nfg\n")  # classes.txt wins; a blank line would shift ids
    with pytest.raises(DataError, match="blank class name") as error:
        read_masks(tmp_path, "train", Problems())
    assert f"{tmp_path / 'classes.txt'}:2" in str(error.value)


def test_missing_mask_is_reported_and_skipped(tmp_path):
    make_image(tmp_path / "images/train/a.jpg")
    make_image(tmp_path / "images/train/b.jpg")
    make_mask(tmp_path / "masks/train/a.png", example_mask())
    problems = Problems()
    samples, _ = read_masks(tmp_path, "train", problems)
    assert [s.image.name for s in samples] == ["a.jpg"]
    assert problems.counts["mask missing"] == 1 and "b.jpg" in problems.places["mask missing"][0]


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="no images/train/ or images/ folder"):
        read_masks(tmp_path, "train", Problems())
    make_image(tmp_path / "images/train/a.jpg")
    with pytest.raises(DataError, match="masks folder not found"):
        read_masks(tmp_path, "train", Problems())


def test_mask_and_image_size_mismatch(tmp_path):
    make_image(tmp_path / "images/a.jpg")
    make_mask(tmp_path / "masks/a.png", np.zeros((10, 12), np.uint8))
    samples, classes = read_masks(tmp_path, "", Problems())
    with pytest.raises(DataError, match="mask is 12x10 but its image is 36x28"):
        VisionDataset(samples, classes, "segment")[0]
    with pytest.raises(DataError, match="mask is 12x10 but its image is 36x28"):
        write_masks([(tmp_path / "images/a.jpg", np.zeros((10, 12), np.uint8))], classes, tmp_path / "out", "train")


def test_writer_refuses_conflicts(tmp_path):
    image = make_image(tmp_path / "src/a.jpg")
    write_masks([(image, example_mask())], ["bg", "a", "b"], tmp_path / "ds", "train")
    write_masks([(image, example_mask())], ["bg", "a", "b"], tmp_path / "ds", "train")  # identical: fine
    with pytest.raises(DataError, match="different file already exists"):
        write_masks([(image, example_mask() * 0)], ["bg", "a", "b"], tmp_path / "ds", "train")
    with pytest.raises(DataError, match="other classes"):
        write_masks([(image, example_mask())], ["bg", "x"], tmp_path / "ds", "val")
    with pytest.raises(DataError, match="0..255"):
        write_masks([(image, example_mask().astype(np.int64) + 300)], ["bg", "a", "b"], tmp_path / "ds", "val")
