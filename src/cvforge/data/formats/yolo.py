"""YOLO txt labels and their data YAML <-> ``Sample`` records.

Layout: a data YAML names the root (``path``), the splits (``train: images/train``: a folder of
images, a .txt file listing image paths, or a list of those) and the class ``names``. Each image
``.../images/<x>.jpg`` has a label file ``.../labels/<x>.txt`` with one object per line, coordinates
normalised to 0..1 by the image's width and height:

    <class> <cx> <cy> <w> <h>              a box (centre and size)
    <class> <x1> <y1> <x2> <y2> ... <xn> <yn>   a polygon of n >= 3 points (instance segmentation)

A missing label file means an image without objects (reported as info); an empty one is silent.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cvforge.data.dataset import Sample, clean_boxes
from cvforge.data.io import (image_size, is_image_file, load_yaml, place_file, resolve_inside, same_file,
                             write_text_atomically)
from cvforge.data.problems import Problems
from cvforge.errors import DataError

DATA_YAML = "data.yaml"


# ---------------------------------------------------------------------------------------------- reading

def read_yolo(yaml_path: Path, split: str, problems: Problems) -> tuple[list[Sample], list[str]]:
    """Parse one split of a YOLO data set.

    Returns (samples in sorted image-path order, class names). Each sample has boxes float32 [N, 4]
    XYXY pixels of the upright image, labels int64 [N], image_id = its index in that order, and
    segments: [] when the split has no polygon line at all, else N entries (a one-polygon list for a
    polygon line, None for a box line).
    """
    yaml_path = Path(yaml_path)
    config = load_yaml(yaml_path)
    if not isinstance(config, dict):
        raise DataError("data YAML is not a mapping", yaml_path,
                        "write keys such as 'path', 'train', 'val' and 'names'")
    classes = _names(config, yaml_path)
    images = _split_images(config, split, _root(config, yaml_path), yaml_path, problems)
    parsed = [(i, _read_labels(image, len(classes), problems)) for i, image in enumerate(images)]
    parsed = [(i, objects) for i, objects in parsed if objects is not None]
    any_polygon = any(p is not None for _, objects in parsed for p in objects[2])
    samples = [Sample(image=images[i], image_id=i, boxes=boxes, labels=labels,
                      segments=list(polygons) if any_polygon else [])
               for i, (boxes, labels, polygons) in parsed]
    return samples, classes


def _names(config: dict, yaml_path: Path) -> list[str]:
    """Class names in id order, from a list or a {id: name} mapping with keys 0..C-1."""
    names = config.get("names")
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            by_id = {}
        if not by_id or sorted(by_id) != list(range(len(names))):
            raise DataError(f"'names' keys must be the class ids 0..{len(names) - 1}, got {list(names)}",
                            yaml_path, "number the classes 0, 1, 2, ... without gaps")
        names = [by_id[i] for i in range(len(by_id))]
    if not isinstance(names, list) or not names:
        raise DataError("data YAML needs 'names', the class names in class-id order", yaml_path,
                        "add e.g. 'names: [cat, dog]' or 'names: {0: cat, 1: dog}'")
    nc = config.get("nc")
    if nc is not None and nc != len(names):
        raise DataError(f"'nc' is {nc} but 'names' lists {len(names)} classes", yaml_path,
                        "make them agree or remove 'nc'")
    return [str(n) for n in names]


def _root(config: dict, yaml_path: Path) -> Path:
    raw = config.get("path")
    root = yaml_path.parent if raw in (None, "") else Path(str(raw)).expanduser()
    # Resolved, so that an image reached through a folder and through a .txt list is one image.
    root = (root if root.is_absolute() else yaml_path.parent / root).resolve()
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder", yaml_path,
                        "set 'path' to the data set folder (relative paths start at the YAML's folder)")
    return root


def _split_images(config: dict, split: str, root: Path, yaml_path: Path, problems: Problems) -> list[Path]:
    """Every image of the split, sorted, without duplicates."""
    entries = config.get(split)
    if entries is None:
        raise DataError(f"data YAML has no {split!r} split", yaml_path,
                        f"add '{split}: images/{split}' (a folder, a .txt list of images, or a list of those)")
    found: set[Path] = set()
    for entry in entries if isinstance(entries, list) else [entries]:
        path = root / str(entry)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if is_image_file(p) and p.is_file())
        elif path.is_file() and path.suffix.lower() == ".txt":
            found.update(_listed_images(path, root, problems))
        elif path.is_file() and is_image_file(path):
            found.add(path)
        else:
            raise DataError(f"{split!r} entry {entry!r} not found (looked for {path})", yaml_path,
                            "point it at a folder of images or a .txt file listing them, relative to 'path'")
    return sorted(found)


def _listed_images(list_file: Path, root: Path, problems: Problems) -> list[Path]:
    """Images named in a split .txt file, one per line, relative to the file's folder."""
    images, list_file = [], list_file.resolve()
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        name, where = line.strip(), f"{list_file}:{line_no}"
        if not name:
            continue
        path = resolve_inside(root, str(list_file.parent / name)) or resolve_inside(list_file.parent, name)
        if path is None:
            problems.add("path escapes data root", f"{where} ({name})")
        elif not is_image_file(path):
            problems.add("malformed label line", f"{where} (not an image file: {name})")
        elif not path.is_file():
            problems.add("missing image", f"{where} ({path})")
        else:
            images.append(path)
    return images


