"""Transfer learning: load pretrained weights into a model, saying exactly what loaded.

``load_pretrained(model, spec)`` takes
- a torchvision weight name (``ResNet18_Weights.IMAGENET1K_V1``, or ``DEFAULT`` / ``IMAGENET1K_V1`` for
  the model's own architecture), read from the torch hub cache ``<torch.hub.get_dir()>/checkpoints/``.
  No network unless ``CVFORGE_ALLOW_DOWNLOAD=1``; offline, the error names the file to put there.
- a local file: a cvforge checkpoint ({"model": state_dict, "cvforge_version": ...}) or a plain
  state_dict, possibly nested under "state_dict" or "model" (torchvision, timm, Lightning files).

Files are read with ``torch.load(weights_only=True)`` only. Keys are matched after removing wrapper
prefixes (``module.``, ``_orig_mod.``, ``model.``, ``backbone.``, ``body.``) on both sides, so a
torchvision resnet18 file fills a cvforge resnet18 ``Backbone`` or ``Classifier`` or the backbone of a
detector. Tensors of equal shape load; everything else is reported, never silently dropped (no
``strict=False``: the model's full state_dict is assembled and loaded strictly). A classifier head of
another size is re-initialised with a message; a file that matches nothing is refused.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from cvforge.errors import CvforgeError

WRAPPER_PREFIXES = ("module", "_orig_mod", "model", "features", "backbone", "body")  # features: Faster R-CNN
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
NESTED_KEYS = ("model", "state_dict", "model_state_dict")
NAME_HINT = "use a torchvision weight name like ResNet18_Weights.IMAGENET1K_V1 (or DEFAULT), or a local file"


@dataclass
class LoadReport:
    """What ``load_pretrained`` did; ``str(report)`` is one line.

    loaded, missing: model keys (missing: absent from the file; ``num_batches_tracked`` counters are not
    counted); mismatched: file keys whose model tensor has another shape; unexpected: file keys with no
    model tensor of that name.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    head_reinitialised: bool = False

    def __str__(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        lists = (("missing", self.missing), ("mismatched", self.mismatched), ("unexpected", self.unexpected))
        for label, keys in lists:
            names = f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""
            parts.append(f"{len(keys)} {label}{names}")
        return f"pretrained {self.source}: " + ", ".join(parts)


def load_pretrained(model: nn.Module, spec: str | os.PathLike) -> LoadReport:
    """Load the weights named by ``spec`` into ``model`` (in place); print and return the report."""
    state, path = read_weights(model, spec)
    report = _load_matching(model, state, str(spec), path)
    print(report)
    return report


def read_weights(model: nn.Module, spec: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """(state_dict, file) for a weight name (resolved for ``model``'s architecture) or a local file."""
    text = str(spec)
    if isinstance(spec, os.PathLike) or os.sep in text or text.endswith(FILE_SUFFIXES) or Path(text).exists():
        path = Path(text).expanduser()
        return read_state_dict(path), path
    weights = resolve_weight_name(text, architecture(model))
    path = hub_file(weights)
    if not path.is_file():
        if os.environ.get("CVFORGE_ALLOW_DOWNLOAD") != "1":
            raise CvforgeError(f"pretrained weights {weights} not found", f"expected {path}",
                               f"download {weights.url} on a machine with internet and copy it there, "
                               "or pass a local file (set CVFORGE_ALLOW_DOWNLOAD=1 to download it here)")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), progress=True)
    return read_state_dict(path), path


def architecture(model: nn.Module) -> str | None:
    """The torchvision model name behind ``model`` (its own or its backbone's ``name``), if any."""
    for candidate in (model, getattr(model, "backbone", None)):
        name = getattr(candidate, "name", None)
        if isinstance(name, str):
            return name
    spec = getattr(model, "cvforge_spec", None)
    return spec.get("name") if isinstance(spec, dict) else None


def resolve_weight_name(name: str, arch: str | None) -> torchvision.models.WeightsEnum:
    """``ResNet18_Weights.IMAGENET1K_V1``, or ``DEFAULT``/``IMAGENET1K_V1`` of ``arch``'s weights."""
    try:
        if "." in name:
            weights = torchvision.models.get_weight(name)
        elif arch is None:
            raise CvforgeError(f"cannot tell which architecture's {name} weights to load", None,
                               "pass a full weight name like ResNet18_Weights.IMAGENET1K_V1")
        else:
            weights = torchvision.models.get_model_weights(arch)[name]
    except (KeyError, ValueError) as error:
        raise CvforgeError(f"unknown pretrained weights {name!r} ({error})", None, NAME_HINT) from None
    own = _weights_enum_of(arch) if arch is not None else None
    if own is not None and type(weights) is not own:
        raise CvforgeError(f"pretrained weights {weights} are not for {arch}", None,
                           f"use one of {', '.join(str(w) for w in own)}, or DEFAULT")
    return weights


def _weights_enum_of(arch: str) -> type | None:
    try:
        return torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        return None


