"""Pascal VOC reader and writer: coordinates, classes, splits, masks and refused XML."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvforge.data.dataset import IGNORE, Sample, VisionDataset
from cvforge.data.formats.voc import VOC_CLASSES, read_voc, voc_palette, write_palette_mask, write_voc
from cvforge.data.problems import Problems
from cvforge.errors import DataError


def make_image(path: Path, width: int = 48, height: int = 32, color=(40, 90, 160)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def snapshot(root: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def voc_xml(filename: str, objects: list[tuple], width: int = 48, height: int = 32) -> str:
    """objects: (name, xmin, ymin, xmax, ymax, difficult) in VOC 1-based coordinates."""
    body = "".join(
        f"  <object>\n    <name>{name}</name>\n    <truncated>1</truncated>\n    <difficult>{d}</difficult>\n"
        f"    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>\n  </object>\n"
        for name, x1, y1, x2, y2, d in objects)
    return (f"<annotation>\n  <filename>{filename}</filename>\n"
            f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n{body}</annotation>\n")


def make_voc(root: Path, annotations: dict[str, list[tuple]], split: str = "train", filenames=None) -> Path:
    for stem, objects in annotations.items():
        make_image(root / "JPEGImages" / f"{stem}.jpg")
        filename = (filenames or {}).get(stem, f"{stem}.jpg")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(filename, objects))
    (root / "ImageSets/Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in annotations))
    return root


def test_one_based_inclusive_boxes_become_pixel_edges(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": [("dog", 1, 1, 48, 32, 0), ("cat", 5, 6, 10, 20, 1)]})
    problems = Problems()
    samples, classes = read_voc(root, "train", problems)
    assert classes == VOC_CLASSES and len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane"
    assert VOC_CLASSES[-1] == "tvmonitor"
    (sample,) = samples
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 48, 32], [4, 5, 10, 20]])
    assert sample.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    assert sample.difficult.tolist() == [False, True]
    assert sample.image == (root / "JPEGImages/a.jpg").resolve()
    assert not problems


def test_write_read_round_trip_keeps_boxes_difficult_and_ids(tmp_path):
    images = [make_image(tmp_path / "src" / f"img{i}.png", 64, 48) for i in range(2)]
    samples = [
        Sample(image=images[0], boxes=np.array([[0, 0, 10, 12], [5, 6, 64, 48]], np.float32),
               labels=np.array([14, 7]), difficult=np.array([False, True])),
        Sample(image=images[1]),  # an image with no objects is a valid sample
    ]
    write_voc(samples, VOC_CLASSES, tmp_path / "out", "val")
    xml = (tmp_path / "out/Annotations/img0.xml").read_text()
    assert "<xmin>1</xmin>" in xml and "<xmax>10</xmax>" in xml and "<difficult>1</difficult>" in xml
    assert "<width>64</width>" in xml
    assert (tmp_path / "out/JPEGImages/img0.png").is_file()  # suffix kept
    assert (tmp_path / "out/ImageSets/Main/val.txt").read_text() == "img0\nimg1\n"
    problems = Problems()
    back, classes = read_voc(tmp_path / "out", "val", problems)
    assert classes == VOC_CLASSES and not problems
    assert [s.image_id for s in back] == [0, 1]
    np.testing.assert_array_equal(back[0].boxes, samples[0].boxes)
    assert back[0].labels.tolist() == [14, 7] and back[0].difficult.tolist() == [False, True]
    assert back[1].boxes.shape == (0, 4)
    _, target = VisionDataset(back, classes, "detect")[0]
    assert target["boxes"].tolist() == samples[0].boxes.tolist() and target["difficult"].tolist() == [False, True]


def test_writer_refuses_to_append_and_renames_duplicate_stems(tmp_path):
    a = make_image(tmp_path / "x/img.jpg")
    b = make_image(tmp_path / "y/img.jpg", color=(1, 2, 3))
    write_voc([Sample(image=a), Sample(image=b)], VOC_CLASSES, tmp_path / "out", "train")
    assert (tmp_path / "out/ImageSets/Main/train.txt").read_text().split() == ["img", "img_1"]
    with pytest.raises(DataError, match="split file already exists"):
        write_voc([Sample(image=a)], VOC_CLASSES, tmp_path / "out", "train")


def test_class_list_custom_names_sorted_and_unknown_names_counted(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": [("zebra", 1, 1, 9, 9, 0)], "b": [("apple", 2, 2, 9, 9, 0)]})
    samples, classes = read_voc(root, "train", Problems())
    assert classes == ["apple", "zebra"]
    assert [s.labels.tolist() for s in samples] == [[1], [0]]
    problems = Problems()
    samples, classes = read_voc(root, "train", problems, classes=["zebra"])
    assert classes == ["zebra"] and [len(s.boxes) for s in samples] == [1, 0]
    assert problems.counts["unknown class id"] == 1
    assert "apple" in problems.places["unknown class id"][0] and "b.xml:" in problems.places["unknown class id"][0]


def test_split_file_missing_falls_back_to_all_annotations(tmp_path):
    root = make_voc(tmp_path / "voc", {"b": [("cat", 1, 1, 5, 5, 0)], "a": []})
    (root / "ImageSets/Main/train.txt").unlink()
    samples, _ = read_voc(root, "val", Problems())
    assert [s.image.name for s in samples] == ["a.jpg", "b.jpg"]
    with pytest.raises(DataError, match="no split file"):
        read_voc(tmp_path / "empty", "train", Problems())


def test_boxes_cleaned_and_missing_files_reported(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": [("cat", 40, 1, 60, 10, 0), ("cat", 9, 9, 5, 20, 0)], "b": []})
    (root / "JPEGImages/b.jpg").unlink()
    make_image(root / "JPEGImages/c.jpg")  # listed, has no XML: a background image
    with open(root / "ImageSets/Main/train.txt", "a") as f:
        f.write("c\na\n")
    problems = Problems()
    samples, _ = read_voc(root, "train", problems)
    assert [s.image.name for s in samples] == ["a.jpg", "c.jpg"] and [s.image_id for s in samples] == [0, 2]
    np.testing.assert_array_equal(samples[0].boxes, [[39, 0, 48, 10]])  # clipped to the 48 px width
    assert dict(problems.counts) == {"box partly outside image": 1, "box of zero or negative size": 1,
                                     "missing image": 1, "image without label file": 1, "duplicate image id": 1}


def test_instance_task_reports_boxes_used_as_masks(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": [("cat", 1, 1, 10, 10, 0), ("dog", 3, 3, 20, 20, 0)]})
    problems = Problems()
    samples, classes = read_voc(root, "train", problems, task="instance")
    assert problems.counts["instance without segmentation"] == 2
    _, target = VisionDataset(samples, classes, "instance")[0]
    assert target["masks"].shape == (2, 32, 48) and int(target["masks"][0].sum()) == 100


def test_billion_laughs_and_external_entities_refused(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": []})
    laughs = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
              + "".join(f' <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">\n'
                        for i in range(1, 10))
              + ']>\n<annotation><filename>&lol9;</filename></annotation>\n')
    (root / "Annotations/a.xml").write_text(laughs)
    with pytest.raises(DataError, match="XML refused") as error:
        read_voc(root, "train", Problems())
    assert "a.xml" in str(error.value)
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (root / "Annotations/a.xml").write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        '<annotation><filename>&x;</filename></annotation>\n')
    with pytest.raises(DataError, match="XML refused"):
        read_voc(root, "train", Problems())


def test_malformed_xml_names_file_line_and_column(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": [("cat", 1, 1, 5, 5, 0)]})
    (root / "Annotations/a.xml").write_text("<annotation>\n  <filename>a.jpg</filename>\n  <object>\n</annotation>\n")
    with pytest.raises(DataError, match="malformed XML") as error:
        read_voc(root, "train", Problems())
    assert f"{root / 'Annotations/a.xml'}:4:" in str(error.value)


def test_object_without_numeric_box_is_reported_with_its_line(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": [("cat", 1, 1, "x", 5, 0), ("dog", 1, 1, 5, 5, 0)]})
    problems = Problems()
    (sample,), _ = read_voc(root, "train", problems)
    assert sample.labels.tolist() == [VOC_CLASSES.index("dog")]
    assert problems.counts["malformed label line"] == 1
    assert problems.places["malformed label line"][0].startswith(f"{root / 'Annotations/a.xml'}:4 ")


def test_filename_escaping_the_root_is_refused_and_counted(tmp_path):
    make_image(tmp_path / "outside.jpg")  # exists, so only the escape check can stop it
    root = make_voc(tmp_path / "voc", {"a": [], "b": []}, filenames={"a": "../../outside.jpg"})
    problems = Problems()
    samples, _ = read_voc(root, "train", problems)
    assert [s.image.name for s in samples] == ["b.jpg"]
    assert problems.counts["path escapes data root"] == 1
    (root / "ImageSets/Main/train.txt").write_text("../../outside\n")
    problems = Problems()
    assert read_voc(root, "train", problems)[0] == [] and problems.counts["path escapes data root"] == 1


def make_segmentation(root: Path, size=(40, 30)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:15, 5:20] = 12  # dog
    mask[4, 4:21] = IGNORE  # object border
    for stem in ("s0", "s1"):
        make_image(root / "JPEGImages" / f"{stem}.jpg", *size)
        write_palette_mask(mask, root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("s0\ns1\nmissing\n")
    make_image(root / "JPEGImages/missing.jpg", *size)
    return mask


def test_segmentation_split_with_palette_masks(tmp_path):
    root = tmp_path / "voc"
    mask = make_segmentation(root)
    with Image.open(root / "SegmentationClass/s0.png") as png:
        assert png.mode == "P" and png.getpalette()[12 * 3:13 * 3] == [64, 0, 128]
    problems = Problems()
    samples, classes = read_voc(root, "val", problems, task="segment")
    assert classes == ["background"] + VOC_CLASSES and len(samples) == 2
    assert problems.counts["mask missing"] == 1 and "missing" in problems.places["mask missing"][0]
    image, target = VisionDataset(samples, classes, "segment")[1]
    assert image.shape == (3, 30, 40)
    assert target["mask"].dtype == torch.int64 and target["mask"].shape == (30, 40)
    assert torch.equal(target["mask"], torch.from_numpy(mask.astype(np.int64)))
    assert int((target["mask"] == IGNORE).sum()) == 17


def test_segmentation_masks_round_trip_through_writer(tmp_path):
    root = tmp_path / "voc"
    mask = make_segmentation(root)
    samples, classes = read_voc(root, "val", Problems(), task="segment")
    write_voc(samples, classes, tmp_path / "out", "val")
    assert (tmp_path / "out/ImageSets/Segmentation/val.txt").read_text() == "s0\ns1\n"
    assert "<segmented>1</segmented>" in (tmp_path / "out/Annotations/s0.xml").read_text()
    back, _ = read_voc(tmp_path / "out", "val", Problems(), task="segment")
    _, target = VisionDataset(back, classes, "segment")[0]
    assert target["mask"].numpy().tolist() == mask.tolist()


def test_mask_and_image_size_mismatch_raises_on_getitem(tmp_path):
    root = tmp_path / "voc"
    make_segmentation(root)
    write_palette_mask(np.zeros((10, 10), np.uint8), root / "SegmentationClass/s1.png")
    samples, classes = read_voc(root, "val", Problems(), task="segment")
    dataset = VisionDataset(samples, classes, "segment")
    dataset[0]
    with pytest.raises(DataError, match="mask is 10x10 but its image is 40x30"):
        dataset[1]


def test_palette_is_the_standard_voc_colour_map():
    palette = voc_palette()
    assert len(palette) == 768
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert palette[15 * 3:16 * 3] == [192, 128, 128]  # person
    assert palette[255 * 3:] == [224, 224, 192]  # border


def test_reading_leaves_user_files_unchanged(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": [("cat", 40, 1, 60, 10, 0)], "b": [("bird", 1, 1, 5, 5, 1)]})
    make_segmentation(root)
    before = snapshot(root)
    read_voc(root, "train", Problems())
    samples, classes = read_voc(root, "val", Problems(), task="segment")
    VisionDataset(samples, classes, "segment")[0]
    assert snapshot(root) == before
