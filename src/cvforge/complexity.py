"""What a model costs: parameters and floating-point operations of one forward pass (``cvforge models``,
``cvforge bench``).

    params, flops = params_and_flops(model, imgsz=640)     # model in any mode; measured in eval mode

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one eval forward of a 1-image batch
(a uint8 ``imgsz`` x ``imgsz`` image): matrix products and convolutions, a multiply-add counting 2 FLOPs;
element-wise work, pooling, RoI ops and NMS are not counted. A detector resizes its input to its own
``input_size``, so its count is at that size (``cvforge models`` builds each detector with ``imgsz``).

Selective search runs outside the network on the CPU, and the work of R-CNN, SPPNet and Fast R-CNN grows
with the number of proposals; their FLOPs are counted for ``FLOPS_PROPOSALS`` fixed proposals (about
what selective search's fast mode gives a 128-px image), and the selective search itself is not counted.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvforge.config import DETECTION_TASKS
from cvforge.models.detection.proposals import FileProposals, SelectiveSearch

FLOPS_PROPOSALS = 100
# `cvforge models`: each task's usual input side and the class count of its usual benchmark
TABLE_IMGSZ = {"classify": 224, "segment": 512, "detect": 640, "instance": 640}
TABLE_CLASSES = {"classify": 1000, "segment": 21, "detect": 80, "instance": 80}  # ImageNet, VOC, COCO


def params_and_flops(model: nn.Module, imgsz: int, task: str | None = None) -> tuple[int, int]:
    """(parameters, FLOPs of one eval forward of one ``imgsz`` x ``imgsz`` image). ``task`` (default: the
    model's ``cvforge_spec``) says whether it takes a list of images (detectors) or a batch tensor."""
    task = task or getattr(model, "cvforge_spec", {}).get("task", "classify")
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    image = torch.randint(0, 256, (3, imgsz, imgsz), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = [image.to(device)] if task in DETECTION_TASKS else image[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with fixed_proposals(model), torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    return params, int(counter.get_total_flops())


def model_table(task: str | None = None, imgsz: int | None = None) -> list[dict[str, Any]]:
    """One row per listed model (``cvforge.zoo.list_models``): {"model", "task", "params", "flops", "imgsz",
    "note"}, built untrained with TABLE_CLASSES classes at ``imgsz`` (default: TABLE_IMGSZ of its task)."""
    from cvforge.zoo import build_model, builder_options, list_models
    rows = []
    for name, model_task in list_models(task):
        side = imgsz or TABLE_IMGSZ[model_task]
        sized = {"imgsz": side} if "imgsz" in builder_options(name, model_task) else {}
        model = build_model(name, task=model_task, num_classes=TABLE_CLASSES[model_task], **sized)
        params, flops = params_and_flops(model, side)
        rows.append({"model": name, "task": model_task, "params": params, "flops": flops, "imgsz": side,
                     "note": flops_note(model)})
    return rows


def flops_note(model: nn.Module) -> str:
    """What a model's FLOP count depends on besides the input size ("" when nothing)."""
    if uses_selective_search(model):
        return f"{FLOPS_PROPOSALS} proposals; selective search not counted"
    if getattr(model, "cvforge_spec", {}).get("task") == "instance":
        return "mask head per detection: varies with the detections"
    return ""


def uses_selective_search(model: nn.Module) -> bool:
    """True for detectors whose proposals come from outside the network (R-CNN, SPPNet, Fast R-CNN)."""
    return isinstance(getattr(model, "source", None), (SelectiveSearch, FileProposals))


@contextlib.contextmanager
def fixed_proposals(model: nn.Module, count: int = FLOPS_PROPOSALS) -> Iterator[None]:
    """Within the block, a selective-search detector gets ``count`` fixed boxes per image as its proposals
    (so that a count does not depend on one image's segmentation); other models are left as they are."""
    if not uses_selective_search(model):
        yield
        return
    source = model.source
    model.source = FixedBoxes(count)
    try:
        yield
    finally:
        model.source = source


class FixedBoxes:
    """``source(image) -> float [count, 4]`` xyxy boxes of 10-50 % of the image's sides, the same every call."""

    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(0)
        corner = torch.rand(count, 2, generator=generator) * 0.5
        extent = 0.1 + 0.4 * torch.rand(count, 2, generator=generator)
        self.fractions = torch.cat([corner, (corner + extent).clamp(max=1.0)], 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        return self.fractions * torch.tensor([width, height, width, height], dtype=torch.float32)
