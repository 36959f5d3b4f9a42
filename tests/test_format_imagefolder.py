"""ImageFolder reader and writer: split folders, class ids, ignored files, layout errors."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvforge.data.dataset import VisionDataset
from cvforge.data.formats.imagefolder import read_imagefolder, write_imagefolder
from cvforge.data.problems import Problems
from cvforge.errors import DataError


def make_image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), color).save(path)
    return path


def snapshot(root: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_split_folders_give_sorted_classes_and_ids(tmp_path):
    root = tmp_path / "data"
    make_image(root / "train/dog/1.jpg")
    make_image(root / "train/cat/b.png")
    make_image(root / "train/cat/a.jpg")
    make_image(root / "train/cat/nested/c.jpg")  # below a class folder: still that class
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/empty").mkdir()  # kept as a class so ids match across splits
    make_image(root / "train/.ipynb_checkpoints/x.jpg")  # hidden: not a class
    make_image(root / "train/loose.jpg")  # no class folder: ignored
    make_image(root / "val/dog/2.jpg")
    before = snapshot(root)
    samples, classes = read_imagefolder(root, "train", Problems())
    assert classes == ["cat", "dog", "empty"]
    assert [(s.image.relative_to(root / "train").as_posix(), s.label) for s in samples] == [
        ("cat/a.jpg", 0), ("cat/b.png", 0), ("cat/nested/c.jpg", 0), ("dog/1.jpg", 1)]
    assert [s.image_id for s in samples] == [0, 1, 2, 3]
    val, val_classes = read_imagefolder(root, "val", Problems())
    assert val_classes == ["dog"] and [s.label for s in val] == [0]
    image, target = VisionDataset(samples, classes, "classify")[3]
    assert image.shape == (3, 24, 32) and int(target["label"]) == 1
    assert snapshot(root) == before


def test_class_folders_without_split_level_serve_every_split(tmp_path):
    make_image(tmp_path / "bird/0.jpg")
    make_image(tmp_path / "ant/0.jpg")
    for split in ("train", "val"):
        samples, classes = read_imagefolder(tmp_path, split, Problems())
        assert classes == ["ant", "bird"] and [s.label for s in samples] == [0, 1]


def test_layout_errors_name_the_folder(tmp_path):
    (tmp_path / "flat").mkdir()
    make_image(tmp_path / "flat/a.jpg")
    with pytest.raises(DataError, match="no 'train' folder") as error:
        read_imagefolder(tmp_path / "flat", "train", Problems())
    assert str(tmp_path / "flat") in str(error.value) and "<class>" in str(error.value)
    make_image(tmp_path / "only_train/train/cat/a.jpg")
    with pytest.raises(DataError, match="no 'val' folder"):
        read_imagefolder(tmp_path / "only_train", "val", Problems())
    (tmp_path / "split_without_classes/train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        read_imagefolder(tmp_path / "split_without_classes", "train", Problems())


def test_write_then_read_round_trip(tmp_path):
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 255
    gray = Image.new("L", (16, 16), 128)
    write_imagefolder([(red, 1), (gray, 0), (red, 1)], ["circle", "square", "star"], tmp_path, "train")
    assert (tmp_path / "train/square/00000.png").is_file() and (tmp_path / "train/square/00002.png").is_file()
    assert (tmp_path / "train/circle/00001.png").is_file() and (tmp_path / "train/star").is_dir()
    samples, classes = read_imagefolder(tmp_path, "train", Problems())
    assert classes == ["circle", "square", "star"] and [s.label for s in samples] == [0, 1, 1]
    image, _ = VisionDataset(samples, classes, "classify")[1]
    assert image[:, 0, 0].tolist() == [255, 0, 0]
    with pytest.raises(DataError, match="not empty"):
        write_imagefolder([(red, 0)], classes, tmp_path, "train")
    with pytest.raises(ValueError, match="class id 3"):
        write_imagefolder([(red, 3)], classes, tmp_path, "val")
