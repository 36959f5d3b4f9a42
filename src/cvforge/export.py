"""``cvforge export --format onnx``: the plain eval model to ONNX, checked against PyTorch with onnxruntime.

    path = export_onnx("runs/segment/train/weights/best.pt")    # -> best.onnx beside it
    model = load_onnx(path)                                      # what `cvforge predict --weights x.onnx` runs

What is exported is the model's own eval-mode ``forward`` (no second, export-only code path): it takes
the same uint8 [B, 3, H, W] batch and its output dict becomes the graph's outputs, in the dict's order
and under its keys (segment: ``masks`` int64 [B, H, W] and ``scores`` float [B, C, H, W] softmax;
classify: ``scores`` [B, C]). The batch is dynamic; for segment, H and W are dynamic too (the FCN pads
and crops inside the graph), for classify they are ``imgsz``. The ONNX file's ``metadata_props`` hold
``task``, ``classes`` (JSON), ``imgsz``, ``model`` and ``cvforge_version``, so it runs on its own.

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
EXPORTABLE_TASKS = ("classify", "segment")


class _OutputsAsTuple(nn.Module):
    """The model itself, with its output dict handed to the exporter as a tuple (ONNX has no dicts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(images).values())


def export_onnx(weights: str | os.PathLike, out: str | os.PathLike | None = None, imgsz: int | None = None,
                opset: int = 17, check: bool = True) -> Path:
    """Export a cvforge checkpoint to ONNX (default: ``<weights>.onnx`` beside it); returns the path.

    imgsz: side of the example input (default: the training ``imgsz``). check: run the onnxruntime parity
    check (raises ``CvforgeError`` when an output differs by more than ``PARITY_TOLERANCE``).
    """
    from cvforge import __version__
    from cvforge.api import load
    model = load(weights, device="cpu")
    if model.task not in EXPORTABLE_TASKS:
        raise CvforgeError(f"ONNX export of {model.task} models is not available yet", weights,
                           f"export a {' or '.join(EXPORTABLE_TASKS)} model")
    imgsz = imgsz or model.config.imgsz
    out = Path(out) if out else Path(weights).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = _OutputsAsTuple(model.module.eval()).eval()
    example = torch.randint(0, 256, (2, 3, imgsz, imgsz), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        names = list(model.module(example).keys())
    _export(module, example, names, out, opset, spatial=model.task == "segment")
    metadata = {"task": model.task, "classes": json.dumps(model.classes), "imgsz": str(imgsz),
                "model": str(model.config.model), "cvforge_version": __version__}
    _set_metadata(out, metadata)
    if check:
        print(parity_report(model.module, out, example))
    return out


def _export(module: nn.Module, example: torch.Tensor, names: list[str], out: Path, opset: int, spatial: bool) -> None:
    """torch.onnx.export (TorchScript-based exporter) with a dynamic batch (and H, W when ``spatial``)."""
    image_axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    axes: dict[str, dict[int, str]] = {"images": image_axes}
    for name in names:  # masks [B, H, W]; scores [B, C, H, W] (segment) or [B, C] (classify)
        axes[name] = ({0: "batch", 1: "height", 2: "width"} if name == "masks" else
                      {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"})
    with warnings.catch_warnings():  # tracer warnings about Python ints from shapes: expected here
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(out), input_names=["images"], output_names=names,
                          opset_version=opset, dynamic_axes=axes, dynamo=False)


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
    ``task``, ``classes``, ``transforms``, ``device`` and ``module(images) -> dict of output tensors``."""

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
        self.module = self.run

    def run(self, images: torch.Tensor) -> dict[str, Any]:
        """uint8 [B, 3, H, W] -> {output name: tensor}, as the PyTorch model's eval forward."""
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(None, {"images": images.cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}


def load_onnx(path: str | os.PathLike) -> OnnxModel:
    """An exported ONNX model, ready for ``cvforge.predict``."""
    return OnnxModel(path)
