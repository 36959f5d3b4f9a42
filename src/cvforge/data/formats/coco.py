"""COCO instances JSON <-> ``Sample`` records.

A COCO file has three lists: ``images`` ({id, file_name, width, height}), ``categories`` ({id, name})
and ``annotations`` ({id, image_id, category_id, bbox [x, y, w, h], segmentation, iscrowd}).
Category ids are arbitrary integers (COCO itself skips some); cvforge maps them to 0..C-1 in
ascending id order. Segmentations are polygons (lists of flat [x0, y0, x1, y1, ...] pixel lists)
or run-length encodings (RLE dicts, ``counts`` either a compressed string or a list of run lengths);
both are kept as they are and rasterised only when a mask is asked for (``dataset.rasterize``).

Bad entries are counted in ``Problems`` with ``<file>: annotation id <id>`` and skipped; only a file
that is not COCO at all (missing top-level lists, categories without id or name) raises DataError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from cvforge.data.dataset import Sample, clean_boxes
from cvforge.data.io import image_size, load_json, resolve_inside, write_text_atomically
from cvforge.data.problems import Problems
from cvforge.errors import DataError

TOP_LEVEL = ("images", "annotations", "categories")


@dataclass
class _Image:
    path: Path
    width: int
    height: int


@dataclass
class _Instance:
    box: list[float]  # XYXY pixels, not yet cleaned
    label: int
    crowd: bool
    segment: Any  # list of flat polygons, an RLE dict, or None
    where: str


# ---------------------------------------------------------------------------------------------- reading

def read_coco(json_path: Path, problems: Problems,
              image_root: Path | None = None) -> tuple[list[Sample], list[str]]:
    """Parse a COCO instances JSON.

    image_root: folder that ``file_name`` is relative to; None looks in the JSON's folder, its
    ``images/`` subfolder and ``../images`` (the first that holds the first image).
    Returns (samples sorted by COCO image id, class names ordered by category id). Each sample has
    boxes float32 [N, 4] XYXY pixels, labels int64 [N], iscrowd bool [N], segments (N entries:
    polygon list, RLE dict or None) and image_id = the COCO image id.
    """
    json_path = Path(json_path)
    data = load_json(json_path)
    images, annotations, categories = _top_level(data, json_path)
    category_index, classes = _categories(categories, json_path)
    root = Path(image_root) if image_root is not None else _find_image_root(json_path, images)
    entries, skipped = _read_images(images, json_path, root, problems)
    instances = _read_annotations(annotations, entries, skipped, category_index, json_path, problems)
    samples = [_make_sample(image_id, entries[image_id], instances.get(image_id, []), len(classes), problems)
               for image_id in sorted(entries)]
    return samples, classes


def _top_level(data: Any, json_path: Path) -> tuple[list, list, list]:
    if not isinstance(data, dict):
        raise DataError("not a COCO annotation file (top level is not an object)", json_path,
                        'expected {"images": [...], "annotations": [...], "categories": [...]}')
    missing = [key for key in TOP_LEVEL if key not in data]
    if missing:
        raise DataError(f"COCO file has no {', '.join(repr(k) for k in missing)}", json_path,
                        "a COCO instances file needs the lists 'images', 'annotations' and 'categories'")
    for key in TOP_LEVEL:
        if not isinstance(data[key], list):
            raise DataError(f"COCO {key!r} is a {type(data[key]).__name__}, not a list", json_path,
                            f"make {key!r} a JSON list")
    return data["images"], data["annotations"], data["categories"]


def _categories(categories: list, json_path: Path) -> tuple[dict[int, int], list[str]]:
    """category id -> class index 0..C-1 (ascending id), and the class names in that order."""
    names: dict[int, str] = {}
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or "name" not in category:
            raise DataError(f"category #{i} needs an integer 'id' and a 'name'", json_path,
                            'write each category as {"id": 1, "name": "cat"}')
        if category["id"] in names:
            raise DataError(f"duplicate category id {category['id']}", json_path, "give each category its own id")
        names[category["id"]] = str(category["name"])
    ids = sorted(names)
    return {cid: index for index, cid in enumerate(ids)}, [names[cid] for cid in ids]


def _find_image_root(json_path: Path, images: list) -> Path:
    folder = json_path.parent
    candidates = (folder, folder / "images", folder.parent / "images")
    first = images[0].get("file_name") if images and isinstance(images[0], dict) else None
    if isinstance(first, str):
        for candidate in candidates:
            found = resolve_inside(candidate, first)
            if found is not None and found.is_file():
                return candidate
    return folder


def _read_images(images: list, json_path: Path, root: Path,
                 problems: Problems) -> tuple[dict[int, _Image], set[int]]:
    """COCO image id -> its file and size; plus the ids of images skipped for a reported problem
    (so that their annotations are not reported a second time as belonging to an unknown image)."""
    entries: dict[int, _Image] = {}
    skipped: set[int] = set()
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise DataError(f"image #{i} needs an integer 'id' and a string 'file_name'", json_path,
                            'write each image as {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}')
        image_id, name = image["id"], image["file_name"]
        where = f"{json_path}: image id {image_id} file_name {name!r}"
        if image_id in entries or image_id in skipped:
            problems.add("duplicate image id", where)
            continue
        entry = _image_entry(image, root, where, problems)
        if entry is None:
            skipped.add(image_id)
        else:
            entries[image_id] = entry
    return entries, skipped


def _image_entry(image: dict, root: Path, where: str, problems: Problems) -> _Image | None:
    path = resolve_inside(root, image["file_name"])
    if path is None:
        problems.add("path escapes data root", where)
        return None
    if not path.is_file():
        problems.add("missing image", f"{where} (looked for {path})")
        return None
    width, height = image.get("width"), image.get("height")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        try:
            width, height = image_size(path)
        except DataError as e:
            problems.add("unreadable image", f"{where} ({e.what})")
            return None
    return _Image(path, int(width), int(height))


def _read_annotations(annotations: list, entries: dict[int, _Image], skipped: set[int],
                      category_index: dict[int, int], json_path: Path,
                      problems: Problems) -> dict[int, list[_Instance]]:
    """image id -> its parsed instances, in file order; bad annotations are reported and dropped."""
    per_image: dict[int, list[_Instance]] = {}
    seen_ids: set = set()
    for i, ann in enumerate(annotations):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{json_path}: annotation id {ann_id}" if ann_id is not None else f"{json_path}: annotation #{i}"
        if not isinstance(ann, dict):
            problems.add("malformed label line", f"{where} (not an object)")
            continue
        if isinstance(ann_id, (int, str)):
            if ann_id in seen_ids:
                problems.add("duplicate annotation id", where)
                continue
            seen_ids.add(ann_id)
        image_id = ann.get("image_id")
        if _is_int(image_id) and image_id in skipped:
            continue  # its image was already reported
        if not _is_int(image_id) or image_id not in entries:
            problems.add("annotation for unknown image", f"{where} (image_id {image_id!r})")
            continue
        instance = _parse_annotation(ann, entries[image_id], category_index, where, problems)
        if instance is not None:
            per_image.setdefault(image_id, []).append(instance)
    return per_image


def _parse_annotation(ann: dict, image: _Image, category_index: dict[int, int], where: str,
                      problems: Problems) -> _Instance | None:
    category = ann.get("category_id")
    if not _is_int(category) or category not in category_index:
        problems.add("unknown class id", f"{where} (category_id {category!r} is not in 'categories')")
        return None
    segment = _parse_segmentation(ann.get("segmentation"), where, problems)
    box = _parse_bbox(ann.get("bbox"))
    if box is None and segment is not None:
        box = _segment_bounds(segment, image.height, image.width)
    if box is None:
        problems.add("malformed label line", f"{where} (needs 'bbox' as [x, y, w, h] or a 'segmentation')")
        return None
    return _Instance(box, category_index[category], bool(ann.get("iscrowd", 0)), segment, where)


def _parse_bbox(bbox: Any) -> list[float] | None:
    """COCO [x, y, w, h] -> [x0, y0, x1, y1]; None when absent or not four numbers."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _parse_segmentation(segmentation: Any, where: str, problems: Problems) -> Any:
    """Polygons -> list of flat float lists; RLE -> the dict as given; absent or empty -> None.
    A segmentation present but unusable is reported: the instance falls back to its box."""
    if segmentation is None or (isinstance(segmentation, list) and not segmentation):
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) for v in size)
                and isinstance(counts, (str, list))):
            return dict(segmentation)
    elif isinstance(segmentation, list):
        # Some exporters write a single polygon as a flat list of numbers.
        polygons = [segmentation] if all(_is_number(v) for v in segmentation) else segmentation
        kept = [[float(v) for v in p] for p in polygons
                if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p)]
        if kept:
            return kept
    problems.add("instance without segmentation", f"{where} (segmentation is malformed)")
    return None


