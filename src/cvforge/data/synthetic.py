"""The built-in ``shapes`` data set (DESIGN §5).

Procedurally drawn shapes on textured backgrounds, deterministic from a seed: image ``index`` of
``split`` is drawn by a ``numpy.random.Generator`` seeded with ``(seed, split, index)`` alone, so any
image can be regenerated on its own and two generations are byte-identical. The set is written in
the standard formats and read back through the same readers as a user's data:

    images/{train,val}/00000.jpg            RGB JPEG, quality 95
    labels/{split}/00000.txt, data.yaml     YOLO polygons (``formats.yolo.write_yolo``)
    annotations/instances_{split}.json      COCO (``formats.coco.write_coco``), file_name "train/00000.jpg"
    masks/{split}/00000.png, classes.txt    grayscale class-index PNGs: 0 background, class id + 1
    crops/{split}/{class}/00000_0.png       64 px crops of instances at least 70 % visible (ImageFolder)
    README.txt, shapes.json                 what this is and its parameters; shapes.json is written last

Each image: a textured background (colour gradient, low-frequency noise, random lines and blobs as
clutter), then 0-6 shapes drawn in order, later ones occluding earlier ones. A placement is retried
when it would leave an earlier shape less than 40 % visible, cut it into slivers or punch a hole in
it (COCO/YOLO polygons cannot hold holes), so that every instance's visible mask is exactly the union
of its polygons. About 5 % of the images are background only.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cvforge.data.dataset import Sample
from cvforge.data.formats.coco import write_coco
from cvforge.data.formats.yolo import write_yolo
from cvforge.errors import DataError

SHAPES_VERSION = 1
# Sorted by name: ImageFolder numbers classes by sorted folder name, so every format agrees on ids.
SHAPES_CLASSES = ("circle", "cross", "square", "star", "triangle")
SPLITS = ("train", "val")

BACKGROUND_RATE = 0.05   # share of images without shapes
MAX_SHAPES = 6
SIZE_RANGE = (0.10, 0.45)  # a shape's outer diameter, as a share of the image side
MIN_VISIBLE = 0.4        # every instance keeps at least this share of its pixels
CROP_VISIBLE = 0.7       # instances at least this visible get a classification crop
CROP_SIZE = 64
MIN_PIECE_AREA = 4.0     # contour area (px^2) below which a piece of a mask is a sliver
PLACEMENT_TRIES = 20
MIN_CONTRAST = 70.0      # RGB distance between a shape and what lies under it
SENSOR_NOISE = 3.0
JPEG_QUALITY = 95
MIN_SIZE = 32


def _unit_outline(label: str) -> np.ndarray:
    """Vertices [K, 2] of a shape of outer radius 1 centred on the origin."""
    if label == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if label == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if label == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if label == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    w = 0.3  # cross: a plus sign whose arms are 0.6 wide
    arm = np.array([[w, 1], [w, w], [1, w]])
    quarters = [arm @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) for a in -np.arange(4) * np.pi / 2]
    points = np.concatenate(quarters)
    return points / np.linalg.norm(points, axis=1).max()


UNIT_OUTLINES = {name: _unit_outline(name) for name in SHAPES_CLASSES}


@dataclass
class Instance:
    """One drawn shape: ``label`` class id, ``mask`` its visible pixels bool [H, W], ``full_area`` its
    pixel count before anything occluded it, ``colour`` float [3] RGB."""

    label: int
    mask: np.ndarray
    full_area: int
    colour: np.ndarray

    @property
    def visible_fraction(self) -> float:
        return float(self.mask.sum()) / max(self.full_area, 1)

    def box(self) -> np.ndarray:
        """float32 [4] XYXY pixel edges tight around the visible pixels."""
        ys, xs = np.nonzero(self.mask)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


# ---------------------------------------------------------------------------------------------- drawing

def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of ``split``: independent of every other image."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def shape_mask(label: int, centre: np.ndarray, radius: float, angle: float, size: int) -> np.ndarray:
    """bool [size, size]: the pixels of a shape of class ``label`` (outer radius in pixels)."""
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    points = UNIT_OUTLINES[SHAPES_CLASSES[label]] @ rotation * radius + centre
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(canvas, dtype=bool)


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """The outer contours of a mask as flat [x0, y0, x1, y1, ...] pixel lists (drawn with
    ``ImageDraw.polygon`` they give the mask back); slivers below ``MIN_PIECE_AREA`` are dropped."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours
            if len(c) >= 3 and cv2.contourArea(c) >= MIN_PIECE_AREA]


