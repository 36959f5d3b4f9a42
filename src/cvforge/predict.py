"""``cvforge predict``: run a trained model on images, folders and videos, print and save what it sees.

Per task, ``describe`` turns a model's raw output into plain per-image records, and ``save_records``
writes them (classification: ``predictions.csv`` and ``predictions.json`` with the top-k classes;
segmentation: ``masks/<stem>.png`` raw class ids, ``overlays/<stem>.png`` VOC-coloured, ``predictions.json``;
detection: ``save_detections``; instance: also ``instance_masks/<stem>.png``, masks drawn, and each
detection's mask as COCO RLE in ``coco_results.json``). Videos (detection) run frame by frame through
``cvforge.video``.
Weights ending in ``.onnx`` (``cvforge export``) run through onnxruntime.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from cvforge.config import DETECTION_TASKS
from cvforge.data.io import is_image_file, read_image
from cvforge.errors import CvforgeError


def as_image(image: Any) -> tv_tensors.Image:
    """A path, PIL image or uint8 [3, H, W] tensor -> uint8 ``tv_tensors.Image`` [3, H, W]."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return tv_tensors.Image(TF.pil_to_tensor(image.convert("RGB")))
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return tv_tensors.Image(image)
    raise CvforgeError(f"cannot read an image from {type(image).__name__}", None,
                       "pass a file path, a PIL image or a uint8 [3, H, W] tensor")


