"""``cvforge export --format onnx``: the plain eval model to ONNX, checked against PyTorch with onnxruntime.

    path = export_onnx("runs/segment/train/weights/best.pt")    # -> best.onnx beside it
    model = load_onnx(path)                                      # what `cvforge predict --weights x.onnx` runs
    with torch_beside_onnxruntime():                             # torch at 1 thread around onnxruntime's
        outputs = model.module(images)                           # (as `cvforge predict` does)

What is exported is the model's own eval-mode ``forward`` (no second, export-only code path): it takes
the same uint8 [B, 3, H, W] batch and its output dict becomes the graph's outputs, in the dict's order
and under its keys (segment: ``masks`` int64 [B, H, W] and ``scores`` float [B, C, H, W] softmax;
classify: ``scores`` [B, C]). The batch is dynamic; for segment, H and W are dynamic too (the FCN pads
and crops inside the graph), for classify they are ``imgsz``. The ONNX file's ``metadata_props`` hold
``task``, ``classes`` (JSON), ``imgsz``, ``model`` and ``cvforge_version``, so it runs on its own.

Detectors (tasks detect and instance): the graph is the network part of the model's eval forward, its
``forward_raw`` method, which the eval forward calls (no second copy). ``load_onnx`` rebuilds the detector's
Python module from the metadata (``model_spec``: builder name and arguments as JSON; ``input_size``: the side
it trained at; ``graph``: which of the kinds below) and lets onnxruntime stand in for its ``forward_raw``, so
the model's own resizing, proposals, decoding and NMS run around the graph exactly as in PyTorch.

- ``raw`` (YOLO, YOLOv1): ``images`` float [B, 3, S, S] letterboxed to [0, 1] -> ``raw`` head outputs (YOLO
  [B, A, 4 * reg_max + C], YOLOv1 [B, S', S', 5B + C]); decoding and NMS stay in Python.
- ``regions`` (R-CNN, SPPNet, Fast R-CNN): ``images`` float [B, 3, S, S] letterboxed to [0, 1] and ``rois``
  float [R, 5] (image index, x1, y1, x2, y2 in canvas pixels) -> ``class_logits`` [R, C + 1] and
  ``box_deltas`` [R, 4 (C + 1)] (R-CNN also ``svm_scores`` [R, C]); B and R are dynamic. Proposals (selective
  search or a file) are not a network and stay in Python, as does the postprocess. The graph normalises the
  canvas, and for R-CNN it also cuts and warps the regions (``crop_and_warp`` is one RoIAlign) before the
  per-crop CNN: the three share one graph signature, and the [R, 3, s, s] crops never leave onnxruntime.
- ``image`` (Faster R-CNN with or without FPN, Mask R-CNN): the whole eval network of one image, NMS
  included: ``images`` float [1, 3, H, W] (resized to ``input_size`` on its longer side and padded, by
  ``resize_batch``; H, W dynamic), ``image_size`` int64 [2] (its h, w inside the padding) and ``score_thresh``
  float [] (the model's own at predict time) -> ``boxes`` [K, 4] xyxy in input pixels, ``scores`` [K],
  ``labels`` int64 [K] (Mask R-CNN: also ``mask_probs`` [K, M, M], the detected class's mask probabilities in
  its box). Why whole: the box head needs the RPN's proposals and the mask head the final boxes, so a
  network-only graph would be two or three graphs, or as many runs each computing the backbone again; the
  RPN (torchvision's), our ``roi_head.postprocess`` and the RoIAlign layers trace to ONNX TopK,
  NonMaxSuppression and RoiAlign. One image per run, because the tracer unrolls the per-image loops of the
  RPN and the postprocess; ``OnnxModel`` runs each image of the padded batch in turn, with the batch's
  padding, so its detections are the batched PyTorch ones. Python keeps the resizing, the mapping back to
  original pixels and the pasting of masks into the image.

Parity: after export, the same random inputs go through PyTorch and onnxruntime, and again at other sizes of
the dynamic axes (``regions``, ``image``: a size the tracer froze would show); every float output must agree
within ``PARITY_TOLERANCE`` (max absolute difference, printed), integer outputs are reported as the share of
equal elements (an argmax may flip where two scores tie to 1e-7). Boxes in pixels (``image``) are compared in
units of the input side (float32 resolves a 640-px coordinate to 6e-5 px only). The ``image`` graph is checked
at a score threshold that keeps at most PROBE_DETECTIONS detections of the noise image (``_probe_threshold``:
a trained model may detect nothing there at its own), detections whose scores tie to float error are paired
by box (``_aligned``), and another number of detections fails the check (a top-k or NMS decision that flips
on a tie within float error: rare).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from cvforge.config import DETECTION_TASKS, TASKS
from cvforge.errors import CvforgeError

PARITY_TOLERANCE = 1e-4
EXPORTABLE_TASKS = TASKS  # every task has an export path
PROBE_DETECTIONS = 10  # at most this many detections in the parity check of Faster / Mask R-CNN


class _OutputsAsTuple(nn.Module):
    """The model itself, with its output dict handed to the exporter as a tuple (ONNX has no dicts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(*inputs).values())