def _segment_bounds(segment: Any, height: int, width: int) -> list[float] | None:
    """XYXY bounds of a segmentation: exact for polygons, from the decoded mask for an RLE."""
    if isinstance(segment, list):
        xs = [x for polygon in segment for x in polygon[0::2]]
        ys = [y for polygon in segment for y in polygon[1::2]]
        return [min(xs), min(ys), max(xs), max(ys)]
    from pycocotools import mask as mask_utils
    x, y, w, h = (float(v) for v in mask_utils.toBbox(_compressed_rle(segment)))
    return [x, y, x + w, y + h]


def _make_sample(image_id: int, image: _Image, instances: list[_Instance], num_classes: int,
                 problems: Problems) -> Sample:
    if not instances:
        return Sample(image=image.path, image_id=image_id)
    boxes = np.array([inst.box for inst in instances], dtype=np.float32).reshape(-1, 4)
    labels = np.array([inst.label for inst in instances], dtype=np.int64)
    keep = clean_boxes(boxes, labels, image.width, image.height, num_classes,
                       [inst.where for inst in instances], problems)
    return Sample(image=image.path, image_id=image_id, boxes=boxes[keep], labels=labels[keep],
                  iscrowd=np.array([inst.crowd for inst in instances], dtype=bool)[keep],
                  segments=[inst.segment for inst, k in zip(instances, keep) if k])


