"""YOLO reader and writer: round trip, data YAML forms, label lines and every reported problem."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cvforge.data.dataset import Sample, VisionDataset
from cvforge.data.formats.yolo import label_path, read_yolo, write_yolo
from cvforge.data.problems import Problems
from cvforge.errors import DataError


def make_image(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(width * height * 3) % 251).astype(np.uint8).reshape(height, width, 3)
    Image.fromarray(pixels).save(path)
    return path


def dataset(tmp_path: Path, labels: dict[str, str | None], names=("cat", "dog"), extra: str = "") -> Path:
    """images/train/<name>.png (64x48) with labels/train/<name>.txt (None: no label file) and data.yaml."""
    for name, text in labels.items():
        make_image(tmp_path / "images" / "train" / f"{name}.png")
        if text is not None:
            label = tmp_path / "labels" / "train" / f"{name}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    path = tmp_path / "data.yaml"
    path.write_text(f"path: .\ntrain: images/train\nnames: {list(names)}\n{extra}")
    return path


def test_box_line_becomes_xyxy_pixels(tmp_path):
    problems = Problems()
    samples, classes = read_yolo(dataset(tmp_path, {"a": "1 0.5 0.5 0.25 0.5\n"}), "train", problems)
    assert classes == ["cat", "dog"] and not problems
    np.testing.assert_allclose(samples[0].boxes, [[24, 12, 40, 36]])
    assert samples[0].labels.tolist() == [1] and samples[0].segments == []


def test_names_as_dict_and_bad_dict_keys(tmp_path):
    path = dataset(tmp_path, {"a": ""})
    path.write_text("path: .\ntrain: images/train\nnames:\n  1: dog\n  0: cat\nnc: 2\n")
    assert read_yolo(path, "train", Problems())[1] == ["cat", "dog"]
    path.write_text("train: images/train\nnames:\n  0: cat\n  2: dog\n")
    with pytest.raises(DataError, match="0..1") as info:
        read_yolo(path, "train", Problems())
    assert str(path) in str(info.value)
    path.write_text("train: images/train\nnames: [cat, dog]\nnc: 3\n")
    with pytest.raises(DataError, match="'nc' is 3"):
        read_yolo(path, "train", Problems())


def test_missing_label_file_is_background_with_info_and_empty_file_is_silent(tmp_path):
    problems = Problems()
    samples, _ = read_yolo(dataset(tmp_path, {"a": None, "b": "", "c": "0 0.5 0.5 0.5 0.5\n"}), "train", problems)
    assert [s.image.name for s in samples] == ["a.png", "b.png", "c.png"]
    assert [s.image_id for s in samples] == [0, 1, 2]
    assert [len(s.boxes) for s in samples] == [0, 0, 1] and samples[0].boxes.shape == (0, 4)
    assert dict(problems.counts) == {"image without label file": 1}
    assert "a.txt" in problems.places["image without label file"][0] and problems.errors == 0


def test_polygon_line_gives_segment_and_bounding_box(tmp_path):
    text = "0 0.25 0.25 0.75 0.25 0.5 0.75\n1 0.5 0.5 0.2 0.2\n"
    samples, _ = read_yolo(dataset(tmp_path, {"a": text, "b": "1 0.5 0.5 0.1 0.1\n"}), "train", Problems())
    first, second = samples
    np.testing.assert_allclose(first.boxes[0], [16, 12, 48, 36])
    np.testing.assert_allclose(first.segments[0], [[16, 12, 48, 12, 32, 36]])
    assert first.segments[1] is None and second.segments == [None]  # box-only lines in a polygon data set
    _, target = VisionDataset(samples, ["cat", "dog"], "instance")[0]
    assert target["masks"].shape == (2, 48, 64)
    assert target["masks"][0, 20, 32] == 1 and target["masks"][0, 30, 17] == 0  # outside the triangle
    assert target["masks"][1].sum() > 0


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    text = "0 0.5 0.5 0.2 0.2\ncat 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n\n0 0.1 0.1 0.2 0.2 0.3\n1.5 0.5 0.5 0.1 0.1\n"
    problems = Problems()
    samples, _ = read_yolo(dataset(tmp_path, {"a": text}), "train", problems)
    assert len(samples[0].boxes) == 1
    label = tmp_path / "labels" / "train" / "a.txt"
    assert problems.counts["malformed label line"] == 4
    assert [p.split(" ")[0] for p in problems.places["malformed label line"]] == [
        f"{label}:2", f"{label}:3", f"{label}:5", f"{label}:6"]


def test_class_out_of_range_and_coordinates_beyond_one(tmp_path):
    text = "2 0.5 0.5 0.2 0.2\n-1 0.5 0.5 0.2 0.2\n0 0.9 0.5 0.4 0.2\n1 0.5 0.5 0.1 0.1\n"
    problems = Problems()
    samples, _ = read_yolo(dataset(tmp_path, {"a": text}), "train", problems)
    label = tmp_path / "labels" / "train" / "a.txt"
    assert problems.counts["unknown class id"] == 2
    assert problems.places["unknown class id"][0].startswith(f"{label}:1")
    assert problems.counts["box partly outside image"] == 1
    assert problems.places["box partly outside image"][0] == f"{label}:3"
    np.testing.assert_allclose(samples[0].boxes, [[44.8, 19.2, 64, 28.8], [28.8, 21.6, 35.2, 26.4]], atol=1e-4)
    assert samples[0].labels.tolist() == [0, 1]


def test_polygon_beyond_image_is_clipped_and_counted(tmp_path):
    problems = Problems()
    samples, _ = read_yolo(dataset(tmp_path, {"a": "0 0.5 0.5 1.5 0.5 1.0 1.0\n"}), "train", problems)
    assert problems.counts["box partly outside image"] == 1
    np.testing.assert_allclose(samples[0].boxes[0], [32, 24, 64, 48])
    assert max(samples[0].segments[0][0][0::2]) == 64


def test_split_as_txt_list_and_as_list_of_entries(tmp_path):
    dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.2 0.2\n"})
    make_image(tmp_path / "images" / "extra" / "c.png")
    (tmp_path / "train.txt").write_text("./images/train/b.png\nimages/train/a.png\n\nimages/train/none.png\n"
                                        "../outside.png\n")
    make_image(tmp_path.parent / "outside.png")
    path = tmp_path / "list.yaml"
    path.write_text("train: train.txt\nval: [train.txt, images/extra]\nnames: [cat, dog]\n")
    problems = Problems()
    samples, _ = read_yolo(path, "train", problems)
    assert [s.image.name for s in samples] == ["a.png", "b.png"] and samples[1].labels.tolist() == [1]
    assert problems.places["missing image"][0].startswith(f"{tmp_path / 'train.txt'}:4")
    assert problems.places["path escapes data root"][0].startswith(f"{tmp_path / 'train.txt'}:5")
    samples, _ = read_yolo(path, "val", Problems())  # sorted by path: images/extra before images/train
    assert [s.image.name for s in samples] == ["c.png", "a.png", "b.png"]


def test_yaml_errors_name_the_file(tmp_path):
    path = dataset(tmp_path, {"a": ""})
    with pytest.raises(DataError, match="'val'") as info:
        read_yolo(path, "val", Problems())
    assert str(path) in str(info.value)
    path.write_text("path: .\ntrain: [images/train\nnames: [a]\n")
    with pytest.raises(DataError, match="malformed YAML") as info:
        read_yolo(path, "train", Problems())
    assert f"{path}:3:" in str(info.value)
    path.write_text("train: images/nowhere\nnames: [a]\n")
    with pytest.raises(DataError, match="images/nowhere"):
        read_yolo(path, "train", Problems())


def test_label_path_replaces_the_last_images_component():
    assert label_path(Path("/d/images/x/images/train/a.jpg")) == Path("/d/images/x/labels/train/a.txt")
    assert label_path(Path("/d/photos/a.png")) == Path("/d/photos/a.txt")


def test_round_trip_boxes_polygons_and_rle(tmp_path):
    src = tmp_path / "src"
    a, b, c = make_image(src / "a.png"), make_image(src / "b.png", 40, 30), make_image(src / "x" / "a.png")
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    rle = {"size": [48, 64], "counts": [100, 5, 3000 - 105 + 72 - 0]}
    samples = [
        Sample(a, boxes=np.array([[10, 10, 30, 30], [1.234, 2.5, 20.75, 40.125], [3, 4, 5, 6]], dtype=np.float32),
               labels=np.array([1, 0, 2]), segments=[square, None, rle]),
        Sample(b, boxes=np.array([[0.3, 0.7, 39.9, 29.1]], dtype=np.float32), labels=np.array([2])),
        Sample(c),  # background, same file name as a: written under a new name
    ]
    classes = ["cat", "dog", "bird"]
    out = tmp_path / "out"
    yaml_path = write_yolo(samples, classes, out, "train")
    assert yaml_path == out / "data.yaml"
    config = yaml.safe_load(yaml_path.read_text())
    assert config == {"path": ".", "names": classes, "train": "images/train"}
    lines = (out / "labels" / "train" / "a.txt").read_text().splitlines()
    assert lines[0].split()[0] == "1" and len(lines[0].split()) == 9  # polygon line
    assert len(lines[2].split()) == 5 and lines[2].split()[1] == "0.062500"  # RLE -> box line, 6 decimals
    assert (out / "labels" / "train" / "a_1.txt").read_text() == ""

    problems = Problems()
    read, got_classes = read_yolo(yaml_path, "train", problems)
    assert got_classes == classes and not problems
    assert [s.image.name for s in read] == ["a.png", "a_1.png", "b.png"]
    for original, got in zip(samples, [read[0], read[2], read[1]]):
        np.testing.assert_allclose(got.boxes, original.boxes, atol=1e-3)
        np.testing.assert_array_equal(got.labels, original.labels)
    np.testing.assert_allclose(read[0].segments[0], square, atol=1e-3)
    assert read[0].segments[1:] == [None, None]
    assert (out / "images" / "train" / "b.png").read_bytes() == b.read_bytes()


def test_write_adds_a_split_and_refuses_to_overwrite(tmp_path):
    image = make_image(tmp_path / "src" / "a.png")
    sample = Sample(image, boxes=np.array([[1, 1, 5, 5]], dtype=np.float32), labels=np.array([0]))
    out = tmp_path / "out"
    write_yolo([sample], ["cat"], out, "train")
    path = write_yolo([sample], ["cat"], out, "val")
    config = yaml.safe_load(path.read_text())
    assert config["train"] == "images/train" and config["val"] == "images/val"
    label = out / "labels" / "val" / "a.txt"
    before = label.read_bytes()
    with pytest.raises(DataError, match="label file already exists"):
        write_yolo([sample], ["cat"], out, "val")
    assert label.read_bytes() == before
    with pytest.raises(DataError, match="other class names"):
        write_yolo([sample], ["dog"], out, "test")
    assert not (out / "labels" / "test").exists()


def test_multi_part_polygon_is_joined_into_one_line(tmp_path):
    image = make_image(tmp_path / "a.png")
    parts = [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0], [40.0, 30.0, 50.0, 30.0, 50.0, 40.0],
             [20.0, 20.0, 25.0, 20.0, 25.0, 25.0]]
    sample = Sample(image, boxes=np.array([[2, 2, 50, 40]], dtype=np.float32), labels=np.array([0]),
                    segments=[parts])
    read, _ = read_yolo(write_yolo([sample], ["x"], tmp_path / "out", "train"), "train", Problems())
    np.testing.assert_allclose(read[0].boxes, [[2, 2, 50, 40]], atol=1e-3)
    _, target = VisionDataset(read, ["x"], "instance")[0]
    mask = target["masks"][0]
    assert mask[4, 8] == 1 and mask[32, 48] == 1 and mask[21, 24] == 1
    # Bridges enclose no area (the hull of the parts would be ~900 px); they only add their 1-px lines.
    assert mask[30, 20] == 0 and mask.sum() < 200


def test_reading_does_not_modify_user_files(tmp_path):
    path = dataset(tmp_path, {"a": "0 0.9 0.5 0.4 0.2\nbad\n5 0.5 0.5 0.1 0.1\n", "b": None,
                              "c": "1 0.1 0.1 0.3 0.1 0.2 0.3\n"})
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    samples, classes = read_yolo(path, "train", Problems())
    dataset_ = VisionDataset(samples, classes, "instance")
    assert [dataset_[i][1]["masks"].shape[0] for i in range(3)] == [1, 0, 1]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