def label_path(image: Path) -> Path:
    """``.../images/a/b.jpg`` -> ``.../labels/a/b.txt`` (the last ``images`` component); an image with
    no ``images`` folder above it has its label file beside it."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_labels(image: Path, num_classes: int,
                 problems: Problems) -> tuple[np.ndarray, np.ndarray, list] | None:
    """(boxes float32 [N, 4], labels int64 [N], N polygons or None) of one image, cleaned;
    None when the image cannot be read (reported)."""
    labels_file = label_path(image)
    if not labels_file.is_file():
        problems.add("image without label file", f"{image} (no {labels_file})")
        return _empty()
    rows = _parse_label_file(labels_file, problems)
    if not rows:
        return _empty()
    try:
        width, height = image_size(image)
    except DataError as e:
        problems.add("unreadable image", f"{image} ({e.what})")
        return None
    return _to_pixels(rows, width, height, num_classes, problems)


def _empty() -> tuple[np.ndarray, np.ndarray, list]:
    return np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.int64), []


def _parse_label_file(path: Path, problems: Problems) -> list[tuple[str, int, list[float]]]:
    """(place, class id, normalised coordinates) per usable line: 4 coordinates for a box,
    an even number >= 6 for a polygon."""
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        tokens, where = line.split(), f"{path}:{line_no}"
        if not tokens:
            continue
        try:
            label, values = float(tokens[0]), [float(t) for t in tokens[1:]]
        except ValueError:
            problems.add("malformed label line", f"{where} (not numbers: {line.strip()[:60]!r})")
            continue
        if (not (len(values) == 4 or (len(values) >= 6 and len(values) % 2 == 0))
                or not math.isfinite(label) or label != int(label)):
            problems.add("malformed label line",
                         f"{where} (expected 'class cx cy w h' or 'class x1 y1 ... xn yn' with n >= 3 and an "
                         f"integer class, got {len(tokens)} values: {line.strip()[:60]!r})")
            continue
        rows.append((where, int(label), values))
    return rows


def _to_pixels(rows: list[tuple[str, int, list[float]]], width: int, height: int, num_classes: int,
               problems: Problems) -> tuple[np.ndarray, np.ndarray, list]:
    """Normalised rows -> cleaned pixel boxes, labels and polygons (clipped to the image)."""
    boxes, polygons = [], []
    for _, _, values in rows:
        if len(values) == 4:
            cx, cy, w, h = values
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            polygons.append(None)
        else:
            # Normalised coordinates carry 6 decimals; rounding to 1/1000 px puts integer vertices back on the
            # integer, so that a polygon rasterises to the mask it was written from.
            xs, ys = np.round(np.array(values[0::2]) * width, 3), np.round(np.array(values[1::2]) * height, 3)
            # The box is the polygon's raw bounds, so that clean_boxes reports points outside the image.
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            flat = np.stack([np.clip(xs, 0, width), np.clip(ys, 0, height)], axis=1).reshape(-1)
            polygons.append([[float(v) for v in flat]])
    boxes_px = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.array([label for _, label, _ in rows], dtype=np.int64)
    keep = clean_boxes(boxes_px, labels, width, height, num_classes, [where for where, _, _ in rows], problems)
    return boxes_px[keep], labels[keep], [p for p, k in zip(polygons, keep) if k]


# ---------------------------------------------------------------------------------------------- writing

def write_yolo(samples: list[Sample], classes: list[str], root: Path, split: str) -> Path:
    """Write samples as a YOLO split under ``root``: images (hard-linked, or copied) in
    ``images/<split>/``, labels in ``labels/<split>/``, and ``data.yaml`` created or updated with the
    split. A box whose segment is a polygon is written as a polygon line, anything else as a box line.
    Never overwrites a label file or a different image. Returns the data.yaml path.
    """
    root = Path(root)
    config = _existing_config(root, classes)
    plan = _plan(samples, root / "images" / split, root / "labels" / split)
    for sample, image_dst, label_dst in plan:
        if not image_dst.exists():
            place_file(sample.image, image_dst)
        width, height = image_size(sample.image)
        try:
            write_text_atomically(label_dst, "".join(line + "\n" for line in _label_lines(sample, width, height)),
                                  replace=False)
        except FileExistsError:
            raise DataError("label file already exists", label_dst, "write to a new root or split") from None
    config.update({"path": ".", "names": list(classes), split: f"images/{split}"})
    if "nc" in config:
        config["nc"] = len(classes)
    yaml_path = root / DATA_YAML
    write_text_atomically(yaml_path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True), replace=True)
    return yaml_path


def _existing_config(root: Path, classes: list[str]) -> dict[str, Any]:
    """The data.yaml already in ``root`` (checked to agree with ``classes``), or an empty one."""
    path = root / DATA_YAML
    if not path.exists():
        return {}
    config = load_yaml(path) or {}
    if not isinstance(config, dict):
        raise DataError("existing data YAML is not a mapping", path, "write to a new root or delete it")
    if "names" in config and _names(config, path) != list(classes):
        raise DataError("existing data YAML lists other class names", path,
                        "write to a new root, or write samples with the same classes")
    if config.get("path") not in (None, "", ".") and _root(config, path).resolve() != root.resolve():
        raise DataError("existing data YAML points at another root", path, "write to a new root")
    return config


def _plan(samples: list[Sample], image_dir: Path, label_dir: Path) -> list[tuple[Sample, Path, Path]]:
    """(sample, image destination, label destination) for each sample, checked before anything is
    written: names made unique within the split, no label file or different image overwritten."""
    taken: set[str] = set()
    plan = []
    for sample in samples:
        source = Path(sample.image)
        stem, k = source.stem, 1
        while stem in taken:
            stem, k = f"{source.stem}_{k}", k + 1
        taken.add(stem)
        image_dst, label_dst = image_dir / f"{stem}{source.suffix}", label_dir / f"{stem}.txt"
        if label_dst.exists():
            raise DataError("label file already exists", label_dst,
                            "write to a new root or split, or delete the old labels")
        if image_dst.exists() and not same_file(source, image_dst):
            raise DataError("a different image already exists", image_dst, "write to a new root or split")
        plan.append((sample, image_dst, label_dst))
    return plan


def _label_lines(sample: Sample, width: int, height: int) -> list[str]:
    """One line per box: a polygon line when its segment has a polygon, else a box line (6 decimals)."""
    segments = sample.segments or [None] * len(sample.boxes)
    size = np.array([width, height, width, height], dtype=np.float64)
    lines = []
    for box, label, segment in zip(sample.boxes, sample.labels, segments):
        polygon = _one_polygon(segment)
        if polygon is not None:
            points = np.clip(np.asarray(polygon, dtype=np.float64).reshape(-1, 2) / size[:2], 0, 1)
            values = points.reshape(-1)
        else:
            x0, y0, x1, y1 = np.clip(np.asarray(box, dtype=np.float64) / size, 0, 1)
            values = np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        lines.append(f"{int(label)} " + " ".join(f"{v:.6f}" for v in values))
    return lines


def _one_polygon(segment: Any) -> list[float] | None:
    """One YOLO polygon for an instance: its polygon, or its parts joined into one outline by a
    zero-width bridge between them (YOLO has one polygon per object); None for an RLE or no segment."""
    if not isinstance(segment, list):
        return None
    polygons = [list(p) for p in segment if len(p) >= 6]
    if not polygons:
        return None
    if len(polygons) == 1:
        return polygons[0]
    # Walk each part round to its start, jump to the next part's start, and at the end come back
    # through the same starts in reverse: every bridge is walked both ways and encloses no area.
    joined: list[float] = []
    for p in polygons:
        joined += p + p[:2]
    for p in polygons[-2:0:-1]:
        joined += p[:2]
    return joined