class _RawHead(nn.Module):
    """YOLO's network without its pre- and postprocessing: {"raw": ``model.forward_raw(images)``}."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"raw": self.model.forward_raw(images)}


class _RegionHead(_RawHead):
    """R-CNN's, SPPNet's or Fast R-CNN's network: ``model.forward_raw(images, rois)``, a dict of [R, ...] outputs."""

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_raw(images, rois)


class _ImageNetwork(_RawHead):
    """Faster / Mask R-CNN's eval network for one image: ``model.forward_raw(images, [(h, w)], score_thresh)[0]``."""

    def forward(self, images: torch.Tensor, image_size: torch.Tensor, score_thresh: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        return self.model.forward_raw(images, [(image_size[0], image_size[1])], score_thresh)[0]


class Graph(NamedTuple):
    """What is exported: ``network`` (returns a dict: the ``outputs`` names, in order), example ``inputs`` by
    name (the input sets of ``checks`` go through the parity check only: other sizes of the dynamic axes),
    the dynamic ``axes`` of inputs and outputs, ``kind`` (metadata "graph": how ``OnnxModel`` feeds it),
    the ``side`` stored as "imgsz", and ``pixels``: outputs in pixels of an input of that side (compared
    relative to it by ``parity_report``)."""
    network: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    checks: list[dict[str, torch.Tensor]]
    axes: dict[str, dict[int, str]]
    kind: str
    side: int
    pixels: dict[str, int] | None = None


def export_onnx(weights: str | os.PathLike, out: str | os.PathLike | None = None, imgsz: int | None = None,
                opset: int = 17, check: bool = True) -> Path:
    """Export a cvforge checkpoint to ONNX (default: ``<weights>.onnx`` beside it); returns the path.

    imgsz: side of the example input (default: the training ``imgsz``; a detector exports at the side it
    trained at, its ``input_size``). check: run the onnxruntime parity check (raises ``CvforgeError``
    when an output differs by more than ``PARITY_TOLERANCE``; for detectors, on the graph's outputs).
    """
    from cvforge import __version__
    from cvforge.api import load
    model = load(weights, device="cpu")
    if model.task not in EXPORTABLE_TASKS:
        raise CvforgeError(f"ONNX export of {model.task} models is not available yet", weights,
                           f"export a {' or '.join(EXPORTABLE_TASKS)} model")
    out = Path(out) if out else Path(weights).with_suffix(".onnx")
    metadata = {"task": model.task, "classes": json.dumps(model.classes), "model": str(model.config.model),
                "data": str(model.config.data), "cvforge_version": __version__}
    if model.task in DETECTION_TASKS:
        graph = _detector_graph(model, imgsz, weights)
        if graph.kind != "raw" and opset < 16:  # below 16, ONNX's RoiAlign has no half-pixel (aligned) mode
            raise CvforgeError(f"{model.config.model} needs ONNX opset 16 or later, not {opset}", weights,
                               "leave out --opset (17)")
        metadata |= {"input_size": str(graph.side), "model_spec": json.dumps(model.module.cvforge_spec),
                     "graph": graph.kind}
    else:
        graph = _plain_graph(model.module.eval(), imgsz or model.config.imgsz, spatial=model.task == "segment")
    out.parent.mkdir(parents=True, exist_ok=True)
    _export(graph, out, opset)
    _set_metadata(out, {**metadata, "imgsz": str(graph.side)})
    if check:
        for inputs in [graph.inputs, *graph.checks]:
            print(parity_report(graph.network, out, inputs, graph.pixels, detections=graph.kind == "image"))
    return out


def _plain_graph(network: nn.Module, imgsz: int, spatial: bool) -> Graph:
    """Classify / segment: the eval ``forward`` on a uint8 batch; dynamic batch (and H, W when ``spatial``)."""
    example = torch.randint(0, 256, (2, 3, imgsz, imgsz), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        names = list(network(example).keys())
    image_axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    axes = {"images": image_axes}
    for name in names:  # masks [B, H, W]; scores [B, C, H, W] (segment) or [B, C] (classify)
        axes[name] = {0: "batch", 1: "height", 2: "width"} if name == "masks" else image_axes
    return Graph(network, {"images": example}, names, [], axes, "plain", imgsz)


def _detector_graph(model: Any, imgsz: int | None, weights: Any) -> Graph:
    """The detector's ``forward_raw`` as a module with example inputs at the side it trained at (its
    ``input_size``: its decoding and anchors assume that scale); module docstring."""
    from cvforge.models.detection.fast_rcnn import ProposalDetector
    from cvforge.models.detection.faster_rcnn import FasterRCNN
    module = model.module.eval()
    name = model.config.model
    if not callable(getattr(module, "forward_raw", None)) or not hasattr(module, "cvforge_spec"):
        raise CvforgeError(f"ONNX export of the detector {name} is not available yet", weights,
                           "export a model of the cvforge zoo (`cvforge models`)")
    size = int(module.input_size)
    if imgsz and imgsz != size:
        raise CvforgeError(f"{name} exports at the side it trained at ({size}), not --imgsz {imgsz}", weights,
                           "leave out --imgsz")
    if isinstance(module, FasterRCNN):
        return _image_graph(module, size)
    if isinstance(module, ProposalDetector):
        return _region_graph(module, size)
    example = torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(0))
    axes = {"images": {0: "batch"}, "raw": {0: "batch"}}
    return Graph(_RawHead(module).eval(), {"images": example}, ["raw"], [], axes, "raw", size)


def _region_graph(module: nn.Module, size: int) -> Graph:
    """R-CNN / SPPNet / Fast R-CNN: a random canvas batch [2, 3, S, S] in [0, 1] and 16 random regions;
    checked again with 3 images and 5 regions (batch and region count are dynamic)."""
    generator = torch.Generator().manual_seed(0)

    def inputs(batch: int, count: int) -> dict[str, torch.Tensor]:
        corner = torch.rand(count, 2, generator=generator) * size * 0.7
        extent = torch.rand(count, 2, generator=generator) * size * 0.5 + 2
        index = torch.arange(count, dtype=torch.float32)[:, None] % batch
        return {"images": torch.rand((batch, 3, size, size), generator=generator),
                "rois": torch.cat([index, corner, (corner + extent).clamp(max=size)], 1)}

    network = _RegionHead(module).eval()
    example = inputs(2, 16)
    with torch.no_grad():
        names = list(network(*example.values()))
    axes = {"images": {0: "batch"}, "rois": {0: "regions"}} | {name: {0: "regions"} for name in names}
    return Graph(network, example, names, [inputs(3, 5)], axes, "regions", size)


def _image_graph(module: Any, size: int) -> Graph:
    """Faster / Mask R-CNN: one random image resized as the model does (landscape 4:3), its (h, w) inside the
    padding and a score threshold (``_probe_threshold``); checked again on a portrait image (H, W dynamic)."""
    generator = torch.Generator().manual_seed(0)
    network = _ImageNetwork(module).eval()

    def inputs(height: int, width: int) -> dict[str, torch.Tensor]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        batch, _, sizes = module.resize([image])
        sample = {"images": batch, "image_size": torch.tensor(sizes[0], dtype=torch.int64)}
        return {**sample, "score_thresh": _probe_threshold(network, sample)}

    example = inputs(size * 3 // 4, size)
    with torch.no_grad():
        names = list(network(*example.values()))
    axes = {"images": {2: "height", 3: "width"}} | {name: {0: "detections"} for name in names}
    return Graph(network, example, names, [inputs(size, size // 2)], axes, "image", size, {"boxes": size})


@torch.no_grad()
def _probe_threshold(network: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score threshold of a parity check: a trained detector may find nothing on a noise image at its own
    threshold, so the check would compare nothing. This one keeps at most PROBE_DETECTIONS, cut at the widest
    gap (by ratio) between consecutive scores, so that no float difference moves a detection across it."""
    scores = network(*inputs.values(), torch.tensor(0.0))["scores"][:PROBE_DETECTIONS + 1].double()
    if len(scores) < 2:
        return torch.tensor(0.0)
    scores = scores.clamp(min=1e-30)
    k = int((scores[:-1] / scores[1:]).argmax())
    return torch.tensor(float((scores[k] * scores[k + 1]).sqrt()), dtype=torch.float32)


def _export(graph: Graph, out: Path, opset: int) -> None:
    """torch.onnx.export (TorchScript-based exporter) of ``graph`` with its dynamic axes; an operator the
    exporter cannot translate becomes a CvforgeError naming it."""
    example = tuple(graph.inputs.values())
    with warnings.catch_warnings():  # tracer warnings about Python ints from shapes: expected here
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(_OutputsAsTuple(graph.network).eval(), example, str(out),
                              input_names=list(graph.inputs), output_names=graph.outputs, opset_version=opset,
                              dynamic_axes=graph.axes, dynamo=False)
        except torch.onnx.errors.OnnxExporterError as error:  # e.g. YOLOv1's adaptive pooling at 64 px
            reason = str(error).splitlines()[0].split(". Please")[0]
            raise CvforgeError(f"ONNX cannot express this model at input {tuple(example[0].shape)} ({reason})",
                               out, "train (or export) at another image size, e.g. a multiple of 112 "
                               "for yolov1, or try another --opset") from None


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


@torch.no_grad()
def parity_report(model: nn.Module, path: Path, inputs: torch.Tensor | dict[str, torch.Tensor],
                  pixels: dict[str, int] | None = None, detections: bool = False) -> str:
    """Run ``inputs`` (a tensor: the "images" input; or the graph's inputs by name) through the PyTorch
    model and the ONNX file; a one-line report.

    Raises CvforgeError when a float output differs by more than PARITY_TOLERANCE, or has another shape
    (e.g. NMS kept another number of detections). ``pixels``: outputs in pixels of an input of side N
    (boxes), whose difference is measured in units of N: float32 resolves 640 px to 6e-5 px only.
    ``detections``: the outputs are detections, which ``_aligned`` puts in the same order first.
    """
    import onnxruntime as ort
    inputs = inputs if isinstance(inputs, dict) else {"images": inputs}
    expected = model.eval()(*inputs.values())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {k: v.numpy() for k, v in inputs.items()})))
    expected = {name: value.numpy() for name, value in expected.items()}
    got = _aligned(got, expected) if detections else got
    parts, worst = [], 0.0
    for name, reference in expected.items():
        if got[name].shape != reference.shape:
            parts.append(f"{name} shape {got[name].shape} != {reference.shape} (a tie within float error "
                         "in a top-k or NMS?)")
            worst = float("inf")
        elif reference.size == 0:  # e.g. no detection on the noise input
            parts.append(f"{name} empty")
        elif np.issubdtype(reference.dtype, np.floating):
            diff = float(np.abs(got[name].astype(np.float64) - reference).max())
            side = (pixels or {}).get(name)
            worst = max(worst, diff / side if side else diff)
            parts.append(f"{name} max |diff| {diff:.2e}" + (f" px ({diff / side:.2e} of {side} px)" if side else ""))
        else:
            parts.append(f"{name} equal {float((got[name] == reference).mean()):.2%}")
    if len(inputs) == 1:
        shapes = f"input {tuple(inputs['images'].shape)}"
    else:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    found = f"{len(expected['scores'])} detections: " if detections else ""
    report = f"onnx parity ({path.name}, {shapes}): {found}{', '.join(parts)} (limit {PARITY_TOLERANCE:g})"
    if worst > PARITY_TOLERANCE:
        raise CvforgeError(f"ONNX output differs from PyTorch: {report}", path,
                           "try another --opset, and report it as a bug")
    return report


def _aligned(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ONNX detections ({"boxes", "scores", "labels", ...}, K rows each) in the order of PyTorch's: each
    PyTorch detection takes the unused ONNX one of its label, of its score to PARITY_TOLERANCE, with the
    nearest box (scores equal to float error may sort either way). Unchanged when some row finds none."""
    if got["boxes"].shape != expected["boxes"].shape:
        return got
    order: list[int] = []
    free = set(range(len(got["boxes"])))
    for box, score, label in zip(expected["boxes"], expected["scores"], expected["labels"]):
        same = [j for j in free if got["labels"][j] == label and abs(got["scores"][j] - score) <= PARITY_TOLERANCE]
        if not same:
            return got
        order.append(min(same, key=lambda j: float(np.abs(got["boxes"][j] - box).max())))
        free.remove(order[-1])
    return {name: value[order] for name, value in got.items()}


class OnnxModel:
    """An exported model run by onnxruntime, with the attributes ``predict`` uses of ``cvforge.Model``:
    ``task``, ``classes``, ``transforms``, ``device`` and ``module(images)``: for classify and segment
    the graph itself (a dict of output tensors); for detect and instance the detector's Python module in
    eval mode with the graph as its ``forward_raw`` (list of uint8 [3, H, W] -> per image {"boxes",
    "scores", "labels"} (+ "masks"))."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime as ort
        from cvforge.data.transforms import build_transforms
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise CvforgeError(f"cannot read the ONNX model ({str(error).splitlines()[0]})", self.path,
                               "pass a file written by `cvforge export --format onnx`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "task" not in meta or "classes" not in meta:
            raise CvforgeError("the ONNX model has no cvforge metadata (task, classes)", self.path,
                               "export it with `cvforge export --format onnx`")
        self.task, self.classes = meta["task"], json.loads(meta["classes"])
        self.data = meta.get("data", "")  # the training data's SPEC ("" in files exported before it was stored)
        self.imgsz = int(meta.get("imgsz", 224))
        self.transforms = build_transforms(self.task, False, self.imgsz)
        self.device = torch.device("cpu")
        self.names = [o.name for o in self.session.get_outputs()]
        self.module = self._detector(meta) if self.task in DETECTION_TASKS else self.run

    def _detector(self, meta: dict[str, str]) -> nn.Module:
        """The exported detector's module (weights untouched: the graph holds the trained ones) whose
        ``forward_raw`` is the graph, so its own pre- and postprocessing run around it (module docstring)."""
        from cvforge.zoo import build_model
        if "model_spec" not in meta or "input_size" not in meta:
            raise CvforgeError("the ONNX detector has no model_spec / input_size metadata", self.path,
                               "export it again with `cvforge export --format onnx`")
        spec = json.loads(meta["model_spec"])
        kwargs = dict(spec["kwargs"])
        module = build_model(spec["name"], task=spec["task"], num_classes=kwargs.pop("num_classes"), **kwargs)
        module.input_size.fill_(int(meta["input_size"]))
        graphs = {"raw": self.run_raw, "regions": self.run_regions, "image": self.run_images}
        module.forward_raw = graphs[meta.get("graph", "raw")]  # an instance attribute: shadows the class's network
        return module.eval()

    def run_raw(self, images: torch.Tensor) -> torch.Tensor:
        """YOLO's graph: float [B, 3, S, S] in [0, 1] -> raw head outputs (module docstring)."""
        (raw,) = self.session.run(None, {"images": images.detach().cpu().float().numpy()})
        return torch.from_numpy(raw)

    def run_regions(self, images: torch.Tensor, regions: Any) -> dict[str, torch.Tensor]:
        """R-CNN's, SPPNet's or Fast R-CNN's graph: canvas float [B, 3, S, S] in [0, 1], regions (per image
        [R_i, 4] or [R, 5]) -> {"class_logits", "box_deltas"(, "svm_scores")}, each [R, ...]."""
        from cvforge.models.detection.region_pool import as_rois
        feeds = {"images": images.detach().cpu().float().numpy(), "rois": as_rois(regions).cpu().numpy()}
        return {name: torch.from_numpy(value) for name, value in zip(self.names, self.session.run(None, feeds))}

    def run_images(self, batch: torch.Tensor, sizes: list[tuple[int, int]], score_thresh: float | None = None
                   ) -> list[dict[str, torch.Tensor]]:
        """Faster / Mask R-CNN's graph, once per image of the padded batch [B, 3, H, W] (each with the batch's
        padding, as in PyTorch) -> per image {"boxes", "scores", "labels"(, "mask_probs")} in input pixels.
        score_thresh: default the model's own (its ``score_thresh``, rebuilt from ``model_spec``)."""
        score_thresh = self.module.score_thresh if score_thresh is None else score_thresh
        results = []
        for image, size in zip(batch.detach().cpu().float(), sizes):
            feeds = {"images": image[None].numpy(), "image_size": np.asarray(size, dtype=np.int64),
                     "score_thresh": np.asarray(score_thresh, dtype=np.float32)}
            outputs = self.session.run(None, feeds)
            results.append({name: torch.from_numpy(value) for name, value in zip(self.names, outputs)})
        return results

    def run(self, images: torch.Tensor) -> dict[str, Any]:
        """uint8 [B, 3, H, W] -> {output name: tensor}, as the PyTorch model's eval forward."""
        outputs = self.session.run(None, {"images": images.cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(self.names, outputs)}


def load_onnx(path: str | os.PathLike) -> OnnxModel:
    """An exported ONNX model, ready for ``cvforge.predict``."""
    return OnnxModel(path)


@contextlib.contextmanager
def torch_beside_onnxruntime() -> Iterator[None]:
    """Torch at one thread while an ``OnnxModel`` runs: torch then only pre- and postprocesses (small ops),
    and its OpenMP workers, which spin for a while after every parallel op, would take the cores that
    onnxruntime's own threads need. yolo-n at 128 px, batch 1, 2 cores: 8.4 ms per image with both at two
    threads, 3.1 ms so (BENCHMARKS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
