"""Videos for ``cvforge predict``: frames read with OpenCV, run through a detector in batches, drawn,
and written to a video of the same size and frame rate.

    records, written = predict_video(model, "clip.mp4", out=Path("runs/detect/predict"))

Each frame becomes one record ``{"image": "clip.mp4", "frame": i, "width": W, "height": H,
"detections": [...]}`` (``predict.describe``'s detection record plus where it comes from), so
``predict.save_detections`` writes its YOLO txt (``labels/clip_000012.txt``) and its rows of the
COCO-results JSON as it does for an image. The annotated video is ``videos/clip.mp4`` (MPEG-4 part 2,
which every OpenCV build can write; MJPG ``.avi`` where it cannot).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvforge.config import DETECTION_TASKS
from cvforge.errors import CvforgeError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
DEFAULT_FPS = 30.0  # for containers that do not state a frame rate
# (fourcc, suffix) to try in order: mp4v needs no external encoder; MJPG is the fallback of last resort.
CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    """What the writer needs to match the input: frame rate, frame size in pixels, frame count."""

    fps: float
    width: int
    height: int
    frames: int | None  # what the container claims; None when it does not say


def open_video(path: str | os.PathLike) -> tuple[Any, VideoInfo]:
    """(cv2.VideoCapture, its VideoInfo); a CvforgeError naming the file when OpenCV cannot decode it."""
    import cv2
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise CvforgeError("cannot read the video (OpenCV cannot open or decode it)", path,
                           "pass a video OpenCV reads (mp4, avi, mov, mkv), or re-encode it, "
                           "e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`")
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    info = VideoInfo(fps=fps if fps > 0 and math.isfinite(fps) else DEFAULT_FPS,
                     width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), frames=count if count > 0 else None)
    return capture, info


def read_frames(capture: Any, path: str | os.PathLike) -> Iterator[torch.Tensor]:
    """Every frame as uint8 RGB [3, H, W]; releases the capture at the end. A video whose first
    frame cannot be decoded is a CvforgeError (a truncated end just ends the video, as players do)."""
    try:
        first = True
        while True:
            ok, bgr = capture.read()
            if not ok:
                if first:
                    raise CvforgeError("cannot read the video (no frame could be decoded)", path,
                                       "pass a video OpenCV reads (mp4, avi, mov, mkv), or re-encode it, "
                                       "e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`")
                return
            first = False
            yield torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)
    finally:
        capture.release()


class VideoWriter:
    """Writes uint8 RGB [3, H, W] frames to ``<folder>/<stem>.mp4`` (or ``.avi``, see CODECS)."""

    def __init__(self, folder: Path, stem: str, info: VideoInfo):
        import cv2
        folder.mkdir(parents=True, exist_ok=True)
        for fourcc, suffix in CODECS:
            self.path = folder / f"{stem}{suffix}"
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*fourcc), info.fps,
                                          (info.width, info.height))
            if self.writer.isOpened():
                return
        raise CvforgeError("OpenCV cannot write a video here (no mp4v or MJPG encoder)", folder,
                           "install opencv-python-headless from PyPI, whose builds include both")

    def write(self, frame: torch.Tensor) -> None:
        self.writer.write(np.ascontiguousarray(frame.permute(1, 2, 0).cpu().numpy()[:, :, ::-1]))

    def close(self) -> None:
        self.writer.release()


def predict_video(model: Any, path: str | os.PathLike, out: Path, *, batch: int = 8, conf: float = 0.25,
                  quiet: bool = False) -> tuple[list[dict[str, Any]], Path]:
    """Run a detector (``cvforge.Model`` or ``export.OnnxModel``) on every frame of ``path``; returns the
    per-frame records (module docstring) and the annotated video (boxes with score >= ``conf``)."""
    from tqdm import tqdm
    from cvforge.engine.optim import to_device
    from cvforge.predict import describe, draw_detections
    if model.task not in DETECTION_TASKS:
        raise CvforgeError(f"video prediction needs a detection model, not a {model.task} model", path,
                           "pass a detector's weights, or extract the frames as images")
    path = Path(path)
    capture, info = open_video(path)
    writer, records = None, []
    frames = read_frames(capture, path)
    try:
        with tqdm(total=info.frames, desc=f"predict {path.name}", unit="frame", disable=quiet) as bar:
            while chunk := [frame for _, frame in zip(range(batch), frames)]:
                # the size of the decoded frames, which a container's header may misstate
                size = {"width": chunk[0].shape[-1], "height": chunk[0].shape[-2]}
                writer = writer or VideoWriter(out / "videos", path.stem, replace(info, **size))
                output = model.module(to_device([model.transforms(f, {})[0] for f in chunk], model.device))
                for frame, record in zip(chunk, describe(model.task, output, model.classes)):
                    record.pop("masks", None)  # instance models: boxes only on videos (no per-frame mask PNGs)
                    record = {"image": str(path), "frame": len(records), **size, **record}
                    writer.write(draw_detections(frame, record["detections"], conf))
                    records.append(record)
                bar.update(len(chunk))
    finally:
        frames.close()
        if writer is not None:
            writer.close()
    return records, writer.path
