"""Reading images safely.

Every reader goes through ``read_image`` so that every format treats bad files the same way:
EXIF orientation is applied (annotations refer to the upright image, as every labelling tool shows
it), any PIL mode becomes 8-bit RGB (16-bit images are rescaled, not clipped), decompression bombs
are refused, and unreadable files raise a ``DataError`` that names the file.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors

from cvforge.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 64_000_000  # far above any training image; a bomb decodes to gigabytes
EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _open(path: Path) -> Image.Image:
    """Open lazily (header only) and refuse what cannot or should not be decoded."""
    if not path.is_file():
        raise DataError("image not found", path, "check the path in your annotations")
    if path.stat().st_size == 0:
        raise DataError("image file is empty (0 bytes)", path, "re-export or remove the image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (OSError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise _decode_error(path, e) from None  # UnidentifiedImageError is an OSError too
    if image.width * image.height > MAX_PIXELS:
        raise DataError(f"image is {image.width}x{image.height} pixels, refused as a possible decompression bomb",
                        path, f"resize it below {MAX_PIXELS:,} pixels")
    return image


def _decode_error(path: Path, error: Exception) -> DataError:
    if isinstance(error, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return DataError("image refused as a possible decompression bomb", path, "resize or remove the image")
    if isinstance(error, UnidentifiedImageError):
        return DataError("not a readable image", path, "replace it with a valid JPEG/PNG or remove it")
    return DataError(f"image is corrupt or truncated ({error})", path, "re-export or remove the image")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]. High bit depths are rescaled to 0..255, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.max() <= 1.0 else 255.0
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels show as white, as an image viewer would show them.
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path) -> tv_tensors.Image:
    """Decode an image file.

    Returns:
        uint8 ``tv_tensors.Image`` [3, H, W] in the upright (EXIF-applied) orientation.
    Raises:
        DataError: missing, empty, corrupt, truncated, non-image or oversized file.
    """
    path = Path(path)
    image = _open(path)
    try:
        with image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            pixels = _to_rgb(upright)
    except (OSError, SyntaxError, ValueError) as e:
        raise _decode_error(path, e) from None
    return tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header only."""
    image = _open(Path(path))
    with image:
        w, h = image.size
        if exif_orientation(image) in _SWAPS_AXES:
            w, h = h, w
    return w, h


def exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1


def verify_image(path: str | Path) -> tuple[int, int]:
    """Fully decode an image (as ``data check`` does); returns its upright (width, height)."""
    image = read_image(path)
    return int(image.shape[-1]), int(image.shape[-2])


def load_json(path: str | Path):
    """Parse a JSON file; malformed JSON raises a DataError naming the file, line and column."""
    import json
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError("file not found", path, "check the path") from None
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg}", f"{path}:{e.lineno}:{e.colno}", "fix the JSON syntax") from None
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 text file", path, "save the file as UTF-8 JSON") from None


def load_yaml(path: str | Path):
    """Parse a YAML file safely; malformed YAML raises a DataError naming the file, line and column."""
    import yaml
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise DataError("file not found", path, "check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or "syntax error"
        raise DataError(f"malformed YAML: {problem}", where, "fix the YAML syntax") from None


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` if it stays inside ``root`` (no ``../`` or absolute escape), else None.

    A data set's annotation file must not make cvforge read files elsewhere on the machine.
    """
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    return candidate if candidate == root or root in candidate.parents else None


def same_file(a: Path, b: Path) -> bool:
    """True if the two paths are one file or hold the same bytes."""
    import filecmp
    import os
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def place_file(source: Path, dest: Path) -> Path:
    """Hard-link ``source`` to ``dest`` (copy where linking fails); an identical ``dest`` is kept.

    Raises DataError if ``dest`` exists with different contents: a writer never overwrites a file.
    """
    import os
    import shutil
    source, dest = Path(source), Path(dest)
    if dest.exists():
        if same_file(source, dest):
            return dest
        raise DataError("a different file already exists", dest, "write to an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:  # another file system, or links not supported
        shutil.copy2(source, dest)
    return dest


def write_text_atomically(path: str | Path, text: str, *, replace: bool) -> None:
    """Write ``text`` through a temporary file in the same folder (flushed and fsynced), so a reader
    never sees half a file. ``replace=False`` refuses a path that exists, even one that appears while
    writing (``FileExistsError``): writers of a user's data never overwrite."""
    import os
    import tempfile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # unlike os.replace, fails if path exists
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if path.exists():
                raise FileExistsError(path) from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
