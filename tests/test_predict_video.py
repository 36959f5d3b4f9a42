"""`cvforge predict` on videos (video.py): an annotated video of the same size and frame rate, and per
frame the YOLO txt and COCO-results rows that images get."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from _checkpoints import save_as_checkpoint
from PIL import Image

from cvforge.cli import main
from cvforge.zoo import build_model

CLASSES = ["disc", "bar", "star"]
FRAMES, FPS, WIDTH, HEIGHT = 5, 12, 80, 48


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained yolo-n whose class scores are spread around 0.3 (some boxes drawn, some not)."""
    torch.manual_seed(0)
    model = build_model("yolo-n", task="detect", num_classes=len(CLASSES), imgsz=64).eval()
    for branch in model.head.cls:
        torch.nn.init.normal_(branch[-1].weight, std=0.05)
        torch.nn.init.constant_(branch[-1].bias, -1.0)
    path = tmp_path_factory.mktemp("video") / "best.pt"
    return save_as_checkpoint(path, model, CLASSES, imgsz=64)


def write_clip(path):
    """FRAMES frames of coloured noise with a red block moving right (red: a BGR / RGB mix-up shows)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(FRAMES):
        frame = rng.integers(0, 120, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        frame[10:30, 8 + 10 * i: 28 + 10 * i] = (0, 0, 255)  # BGR
        writer.write(frame)
    writer.release()
    return path


def test_predict_a_folder_with_a_video_and_an_image(weights, tmp_path, capsys):
    source = tmp_path / "media"
    source.mkdir()
    clip = write_clip(source / "clip.avi")
    ok, first = cv2.VideoCapture(str(clip)).read()
    Image.fromarray(first[:, :, ::-1]).save(source / "first.png")  # frame 0 as the model should see it
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(weights), str(source), "--out", str(out), "--device", "cpu"]) == 0
    assert "predict clip.avi" in capsys.readouterr().err  # the tqdm bar over frames

    annotated = cv2.VideoCapture(str(out / "videos" / "clip.mp4"))
    assert annotated.get(cv2.CAP_PROP_FPS) == FPS
    assert (annotated.get(cv2.CAP_PROP_FRAME_WIDTH), annotated.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (WIDTH, HEIGHT)
    assert sum(1 for _ in iter(lambda: annotated.read()[0], False)) == FRAMES

    records = json.loads((out / "predictions.json").read_text())
    frames = [r for r in records if "frame" in r]
    assert [r["frame"] for r in frames] == list(range(FRAMES)) and all(r["image"] == str(clip) for r in frames)
    image = next(r for r in records if r["image"].endswith("first.png"))
    assert frames[0]["detections"] == image["detections"] and image["detections"]  # same pixels, same boxes

    results = json.loads((out / "coco_results.json").read_text())
    video_rows = [r for r in results if r["file_name"] == str(clip)]
    assert len(video_rows) == sum(len(r["detections"]) for r in frames)
    assert {r["frame"] for r in video_rows} <= set(range(FRAMES)) and all(len(r["bbox"]) == 4 for r in video_rows)
    labels = sorted(p.name for p in (out / "labels").glob("clip_*.txt"))
    assert labels == [f"clip_{i:06d}.txt" for i in range(FRAMES)]
    shown = sum(d["score"] >= 0.25 for d in frames[2]["detections"])
    assert shown > 0 and len((out / "labels" / "clip_000002.txt").read_text().splitlines()) == shown
    assert (out / "images" / "first.png").is_file()


def test_an_unreadable_video_is_a_one_line_error(weights, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    assert main(["predict", "--weights", str(weights), str(bad), "--out", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvforge: error: cannot read the video") and "broken.mp4" in err and err.count("\n") == 1
