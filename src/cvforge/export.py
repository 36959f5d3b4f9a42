"""``cvforge export --format onnx``: the plain eval model to ONNX, checked against PyTorch with onnxruntime.

    path = export_onnx("runs/segment/train/weights/best.pt")    # -> best.onnx beside it
    model = load_onnx(path)                                      # what `cvforge predict --weights x.onnx` runs

What is exported is the model's own eval-mode ``forward`` (no second, export-only code path): it takes
the same uint8 [B, 3, H, W] batch and its output dict becomes the graph's outputs, in the dict's order
and under its keys (segment: ``masks`` int64 [B, H, W] and ``scores`` float [B, C, H, W] softmax;
classify: ``scores`` [B, C]). The batch is dynamic; for segment, H and W are dynamic too (the FCN pads
and crops inside the graph), for classify they are ``imgsz``. The ONNX file's ``metadata_props`` hold
``task``, ``classes`` (JSON), ``imgsz``, ``model`` and ``cvforge_version``, so it runs on its own.

Detectors (YOLO, YOLOv1): the graph is the network only, the model's ``forward_raw``: ``images`` float
[B, 3, S, S] letterboxed to [0, 1] -> ``raw`` head outputs (YOLO [B, A, 4 * reg_max + C], YOLOv1
[B, S', S', 5B + C]); S is the side the model trained at (``input_size`` in the metadata, beside
``model_spec``, the builder's name and arguments as JSON). ``load_onnx`` rebuilds the detector's Python
module from ``model_spec`` and lets onnxruntime stand in for its ``forward_raw``, so the model's own
letterbox, decoding and NMS run around the graph, exactly as in PyTorch, with no copy of that code.

Parity: after export, the same random uint8 batch goes through PyTorch and onnxruntime; every float
output must agree within ``PARITY_TOLERANCE`` (max absolute difference, printed), integer outputs are
reported as the share of equal elements (an argmax may flip where two scores tie to 1e-7).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cvforge.errors import CvforgeError

PARITY_TOLERANCE = 1e-4
EXPORTABLE_TASKS = ("classify", "segment", "detect")


class _OutputsAsTuple(nn.Module):
    """The model itself, with its output dict handed to the exporter as a tuple (ONNX has no dicts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(images).values())


