"""FCN-32s / 16s / 8s x deconv / bilinear on the built-in shapes data, plus torchvision's fcn_resnet50.

Every model trains from scratch (no pretrained weights: the machine is offline) through cvforge's
engine with the same data, epochs, image size, batch, optimizer and schedule, then is measured on the
val split: mIoU (best epoch), train images/s (mean over the run) and inference ms/image (batch 1,
median over the val images, full-size images as ``cvforge eval`` sees them). torchvision's
``fcn_resnet50(weights=None, weights_backbone=None)`` is the reference implementation: a dilated
ResNet-50 (output stride 8) with a 3x3 conv head and bilinear upsampling; here it is wrapped to take
uint8 batches and return cvforge's loss / prediction dicts.

    python benchmarks/fcn.py                                     # the BENCHMARKS.md table (CPU: long)
    python benchmarks/fcn.py --epochs 2 --data shapes:train=64,val=32 --models fcn8s-deconv
    python benchmarks/fcn.py --device cuda --epochs 30 --batch 16

Prints a Markdown table (and writes it to --out when given).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _markdown import markdown_table  # benchmarks/_markdown.py
from torch import nn

from cvforge.config import TrainConfig
from cvforge.data import build_dataset
from cvforge.data.transforms import build_transforms
from cvforge.engine.optim import seed_everything
from cvforge.engine.trainer import Trainer
from cvforge.eval import build_evaluator
from cvforge.models.backbones import Normalize
from cvforge.models.fcn import segmentation_loss
from cvforge.zoo import build_model

VARIANTS = [f"{name}-{up}" for name in ("fcn32s", "fcn16s", "fcn8s") for up in ("deconv", "bilinear")]
REFERENCE = "torchvision-fcn_resnet50"


class TorchvisionFCN(nn.Module):
    """torchvision's ``fcn_resnet50`` behind cvforge's model contract (uint8 in, loss / prediction dicts out)."""

    def __init__(self, num_classes: int):
        super().__init__()
        from torchvision.models.segmentation import fcn_resnet50
        self.net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        self.normalize = Normalize()

    def forward(self, images: torch.Tensor, targets: dict | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(self.normalize(images))["out"]
        if self.training:
            return {"loss_seg": segmentation_loss(logits, targets["mask"].long())}
        scores = logits.float().softmax(dim=1)
        return {"masks": scores.argmax(dim=1), "scores": scores}


def build(name: str, num_classes: int, backbone: str) -> nn.Module:
    if name == REFERENCE:
        return TorchvisionFCN(num_classes)
    variant, upsample = name.split("-")
    return build_model(variant, task="segment", num_classes=num_classes, backbone=backbone, upsample=upsample)


@torch.inference_mode()
def inference_ms(model: nn.Module, dataset, device: torch.device, limit: int = 32) -> float:
    """Median milliseconds per image at batch 1 over up to ``limit`` val images (after 2 warm-ups)."""
    model.eval()
    times = []
    for i in range(min(limit, len(dataset)) + 2):
        image = dataset[i % len(dataset)][0].as_subclass(torch.Tensor)[None].to(device)
        start = time.perf_counter()
        model(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def run(name: str, args: argparse.Namespace, project: Path) -> dict:
    config = TrainConfig(task="segment", model=name, data=args.data, epochs=args.epochs, imgsz=args.imgsz,
                         batch=args.batch, workers=args.workers, device=args.device, optimizer="adamw",
                         lr=args.lr, warmup_epochs=1.0, patience=0, seed=0, project=str(project), name=name)
    train = build_dataset(args.data, "train", "segment", transforms=build_transforms("segment", True, args.imgsz))
    val = build_dataset(args.data, "val", "segment", transforms=build_transforms("segment", False, args.imgsz))
    seed_everything(0)
    model = build(name, len(train.classes), args.backbone)
    trainer = Trainer(config, model, train, val, build_evaluator("segment", train.classes))
    result = trainer.fit()
    seconds = sum(row["time"] for row in result.history)
    images = len(train) * len(result.history)
    return {"model": name, "mIoU": result.best_metric, "train img/s": images / seconds,
            "infer ms/img": inference_ms(trainer.raw_model, val, trainer.device), "train min": seconds / 60,
            "params (M)": sum(p.numel() for p in model.parameters()) / 1e6}


def table(rows: list[dict]) -> str:
    return markdown_table(rows, lambda k, v: f"{v:.3f}" if isinstance(v, float) and k == "mIoU"
                          else f"{v:.1f}" if isinstance(v, float) else str(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--models", default=",".join([*VARIANTS, REFERENCE]))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as project:
        for name in args.models.split(","):
            rows.append(run(name, args, Path(project)))
            print(table(rows[-1:]), flush=True)
    text = (f"data {args.data}, {args.epochs} epochs, imgsz {args.imgsz}, batch {args.batch}, AdamW lr {args.lr}, "
            f"backbone {args.backbone} (FCN rows), from scratch\n\n{table(rows)}")
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