def source_files(sources: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(image files, video files) named by SOURCE arguments: files, and folders searched recursively (sorted)."""
    from cvforge.video import is_video_file
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.is_file() and (is_image_file(p) or is_video_file(p)))
        elif source.is_file():
            files.append(source)
        else:
            raise CvforgeError("source not found", source, "pass image or video files, or folders")
    if not files:
        raise CvforgeError("no images or videos found", ", ".join(map(str, sources)),
                           "pass image or video files, or folders of them")
    return [f for f in files if not is_video_file(f)], [f for f in files if is_video_file(f)]


def describe(task: str, output: Any, classes: list[str], top: int = 5) -> list[dict[str, Any]]:
    """A model's batched output -> one plain record per image."""
    if task == "classify":
        return _describe_classes(output["scores"], classes, top)
    if task == "segment":
        return _describe_masks(output["masks"], classes, top)
    if task in DETECTION_TASKS:
        return [{**_describe_boxes(o, classes), **_instance_masks(o)} for o in output]
    raise CvforgeError(f"prediction for task {task!r} is not available yet", None, "use a classification model")


def _describe_boxes(output: dict[str, torch.Tensor], classes: list[str]) -> dict[str, Any]:
    """One image's {"boxes" xyxy, "scores", "labels"} -> {"detections": [{"box", "label", "name", "score"}]}."""
    rows = zip(output["boxes"].float().cpu().tolist(), output["scores"].float().cpu().tolist(),
               output["labels"].cpu().tolist())
    return {"detections": [{"box": [round(v, 2) for v in box], "label": label, "name": classes[label],
                            "score": round(score, 5)} for box, score, label in rows]}


def save_detections(records: list[dict[str, Any]], out: Path, conf: float = 0.25) -> list[Path]:
    """Detections -> ``images/`` (boxes drawn, score >= conf), ``labels/*.txt`` (YOLO: class cx cy w h
    normalised, score >= conf) and ``coco_results.json`` (every detection; image_id = index of the record).
    Video frames (records with "frame", "width", "height"; ``cvforge.video``) are drawn into their video
    already: they get ``labels/<video stem>_<frame:06d>.txt`` and rows with "frame" in the JSON."""
    from torchvision.utils import save_image
    (out / "labels").mkdir(parents=True, exist_ok=True)
    results, drawn = [], False
    for image_id, record in enumerate(records):
        stem = Path(record["image"]).stem
        if "frame" in record:
            stem, h, w = f"{stem}_{record['frame']:06d}", record["height"], record["width"]
        else:
            image = read_image(record["image"]).as_subclass(torch.Tensor)
            h, w = image.shape[-2:]
            (out / "images").mkdir(exist_ok=True)
            drawn = True
            image = draw_instance_masks(image, record, conf) if "mask_file" in record else image
            drawn_image = draw_detections(image, record["detections"], conf)
            save_image(drawn_image.float() / 255, out / "images" / f"{stem}.png")
        frame = {"frame": record["frame"]} if "frame" in record else {}
        for d in record["detections"]:
            x1, y1, x2, y2 = d["box"]
            mask = {"segmentation": d["segmentation"]} if "segmentation" in d else {}  # instance: COCO RLE
            results.append({"image_id": image_id, "file_name": record["image"], **frame, "category_id": d["label"],
                            "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "score": d["score"], **mask})
        lines = [_yolo_line(d, w, h) for d in record["detections"] if d["score"] >= conf]
        (out / "labels" / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    json_path = out / "coco_results.json"
    json_path.write_text(json.dumps(results), encoding="utf-8")
    return [out / "images"] * drawn + [out / "labels", json_path]


def _yolo_line(detection: dict[str, Any], width: int, height: int) -> str:
    """One YOLO txt row: ``class cx cy w h score``, box normalised by the image's size."""
    x1, y1, x2, y2 = detection["box"]
    return (f"{detection['label']} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
            f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f} {detection['score']:.5f}")


def draw_detections(image: torch.Tensor, detections: list[dict[str, Any]], conf: float = 0.25) -> torch.Tensor:
    """uint8 [3, H, W] -> a copy with the boxes of score >= conf drawn and labelled "name score"."""
    from torchvision.utils import draw_bounding_boxes
    shown = [d for d in detections if d["score"] >= conf]
    if not shown:
        return image
    return draw_bounding_boxes(image, torch.tensor([d["box"] for d in shown]), width=1,
                               labels=[f"{d['name']} {d['score']:.2f}" for d in shown])


def _instance_masks(output: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{"masks": uint8 ndarray [K, H, W]} (0/1, one per detection, in its order) when the model gives masks."""
    if "masks" not in output:
        return {}
    return {"masks": (output["masks"] >= 0.5).to(torch.uint8).cpu().numpy()}


def save_instance_masks(records: list[dict[str, Any]], out: Path, conf: float = 0.25) -> None:
    """Per record with "masks": ``instance_masks/<stem>.png``, one byte per pixel, 0 background and k + 1
    where detection k (score >= conf, at most 255) lies, the most confident on top; the record's
    "masks" array is replaced by the path ("mask_file"), and every detection gets its mask as COCO RLE
    ("segmentation", ``mask_rles``), which ``save_detections`` writes to ``coco_results.json``."""
    import numpy as np
    (out / "instance_masks").mkdir(parents=True, exist_ok=True)
    for record in records:
        masks = record.pop("masks", None)
        if masks is None:
            continue
        for detection, rle in zip(record["detections"], mask_rles(masks)):
            detection["segmentation"] = rle
        ids = np.zeros(masks.shape[1:], dtype=np.uint8)
        scores = [d["score"] for d in record["detections"]]
        for k in reversed(range(min(len(masks), 255))):  # sorted by score: paint the best last
            if scores[k] >= conf:
                ids[masks[k] > 0] = k + 1
        path = out / "instance_masks" / f"{Path(record['image']).stem}.png"
        Image.fromarray(ids).save(path)
        record["mask_file"] = str(path)


def mask_rles(masks: Any) -> list[dict[str, Any]]:
    """uint8 ndarray [K, H, W] of 0/1 masks (the original image's pixels) -> K COCO RLEs {"size": [H, W],
    "counts": str}, as COCO's results format for segmentation wants them (``pycocotools.mask.encode``,
    its byte string decoded so that it is JSON)."""
    from cvforge.eval.instance import encode_masks  # the encoder mask AP uses
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in encode_masks(masks)]


def draw_instance_masks(image: torch.Tensor, record: dict[str, Any], conf: float = 0.25, alpha: float = 0.5
                        ) -> torch.Tensor:
    """uint8 [3, H, W] -> a copy with the masks of ``record["mask_file"]`` (``save_instance_masks``) blended in."""
    import numpy as np
    from torchvision.utils import draw_segmentation_masks
    ids = torch.from_numpy(np.asarray(Image.open(record["mask_file"])).copy()) if record.get("mask_file") else None
    shown = [k for k, d in enumerate(record["detections"]) if d["score"] >= conf and k < 255]
    if ids is None or not shown or ids.shape != image.shape[-2:]:
        return image
    return draw_segmentation_masks(image, torch.stack([ids == k + 1 for k in shown]), alpha=alpha)


def _describe_classes(scores: torch.Tensor, classes: list[str], top: int) -> list[dict[str, Any]]:
    """scores: float [B, C] probabilities -> [{"label", "name", "score", "top": [{"name", "score"}, ...]}]."""
    k = min(top, scores.shape[1])
    values, indices = scores.float().cpu().topk(k, dim=1)
    records = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist()):
        ranked = [{"label": i, "name": classes[i], "score": round(v, 6)} for v, i in zip(row_values, row_indices)]
        records.append({**ranked[0], "top": ranked})
    return records


def _describe_masks(masks: torch.Tensor, classes: list[str], top: int) -> list[dict[str, Any]]:
    """masks: int64 [B, H, W] class ids -> [{"mask": uint8 ndarray [H, W], "top": the ``top`` classes
    covering most pixels, [{"label", "name", "score": share of the image's pixels}, ...]}]."""
    records = []
    for mask in masks.cpu():
        counts = torch.bincount(mask.flatten(), minlength=len(classes)).double() / max(1, mask.numel())
        shares, labels = counts.topk(min(top, len(classes)))
        ranked = [{"label": i, "name": classes[i], "score": round(s, 6)}
                  for s, i in zip(shares.tolist(), labels.tolist()) if s > 0]
        records.append({"mask": mask.to(torch.uint8).numpy(), "top": ranked})
    return records


def save_segment_masks(records: list[dict[str, Any]], out: Path, alpha: float = 0.5) -> None:
    """Per record: ``masks/<stem>.png`` (raw class ids, one byte per pixel) and ``overlays/<stem>.png``
    (the image blended with the VOC colours of its classes); the record's "mask" array is replaced by
    the two file paths ("mask_file", "overlay_file")."""
    import numpy as np
    from cvforge.data.formats.voc import voc_palette
    palette = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)
    used: set[str] = set()
    for record in records:
        stem, n = Path(record["image"]).stem, 1
        while stem in used:  # images of different folders may share a name
            stem, n = f"{Path(record['image']).stem}_{n}", n + 1
        used.add(stem)
        mask = record.pop("mask")
        paths = out / "masks" / f"{stem}.png", out / "overlays" / f"{stem}.png"
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(paths[0])  # uint8 [H, W]: an 8-bit grey PNG of class ids
        image = read_image(record["image"]).permute(1, 2, 0).numpy().astype(np.float32)
        colours = palette[mask]
        blend = np.where((mask > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
        Image.fromarray(blend.round().clip(0, 255).astype(np.uint8)).save(paths[1])
        record["mask_file"], record["overlay_file"] = str(paths[0]), str(paths[1])


def format_eval(metrics: dict[str, float]) -> str:
    """Metrics as text: ``name  value`` lines for the overall ones, then one table of the per-class
    ones (keys ``<metric>/<class>``: rows are classes, columns metrics; e.g. IoU and acc per class)."""
    overall = {k: v for k, v in metrics.items() if "/" not in k}
    columns: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "/" in key:
            column, _, name = key.partition("/")
            columns.setdefault(column, {})[name] = value
    width = max(map(len, overall), default=0)
    lines = [f"{key:<{width}}  {value:.4f}" for key, value in overall.items()]
    if columns:
        names = list(dict.fromkeys(name for column in columns.values() for name in column))
        first = max(len("class"), *map(len, names))
        lines.append(f"{'class':<{first}}" + "".join(f"  {c:>9}" for c in columns))
        for name in names:
            cells = "".join(f"  {columns[c].get(name, float('nan')):>9.4f}" for c in columns)
            lines.append(f"{name:<{first}}{cells}")
    return "\n".join(lines)


def save_records(task: str, records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write prediction records; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    if task == "segment":
        save_segment_masks(records, out)
    if task == "instance" and any("masks" in r for r in records):
        save_instance_masks(records, out)
    json_path = out / "predictions.json"
    json_path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    written = [json_path] + ([out / "masks", out / "overlays"] if task == "segment" else [])
    if task in DETECTION_TASKS:
        written += save_detections(records, out)
    if task == "classify":
        csv_path = out / "predictions.csv"
        with open(csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "rank", "label", "name", "score"])
            for record in records:
                for rank, guess in enumerate(record["top"], 1):
                    writer.writerow([record["image"], rank, guess["label"], guess["name"], guess["score"]])
        written.append(csv_path)
    return written


def write_eval_plots(task: str, evaluator: Any, classes: list[str], out: Path) -> list[Path]:
    """The task's evaluation pictures (classification: the confusion matrix)."""
    from cvforge import viz
    if task in ("classify", "segment"):  # segment: a confusion matrix of pixels, rows = true class
        return [viz.plot_confusion_matrix(evaluator.confusion, classes, Path(out) / "confusion_matrix.png",
                                          unit="images" if task == "classify" else "pixels")]
    if task in DETECTION_TASKS:  # last row / column: background (missed object / false detection)
        from cvforge.eval.detection import plot_pr_curves
        return [viz.plot_confusion_matrix(evaluator.confusion, [*classes, "background"],
                                          Path(out) / "confusion_matrix.png", normalize=False, unit="boxes"),
                plot_pr_curves(evaluator.curves, classes, Path(out) / "pr_curves.png")]
    return []


def summary_lines(records: list[dict[str, Any]], conf: float = 0.25, shown: int = 5) -> list[str]:
    """What ``cvforge predict`` prints: one line per image (its top classes or its detections above
    ``conf``), and one line per video instead of one per frame."""
    lines, videos = [], {}
    for record in records:
        found = [d for d in record.get("detections", []) if d["score"] >= conf]
        if "frame" in record:
            frames, boxes = videos.get(record["image"], (0, 0))
            videos[record["image"]] = (frames + 1, boxes + len(found))
        elif "detections" in record:
            best = ", ".join(f"{d['name']} {d['score']:.2f}" for d in found[:shown])
            lines.append(f"{record['image']}: {len(found)} objects" + (f" ({best}{', ...' if len(found) > shown else ''})"
                                                                       if found else ""))
        else:
            lines.append(f"{record['image']}: " + ", ".join(f"{g['name']} {g['score']:.3f}" for g in record.get("top", [])))
    lines += [f"{video}: {frames} frames, {boxes} objects in all" for video, (frames, boxes) in videos.items()]
    return lines


def predict(weights: str | os.PathLike, sources: Iterable[str | os.PathLike], *, out: str | os.PathLike | None = None,
            top: int = 5, device: str = "auto", batch: int = 16) -> tuple[list[dict[str, Any]], list[Path]]:
    """Predict every image and video of ``sources``; returns the records (one per image or video frame)
    and the files written to ``out`` (default: a new ``runs/<task>/predict`` folder)."""
    from cvforge.api import load_for_inference
    from cvforge.engine.checkpoint import next_run_dir
    from cvforge.engine.optim import to_device
    model, threads = load_for_inference(weights, device)  # .onnx: through onnxruntime
    if model.task == "segment":
        batch = 1  # full-size images of different sizes: masks stay in each image's own pixels
    files, videos = source_files(sources)
    out = Path(out) if out else next_run_dir(Path("runs") / model.task, "predict")
    records, annotated = [], []
    with threads, torch.inference_mode():
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            images = [model.transforms(read_image(f), {})[0] for f in chunk]
            if model.task not in DETECTION_TASKS:  # detectors take images of any sizes as a list
                images = torch.stack(images)
            output = model.module(to_device(images, model.device))
            for path, record in zip(chunk, describe(model.task, output, model.classes, top)):
                records.append({"image": str(path), **record})
        for video in videos:  # one record per frame; the annotated video is written on the way
            from cvforge.video import predict_video
            frames, annotated_video = predict_video(model, video, out, batch=batch)
            records, annotated = records + frames, annotated + [annotated_video]
    return records, annotated + save_records(model.task, records, out)