class _RawHead(nn.Module):
    """A detector's network without its pre- and postprocessing: {"raw": ``model.forward_raw(images)``}."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"raw": self.model.forward_raw(images)}


def export_onnx(weights: str | os.PathLike, out: str | os.PathLike | None = None, imgsz: int | None = None,
                opset: int = 17, check: bool = True) -> Path:
    """Export a cvforge checkpoint to ONNX (default: ``<weights>.onnx`` beside it); returns the path.

    imgsz: side of the example input (default: the training ``imgsz``; a detector exports at the side it
    trained at, its ``input_size``). check: run the onnxruntime parity check (raises ``CvforgeError``
    when an output differs by more than ``PARITY_TOLERANCE``; for detectors, on the raw head outputs).
    """
    from cvforge import __version__
    from cvforge.api import load
    model = load(weights, device="cpu")
    if model.task not in EXPORTABLE_TASKS:
        raise CvforgeError(f"ONNX export of {model.task} models is not available yet", weights,
                           f"export a {' or '.join(EXPORTABLE_TASKS)} model")
    out = Path(out) if out else Path(weights).with_suffix(".onnx")
    metadata = {"task": model.task, "classes": json.dumps(model.classes), "model": str(model.config.model),
                "cvforge_version": __version__}
    if model.task == "detect":
        network, example = _detector_graph(model, imgsz, weights)
        imgsz = example.shape[-1]
        metadata |= {"input_size": str(imgsz), "model_spec": json.dumps(model.module.cvforge_spec)}
    else:
        imgsz = imgsz or model.config.imgsz
        network = model.module.eval()
        example = torch.randint(0, 256, (2, 3, imgsz, imgsz), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        names = list(network(example).keys())
    _export(_OutputsAsTuple(network).eval(), example, names, out, opset, spatial=model.task == "segment")
    _set_metadata(out, {**metadata, "imgsz": str(imgsz)})
    if check:
        print(parity_report(network, out, example))
    return out


def _detector_graph(model: Any, imgsz: int | None, weights: Any) -> tuple[nn.Module, torch.Tensor]:
    """(the detector's ``forward_raw`` as a module, an example float batch [2, 3, S, S] in [0, 1]).

    S is the side the detector trained at (its ``input_size``): its decoding assumes that grid.
    """
    module = model.module.eval()
    name = model.config.model
    if not callable(getattr(module, "forward_raw", None)) or not hasattr(module, "cvforge_spec"):
        raise CvforgeError(f"ONNX export of the detector {name} is not available yet", weights,
                           "export a yolo-n, yolo-s or yolov1 model")
    size = int(module.input_size)
    if imgsz and imgsz != size:
        raise CvforgeError(f"{name} exports at the side it trained at ({size}), not --imgsz {imgsz}", weights,
                           "leave out --imgsz")
    example = torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(0))
    return _RawHead(module).eval(), example


def _export(module: nn.Module, example: torch.Tensor, names: list[str], out: Path, opset: int, spatial: bool) -> None:
    """torch.onnx.export (TorchScript-based exporter) with a dynamic batch (and H, W when ``spatial``);
    an operator the exporter cannot translate becomes a CvforgeError naming it."""
    image_axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    axes: dict[str, dict[int, str]] = {"images": image_axes}
    for name in names:  # masks [B, H, W]; scores [B, C, H, W] (segment) or [B, C] (classify)
        axes[name] = ({0: "batch", 1: "height", 2: "width"} if name == "masks" else
                      {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"})
    with warnings.catch_warnings():  # tracer warnings about Python ints from shapes: expected here
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(out), input_names=["images"], output_names=names,
                              opset_version=opset, dynamic_axes=axes, dynamo=False)
        except torch.onnx.errors.OnnxExporterError as error:  # e.g. YOLOv1's adaptive pooling at 64 px
            reason = str(error).splitlines()[0].split(". Please")[0]
            raise CvforgeError(f"ONNX cannot express this model at input {tuple(example.shape)} ({reason})",
                               out, "train (or export) at another image size, e.g. a multiple of 112 "
                               "for yolov1, or try another --opset") from None


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


@torch.no_grad()
def parity_report(model: nn.Module, path: Path, images: torch.Tensor) -> str:
    """Run ``images`` through the PyTorch model and the ONNX file; a one-line report.

    Raises CvforgeError when a float output differs by more than PARITY_TOLERANCE.
    """
    import onnxruntime as ort
    expected = model.eval()(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images.numpy()})))
    parts, worst = [], 0.0
    for name, reference in expected.items():
        reference = reference.numpy()
        if np.issubdtype(reference.dtype, np.floating):
            diff = float(np.abs(got[name].astype(np.float64) - reference).max())
            worst = max(worst, diff)
            parts.append(f"{name} max |diff| {diff:.2e}")
        else:
            parts.append(f"{name} equal {float((got[name] == reference).mean()):.2%}")
    report = f"onnx parity ({path.name}, input {tuple(images.shape)}): {', '.join(parts)} (limit {PARITY_TOLERANCE:g})"
    if worst > PARITY_TOLERANCE:
        raise CvforgeError(f"ONNX output differs from PyTorch: {report}", path,
                           "try another --opset, and report it as a bug")
    return report


class OnnxModel:
    """An exported model run by onnxruntime, with the attributes ``predict`` uses of ``cvforge.Model``:
    ``task``, ``classes``, ``transforms``, ``device`` and ``module(images)``: for classify and segment
    the graph itself (a dict of output tensors); for detect the detector's Python module in eval mode
    with the graph as its ``forward_raw`` (list of uint8 [3, H, W] -> per image {"boxes", "scores", "labels"})."""

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
        self.imgsz = int(meta.get("imgsz", 224))
        self.transforms = build_transforms(self.task, False, self.imgsz)
        self.device = torch.device("cpu")
        self.module = self._detector(meta) if self.task == "detect" else self.run

    def _detector(self, meta: dict[str, str]) -> nn.Module:
        """The exported detector's module (weights untouched: the graph holds the trained ones) whose
        ``forward_raw`` is the graph, so its own letterbox, decoding and NMS run around it."""
        from cvforge.zoo import build_model
        if "model_spec" not in meta or "input_size" not in meta:
            raise CvforgeError("the ONNX detector has no model_spec / input_size metadata", self.path,
                               "export it again with `cvforge export --format onnx`")
        spec = json.loads(meta["model_spec"])
        kwargs = dict(spec["kwargs"])
        module = build_model(spec["name"], task=spec["task"], num_classes=kwargs.pop("num_classes"), **kwargs)
        module.input_size.fill_(int(meta["input_size"]))
        module.forward_raw = self.run_raw  # an instance attribute: shadows the class's network
        return module.eval()

    def run_raw(self, images: torch.Tensor) -> torch.Tensor:
        """A detector's graph: float [B, 3, S, S] in [0, 1] -> raw head outputs (module docstring)."""
        (raw,) = self.session.run(None, {"images": images.detach().cpu().float().numpy()})
        return torch.from_numpy(raw)

    def run(self, images: torch.Tensor) -> dict[str, Any]:
        """uint8 [B, 3, H, W] -> {output name: tensor}, as the PyTorch model's eval forward."""
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(None, {"images": images.cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}


def load_onnx(path: str | os.PathLike) -> OnnxModel:
    """An exported ONNX model, ready for ``cvforge.predict``."""
    return OnnxModel(path)
