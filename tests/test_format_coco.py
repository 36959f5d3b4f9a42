"""COCO reader and writer: round trip, id mapping, and every reported problem."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cvforge.data.dataset import Sample, VisionDataset
from cvforge.data.formats.coco import read_coco, write_coco
from cvforge.data.problems import Problems
from cvforge.errors import DataError


def make_image(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(width * height * 3) % 251).astype(np.uint8).reshape(height, width, 3)
    Image.fromarray(pixels).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def coco_file(tmp_path: Path, images=None, annotations=None, categories=None, name="ann.json") -> Path:
    """A COCO file beside two 64x48 images a.png (id 1) and b.png (id 2), category 'cat' (id 1)."""
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    data = {
        "images": images if images is not None else [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
        "annotations": annotations if annotations is not None else [],
        "categories": categories if categories is not None else [{"id": 1, "name": "cat"}],
    }
    return write_json(tmp_path / name, data)


def ann(ann_id, image_id=1, category_id=1, bbox=(10, 5, 20, 10), **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), **extra}


def rle_of(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_round_trip_keeps_boxes_labels_polygons_rle_and_crowd(tmp_path):
    root = tmp_path / "data"
    a, b, c = make_image(root / "a.png"), make_image(root / "sub" / "b.png", 40, 30), make_image(root / "c.png")
    polygon = [[10.25, 5.5, 30.0, 5.5, 30.0, 20.75, 10.25, 20.75]]
    rle = rle_of(48, 64, 2, 12, 3, 9)
    samples = [
        Sample(a, image_id=5, boxes=np.array([[10.25, 5.5, 30, 20.75], [3, 2, 9, 12], [1.1, 2.3, 33.7, 21.9]],
                                             dtype=np.float32),
               labels=np.array([1, 0, 2]), iscrowd=np.array([False, True, False]),
               segments=[polygon, rle, None]),
        Sample(b, image_id=9, boxes=np.array([[0.5, 0.5, 39.5, 29.5]], dtype=np.float32), labels=np.array([2]),
               iscrowd=np.array([False]), segments=[]),
        Sample(c, image_id=7),  # background
    ]
    json_path = tmp_path / "out" / "instances.json"
    write_coco(samples, ["cat", "dog", "bird"], json_path, root)

    problems = Problems()
    read, classes = read_coco(json_path, problems, image_root=root)
    assert classes == ["cat", "dog", "bird"] and not problems
    assert [s.image_id for s in read] == [5, 7, 9]
    by_id = {s.image_id: s for s in read}
    for original in samples:
        got = by_id[original.image_id]
        assert got.image == original.image.resolve()
        np.testing.assert_array_equal(got.boxes, original.boxes)  # exact
        assert got.boxes.dtype == np.float32
        np.testing.assert_array_equal(got.labels, original.labels)
    first = by_id[5]
    assert first.iscrowd.tolist() == [False, True, False]
    assert first.segments[0] == polygon and first.segments[2] is None
    assert first.segments[1] == rle
    assert by_id[9].segments == [None] and by_id[7].segments == []


def test_written_file_is_valid_coco_for_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    image = make_image(tmp_path / "a.png")
    polygon = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    uncompressed = {"size": [48, 64], "counts": [48 * 2 + 3, 5, 43, 5] + [48 * 64 - 48 * 2 - 3 - 53]}
    samples = [Sample(image, image_id=1, boxes=np.array([[10, 10, 30, 30], [2, 3, 4, 8]], dtype=np.float32),
                      labels=np.array([0, 0]), iscrowd=np.array([False, True]),
                      segments=[polygon, uncompressed])]
    json_path = tmp_path / "a.json"
    write_coco(samples, ["thing"], json_path, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["categories"] == [{"id": 1, "name": "thing", "supercategory": ""}]
    assert data["images"][0] == {"id": 1, "file_name": "a.png", "width": 64, "height": 48}
    first, second = data["annotations"]
    assert first["bbox"] == [10.0, 10.0, 20.0, 20.0] and first["area"] == pytest.approx(400, rel=0.1)
    assert isinstance(second["segmentation"]["counts"], str) and second["area"] == 10  # two runs of 5
    coco = COCO(str(json_path))
    assert coco.annToMask(coco.loadAnns([2])[0]).sum() == 10
    assert coco.annToMask(coco.loadAnns([1])[0])[20, 20] == 1


def test_write_refuses_to_overwrite_and_images_outside_root(tmp_path):
    image = make_image(tmp_path / "a.png")
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    with pytest.raises(DataError, match="already exists"):
        write_coco([Sample(image)], ["x"], existing, tmp_path)
    assert existing.read_text() == "{}"
    with pytest.raises(DataError, match="outside the image root"):
        write_coco([Sample(image)], ["x"], tmp_path / "new.json", tmp_path / "elsewhere")


def test_arbitrary_category_ids_map_to_consecutive_classes_in_id_order(tmp_path):
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 42, "name": "forty-two"}]
    annotations = [ann(1, category_id=42), ann(2, category_id=3), ann(3, category_id=7)]
    samples, classes = read_coco(coco_file(tmp_path, annotations=annotations, categories=categories), Problems())
    assert classes == ["three", "seven", "forty-two"]
    assert samples[0].labels.tolist() == [2, 0, 1]


def test_iscrowd_and_background_images(tmp_path):
    annotations = [ann(1, iscrowd=1), ann(2, iscrowd=0), ann(3)]
    samples, _ = read_coco(coco_file(tmp_path, annotations=annotations), Problems())
    assert samples[0].iscrowd.tolist() == [True, False, False]
    assert samples[1].image_id == 2 and len(samples[1].boxes) == 0 and samples[1].boxes.shape == (0, 4)


def test_bbox_is_converted_to_xyxy_and_clipped_with_a_report(tmp_path):
    annotations = [ann(1, bbox=(10, 5, 20, 10)), ann(2, bbox=(50, 40, 30, 30)), ann(3, bbox=(5, 5, 0, 4))]
    problems = Problems()
    samples, _ = read_coco(coco_file(tmp_path, annotations=annotations), problems)
    np.testing.assert_array_equal(samples[0].boxes, [[10, 5, 30, 15], [50, 40, 64, 48]])
    assert problems.counts["box partly outside image"] == 1
    assert problems.counts["box of zero or negative size"] == 1
    assert "annotation id 3" in problems.places["box of zero or negative size"][0]


def test_duplicates_unknown_image_and_unknown_category_are_reported_and_dropped(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 1, "file_name": "b.png", "width": 64, "height": 48}]
    annotations = [ann(1, bbox=(1, 1, 5, 5)), ann(1, bbox=(2, 2, 5, 5)), ann(2, image_id=99),
                   ann(3, category_id=5), ann(4, bbox=(3, 3, 5, 5))]
    problems = Problems()
    json_path = coco_file(tmp_path, images=images, annotations=annotations)
    samples, _ = read_coco(json_path, problems)
    assert len(samples) == 1 and samples[0].image.name == "a.png"
    np.testing.assert_array_equal(samples[0].boxes, [[1, 1, 6, 6], [3, 3, 8, 8]])  # the first of duplicate id 1
    for kind in ("duplicate image id", "duplicate annotation id", "annotation for unknown image", "unknown class id"):
        assert problems.counts[kind] == 1, kind
        assert str(json_path) in problems.places[kind][0]
    assert "annotation id 3" in problems.places["unknown class id"][0]
    assert problems.errors == 4


def test_file_name_escaping_the_root_and_missing_images_are_skipped(tmp_path):
    make_image(tmp_path / "secret.png")
    data_dir = tmp_path / "data"
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "../secret.png", "width": 64, "height": 48},
              {"id": 3, "file_name": "gone.png", "width": 64, "height": 48}]
    annotations = [ann(1, image_id=2), ann(2, image_id=3)]
    problems = Problems()
    samples, _ = read_coco(coco_file(data_dir, images=images, annotations=annotations), problems)
    assert [s.image_id for s in samples] == [1]
    assert problems.counts["path escapes data root"] == 1 and "../secret.png" in problems.places["path escapes data root"][0]
    assert problems.counts["missing image"] == 1 and "gone.png" in problems.places["missing image"][0]
    assert problems.counts["annotation for unknown image"] == 0  # not reported twice


@pytest.mark.parametrize("missing", ["images", "annotations", "categories"])
def test_missing_top_level_key_raises_naming_file_and_key(tmp_path, missing):
    data = {"images": [], "annotations": [], "categories": []}
    del data[missing]
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DataError) as info:
        read_coco(path, Problems())
    assert str(path) in str(info.value) and repr(missing) in str(info.value)


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DataError) as info:
        read_coco(path, Problems())
    assert f"{path}:3:19" in str(info.value)


def test_bbox_derived_from_segmentation_when_missing(tmp_path):
    polygon = [[10.5, 4.0, 20.0, 4.0, 20.0, 30.25, 10.5, 30.25]]
    rle = rle_of(48, 64, 2, 12, 3, 9)
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon},
                   {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rle},
                   {"id": 3, "image_id": 1, "category_id": 1}]
    problems = Problems()
    samples, _ = read_coco(coco_file(tmp_path, annotations=annotations), problems)
    np.testing.assert_array_equal(samples[0].boxes, [[10.5, 4.0, 20.0, 30.25], [3, 2, 9, 12]])
    assert problems.counts["malformed label line"] == 1 and "annotation id 3" in problems.places["malformed label line"][0]


def test_image_root_found_beside_annotations_folder_and_size_read_when_absent(tmp_path):
    make_image(tmp_path / "images" / "x.png", 40, 30)
    data = {"images": [{"id": 3, "file_name": "x.png"}],
            "annotations": [ann(1, image_id=3, bbox=(30, 20, 30, 30))], "categories": [{"id": 1, "name": "a"}]}
    problems = Problems()
    samples, _ = read_coco(write_json(tmp_path / "annotations" / "train.json", data), problems)
    assert samples[0].image == (tmp_path / "images" / "x.png").resolve()
    np.testing.assert_array_equal(samples[0].boxes, [[30, 20, 40, 30]])  # clipped to the file's 40x30
    assert problems.counts["box partly outside image"] == 1


def test_instance_dataset_gives_masks_per_instance(tmp_path):
    polygon = [[10, 10, 30, 10, 30, 30, 10, 30]]
    annotations = [ann(1, bbox=(10, 10, 20, 20), segmentation=polygon),
                   ann(2, bbox=(3, 2, 6, 10), segmentation=rle_of(48, 64, 2, 12, 3, 9)),
                   ann(3, bbox=(40, 5, 10, 10))]
    samples, classes = read_coco(coco_file(tmp_path, annotations=annotations), Problems())
    dataset = VisionDataset(samples, classes, "instance")
    image, target = dataset[0]
    assert image.shape == (3, 48, 64)
    assert target["masks"].shape == (3, 48, 64) and target["boxes"].shape == (3, 4)
    assert int(target["masks"][1].sum()) == 60 and int(target["masks"][2].sum()) == 100
    _, background = dataset[1]
    assert background["masks"].shape == (0, 48, 64)


def test_reading_does_not_modify_user_files(tmp_path):
    json_path = coco_file(tmp_path, annotations=[ann(1, bbox=(50, 40, 30, 30)), ann(1), ann(2, category_id=9)])
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    samples, classes = read_coco(json_path, Problems())
    VisionDataset(samples, classes, "instance")[0]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
