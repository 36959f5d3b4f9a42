"""ImageFolder: classification labels given by folder names.

Layout, with or without the split level::

    root/<split>/<class>/<image>        e.g. root/train/cat/001.jpg, root/val/dog/7.png
    root/<class>/<image>                one folder of classes used for every split

Class ids are the indices of the sorted class folder names, as in ``torchvision.datasets.ImageFolder``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cvforge.data.dataset import Sample
from cvforge.data.io import is_image_file
from cvforge.data.problems import Problems
from cvforge.errors import DataError

_LAYOUT = "lay it out as <root>/<split>/<class>/<image> or <root>/<class>/<image>"


def read_imagefolder(root: Path, split: str, problems: Problems) -> tuple[list[Sample], list[str]]:
    """Read ``root/<split>`` if it exists, else ``root`` itself when it holds class folders with images
    (then every split reads the same images).

    Classes are the sorted names of the class folders (hidden ones such as ``.ipynb_checkpoints`` are
    skipped); an empty class folder is still a class, so that ids stay the same across splits.
    Images in nested folders below a class folder belong to that class; non-image files, and images
    lying directly in the split folder (they have no class), are ignored.
    Returns ``(samples, classes)`` with ``Sample.label`` the class id and ``image_id`` the sample index.
    Raises DataError when there are no class folders. ``problems`` is unused: folder names cannot be
    malformed, and images are checked when they are decoded.
    """
    root = Path(root)
    folder = _split_folder(root, split)
    classes = sorted(p.name for p in _subfolders(folder))
    if not classes:
        raise DataError("no class folders", folder, _LAYOUT)
    samples = []
    for label, name in enumerate(classes):
        for image in sorted(p for p in (folder / name).rglob("*") if _is_visible_image(p, folder)):
            samples.append(Sample(image=image, image_id=len(samples), label=label))
    return samples, classes


def _split_folder(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise DataError("data folder not found", root, "check the path")
    if split and (root / split).is_dir():
        return root / split
    if any(_has_images(sub) for sub in _subfolders(root)):
        return root
    raise DataError(f"no {split!r} folder and no class folders with images", root, _LAYOUT)


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _has_images(folder: Path) -> bool:
    """Images directly inside: a split folder such as ``train/`` holds class folders, not images."""
    return any(p.is_file() and is_image_file(p) for p in folder.iterdir())


def _is_visible_image(path: Path, top: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(top).parts)
    return not hidden and path.is_file() and is_image_file(path)


def write_imagefolder(images: list[tuple[np.ndarray | Image.Image, int]], classes: list[str],
                      root: Path, split: str) -> None:
    """Write ``(image, class id)`` pairs as ``root/<split>/<class>/<index:05d>.png``.

    image: uint8 [H, W, 3] or [H, W] array, or a PIL image; index is the pair's position in ``images``.
    Every class gets a folder, even one without images, so that reading gives back the same ids.
    Raises DataError if ``root/<split>`` already holds files (a split is never appended to).
    """
    folder = Path(root) / split
    if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
        raise DataError("split folder is not empty", folder, "write to a new folder or delete this one")
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(images):
        if not 0 <= label < len(classes):
            raise ValueError(f"class id {label} of image {index} is outside 0..{len(classes) - 1}")
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        image.save(folder / classes[label] / f"{index:05d}.png")
