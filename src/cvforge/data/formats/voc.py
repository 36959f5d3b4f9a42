"""Pascal VOC: one XML file per image for boxes, one palette PNG per image for semantic masks.

Layout (``root`` is the folder that holds these, e.g. ``VOCdevkit/VOC2012``)::

    Annotations/<id>.xml                 boxes, class names, difficult flags, image size
    JPEGImages/<id>.jpg                  images
    ImageSets/Main/<split>.txt           ids of a detection split, one per line
    ImageSets/Segmentation/<split>.txt   ids of a segmentation split
    SegmentationClass/<id>.png           palette PNG: index = class id, 0 background, 255 border/ignore

Coordinates: VOC boxes are 1-based *inclusive* pixel indices (a box covering the image's first
pixel column is ``xmin=1, xmax=1``). cvforge boxes are 0-based pixel *edges* (that column is
``x1=0, x2=1``), so reading maps ``(xmin, ymin, xmax, ymax) -> (xmin - 1, ymin - 1, xmax, ymax)`` and
writing does the inverse; integer boxes survive a write -> read round trip exactly.

XML is parsed with ``defusedxml``: entity declarations (the "billion laughs" expansion) and
external references are refused, so an annotation file cannot exhaust memory or read other files.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # writing only; every parse goes through defusedxml
from dataclasses import dataclass, field
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np
from PIL import Image

from cvforge.data.dataset import Sample, clean_boxes, per_box_flags
from cvforge.data.io import IMAGE_SUFFIXES, image_size, place_file, resolve_inside, write_text_atomically
from cvforge.data.problems import Problems
from cvforge.errors import DataError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
_COORDS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class _Object:
    name: str
    box: list[float]  # VOC coordinates: 1-based, inclusive
    difficult: bool
    where: str  # file:line of its <object> element


@dataclass
class _Annotation:
    path: Path
    filename: str | None
    size: tuple[int, int] | None  # (width, height) when the XML states a usable one
    objects: list[_Object] = field(default_factory=list)
    exists: bool = True  # False: the id is listed but Annotations/<id>.xml is missing


# ---------------------------------------------------------------------------------------------- reading

def read_voc(root: Path, split: str, problems: Problems, classes: list[str] | None = None,
             task: str = "detect") -> tuple[list[Sample], list[str]]:
    """Read one split of a VOC data set.

    detect / instance: ids come from ``ImageSets/Main/<split>.txt``; when that file is missing but
    ``Annotations/`` exists, every ``Annotations/*.xml`` (sorted by name) is used, whatever the split,
    so ``train`` and ``val`` are then the same images. Boxes are converted from VOC's 1-based inclusive
    coordinates (module docstring); ``difficult`` is kept in ``Sample.difficult``, ``truncated`` ignored.
    Classes: the given list, else ``VOC_CLASSES`` when every name found is one of them, else the sorted
    names found in this split's XMLs (read ``val`` with ``train``'s classes so that ids agree).
    VOC has no instance masks in its XMLs, so for ``instance`` each box is used as its mask (reported).

    segment: ids from ``ImageSets/Segmentation/<split>.txt`` (else every ``SegmentationClass/*.png``);
    ``Sample.mask`` is ``SegmentationClass/<id>.png``; classes default to ``["background"] + VOC_CLASSES``.

    Returns ``(samples, classes)``; ``Sample.image_id`` is the id's index in the split list.
    Raises DataError for a missing split, a malformed or refused XML file (with ``file:line:col``).
    """
    root = Path(root)
    if task == "segment":
        return _read_segmentation(root, split, problems, classes)
    ids = _split_ids(root, Path("ImageSets/Main") / f"{split}.txt", "Annotations", ".xml")
    found: list[tuple[int, str, _Annotation]] = []
    seen: set[str] = set()
    for index, (where, stem) in enumerate(ids):
        if stem in seen:
            problems.add("duplicate image id", f"{where} ({stem})")
            continue
        seen.add(stem)
        xml = resolve_inside(root, f"Annotations/{stem}.xml")
        if xml is None:
            problems.add("path escapes data root", f"{where} ({stem})")
        elif xml.is_file():
            found.append((index, stem, parse_annotation(xml, problems)))
        else:  # listed but not annotated: a background image if the image is there
            found.append((index, stem, _Annotation(xml, None, None, exists=False)))
    names = [obj.name for _, _, annotation in found for obj in annotation.objects]
    classes = _choose_classes(classes, names)
    samples = [_to_sample(root, index, stem, annotation, classes, problems, task)
               for index, stem, annotation in found]
    return [s for s in samples if s is not None], classes


def _split_ids(root: Path, split_file: Path, folder: str, suffix: str) -> list[tuple[str, str]]:
    """``(where, id)`` per listed id: from the split file, else every ``folder/*suffix`` (sorted)."""
    path = root / split_file
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DataError("split file is not UTF-8 text", path, "save it as one image id per line") from None
        # Class-specific split files carry a second column (1 / -1 / 0); the id is the first token.
        return [(f"{path}:{n}", line.split()[0]) for n, line in enumerate(lines, 1) if line.strip()]
    if (root / folder).is_dir():
        return [(str(p), p.stem) for p in sorted((root / folder).glob(f"*{suffix}"))]
    raise DataError(f"no split file {split_file} and no {folder}/ folder", root,
                    f"point to a VOC root (with {folder}/ and {split_file.parent}/) or list the ids in {split_file}")


def parse_annotation(path: Path, problems: Problems) -> _Annotation:
    """One VOC XML file -> filename, size and objects (in VOC coordinates).

    Objects without a name or a numeric ``bndbox`` are reported (``malformed label line``) and dropped.
    """
    data = path.read_bytes()
    try:
        tree = SafeET.fromstring(data)
    except defusedxml.DefusedXmlException as e:
        raise DataError(f"XML refused: it declares entities or external references ({e})", path,
                        "remove the <!DOCTYPE>/<!ENTITY> declarations; VOC annotations need none") from None
    except SafeET.ParseError as e:
        line, column = e.position
        reason = str(e).split(": line")[0]
        raise DataError(f"malformed XML: {reason}", f"{path}:{line}:{column + 1}", "fix the XML syntax") from None
    elements = tree.findall("object")
    lines = _object_lines(data, len(elements))
    annotation = _Annotation(path, (tree.findtext("filename") or "").strip() or None, _xml_size(tree))
    for element, line in zip(elements, lines):
        where = f"{path}:{line}" if line else f"{path} (object {len(annotation.objects) + 1})"
        obj = _parse_object(element, where)
        if obj is None:
            problems.add("malformed label line", f"{where} (object without a name or a numeric bndbox)")
        else:
            annotation.objects.append(obj)
    return annotation


def _parse_object(element, where: str) -> _Object | None:
    name = (element.findtext("name") or "").strip()
    box = element.find("bndbox")
    if not name or box is None:
        return None
    try:
        coords = [float(box.findtext(key)) for key in _COORDS]
    except (TypeError, ValueError):  # a missing or non-numeric coordinate
        return None
    difficult = (element.findtext("difficult") or "0").strip().lower() in ("1", "true", "yes")
    return _Object(name, coords, difficult, where)


def _object_lines(data: bytes, count: int) -> list[int | None]:
    """Line number of each ``<object>`` element; ElementTree keeps none, so find them in the text.
    Falls back to no line numbers if the text count disagrees (e.g. ``<object`` inside a comment)."""
    starts = [m.start() for m in re.finditer(rb"<object[\s>]", data)]
    if len(starts) != count:
        return [None] * count
    return [data.count(b"\n", 0, start) + 1 for start in starts]


def _xml_size(tree) -> tuple[int, int] | None:
    try:
        width, height = int(float(tree.findtext("size/width"))), int(float(tree.findtext("size/height")))
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None  # some tools write 0 x 0


def _choose_classes(classes: list[str] | None, names: list[str]) -> list[str]:
    if classes is not None:
        return list(classes)
    if set(names) <= set(VOC_CLASSES):
        return list(VOC_CLASSES)
    return sorted(set(names))


def _to_sample(root: Path, index: int, stem: str, annotation: _Annotation, classes: list[str],
               problems: Problems, task: str) -> Sample | None:
    """Image path, size and cleaned boxes of one annotation; None (reported) if unusable."""
    image = _find_image(root, annotation.filename, stem)
    where = str(annotation.path)
    if image is None:
        problems.add("path escapes data root", f"{where} (filename {annotation.filename or stem!r})")
        return None
    if not image.is_file():
        problems.add("missing image", f"{where} ({image.name})")
        return None
    if not annotation.exists:
        problems.add("image without label file", f"{where} is missing")
    try:
        width, height = annotation.size or image_size(image)
    except (DataError, OSError):  # OSError: a header PIL cannot even open (e.g. truncated JPEG)
        problems.add("unreadable image", str(image))
        return None
    index_of = {name: i for i, name in enumerate(classes)}
    objects = []
    for obj in annotation.objects:
        if obj.name in index_of:
            objects.append(obj)
        else:
            problems.add("unknown class id", f"{obj.where} (class {obj.name!r} is not in the class list)")
    boxes = np.array([[o.box[0] - 1, o.box[1] - 1, o.box[2], o.box[3]] for o in objects],
                     dtype=np.float32).reshape(-1, 4)
    labels = np.array([index_of[o.name] for o in objects], dtype=np.int64)
    difficult = np.array([o.difficult for o in objects], dtype=bool)
    keep = clean_boxes(boxes, labels, width, height, len(classes), [o.where for o in objects], problems)
    if task == "instance" and keep.any():
        problems.add("instance without segmentation", where, count=int(keep.sum()))
    return Sample(image=image, image_id=index, boxes=boxes[keep], labels=labels[keep],
                  iscrowd=np.zeros(int(keep.sum()), dtype=bool), difficult=difficult[keep])


def _find_image(root: Path, filename: str | None, stem: str) -> Path | None:
    """``JPEGImages/<filename>``, else ``JPEGImages/<stem>.<any image suffix>`` that exists.

    Returns None if a name escapes the data root, else a path (the first candidate when none exists).
    """
    names = ([filename] if filename else []) + [stem + suffix for suffix in IMAGE_SUFFIXES]
    first = None
    for name in names:
        path = resolve_inside(root, str(Path("JPEGImages") / name))
        if path is None:
            return None
        if path.is_file():
            return path
        first = first or path
    return first


def _read_segmentation(root: Path, split: str, problems: Problems,
                       classes: list[str] | None) -> tuple[list[Sample], list[str]]:
    classes = list(classes) if classes is not None else ["background"] + VOC_CLASSES
    ids = _split_ids(root, Path("ImageSets/Segmentation") / f"{split}.txt", "SegmentationClass", ".png")
    samples, seen = [], set()
    for index, (where, stem) in enumerate(ids):
        if stem in seen:
            problems.add("duplicate image id", f"{where} ({stem})")
            continue
        seen.add(stem)
        image, mask = _find_image(root, None, stem), resolve_inside(root, f"SegmentationClass/{stem}.png")
        if image is None or mask is None:
            problems.add("path escapes data root", f"{where} ({stem})")
        elif not image.is_file():
            problems.add("missing image", f"{where} ({image.name})")
        elif not mask.is_file():
            problems.add("mask missing", f"{where} (expected {mask})")
        else:
            samples.append(Sample(image=image, image_id=index, mask=mask))
    return samples, classes


# ---------------------------------------------------------------------------------------------- writing

def write_voc(samples: list[Sample], classes: list[str], root: Path, split: str) -> None:
    """Write samples as a VOC split under ``root`` (images hard-linked, or copied across file systems).

    Writes ``JPEGImages/<stem><suffix>``, ``Annotations/<stem>.xml`` (1-based inclusive coordinates,
    ``difficult``, size; crowd boxes are written as difficult, VOC's "not counted" flag) and
    ``ImageSets/Main/<split>.txt``; samples with a ``mask`` also get ``SegmentationClass/<stem>.png`` and
    ``ImageSets/Segmentation/<split>.txt``. Two samples with the same file stem get ``<stem>_<n>``.
    Raises DataError if a split file already exists (a split is never appended to) or if a file to write
    exists with different contents.
    """
    root = Path(root)
    split_files = [root / "ImageSets/Main" / f"{split}.txt"]
    if any(s.mask is not None for s in samples):
        split_files.append(root / "ImageSets/Segmentation" / f"{split}.txt")
    for path in split_files:
        if path.exists():
            raise DataError("split file already exists", path,
                            "write to a new folder or delete the file; cvforge never appends to a split")
    stems = _unique_stems(samples)
    for sample, stem in zip(samples, stems):
        image = place_file(sample.image, root / "JPEGImages" / f"{stem}{sample.image.suffix}")
        _write_new_text(root / "Annotations" / f"{stem}.xml", annotation_xml(sample, classes, image))
        if sample.mask is not None:
            _place_mask(sample.mask, root / "SegmentationClass" / f"{stem}.png")
    _write_new_text(split_files[0], "".join(f"{stem}\n" for stem in stems))
    if len(split_files) > 1:
        masked = [stem for sample, stem in zip(samples, stems) if sample.mask is not None]
        _write_new_text(split_files[1], "".join(f"{stem}\n" for stem in masked))


def annotation_xml(sample: Sample, classes: list[str], image: Path) -> str:
    """The VOC XML text of one sample whose image file is ``image``."""
    width, height = image_size(image)
    tree = ET.Element("annotation")
    ET.SubElement(tree, "folder").text = "JPEGImages"
    ET.SubElement(tree, "filename").text = image.name
    size = ET.SubElement(tree, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(tree, "segmented").text = "1" if sample.mask is not None else "0"
    difficult = per_box_flags(sample.difficult, len(sample.boxes)) | per_box_flags(sample.iscrowd, len(sample.boxes))
    for box, label, hard in zip(sample.boxes, sample.labels, difficult):
        obj = ET.SubElement(tree, "object")
        ET.SubElement(obj, "name").text = classes[int(label)]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if hard else "0"
        bndbox = ET.SubElement(obj, "bndbox")
        voc_box = (box[0] + 1, box[1] + 1, box[2], box[3])  # back to 1-based inclusive
        for key, value in zip(_COORDS, voc_box):
            ET.SubElement(bndbox, key).text = _number(float(value))
    ET.indent(tree)
    return ET.tostring(tree, encoding="unicode") + "\n"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(round(value, 3))


def _unique_stems(samples: list[Sample]) -> list[str]:
    stems, used = [], set()
    for sample in samples:
        stem, n = sample.image.stem, 1
        while stem in used:
            stem, n = f"{sample.image.stem}_{n}", n + 1
        used.add(stem)
        stems.append(stem)
    return stems


def _write_new_text(path: Path, text: str) -> None:
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            return
        raise DataError("a different file already exists", path, "write to an empty folder")
    try:
        write_text_atomically(path, text, replace=False)
    except FileExistsError:
        raise DataError("a different file already exists", path, "write to an empty folder") from None


def _place_mask(source: Path, dest: Path) -> None:
    if source.suffix.lower() == ".png":
        place_file(source, dest)
        return
    with Image.open(source) as image:  # e.g. a TIFF mask: re-encode as the PNG that VOC expects
        write_palette_mask(np.asarray(image), dest)


def voc_palette() -> list[int]:
    """The standard VOC colour map: 256 colours as 768 ints ``[r0, g0, b0, r1, ...]``.

    Class ``i``'s colour spreads the bits of ``i`` over the channels, most significant first, so that
    neighbouring ids get distinct colours: 1 -> (128, 0, 0), 2 -> (0, 128, 0), 255 -> (224, 224, 192).
    """
    palette = []
    for index in range(256):
        rgb, value = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette += rgb
    return palette


def write_palette_mask(mask: np.ndarray, path: Path) -> None:
    """Write a class-index mask (integers 0..255, [H, W]) as a palette PNG with the VOC colours."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"expected an [H, W] mask of class ids 0..255, got shape {mask.shape}")
    pixels = np.ascontiguousarray(mask, dtype=np.uint8)
    image = Image.frombytes("P", (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    image.putpalette(voc_palette())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
