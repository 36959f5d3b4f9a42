"""Data: one entry point from a ``--data`` SPEC to a Dataset of ``(image, target)`` samples.

``build_dataset(spec, split, task)`` finds the format of SPEC (DESIGN §4), runs that format's
reader (``data/formats/``) and wraps its records in one ``VisionDataset``. SPEC is one of:

- ``shapes``: the built-in data set (generated on first use, then read like any user's data);
- a data YAML: YOLO's ``data.yaml``, or any YAML with ``format: coco|voc|yolo|masks|imagefolder``;
- a COCO JSON file, or a folder with ``annotations/instances_<split>.json``;
- a Pascal VOC root (``Annotations/``, ``JPEGImages/``, ``ImageSets/``);
- a folder with ``data.yaml`` (YOLO), ``images/`` + ``masks/`` (semantic masks) or class
  sub-folders (ImageFolder, optionally under ``train/`` and ``val/``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cvforge.config import DETECTION_TASKS, TASKS
from cvforge.data.dataset import Sample, VisionDataset
from cvforge.data.io import is_image_file, load_yaml
from cvforge.data.problems import Problems
from cvforge.errors import DataError

FORMATS = ("shapes", "coco", "voc", "yolo", "masks", "imagefolder")
# Which tasks each format's annotations can serve, the first being its default.
FORMAT_TASKS = {
    "shapes": ("detect", "instance", "segment", "classify"),
    "coco": ("detect", "instance", "segment"),
    "voc": ("detect", "segment"),
    "yolo": ("detect", "instance", "segment"),
    "masks": ("segment",),
    "imagefolder": ("classify",),
}
FORMATS_HELP = "see the README's 'Data formats' section, or name it with `format:` in a data YAML"

__all__ = ["DataSource", "build_dataset", "resolve", "Sample", "VisionDataset", "Problems"]


@dataclass(frozen=True)
class DataSource:
    """A resolved SPEC: its format, its root path and the YAML's settings (if any)."""

    format: str
    path: Path
    options: dict

    def default_task(self) -> str:
        return FORMAT_TASKS[self.format][0]


def resolve(spec: str | Path) -> DataSource:
    """Find the format of a ``--data`` SPEC without reading its annotations."""
    text = str(spec)
    if text == "shapes" or text.startswith("shapes:"):
        return DataSource("shapes", Path(text), _shapes_options(text))
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError("data not found", path, "pass `shapes`, a data YAML, a COCO JSON or a data folder")
    if path.is_file():
        return _resolve_file(path)
    return _resolve_folder(path)


def _shapes_options(text: str) -> dict:
    """``shapes:train=256,val=64,size=96`` -> {"train": 256, ...} (all ints)."""
    options = {}
    for item in filter(None, text.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        if key not in ("train", "val", "size", "seed") or not value.isdigit():
            raise DataError(f"bad built-in data option {item!r}", text,
                            "use shapes:train=N,val=M,size=S,seed=K")
        options[key] = int(value)
    return options


def _resolve_file(path: Path) -> DataSource:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return DataSource("coco", path, {})
    if suffix in (".yaml", ".yml"):
        options = load_yaml(path)
        if not isinstance(options, dict):
            raise DataError("data YAML must be a mapping of keys", path, "see the README's data YAML example")
        fmt = options.get("format", "yolo")
        if fmt not in FORMATS[1:]:
            raise DataError(f"unknown format {fmt!r}", path, f"use one of {', '.join(FORMATS[1:])}")
        return DataSource(fmt, path, options)
    raise DataError("cannot tell the data format of this file", path, FORMATS_HELP)


def _resolve_folder(path: Path) -> DataSource:
    if (path / "Annotations").is_dir() or (path / "SegmentationClass").is_dir():
        return DataSource("voc", path, {})
    if (path / "data.yaml").is_file():
        return _resolve_file(path / "data.yaml")
    if (path / "annotations").is_dir() and any((path / "annotations").glob("*.json")):
        return DataSource("coco", path, {})
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return DataSource("masks", path, {})
    if any(p.is_dir() and any(is_image_file(f) for f in p.rglob("*")) for p in path.iterdir()):
        return DataSource("imagefolder", path, {})
    raise DataError("cannot tell the data format of this folder", path, FORMATS_HELP)


def build_dataset(spec: str | Path | DataSource, split: str = "train", task: str | None = None, *,
                  transforms: Callable | None = None, problems: Problems | None = None) -> VisionDataset:
    """The Dataset of one split of SPEC for a task (default: the format's natural task).

    Annotation problems are counted in ``dataset.problems`` (see ``cvforge data check``).
    """
    source = spec if isinstance(spec, DataSource) else resolve(spec)
    task = task or source.default_task()
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}", None, f"use one of {', '.join(TASKS)}")
    if task not in FORMAT_TASKS[source.format]:
        raise DataError(f"{source.format} data has no annotations for task {task!r}", source.path,
                        f"use --task {' or '.join(FORMAT_TASKS[source.format])}")
    problems = problems if problems is not None else Problems()
    samples, classes = _read(source, split, task, problems)
    if task == "segment" and source.format in ("coco", "yolo"):
        classes = ["background", *classes]  # instance annotations painted as class id + 1
    return VisionDataset(samples, classes, task, transforms=transforms, source=str(source.path),
                         fmt=source.format, problems=problems)


