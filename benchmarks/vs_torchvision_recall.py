"""RPN recall and detections per image of the two Faster R-CNNs a ``vs_torchvision.py --project DIR`` run trained.

Where does an accuracy gap between the pair come from, the proposals or the box head? For each side's
``last.pt``: the share of val objects that one of the RPN's top-N proposals overlaps at IoU 0.5 / 0.7
(proposals in the order the RPN returns them, best first), and the detections per image the whole model keeps.

    python benchmarks/vs_torchvision_recall.py --project runs/vs_tv/p256 --data shapes:train=192,val=64,size=256 --imgsz 256
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.ops import box_iou
from vs_torchvision import build  # benchmarks/vs_torchvision.py

from cvforge.data import build_dataset

TOPS = (10, 50, 100, 300, 1000)
THRESHOLDS = (0.5, 0.7)


def proposals(model: torch.nn.Module, side: str, image: torch.Tensor) -> torch.Tensor:
    """The RPN's proposals [P, 4] for one uint8 image [3, H, W], in its pixels, best first."""
    if side == "cvforge":
        batch, scales, sizes = model.resize([image])
        return model.propose(batch, model.features(model.normalize(batch)), sizes)[0] / scales[0]
    net = model.net
    images, _ = net.transform([image.float() / 255])
    found, _ = net.rpn(images, net.backbone(images.tensors))
    scale = torch.tensor(images.image_sizes[0], dtype=torch.float32) / torch.tensor(image.shape[-2:])
    return found[0] / scale.flip(0).repeat(2)


@torch.inference_mode()
def measure(model: torch.nn.Module, side: str, val, limit: int) -> dict:
    hits = {(n, t): 0 for n in TOPS for t in THRESHOLDS}
    objects, detections = 0, 0
    for i in range(min(limit, len(val))):
        image, target = val[i]
        image, gt = image.as_subclass(torch.Tensor), target["boxes"].float()
        found = proposals(model, side, image)
        objects += len(gt)
        detections += len(model([image])[0]["boxes"])
        if len(gt) and len(found):
            for n in TOPS:
                best = box_iou(gt, found[:n]).amax(1)
                for t in THRESHOLDS:
                    hits[(n, t)] += int((best >= t).sum())
    images = min(limit, len(val))
    return {"recall": {k: v / max(objects, 1) for k, v in hits.items()}, "detections/img": detections / images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="the --project of a vs_torchvision.py run")
    parser.add_argument("--data", required=True, help="its --data")
    parser.add_argument("--imgsz", type=int, required=True, help="its --imgsz")
    parser.add_argument("--runs", default="faster-cvforge-seed0,faster-torchvision-seed0", help="run folders under --project")
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    val = build_dataset(args.data, "val", "detect")
    for run in args.runs.split(","):
        side = "torchvision" if "torchvision" in run else "cvforge"
        model = build("faster", side, len(val.classes), args.imgsz)
        state = torch.load(args.project / run / "weights" / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        result = measure(model.eval(), side, val, args.images)
        for t in THRESHOLDS:
            recall = " / ".join(f"{result['recall'][(n, t)]:.2f}" for n in TOPS)
            print(f"{run}: RPN recall@{t} with the top {'/'.join(map(str, TOPS))}: {recall}")
        print(f"{run}: {result['detections/img']:.1f} detections per image")


if __name__ == "__main__":
    main()