# ---------------------------------------------------------------------------------------------- writing

def write_coco(samples: list[Sample], classes: list[str], json_path: Path, image_root: Path) -> None:
    """Write samples as a COCO instances JSON (category ids 1..C in ``classes`` order).

    ``file_name`` is each image's path relative to ``image_root``; width and height are read from
    the image headers. Refuses to overwrite ``json_path``.
    """
    json_path, image_root = Path(json_path), Path(image_root).resolve()
    if json_path.exists():
        raise DataError("annotation file already exists", json_path, "choose a new path or delete the old file")
    images, annotations = [], []
    for sample, image_id in zip(samples, _unique_ids(samples)):
        width, height = image_size(sample.image)
        images.append({"id": image_id, "file_name": _relative_name(sample.image, image_root),
                       "width": width, "height": height})
        annotations += _annotation_entries(sample, image_id, height, width, first_id=len(annotations) + 1)
    data = {"info": {"description": "written by cvforge"}, "licenses": [], "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(classes)]}
    try:
        write_text_atomically(json_path, json.dumps(data), replace=False)
    except FileExistsError:
        raise DataError("annotation file already exists", json_path, "choose a new path or delete it") from None


def _unique_ids(samples: list[Sample]) -> list[int]:
    """The samples' own image ids when they are distinct, else 1..n (COCO ids must be unique)."""
    ids = [int(s.image_id) for s in samples]
    return ids if len(set(ids)) == len(ids) else list(range(1, len(samples) + 1))


def _relative_name(image: Path, image_root: Path) -> str:
    try:
        return Path(image).resolve().relative_to(image_root).as_posix()
    except ValueError:
        raise DataError("image is outside the image root", image,
                        f"pass an image_root that contains every image (got {image_root})") from None


def _annotation_entries(sample: Sample, image_id: int, height: int, width: int, first_id: int) -> list[dict]:
    segments = sample.segments or [None] * len(sample.boxes)
    crowd = sample.iscrowd if len(sample.iscrowd) == len(sample.boxes) else np.zeros(len(sample.boxes), bool)
    entries = []
    for i, (box, label, segment) in enumerate(zip(sample.boxes, sample.labels, segments)):
        x0, y0, x1, y1 = (float(v) for v in box)
        segmentation, area = _segmentation_entry(segment, height, width)
        entries.append({"id": first_id + i, "image_id": image_id, "category_id": int(label) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": area if area is not None else (x1 - x0) * (y1 - y0),
                        "segmentation": segmentation, "iscrowd": int(bool(crowd[i]))})
    return entries


def _segmentation_entry(segment: Any, height: int, width: int) -> tuple[Any, float | None]:
    """(COCO segmentation, mask area in pixels); ([], None) when there is no segment."""
    from pycocotools import mask as mask_utils
    if isinstance(segment, dict):
        rle = _compressed_rle(segment)
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}, \
            float(mask_utils.area(rle))
    polygons = [[float(v) for v in p] for p in (segment or []) if len(p) >= 6]
    if not polygons:
        return [], None
    area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))))
    return polygons, area


def _compressed_rle(rle: dict) -> dict:
    """An RLE dict with compressed ``counts`` as bytes, as pycocotools' functions want it."""
    from pycocotools import mask as mask_utils
    height, width = (int(v) for v in rle["size"])
    if isinstance(rle["counts"], list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": rle["counts"]}, height, width)
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return {"size": [height, width], "counts": counts}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
