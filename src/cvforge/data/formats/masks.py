"""Semantic segmentation from a folder of images and a folder of class-index mask PNGs.

Layout, with or without the split level::

    root/images/<split>/<stem>.jpg|png     root/images/<stem>.jpg|png
    root/masks/<split>/<stem>.png          root/masks/<stem>.png
    root/classes.txt                       optional: line i is the name of class id i

A mask is a grayscale or palette PNG the size of its image whose pixel values are class ids
(0 usually background) and 255 marks pixels that no loss or metric counts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cvforge.data.dataset import IGNORE, Sample, read_mask
from cvforge.data.io import place_file
from cvforge.data.io import image_size, is_image_file, load_yaml
from cvforge.data.problems import Problems
from cvforge.errors import DataError

MAX_MASKS_SCANNED = 50  # masks read to count classes when no names are given
_LAYOUT = "lay it out as <root>/images/<split>/*.jpg with <root>/masks/<split>/<stem>.png (or without <split>)"


def read_masks(root: Path, split: str, problems: Problems) -> tuple[list[Sample], list[str]]:
    """Read ``root/images/<split>`` with ``root/masks/<split>``, or ``root/images`` with ``root/masks``
    when there is no split level (then every split reads the same images).

    Class names come from ``root/classes.txt`` (line i names class id i), else from a ``names`` list (or
    ``{id: name}`` mapping) in ``root/data.yaml``, else they are ``class0 .. classK`` where K is the largest
    id (other than 255) in the first 50 masks: a class seen only in later masks would then be missing,
    so write a ``classes.txt`` for real data.
    Returns ``(samples, classes)`` with ``Sample.mask`` set and ``image_id`` the sample index; an image
    without ``<stem>.png`` in the masks folder is reported (``mask missing``) and skipped. Mask values
    and sizes are checked when a sample is loaded.
    """
    root = Path(root)
    images_dir, masks_dir = _folders(root, split)
    samples, seen = [], set()
    for image in sorted(p for p in images_dir.iterdir() if p.is_file() and is_image_file(p)):
        if image.name.startswith("."):
            continue
        if image.stem in seen:  # a.jpg and a.png would share a.png as their mask
            problems.add("duplicate image id", f"{image} (another image is also named {image.stem}.*)")
            continue
        seen.add(image.stem)
        mask = masks_dir / f"{image.stem}.png"
        if mask.is_file():
            samples.append(Sample(image=image, image_id=len(samples), mask=mask))
        else:
            problems.add("mask missing", f"{image} (expected {mask})")
    return samples, class_names(root, [s.mask for s in samples])


def _folders(root: Path, split: str) -> tuple[Path, Path]:
    """(images folder, masks folder) of the split, or of the layout without a split level."""
    if split and (root / "images" / split).is_dir():
        images, masks = root / "images" / split, root / "masks" / split
    elif (root / "images").is_dir() and any(is_image_file(p) for p in (root / "images").iterdir()):
        images, masks = root / "images", root / "masks"
    else:
        raise DataError(f"no images/{split}/ or images/ folder with images", root, _LAYOUT)
    if not masks.is_dir():
        raise DataError("masks folder not found", masks, _LAYOUT)
    return images, masks


def class_names(root: Path, masks: list[Path]) -> list[str]:
    """Names indexed by class id: ``classes.txt``, else ``data.yaml`` ``names``, else counted from masks."""
    listed = Path(root) / "classes.txt"
    if listed.is_file():
        return _read_classes_txt(listed)
    config = Path(root) / "data.yaml"
    if config.is_file():
        data = load_yaml(config)
        if isinstance(data, dict) and data.get("names") is not None:
            return _names(data["names"], config)
    return [f"class{i}" for i in range(_largest_id(masks[:MAX_MASKS_SCANNED]) + 1)]


def _read_classes_txt(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for n, name in enumerate(lines, 1):
        if not name:  # a blank line would silently shift every later class id
            raise DataError("blank class name", f"{path}:{n}", "write one class name per line, line i = class id i")
    if not lines:
        raise DataError("no class names", path, "write one class name per line, line i = class id i")
    return lines


def _names(names, path: Path) -> list[str]:
    """A list of names, or a mapping ``{0: name, 1: name, ...}`` with ids 0..K-1."""
    if isinstance(names, dict):
        try:
            ids = sorted(int(key) for key in names)
        except (TypeError, ValueError):
            ids = []
        if ids != list(range(len(names))):
            raise DataError("names must map the ids 0..K-1 to class names", path,
                            "write names as a list, or as {0: name0, 1: name1, ...}")
        return [str(names[key]) for key in sorted(names, key=int)]
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    raise DataError("names must be a non-empty list of class names", path, "write names: [background, ...]")


def _largest_id(masks: list[Path]) -> int:
    """The largest class id other than 255 in these masks (0 when there are none)."""
    largest = 0
    for path in masks:
        try:
            values = np.unique(read_mask(path, num_classes=IGNORE))
        except DataError:  # reported with the file when the sample is loaded or checked
            continue
        values = values[values != IGNORE]
        if values.size:
            largest = max(largest, int(values.max()))
    return largest


def write_masks(samples_with_arrays: list[tuple[Path, np.ndarray]], classes: list[str],
                root: Path, split: str) -> None:
    """Write ``(image file, mask)`` pairs as ``root/images/<split>/<name>`` (hard-linked or copied) and
    ``root/masks/<split>/<stem>.png`` (grayscale, uint8 class ids); writes ``root/classes.txt`` if absent.

    mask: integer [H, W] with values in 0..255 (255 = ignore), the size of its image.
    Raises DataError if a mask's size differs from its image's, two images share a stem, a file to
    write exists with different contents, or an existing ``classes.txt`` names other classes.
    """
    root = Path(root)
    _write_classes(root / "classes.txt", classes)
    images_dir, masks_dir = root / "images" / split, root / "masks" / split
    stems: set[str] = set()
    for image, mask in samples_with_arrays:
        image, mask = Path(image), np.asarray(mask)
        if image.stem in stems:
            raise DataError("two images share a file stem, so they would share a mask", image, "rename one")
        stems.add(image.stem)
        _check_mask(mask, image)
        place_file(image, images_dir / image.name)
        _write_gray(mask, masks_dir / f"{image.stem}.png")


def _write_classes(path: Path, classes: list[str]) -> None:
    if path.is_file():
        if _read_classes_txt(path) != list(classes):
            raise DataError("classes.txt already exists with other classes", path,
                            "write to a new folder, or pass the same class list")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")


def _check_mask(mask: np.ndarray, image: Path) -> None:
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"mask must be an integer [H, W] array, got {mask.dtype} {mask.shape}", image,
                        "pass one class id per pixel")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise DataError(f"mask values must be 0..255, got {mask.min()}..{mask.max()}", image,
                        "use class ids below 255 and 255 for ignored pixels")
    width, height = image_size(image)
    if mask.shape != (height, width):
        raise DataError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}", image,
                        "make the mask the image's size")


def _write_gray(mask: np.ndarray, path: Path) -> None:
    encoded = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # 2-D uint8 -> mode "L"
    if path.exists():
        with Image.open(path) as existing:
            if np.array_equal(np.asarray(existing), np.asarray(encoded)):
                return
        raise DataError("a different file already exists", path, "write to an empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded.save(path)