def is_clean(mask: np.ndarray) -> bool:
    """True when the mask has no hole and no sliver, so that its polygons describe it exactly."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return False
    if (hierarchy[0][:, 3] >= 0).any():  # a contour with a parent is a hole
        return False
    return all(len(c) >= 3 and cv2.contourArea(c) >= MIN_PIECE_AREA for c in contours)


def _keeps_visible(instance: Instance, occluder: np.ndarray) -> bool:
    if not (instance.mask & occluder).any():
        return True
    rest = instance.mask & ~occluder
    return rest.sum() >= MIN_VISIBLE * instance.full_area and is_clean(rest)


def place_shape(rng: np.random.Generator, size: int, label: int, instances: list[Instance]) -> np.ndarray | None:
    """A random placement of one shape (bool mask [H, W]) that leaves every earlier instance at least
    ``MIN_VISIBLE`` visible, in one piece or in clean pieces and without holes; None if none was found."""
    for _ in range(PLACEMENT_TRIES):
        radius = max(rng.uniform(*SIZE_RANGE) * size / 2, 3.0)
        centre = rng.uniform(radius, size - radius, 2)
        mask = shape_mask(label, centre, radius, rng.uniform(0, 2 * np.pi), size)
        if is_clean(mask) and all(_keeps_visible(inst, mask) for inst in instances):
            return mask
    return None


def _ramp(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [H, W] linear ramp from 0 to 1 in a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    grid = np.arange(size, dtype=np.float32) / max(size - 1, 1)
    ramp = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]
    return (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """float32 [H, W, 3] noise with about ``cells`` blobs per side (a random grid upsampled)."""
    grid = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) * amplitude


def _clutter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Random lines and irregular blobs blended into the background, so that a detector has to tell
    shapes from other edges and regions."""
    size = image.shape[0]
    base = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    drawn = base.copy()
    draw = ImageDraw.Draw(drawn)
    for _ in range(rng.integers(0, 5)):
        ends = rng.uniform(-0.2, 1.2, 4) * size
        draw.line([float(v) for v in ends], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(0, 4)):
        k = int(rng.integers(7, 13))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(0.5, 1.0, k) * rng.uniform(0.04, 0.15) * size
        aspect = rng.uniform(0.4, 1.0)
        centre = rng.uniform(0, size, 2)
        points = np.stack([radii * np.cos(angles), aspect * radii * np.sin(angles)], 1) + centre
        draw.polygon([(float(x), float(y)) for x, y in points], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    blended = Image.blend(base, drawn, float(rng.uniform(0.4, 0.9)))
    return np.asarray(blended, dtype=np.float32)


def draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] RGB in 0..255: gradient + two octaves of smooth noise + clutter."""
    start, end = rng.uniform(20, 235, (2, 3)).astype(np.float32)
    image = start + _ramp(rng, size)[..., None] * (end - start)
    image += _smooth_noise(rng, size, int(rng.integers(2, 6)), rng.uniform(8, 30))
    image += _smooth_noise(rng, size, int(rng.integers(8, 17)), rng.uniform(2, 10))
    return _clutter(rng, image)


def _pick_colour(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                 instances: list[Instance]) -> np.ndarray:
    """A random colour that stands out from the background and from the shapes it covers."""
    below = [image[mask].mean(0)] + [inst.colour for inst in instances if (inst.mask & mask).any()]
    colour = rng.uniform(0, 255, 3)
    for _ in range(10):
        if min(np.linalg.norm(colour - b) for b in below) >= MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def draw_shapes_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Instance]]:
    """One image of the set: uint8 [size, size, 3] RGB and its instances in drawing order, each with
    its final visible mask (instances are disjoint; their union is every shape pixel)."""
    image = draw_background(rng, size)
    count = 0 if rng.random() < BACKGROUND_RATE else int(rng.integers(1, MAX_SHAPES + 1))
    instances: list[Instance] = []
    for _ in range(count):
        label = int(rng.integers(len(SHAPES_CLASSES)))
        mask = place_shape(rng, size, label, instances)
        if mask is None:
            continue
        colour = _pick_colour(rng, image, mask, instances)
        shading = (_ramp(rng, size)[mask] - 0.5) * rng.uniform(0, 50)  # shapes are not flat paint
        image[mask] = colour + shading[:, None]
        for inst in instances:
            inst.mask = inst.mask & ~mask
        instances.append(Instance(label, mask, int(mask.sum()), colour))
    image += rng.normal(0, SENSOR_NOISE, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), instances


def semantic_mask(instances: list[Instance], size: int) -> np.ndarray:
    """uint8 [size, size]: 0 background, class id + 1 where a shape is visible (painted in drawing
    order so that occluders win, although visible masks are already disjoint)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for inst in instances:
        mask[inst.mask] = inst.label + 1
    return mask


