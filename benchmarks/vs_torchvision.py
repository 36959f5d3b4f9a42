"""cvforge's Faster R-CNN and Mask R-CNN against torchvision's own, same backbone, data and budget, one run.

Pairs (weights=None; the machine is offline, so no ImageNet backbone either):
    faster  cvforge ``faster_rcnn_fpn`` on mobilenet_v3_large  vs  torchvision ``fasterrcnn_mobilenet_v3_large_fpn``
    mask    cvforge ``mask_rcnn`` (ResNet-50-FPN)              vs  torchvision ``maskrcnn_resnet50_fpn``
Both sides of a pair train through cvforge's engine (same loader, seed, SGD, schedule, epochs, batch,
image size; torchvision resizes to ``min_size = max_size = imgsz``, cvforge to ``imgsz``) and are
scored by cvforge's evaluator on the val split: box mAP50-95 / mAP50 and, for Mask R-CNN, mask
mAP50-95, of the last epoch's weights (evaluated once, after training). cvforge's side takes torchvision's
settings, so that the two differ by implementation and random draws only: its anchor sizes (``anchor_reference
= imgsz``: sizes in pixels as given), its box loss (smooth L1 with beta 1/9; cvforge's default is Fast R-CNN's 1)
and 1000 proposals at test (cvforge's default: the paper's 300), and for the Faster R-CNN pair its RPN score
threshold (0.05, its mobilenet builder's) and FPN inputs (two stride-32 maps, blocks 13 and 16:
``fpn_blocks``); the two models then have the same parameters, one for one (``tests/test_torchvision_parity.py``:
with the same weights they return the same detections). ``--cvforge-option KEY=VALUE`` overrides any of these
(``box_beta=1 --cvforge-option 'post_nms_top_n=[2000,300]'``: cvforge's defaults). ``--torchvision-fpn-inputs 1``
gives torchvision's model one FPN input, the last block's (a diagnostic; cvforge's side gets the same with
``--cvforge-option 'fpn_blocks=[features.16]'``). Speeds:
training images/s (forward + backward + SGD step on the same batches) and inference ms/image
(batch 1), medians of steps run alternately on the two sides (``speeds``), so that a busy shared
machine slows both alike; ``--epochs 0`` measures speed only.

From random weights neither side learns much in a CPU budget (both stay under 1 mAP point), so
``--pretrain-epochs N`` first trains the pair's backbone as a classifier on shapes crops (another seed's
images than the detection data) and loads that same backbone into both models, all of it still
trainable with batch norm as before: the stand-in for ImageNet weights, as in ``benchmarks/lineage.py``.
With ``--project DIR`` the runs are kept there and a rerun reuses the pretrained backbone it finds.

    python benchmarks/vs_torchvision.py                                 # the BENCHMARKS.md table (CPU: long)
    python benchmarks/vs_torchvision.py --pairs faster --epochs 1 --data shapes:train=16,val=8
    python benchmarks/vs_torchvision.py --pairs mask --epochs 0 --proposals shared    # speed, equal work per step
    python benchmarks/vs_torchvision.py --pairs faster --pretrain-epochs 30 --data shapes:train=192,val=64,size=256 \
        --imgsz 256 --epochs 10 --project runs/vs_tv
    bash benchmarks/vs_torchvision_gpu.sh          # on a GPU: both pairs, two seeds, the sides side by side

Prints a Markdown table (and writes it to --out when given).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _markdown import markdown_table  # benchmarks/_markdown.py
from torch import nn

import cvforge
from cvforge.api import evaluate_module
from cvforge.config import TrainConfig
from cvforge.data import build_dataset
from cvforge.data.loader import build_loader
from cvforge.data.transforms import build_transforms
from cvforge.engine.optim import resolve_device, seed_everything, to_device
from cvforge.engine.trainer import Trainer
from cvforge.models.weights import load_pretrained
from cvforge.zoo import build_model

TV_ANCHORS = (32, 64, 128, 256, 512)  # torchvision's anchor sizes (in input pixels)
TV_FPN_BLOCKS = ["features.13", "features.16"]  # torchvision's mobilenet_v3_large FPN inputs (both stride 32)
TV_PROPOSALS = (2000, 1000)  # proposals kept after the RPN's NMS (training, test), torchvision's
BACKBONES = {"faster": "mobilenet_v3_large", "mask": "resnet50"}
PRETRAIN_DATA = "shapes:train=400,val=60,size=96,seed=1"  # crops for the backbones (another seed than --data)
# AdamW recipes per backbone, in float32 on every device; resnet50's, the best of four tried on a GPU
# (BENCHMARKS.md), stays at chance with mobilenet's (lr 4e-3, 64 px) and learns at lr 1e-3 on the crops' own 96 px
PRETRAIN_RECIPES = {"mobilenet_v3_large": {"lr": 4e-3, "imgsz": 64, "amp": False},
                    "resnet50": {"lr": 1e-3, "imgsz": 96, "amp": False}}
PAIRS = {
    "faster": ("detect", "cvforge faster_rcnn_fpn (mobilenet_v3_large)", "torchvision fasterrcnn_mobilenet_v3_large_fpn"),
    "mask": ("instance", "cvforge mask_rcnn (resnet50 FPN)", "torchvision maskrcnn_resnet50_fpn"),
}


class TorchvisionDetector(nn.Module):
    """A torchvision detection model behind cvforge's contract: uint8 images in, 0-based labels, uint8
    masks [K, H, W] out; in training its loss dict."""

    def __init__(self, pair: str, num_classes: int, imgsz: int, pretrained: str | None = None,
                 fpn_inputs: int = 2):
        super().__init__()
        from torchvision.models import detection
        builder = detection.fasterrcnn_mobilenet_v3_large_fpn if pair == "faster" else detection.maskrcnn_resnet50_fpn
        # weights_backbone=None also keeps plain BatchNorm and every layer trainable, as on cvforge's side
        self.net = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                           min_size=imgsz, max_size=imgsz)
        if pair == "faster" and fpn_inputs == 1:
            self.net = one_input_mobilenet_fpn(num_classes, imgsz)
        if pretrained:  # the same classifier checkpoint cvforge's backbone loads (keys match after prefixes)
            load_pretrained(self.net.backbone.body, pretrained)

    def forward(self, images, targets=None):
        images = [image.float() / 255 for image in images]
        if self.training:
            keep = ("boxes", "masks")
            targets = [{**{k: t[k] for k in keep if k in t}, "labels": t["labels"] + 1} for t in targets]
            return self.net(images, targets)
        out = []
        for o in self.net(images):
            o = {**o, "labels": o["labels"] - 1}
            if "masks" in o:
                o["masks"] = (o["masks"][:, 0] >= 0.5).to(torch.uint8)
            out.append(o)
        return out


def one_input_mobilenet_fpn(num_classes: int, imgsz: int) -> nn.Module:
    """torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` as its builder makes it (random weights, plain batch
    norm, all layers trainable, RPN score threshold 0.05), except that its FPN takes only the last block's
    960-channel map (+ the pooled level), as cvforge's ``fpn_blocks=["features.16"]``, instead of blocks 13 and 16:
    a diagnostic of where an accuracy gap comes from (``--torchvision-fpn-inputs 1``)."""
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor
    backbone = _mobilenet_extractor(mobilenet_v3_large(weights=None), True, 6, returned_layers=[5])
    anchors = AnchorGenerator((TV_ANCHORS,) * 2, ((0.5, 1.0, 2.0),) * 2)
    return FasterRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors, rpn_score_thresh=0.05,
                      min_size=imgsz, max_size=imgsz)


def build(pair: str, side: str, num_classes: int, imgsz: int, pretrained: str | None = None,
          options: dict | None = None, fpn_inputs: int = 2) -> nn.Module:
    """One side of a pair; ``options`` (``--cvforge-option``) go to cvforge's model builder."""
    if side == "torchvision":
        return TorchvisionDetector(pair, num_classes, imgsz, pretrained, fpn_inputs)
    # torchvision's settings where they are settings, not implementation: its anchor sizes, its box loss (smooth L1,
    # beta 1/9; cvforge's default is Fast R-CNN's 1) and its 1000 proposals at test (cvforge's default: the paper's 300)
    options = {"box_beta": 1 / 9, "post_nms_top_n": TV_PROPOSALS, **(options or {})}
    if pair == "faster":  # as torchvision's mobilenet FPN: two stride-32 maps + a pooled level, 5 sizes x 3 ratios
        # each, and its builder's RPN score threshold 0.05 (without it the box head trains on ~500 mostly-background
        # regions per image: 3.3 vs 7.3 mAP50 in BENCHMARKS.md)
        options = {"rpn_score_thresh": 0.05, "fpn_blocks": TV_FPN_BLOCKS, **options}
        return build_model("faster_rcnn_fpn", task="detect", num_classes=num_classes, backbone=BACKBONES[pair],
                           imgsz=imgsz, anchor_sizes=[list(TV_ANCHORS)] * (len(options["fpn_blocks"]) + 1),
                           anchor_reference=imgsz, pretrained=pretrained, **options)
    return build_model("mask_rcnn", task="instance", num_classes=num_classes, imgsz=imgsz, backbone=BACKBONES[pair],
                       anchor_sizes=list(TV_ANCHORS), anchor_reference=imgsz, pretrained=pretrained, **options)


def pretrain(pair: str, args: argparse.Namespace, project: Path) -> str | None:
    """The pair's backbone as a shapes-crop classifier (``--pretrain-epochs``); its best.pt, or None."""
    if not args.pretrain_epochs:
        return None
    done = project / "pretrain" / pair / "weights" / "best.pt"
    if done.exists():  # a rerun with the same --project reuses its backbone
        return str(done)
    result = cvforge.train(task="classify", model=BACKBONES[pair], data=PRETRAIN_DATA, epochs=args.pretrain_epochs,
                           optimizer="adamw", weight_decay=0.05, workers=args.workers, device=args.device, seed=0,
                           project=str(project / "pretrain"), name=pair, **PRETRAIN_RECIPES[BACKBONES[pair]])
    print(f"pretrained {BACKBONES[pair]} on {PRETRAIN_DATA} crops: val top-1 {result.best_metric:.3f}")
    return str(result.best or result.last)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> float:
    """Seconds of one training step (forward, backward, SGD step)."""
    start = time.perf_counter()
    loss = sum(model(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if loss.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def infer(model: nn.Module, image: torch.Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    model([image])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def shared_proposals(targets: list[dict], side: int, count: int, seed: int) -> list[torch.Tensor]:
    """Per image ``count`` proposals float [count, 4] xyxy in input pixels, the same for both models:
    five per gt box are that box moved and rescaled at random (by up to 20 %: mostly foreground, as a
    trained RPN's best proposals), the rest random boxes."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for target in targets:
        gt = target["boxes"].float().cpu().reshape(-1, 4)
        near = min(5 * len(gt), count)
        base = gt.repeat_interleave(5, 0)[:near]
        centre, size = (base[:, :2] + base[:, 2:]) / 2, base[:, 2:] - base[:, :2]
        centre = centre + (torch.rand(near, 2, generator=generator) - 0.5) * 0.4 * size
        size = size * (0.8 + 0.4 * torch.rand(near, 2, generator=generator))
        corners = torch.rand(count - near, 2, 2, generator=generator) * side
        far = torch.cat([corners.min(1).values, corners.max(1).values + 2], 1)
        boxes = torch.cat([torch.cat([centre - size / 2, centre + size / 2], 1), far])
        out.append(boxes.clamp(0, side).to(target["boxes"].device))
    return out


def replace_proposals(model: nn.Module, holder: dict) -> None:
    """Make the model's RPN hand ``holder["proposals"]`` to the RoI heads (its own losses still count)."""
    rpn = model.net.rpn if isinstance(model, TorchvisionDetector) else model.rpn.network
    rpn.register_forward_hook(lambda module, inputs, output:
                              (holder["proposals"], output[1]) if module.training else output)


def speeds(pair: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per side (train images/s, inference ms/image): median of ``--speed-steps`` training steps on the
    same batches and of as many single-image inferences, the two sides interleaved step by step so a
    busy shared machine slows both alike. Untrained models (speed does not depend on the weights much;
    inference keeps at most 100 detections either way).

    The work of a training step's RoI heads grows with the foreground regions sampled from the RPN's
    proposals, and two untrained RPNs propose differently (one initialisation's proposals hit the
    objects more often: +40 % mask regions in one measurement). ``--proposals shared`` hands both RoI heads
    the same proposals per batch (``shared_proposals``, 1000 per image), so both sides do the same work;
    ``own`` times each model as it is."""
    task = PAIRS[pair][0]
    train = build_dataset(args.data, "train", task, transforms=build_transforms(task, True, args.imgsz))
    val = build_dataset(args.data, "val", task, transforms=build_transforms(task, False, args.imgsz))
    loader = build_loader(train, task, batch_size=args.batch, shuffle=True, seed=0)
    batches = [batch for batch, _ in zip(loader, range(args.speed_steps + 1))]
    device = resolve_device(args.device)
    batches = [to_device(batch, device) for batch in batches]
    models = {}
    for side in ("cvforge", "torchvision"):
        seed_everything(0)
        model = build(pair, side, len(train.classes), args.imgsz, options=args.cvforge_options).to(device).train()
        models[side] = (model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))
    holder: dict = {}
    if args.proposals == "shared":
        if any(max(image.shape[-2:]) != args.imgsz for images, _ in batches for image in images):
            raise SystemExit("--proposals shared needs images of side --imgsz (both models then work in their pixels)")
        for model, _ in models.values():
            replace_proposals(model, holder)
    times: dict[str, list[float]] = {side: [] for side in models}
    for step, (images, targets) in enumerate(batches):  # the first step of each side is a warm-up
        holder["proposals"] = shared_proposals(targets, args.imgsz, 1000, seed=step)
        for side, (model, optimizer) in models.items():
            times[side].append(train_step(model, optimizer, images, targets))
    for model, _ in models.values():
        model.eval()
    latency: dict[str, list[float]] = {side: [] for side in models}
    for i in range(args.speed_steps + 1):
        image = val[i % len(val)][0].as_subclass(torch.Tensor).to(device)
        for side, (model, _) in models.items():
            latency[side].append(infer(model, image, device))
    return {side: (args.batch / statistics.median(times[side][1:]), 1000 * statistics.median(latency[side][1:]))
            for side in models}


def accuracy(pair: str, side: str, args: argparse.Namespace, project: Path, pretrained: str | None) -> dict:
    """Train through cvforge's engine (no validation on the way), then evaluate the last weights once;
    the metrics and the training minutes."""
    task, ours, reference = PAIRS[pair]
    config = TrainConfig(task=task, model=f"{pair}-{side}", data=args.data, epochs=args.epochs, imgsz=args.imgsz,
                         batch=args.batch, workers=args.workers, device=args.device, optimizer="sgd", lr=args.lr,
                         weight_decay=1e-4, warmup_epochs=1.0, patience=0, seed=args.seed, project=str(project),
                         name=f"{pair}-{side}-seed{args.seed}", metric="loss",
                         amp={"auto": None, "on": True, "off": False}[args.amp], amp_dtype=args.amp_dtype)
    train = build_dataset(args.data, "train", task, transforms=build_transforms(task, True, args.imgsz))
    val = build_dataset(args.data, "val", task, transforms=build_transforms(task, False, args.imgsz))
    seed_everything(args.seed)
    model = build(pair, side, len(train.classes), args.imgsz, pretrained, args.cvforge_options,
                  args.torchvision_fpn_inputs)
    result = Trainer(config, model, train).fit()
    last = evaluate(model, val, task, args)
    row = {"model": ours if side == "cvforge" else reference, "seed": args.seed,
           "box mAP50-95": last["mAP50-95"], "box mAP50": last["mAP50"]}
    if task == "instance":
        row["mask mAP50-95"] = last["mask_mAP50-95"]
    row["train min"] = sum(r["time"] for r in result.history) / 60
    row["params (M)"] = sum(p.numel() for p in model.parameters()) / 1e6
    return row


def evaluate(model: nn.Module, val, task: str, args: argparse.Namespace) -> dict[str, float]:
    """cvforge's evaluator over the val split (what ``cvforge eval`` computes), batch ``--batch``."""
    device = resolve_device(args.device)
    evaluator = evaluate_module(model.to(device).eval(), val, task, device, batch=args.batch)
    return {key: float(value) for key, value in evaluator.compute().items()}


def table(rows: list[dict]) -> str:
    return markdown_table(rows, lambda k, v: f"{100 * v:.1f}" if "mAP" in k and isinstance(v, float)
                          else f"{v:.2f}" if k == "train img/s" else f"{v:.1f}" if isinstance(v, float) else str(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shapes:train=128,val=48")
    parser.add_argument("--pairs", default="faster,mask")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the detectors' initialisation and data order")
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="mixed precision while training (auto: cvforge's default, float16 on CUDA only)")
    parser.add_argument("--amp-dtype", choices=("", "float16", "bfloat16"), default="",
                        help="autocast type when AMP is on ('': float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--speed-steps", type=int, default=10, help="timed steps per side (interleaved; 0: no timing)")
    parser.add_argument("--prepare", action="store_true",
                        help="only make the data sets and pretrain the backbones (needs --project), then stop")
    parser.add_argument("--proposals", choices=("own", "shared"), default="own",
                        help="training speed with each RPN's own proposals, or the same ones on both sides")
    parser.add_argument("--pretrain-epochs", type=int, default=0,
                        help="first train the backbone on shapes crops and start both models from it (0: from scratch)")
    parser.add_argument("--project", help="keep the runs (and the pretrained backbones, reused) here; default: a temp dir")
    parser.add_argument("--cvforge-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a model option for cvforge's side, e.g. box_beta=0.111 (repeatable; values as YAML)")
    parser.add_argument("--torchvision-fpn-inputs", type=int, choices=(1, 2), default=2,
                        help="faster pair: 1 feeds torchvision's FPN only the last block's map, as cvforge's (diagnostic)")
    parser.add_argument("--sides", default="cvforge,torchvision", help="which sides train (speeds: both)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    args.cvforge_options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.cvforge_option)}
    if args.prepare and not (args.project and args.pretrain_epochs):
        parser.error("--prepare needs --project (where the runs find what it made) and --pretrain-epochs")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        project = args.project or temporary
        for pair in args.pairs.split(","):
            if args.prepare:  # the data sets and the pretrained backbone, for runs that start side by side
                for split in ("train", "val"):
                    build_dataset(args.data, split, PAIRS[pair][0])
                pretrain(pair, args, Path(project))
                continue
            measured = speeds(pair, args) if args.speed_steps else {}
            pretrained = pretrain(pair, args, Path(project)) if args.epochs else None
            for side in args.sides.split(","):
                row = accuracy(pair, side, args, Path(project), pretrained) if args.epochs else {"model": PAIRS[pair][1 + (side != "cvforge")]}
                if side in measured:
                    row["train img/s"], row["infer ms/img"] = measured[side]
                rows.append(row)
                print(table(rows[-1:]), flush=True)
    if args.prepare:
        return
    start = (f"backbones pretrained {args.pretrain_epochs} epochs on {PRETRAIN_DATA} crops" if args.pretrain_epochs
             else "from scratch")
    text = (f"data {args.data}, {args.epochs} epochs, imgsz {args.imgsz}, batch {args.batch}, SGD lr {args.lr} "
            f"(momentum 0.9, weight decay 1e-4, 1 warm-up epoch, cosine), AMP {args.amp} {args.amp_dtype}, "
            f"{start}; mAP in points\n\n{table(rows)}")
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
