"""Reading images safely: every bad file gives a DataError that names it; odd modes convert, not clip."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cvforge.data import io as cio
from cvforge.errors import DataError


def _save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode=mode).save(path, **kwargs) if mode else Image.fromarray(array).save(path, **kwargs)
    return path


def test_rgb_png_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    image = cio.read_image(_save(tmp_path / "a.png", pixels))
    assert image.dtype.is_floating_point is False and tuple(image.shape) == (3, 20, 30)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_modes_become_rgb(tmp_path, mode):
    base = Image.new("RGB", (16, 12), (200, 50, 25))
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    base.convert(mode).save(path)
    image = cio.read_image(path)
    assert tuple(image.shape) == (3, 12, 16)


def test_rgba_transparent_pixels_are_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    image = cio.read_image(_save(tmp_path / "t.png", rgba, mode="RGBA"))
    assert image[:, 0, 0].tolist() == [255, 255, 255]


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = cio.read_image(path)
    assert image[0, 0].tolist() == [0, 100, 255]  # clipping would give [0, 255, 255]


def test_exif_rotation_is_applied(tmp_path):
    # Stored 40 wide x 20 high with a red left half; orientation 6 means "rotate 90° clockwise to view".
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[cio.EXIF_ORIENTATION] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = cio.read_image(path)
    assert tuple(image.shape) == (3, 40, 20)  # upright: 20 wide, 40 high
    assert cio.image_size(path) == (20, 40)
    assert image[0, 5, 10] > 200 and image[0, 35, 10] < 60  # red half is now on top


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty") as e:
        cio.read_image(tmp_path / "empty.jpg")
    assert "empty.jpg" in str(e.value)


def test_non_image_with_image_name(tmp_path):
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(DataError, match="not a readable image"):
        cio.read_image(tmp_path / "notes.png")


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as e:
        cio.read_image(tmp_path / "cut.jpg")
    assert "cut.jpg" in str(e.value)


def test_missing_image(tmp_path):
    with pytest.raises(DataError, match="not found"):
        cio.read_image(tmp_path / "nope.jpg")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    # A real bomb is a tiny PNG that claims enormous dimensions; a small limit stands in for the real one.
    Image.new("L", (300, 300)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(cio, "MAX_PIXELS", 300 * 300 - 1)
    with pytest.raises(DataError, match="decompression bomb"):
        cio.read_image(tmp_path / "bomb.png")


def test_pil_bomb_limit_is_refused(tmp_path, monkeypatch):
    Image.new("L", (200, 200)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # PIL warns above, errors above twice this
    with pytest.raises(DataError, match="decompression bomb"):
        cio.read_image(tmp_path / "bomb.png")


def test_malformed_json_names_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DataError, match=r"bad\.json:2:\d+"):
        cio.load_json(tmp_path / "bad.json")


def test_malformed_yaml_names_line(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [a, b\ntrain: images\n")
    with pytest.raises(DataError, match=r"data\.yaml:\d+:\d+"):
        cio.load_yaml(tmp_path / "data.yaml")


def test_resolve_inside_refuses_escapes(tmp_path):
    assert cio.resolve_inside(tmp_path, "a/b.jpg") == (tmp_path / "a" / "b.jpg").resolve()
    assert cio.resolve_inside(tmp_path, "../outside.jpg") is None
    assert cio.resolve_inside(tmp_path, "/etc/passwd") is None