def crop_instance(image: np.ndarray, box: np.ndarray, out_size: int = CROP_SIZE) -> Image.Image:
    """A square crop around ``box`` with some context, moved inside the image, resized to ``out_size``."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    side = int(min(round(max(x1 - x0, y1 - y0) * 1.25 + 4), width, height))
    left = int(np.clip(round((x0 + x1 - side) / 2), 0, width - side))
    top = int(np.clip(round((y0 + y1 - side) / 2), 0, height - side))
    crop = Image.fromarray(image[top:top + side, left:left + side])
    return crop.resize((out_size, out_size), Image.BILINEAR)


# ---------------------------------------------------------------------------------------------- writing

def _save_image(out: Path, split: str, index: int, image: np.ndarray, instances: list[Instance]) -> Sample:
    """Write the image, its semantic mask and its crops; return its record for the annotation writers."""
    stem = f"{index:05d}"
    image_path, mask_path = out / "images" / split / f"{stem}.jpg", out / "masks" / split / f"{stem}.png"
    Image.fromarray(image).save(image_path, quality=JPEG_QUALITY)
    Image.fromarray(semantic_mask(instances, image.shape[0])).save(mask_path)
    boxes = np.stack([inst.box() for inst in instances]) if instances else np.zeros((0, 4), np.float32)
    for k, (inst, box) in enumerate(zip(instances, boxes)):
        if inst.visible_fraction >= CROP_VISIBLE:
            crop_instance(image, box).save(out / "crops" / split / SHAPES_CLASSES[inst.label] / f"{stem}_{k}.png")
    return Sample(image=image_path, image_id=index, boxes=boxes.astype(np.float32),
                  labels=np.array([inst.label for inst in instances], dtype=np.int64),
                  segments=[mask_polygons(inst.mask) for inst in instances], mask=mask_path)


def _make_folders(out: Path) -> None:
    for split in SPLITS:
        for sub in ("images", "masks"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)
        for name in SHAPES_CLASSES:  # every class has a folder, so ImageFolder ids never shift
            (out / "crops" / split / name).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{n}\n" for n in ("background", *SHAPES_CLASSES)), encoding="utf-8")


def _write_split(out: Path, split: str, count: int, size: int, seed: int, progress: bool) -> list[Sample]:
    samples = []
    for index in tqdm(range(count), desc=f"shapes {split}", unit="img", disable=not progress, leave=False):
        image, instances = draw_shapes_image(image_rng(seed, split, index), size)
        samples.append(_save_image(out, split, index, image, instances))
    write_yolo(samples, list(SHAPES_CLASSES), out, split)
    write_coco(samples, list(SHAPES_CLASSES), out / "annotations" / f"instances_{split}.json", out / "images")
    return samples


def _parameters(train: int, val: int, size: int, seed: int) -> dict:
    return {"name": "shapes", "version": SHAPES_VERSION, "seed": seed, "train": train, "val": val,
            "size": size, "classes": list(SHAPES_CLASSES)}


def _readme(params: dict) -> str:
    return (f"cvforge built-in 'shapes' data set, version {params['version']}.\n"
            f"Generated by cvforge.data.synthetic.make_shapes(train={params['train']}, val={params['val']}, "
            f"size={params['size']}, seed={params['seed']}); regenerating gives the same bytes.\n"
            f"Classes (ids 0..{len(SHAPES_CLASSES) - 1}): {', '.join(SHAPES_CLASSES)}.\n\n"
            "images/<split>/*.jpg                 the images\n"
            "data.yaml, labels/<split>/*.txt      YOLO labels (polygons)\n"
            "annotations/instances_<split>.json   COCO boxes and polygons\n"
            "masks/<split>/*.png, classes.txt     semantic masks: 0 background, class id + 1\n"
            "crops/<split>/<class>/*.png          classification crops (ImageFolder layout)\n"
            "shapes.json                          these parameters; written last, marks a complete folder\n")


def _check_options(train: int, val: int, size: int, seed: int) -> None:
    for name, value, low in (("train", train, 0), ("val", val, 0), ("size", size, MIN_SIZE), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"shapes option {name}={value!r} is invalid", None, f"pass an integer >= {low}")


def make_shapes(out: Path, *, train: int = 512, val: int = 128, size: int = 128, seed: int = 0,
                progress: bool = True) -> Path:
    """Generate the shapes data set into ``out`` (created; must be empty or absent). Returns ``out``.

    ``train``/``val``: number of images per split; ``size``: image side in pixels.
    """
    out = Path(out)
    _check_options(train, val, size, seed)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder for the shapes data set is not empty", out,
                        "choose a new folder or delete this one")
    _make_folders(out)
    params = _parameters(train, val, size, seed)
    (out / "README.txt").write_text(_readme(params), encoding="utf-8")
    for split, count in zip(SPLITS, (train, val)):
        _write_split(out, split, count, size, seed, progress)
    (out / "shapes.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------- cache

def shapes_cache_dir() -> Path:
    """Where generated data sets live: ``$CVFORGE_HOME/datasets``, else ``~/.cache/cvforge/datasets``."""
    home = os.environ.get("CVFORGE_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "cvforge"
    return base / "datasets"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) across processes."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the atomic rename alone still keeps readers safe
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / "shapes.json").is_file()


def ensure_shapes(*, train: int = 512, val: int = 128, size: int = 128, seed: int = 0,
                  progress: bool = True) -> Path:
    """The cached shapes folder for these parameters, generated on first use.

    Generation goes to a temporary sibling that is renamed into place only when complete, under a
    file lock, so that concurrent processes (DDP ranks, parallel tests) generate it once and nobody
    ever sees a half-written folder.
    """
    _check_options(train, val, size, seed)
    cache = shapes_cache_dir()
    name = f"shapes-v{SHAPES_VERSION}-{train}-{val}-{size}-{seed}"
    final = cache / name
    if _is_complete(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{name}.lock"):
        if _is_complete(final):  # another process made it while we waited
            return final
        for stale in cache.glob(f".{name}.tmp-*"):  # left by a crash; we hold the lock, nobody writes them
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not complete (made by hand or damaged): regenerate
            shutil.rmtree(final)
        tmp = cache / f".{name}.tmp-{os.getpid()}"
        try:
            make_shapes(tmp, train=train, val=val, size=size, seed=seed, progress=progress)
        except BaseException:  # interrupted or failed: leave nothing half-written behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, final)
    return final