def hub_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch hub caches the file of ``weights``: ``<hub dir>/checkpoints/<file name of its url>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a state_dict, or one nested under "model"/"state_dict"."""
    if not path.is_file():
        raise CvforgeError("weights file not found", path, f"check the path; or {NAME_HINT}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # not written by torch.save at all (or by a pre-1.6 torch)
            raise CvforgeError("cannot read weights file (not a PyTorch file, or one holding unsafe Python objects)",
                               path, "pass a state_dict saved with torch.save") from None
        raise CvforgeError("weights file holds Python objects that are unsafe to load", path,
                           "save tensors only: torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CvforgeError(f"cannot read weights file ({type(error).__name__})", path,
                           "is it a complete PyTorch .pt/.pth file?") from None
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CvforgeError("no weights (named tensors) in file", path,
                           "save a state_dict: torch.save(model.state_dict(), path)")
    return tensors


def canonical(key: str) -> str:
    """A key without its leading wrapper names (``module.``, ``backbone.``, ``body.``, ...):
    ``module.backbone.body.layer1.0.conv1.weight`` -> ``layer1.0.conv1.weight``."""
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in WRAPPER_PREFIXES:
        parts = parts[1:]
    return ".".join(parts)


def _match_keys(model_keys: list[str], file_keys: list[str]) -> dict[str, str]:
    """file key -> model key, by exact name, else by canonical name where that is unambiguous."""
    by_canonical: dict[str, list[str]] = {}
    for key in model_keys:
        by_canonical.setdefault(canonical(key), []).append(key)
    exact = set(model_keys)
    pairs = {}
    for key in file_keys:
        candidates = [key] if key in exact else by_canonical.get(canonical(key), [])
        if len(candidates) == 1:
            pairs[key] = candidates[0]
    return pairs


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, path: Path) -> LoadReport:
    """Copy the file's tensors into the model where names and shapes agree; report the rest."""
    full = model.state_dict()
    pairs = _match_keys(list(full), list(state))
    report = LoadReport(source)
    for file_key, tensor in state.items():
        model_key = pairs.get(file_key)
        if model_key is None:
            report.unexpected.append(file_key)
        elif tensor.shape != full[model_key].shape:
            report.mismatched.append(file_key)
        else:
            full[model_key] = tensor
            report.loaded.append(model_key)
    if not report.loaded:
        raise CvforgeError(f"no weights in the file match the model ({architecture(model) or type(model).__name__})",
                           path, "was it saved from another architecture? pass weights of the same model")
    _load_head(model, state, pairs, full, report)
    model.load_state_dict(full)  # strict: every key of the model is accounted for
    # missing: what the file does not have at all (a tensor of the wrong shape is listed as mismatched)
    done = set(report.loaded) | {pairs[k] for k in report.mismatched}
    report.missing = [k for k in full if k not in done and not k.endswith("num_batches_tracked")]
    return report


def _head_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(state_dict prefix, layer) of the model's final classifier layer (``head.fc``), if it has one."""
    fc = getattr(getattr(model, "head", None), "fc", None)
    if not isinstance(fc, nn.Linear):
        return None
    return next(f"{name}." for name, module in model.named_modules() if module is fc), fc


def _load_head(model: nn.Module, state: dict[str, torch.Tensor], pairs: dict[str, str],
               full: dict[str, torch.Tensor], report: LoadReport) -> None:
    """Load the file's classifier into the model's head if it fits, else say it is re-initialised.

    The file's classifier is the tensor matched to the head by name (a cvforge checkpoint), or else the
    last 2-D weight nothing matched (torchvision's ``fc``, ``classifier.3``, ...).
    """
    found = _head_linear(model)
    if found is None or f"{found[0]}weight" in report.loaded:
        return
    prefix, fc = found
    by_name = [k for k, m in pairs.items() if m == f"{prefix}weight"]
    unmatched = [k for k in report.unexpected if k.endswith("weight") and state[k].ndim == 2]
    file_key = (by_name or unmatched[-1:] or [None])[0]
    if file_key is None:
        return
    weight, bias = state[file_key], state.get(file_key[:-len("weight")] + "bias")
    if weight.shape == fc.weight.shape and bias is not None and bias.shape == fc.bias.shape:
        full[f"{prefix}weight"], full[f"{prefix}bias"] = weight, bias
        report.loaded += [f"{prefix}weight", f"{prefix}bias"]
        report.unexpected = [k for k in report.unexpected if k not in (file_key, file_key[:-len("weight")] + "bias")]
        return
    if weight.shape[0] != fc.out_features:
        print(f"head: {weight.shape[0]} classes in file, {fc.out_features} in model — re-initialised")
    else:
        print(f"head: the file's classifier ({file_key}) takes {weight.shape[1]} features, "
              f"the model's {fc.in_features} — re-initialised")
    getattr(model.head, "reset_parameters", fc.reset_parameters)()
    full[f"{prefix}weight"], full[f"{prefix}bias"] = fc.weight.detach().clone(), fc.bias.detach().clone()
    report.head_reinitialised = True
