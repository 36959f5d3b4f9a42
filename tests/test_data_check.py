"""`cvforge data check` names every problem planted in a broken data set, and finds none in good data."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from cvforge.cli import main


def _jpeg(path, size=(48, 40), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _broken_coco(root):
    (root / "images").mkdir(parents=True)
    for i in range(1, 4):
        _jpeg(root / "images" / f"ok{i}.jpg", seed=i)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "images" / "truncated.jpg").write_bytes(buffer.getvalue()[:100])
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "text.jpg").write_text("not an image")
    images = [{"id": i, "file_name": f"ok{i}.jpg", "width": 48, "height": 40} for i in range(1, 4)]
    images += [{"id": 4, "file_name": "truncated.jpg", "width": 48, "height": 40},
               {"id": 5, "file_name": "empty.jpg", "width": 48, "height": 40},
               {"id": 6, "file_name": "text.jpg", "width": 48, "height": 40},
               {"id": 7, "file_name": "../../etc/passwd", "width": 48, "height": 40},
               {"id": 1, "file_name": "ok2.jpg", "width": 48, "height": 40}]        # duplicate image id
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10]},      # fine
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [40, 30, 20, 20]},    # partly outside: clipped
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [5, 5, 0, 10]},       # zero width
        {"id": 4, "image_id": 2, "category_id": 5, "bbox": [float("nan"), 5, 4, 4]},
        {"id": 5, "image_id": 3, "category_id": 99, "bbox": [1, 1, 5, 5]},       # unknown class
        {"id": 5, "image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5]},        # duplicate annotation id
        {"id": 6, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5]},       # unknown image
    ]
    categories = [{"id": 5, "name": "b"}, {"id": 3, "name": "a"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                      "categories": categories}))
    return root / "instances.json"


EXPECTED = ["unreadable image", "box partly outside image", "box of zero or negative size",
            "non-finite box coordinates", "unknown class id", "duplicate image id", "duplicate annotation id",
            "annotation for unknown image", "path escapes data root"]


def test_check_names_every_planted_problem(tmp_path, capsys):
    spec = _broken_coco(tmp_path / "broken")
    before = {p: p.read_bytes() for p in (tmp_path / "broken").rglob("*") if p.is_file()}
    assert main(["data", "check", str(spec)]) == 1
    out = capsys.readouterr().out
    for kind in EXPECTED:
        assert kind in out, kind
    for name in ("truncated.jpg", "empty.jpg", "text.jpg", "instances.json"):
        assert name in out
    assert before == {p: p.read_bytes() for p in (tmp_path / "broken").rglob("*") if p.is_file()}


def test_broken_yolo_labels_are_reported_with_file_and_line(tmp_path, capsys):
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i in range(3):
        _jpeg(root / "images" / "train" / f"{i}.jpg", seed=i)
    (root / "labels" / "train" / "0.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 oops 0.2 0.2\n")
    (root / "labels" / "train" / "1.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [a, b]\n")
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "malformed label line" in out and "0.txt:2" in out
    assert "unknown class id" in out and "1.txt:1" in out
    assert "image without label file" in out  # 2.jpg: a background image, reported as info


def test_bad_spec_is_one_line_error_with_status_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvforge: error: data not found") and "\n" not in err
    (tmp_path / "bad.json").write_text("{oops")
    assert main(["data", "stats", str(tmp_path / "bad.json")]) == 2
    assert "bad.json:1:2" in capsys.readouterr().err


def test_builtin_data_has_no_problems(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path))
    assert main(["data", "check", "shapes:train=16,val=8,size=64"]) == 0
    assert "no problems found" in capsys.readouterr().out