def _read(source: DataSource, split: str, task: str, problems: Problems) -> tuple[list[Sample], list[str]]:
    """Dispatch to the format's reader (imported here so that each reader stays optional)."""
    fmt, path, options = source.format, source.path, source.options
    if fmt == "shapes":
        return _read_shapes(options, split, task, problems)
    if fmt == "coco":
        from cvforge.data.formats.coco import read_coco
        json_path, image_root = _coco_split(source, split)
        return read_coco(json_path, problems, image_root=image_root)
    if fmt == "yolo":
        from cvforge.data.formats.yolo import read_yolo
        return read_yolo(path, split, problems)
    root = _yaml_root(source) if path.is_file() else path
    if fmt == "voc":
        from cvforge.data.formats.voc import read_voc
        names = options.get("names")
        if names and task == "segment" and names[0] != "background":
            names = ["background", *names]  # VOC masks: index 0 is background
        return read_voc(root, split, problems, classes=names, task=task)
    if fmt == "masks":
        from cvforge.data.formats.masks import read_masks
        return read_masks(root, split, problems)
    from cvforge.data.formats.imagefolder import read_imagefolder
    return read_imagefolder(root, split, problems)


def _yaml_root(source: DataSource) -> Path:
    """A data YAML's ``path`` key, relative to the YAML's folder (default: that folder)."""
    return (source.path.parent / str(source.options.get("path", "."))).resolve()


def _coco_split(source: DataSource, split: str) -> tuple[Path, Path | None]:
    """(annotation JSON, image root or None) of a COCO SPEC's split."""
    if source.path.suffix.lower() == ".json":
        return source.path, None  # one file is one split, whatever split was asked for
    if source.path.is_file():  # data YAML: `train: annotations/train.json`, optional `images: ...`
        root = _yaml_root(source)
        if split not in source.options:
            raise DataError(f"data YAML has no {split!r} key", source.path, f"add `{split}: <annotations JSON>`")
        images = source.options.get("images")
        return root / str(source.options[split]), (root / str(images)) if images else None
    candidates = sorted((source.path / "annotations").glob(f"*{split}*.json"))
    if not candidates:
        raise DataError(f"no annotation JSON for split {split!r}", source.path / "annotations",
                        f"name it instances_{split}.json")
    return candidates[0], None


def _read_shapes(options: dict, split: str, task: str, problems: Problems) -> tuple[list[Sample], list[str]]:
    """The built-in data set, read back through the same readers as a user's data."""
    from cvforge.data.synthetic import ensure_shapes
    root = ensure_shapes(**options)
    if task in DETECTION_TASKS:
        from cvforge.data.formats.coco import read_coco
        return read_coco(root / "annotations" / f"instances_{split}.json", problems)
    if task == "segment":
        from cvforge.data.formats.masks import read_masks
        return read_masks(root, split, problems)
    from cvforge.data.formats.imagefolder import read_imagefolder
    return read_imagefolder(root / "crops", split, problems)


def splits_of(source: DataSource) -> list[str]:
    """The splits a SPEC has, for commands that look at all of them (``data check``)."""
    fmt, path, options = source.format, source.path, source.options
    if fmt == "shapes":
        return ["train", "val"]
    if fmt == "coco" and path.suffix.lower() == ".json":
        return ["all"]
    if fmt in ("yolo",) or (path.is_file() and fmt != "yolo"):
        present = [s for s in ("train", "val", "test") if s in options]
        return present or ["train"]
    if fmt == "coco":
        return [s for s in ("train", "val", "test") if list((path / "annotations").glob(f"*{s}*.json"))]
    if fmt == "voc":
        names = {p.stem for p in path.glob("ImageSets/*/*.txt")}
        return [s for s in ("train", "val", "trainval", "test") if s in names] or ["train"]
    if fmt == "masks":
        return [s for s in ("train", "val", "test") if (path / "images" / s).is_dir()] or ["all"]
    return [s for s in ("train", "val", "test") if (path / s).is_dir()] or ["all"]
