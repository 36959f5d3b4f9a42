"""How many training images YOLOv1's fully connected head needs: val mAP50 against training-set size.

YOLOv1's detection layers are fully connected (features -> hidden -> S x S x (5B + C)): nothing is
shared between grid cells, so the head learns the class and box of every cell separately, from the
flattened features of the whole image (3136 numbers here). A convolutional head (``yolo-n``) applies one
small predictor at every position and sees every object as a training example for all of them.

The experiment isolates the head: a ``DarknetSmall`` backbone (yolov1.py) is first trained as a
classifier on the shapes crops (the paper pre-trains on ImageNet; here the built-in set's own 64-px
crops), then frozen; YOLOv1's head (1x1 reduce conv, FC, dropout, FC) and loss are trained on the
backbone's features of N training images (``shapes:train=N``, no augmentation), the same number of
image presentations for every N, and scored by cvforge's evaluator on the same 128 val images.

    python benchmarks/yolov1_data_scaling.py                  # 512, 4096, 16384 images; ~15 min on 2 CPU cores

Prints a Markdown table: images, epochs, train loss, val loss (the paper's sum-squared loss per image,
class term in brackets), val mAP50.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _markdown import markdown_table  # benchmarks/_markdown.py
from torch import nn
from torchvision import datasets
from torchvision.transforms import v2

from cvforge.data import build_dataset
from cvforge.data.synthetic import ensure_shapes
from cvforge.data.transforms import build_transforms
from cvforge.eval import build_evaluator
from cvforge.models.detection.yolo import letterbox_batch
from cvforge.models.detection.yolov1 import YOLOv1

SIDE = 112  # the recipe's size on the 128-px shapes (a multiple of 16 x 7)
CELL = lambda key, value: str(value)  # noqa: E731  (values are formatted when the row is made)


def pretrain_backbone(model: YOLOv1, crops: str, epochs: int) -> float:
    """Train ``model.backbone`` + global pooling + a linear layer on the ImageFolder ``crops``/{train,val};
    returns the val accuracy."""
    flips = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                        v2.ToDtype(torch.float32, scale=True)])
    plain = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    train, val = datasets.ImageFolder(f"{crops}/train", flips), datasets.ImageFolder(f"{crops}/val", plain)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    classifier = nn.Sequential(model.backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(model.backbone.out_channels, len(train.classes)))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * len(loader))
    for _ in range(epochs):
        classifier.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(classifier(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()
    with torch.no_grad():
        right = sum(int((classifier(x).argmax(1) == y).sum()) for x, y in torch.utils.data.DataLoader(val, 256))
    return right / len(val)


@torch.no_grad()
def features(model: YOLOv1, data: str, split: str) -> tuple:
    """(backbone features float [N, C, 7, 7], letterboxed boxes per image, targets, images, class names)."""
    dataset = build_dataset(data, split, "detect", transforms=build_transforms("detect", False, SIDE))
    items = [dataset[i] for i in range(len(dataset))]
    images, targets = [i[0] for i in items], [i[1] for i in items]
    maps, moved = [], []
    for k in range(0, len(images), 64):
        x, boxes = letterbox_batch(images[k:k + 64], SIDE, [t["boxes"] for t in targets[k:k + 64]])
        maps.append(model.backbone(x))
        moved += boxes
    return torch.cat(maps), moved, targets, images, dataset.classes


def head_output(model: YOLOv1, maps: torch.Tensor) -> torch.Tensor:
    """Frozen features [N, C, 7, 7] -> YOLOv1's raw output [N, S, S, 5B + C]."""
    return model.head(model.pool(model.reduce(maps))).view(-1, model.S, model.S, 5 * model.B + model.C)


def train_head(model: YOLOv1, train: tuple, epochs: int, batch: int, lr: float) -> dict[str, float]:
    """Fresh head (``reset_head``) trained on the frozen features; the last step's loss parts."""
    maps, moved, targets = train[:3]
    params = [*model.reduce.parameters(), *model.head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    steps = epochs * -(-len(maps) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(maps))
        for k in range(0, len(maps), batch):
            index = order[k:k + batch].tolist()
            losses = model.loss(head_output(model, maps[index]), [moved[i] for i in index],
                                [targets[i]["labels"] for i in index])
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            schedule.step()
    return {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def evaluate(model: YOLOv1, val: tuple) -> tuple[dict[str, float], float]:
    maps, moved, targets, images, classes = val
    model.eval()
    out = head_output(model, maps)
    losses = {k: float(v) for k, v in model.loss(out, moved, [t["labels"] for t in targets]).items()}
    evaluator = build_evaluator("detect", classes)
    evaluator.update(model.postprocess(out, [tuple(i.shape[-2:]) for i in images]), targets)
    return losses, evaluator.compute()["mAP50"]


def reset_head(model: YOLOv1, seed: int) -> None:
    torch.manual_seed(seed)
    fresh = YOLOv1(model.C, imgsz=SIDE, dropout=model.head[3].p)
    model.reduce.load_state_dict(fresh.reduce.state_dict())
    model.head.load_state_dict(fresh.head.state_dict())


def described(losses: dict[str, float]) -> str:
    return f"{sum(losses.values()):.2f} ({losses['cls']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,4096,16384", help="training-set sizes (shapes:train=N)")
    parser.add_argument("--presentations", type=int, default=65536, help="images shown to the head, per size")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--dropout", default="0.5,0.0", help="dropout values to try (the paper: 0.5)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--save-backbone", type=Path, help="also write the pre-trained backbone here "
                        "(a state_dict that `cvforge train --model yolov1 --pretrained FILE` loads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = YOLOv1(5, imgsz=SIDE)
    accuracy = pretrain_backbone(model, str(ensure_shapes() / "crops"), args.pretrain_epochs)
    print(f"DarknetSmall pre-trained on the shapes crops: val accuracy {accuracy:.3f}", flush=True)
    if args.save_backbone:
        torch.save({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}, args.save_backbone)
    model.backbone.requires_grad_(False)
    val = features(model.eval(), "shapes", "val")
    rows = []
    for size in map(int, args.sizes.split(",")):
        start = time.perf_counter()
        train = features(model.eval(), f"shapes:train={size}", "train")
        epochs = max(1, args.presentations // size)
        for dropout in map(float, args.dropout.split(",")):
            model.head[3].p = dropout
            reset_head(model, seed=0)
            last = train_head(model, train, epochs, args.batch, args.lr)
            val_losses, map50 = evaluate(model, val)
            rows.append({"train images": size, "epochs": epochs, "dropout": dropout,
                         "train loss (cls)": described(last), "val loss (cls)": described(val_losses),
                         "val mAP50": f"{map50:.3f}", "minutes": f"{(time.perf_counter() - start) / 60:.1f}"})
            print(markdown_table(rows[-1:], CELL), flush=True)
        del train
    print(markdown_table(rows, CELL))


if __name__ == "__main__":
    main()
