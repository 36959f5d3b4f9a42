"""YOLOv1 (Redmon et al., 2016): "You Only Look Once" — detection as one regression problem.

What the paper changed: instead of classifying thousands of proposals (R-CNN), one network looks at the
whole image once. It divides the image into an S x S grid; each cell predicts B boxes (x, y relative to
the cell, w, h relative to the image, and a confidence = Pr(object) * IoU) and one set of C class
probabilities Pr(class | object). Class-specific scores are Pr(class | object) * confidence.

Loss (paper, eq. 3), summed over cells and predictors, averaged over images:

    5   * sum_obj [(x - x^)^2 + (y - y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]
    + sum_obj (C - IoU)^2  +  0.5 * sum_noobj C^2  +  sum_cells_with_obj sum_c (p(c) - p^(c))^2

where "obj" is the one predictor of the cell holding the object's centre whose box overlaps the object
most (it becomes "responsible"); lambda_coord = 5 raises the box terms, lambda_noobj = 0.5 lowers the
many empty cells' push on confidence, and square roots make an error count more on a small box.

Here: the network predicts sqrt(w) and sqrt(h) directly (so the loss is the paper's squared error on
them), outputs are linear as in the paper, and the backbone is a small Darknet-like CNN with batch
norm instead of the paper's 24 layers pre-trained on ImageNet, so it trains on a CPU from scratch.
The detection layers are the paper's: features -> fully connected -> dropout -> S x S x (5B + C).

What that head costs in data: nothing is shared between grid cells, so every cell's class and box are
learned separately from the flattened features of the whole image. With a backbone pre-trained on the
shapes crops (98 % accuracy) and frozen, the head reaches val mAP50 0.04 from the 512 built-in training
images (it memorises them), 0.14 from 4,096 and 0.21 from 16,384, for the same 65k image presentations
(``benchmarks/yolov1_data_scaling.py``, BENCHMARKS.md), where the convolutional head of ``yolo-n``
reaches ~0.5 from 512 images in 4 minutes. The paper trained on ~16k VOC images for 135 epochs after
ImageNet pre-training.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import batched_nms

from cvforge.boxes import paired_iou, unletterbox
from cvforge.models.detection.yolo import float32, letterbox_batch


def conv(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.1, inplace=True))


class DarknetSmall(nn.Sequential):
    """Conv + max-pool stages, the paper's pattern (3x3 convs, 1x1 reductions, leaky ReLU), stride 16."""

    def __init__(self, width: int = 32):
        w = width
        super().__init__(conv(3, w), nn.MaxPool2d(2), conv(w, 2 * w), nn.MaxPool2d(2),
                         conv(2 * w, 4 * w), conv(4 * w, 2 * w, 1), conv(2 * w, 4 * w), nn.MaxPool2d(2),
                         conv(4 * w, 8 * w), conv(8 * w, 4 * w, 1), conv(4 * w, 8 * w), nn.MaxPool2d(2),
                         conv(8 * w, 16 * w), conv(16 * w, 8 * w, 1), conv(8 * w, 16 * w))
        self.out_channels = 16 * w


class YOLOv1(nn.Module):
    """``model(images, targets)`` -> {"coord", "conf_obj", "conf_noobj", "cls"} in train mode;
    ``model(images)`` -> per image {"boxes" xyxy original pixels, "scores", "labels"} in eval mode.
    images: list of uint8 [3, H, W]; letterboxed to ``input_size`` (the side of the training images,
    initially ``imgsz``) and scaled to [0, 1] inside."""

    def __init__(self, num_classes: int, grid: int = 7, boxes_per_cell: int = 2, imgsz: int = 448,
                 width: int = 32, hidden: int = 512, dropout: float = 0.5, lambda_coord: float = 5.0, lambda_noobj: float = 0.5,
                 conf: float = 0.001, iou: float = 0.5, max_det: int = 300):
        super().__init__()
        self.C, self.S, self.B = num_classes, grid, boxes_per_cell
        self.lambda_coord, self.lambda_noobj = lambda_coord, lambda_noobj
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.backbone = DarknetSmall(width)
        self.reduce = conv(self.backbone.out_channels, 64, 1)  # keeps the fc layer small
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * grid * grid, hidden), nn.LeakyReLU(0.1, inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, grid * grid * (5 * boxes_per_cell + num_classes)))
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        nn.init.zeros_(self.head[-1].bias)
        # the side it last trained at (saved with the weights), so a checkpoint predicts at that size
        self.register_buffer("input_size", torch.tensor(imgsz))

    @property
    def imgsz(self) -> int:
        return int(self.input_size)

    def forward(self, images: Any, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        boxes = [t["boxes"] for t in targets] if self.training else None
        if self.training:
            self.input_size.fill_(max(max(image.shape[-2:]) for image in images))
        x, moved = letterbox_batch(images, self.imgsz, boxes, self.input_size.device)
        out = self.forward_raw(x)
        with float32(out):  # AMP computes the network; the loss and decoding stay float32
            if self.training:
                return self.loss(out, moved, [t["labels"] for t in targets])
            return self.postprocess(out, [tuple(image.shape[-2:]) for image in images])

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, S, S, 5B + C]: per cell B x (x, y, sqrt w, sqrt h, conf), then C probs."""
        out = self.head(self.pool(self.reduce(self.backbone(x))))
        return out.view(-1, self.S, self.S, 5 * self.B + self.C)

    def cell_boxes(self, out: torch.Tensor) -> torch.Tensor:
        """[B, S, S, 5B + C] -> predicted boxes xyxy [B, S, S, B, 4] in input pixels."""
        p = out[..., : 5 * self.B].reshape(*out.shape[:3], self.B, 5).float()
        cols = torch.arange(self.S, device=out.device, dtype=p.dtype)
        cx = (p[..., 0] + cols[None, None, :, None]) / self.S * self.imgsz
        cy = (p[..., 1] + cols[None, :, None, None]) / self.S * self.imgsz
        w, h = p[..., 2].pow(2) * self.imgsz, p[..., 3].pow(2) * self.imgsz
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    def encode(self, boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One image's objects -> grid targets: has_obj bool [S, S], (x, y, sqrt w, sqrt h) [S, S, 4],
        box xyxy [S, S, 4], class one-hot [S, S, C]. A cell holds one object (the paper's limit):
        when centres collide, the larger object wins (written last)."""
        S, size = self.S, self.imgsz
        has = torch.zeros(S, S, dtype=torch.bool, device=boxes.device)
        coords, xyxy = boxes.new_zeros(S, S, 4), boxes.new_zeros(S, S, 4)
        onehot = boxes.new_zeros(S, S, self.C)
        order = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argsort()
        for box, label in zip(boxes[order], labels[order]):
            cx, cy = (box[0] + box[2]) / 2 / size * S, (box[1] + box[3]) / 2 / size * S
            i, j = int(cy.clamp(0, S - 1e-4)), int(cx.clamp(0, S - 1e-4))
            has[i, j] = True
            wh = ((box[2:] - box[:2]) / size).clamp(min=0).sqrt()
            coords[i, j] = torch.cat([torch.stack([cx - j, cy - i]), wh])
            xyxy[i, j], onehot[i, j] = box, 0
            onehot[i, j, label] = 1
        return has, coords, xyxy, onehot

    def loss(self, out: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The paper's sum-squared loss (module docstring), divided by the number of images."""
        out = out.float()
        targets = [self.encode(b.float(), l) for b, l in zip(boxes, labels)]
        has, coords, xyxy, onehot = (torch.stack(parts) for parts in zip(*targets))
        pred = out[..., : 5 * self.B].reshape(*out.shape[:3], self.B, 5)
        with torch.no_grad():  # responsible predictor: highest IoU with the cell's object
            ious = paired_iou(self.cell_boxes(out), xyxy[..., None, :].expand(-1, -1, -1, self.B, -1))
            best = ious.argmax(-1, keepdim=True)
            responsible = torch.zeros_like(ious, dtype=torch.bool).scatter_(-1, best, True) & has[..., None]
        n = out.shape[0]
        box_error = (pred[..., :4] - coords[..., None, :]).pow(2).sum(-1)
        coord = self.lambda_coord * (box_error * responsible).sum() / n
        conf = pred[..., 4]
        conf_obj = ((conf - ious.clamp(min=0)).pow(2) * responsible).sum() / n
        conf_noobj = self.lambda_noobj * (conf.pow(2) * ~responsible).sum() / n
        cls = ((out[..., 5 * self.B:] - onehot).pow(2).sum(-1) * has).sum() / n
        return {"coord": coord, "conf_obj": conf_obj, "conf_noobj": conf_noobj, "cls": cls}

    @torch.no_grad()
    def postprocess(self, out: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Class-specific confidence Pr(class | object) * C per predictor, threshold, NMS per class."""
        out = out.float()
        boxes = self.cell_boxes(out).flatten(1, 3)  # [N, S*S*B, 4]
        conf = out[..., 4: 5 * self.B: 5]  # [N, S, S, B]
        scores = (out[..., None, 5 * self.B:] * conf[..., None]).flatten(1, 3)  # [N, S*S*B, C]
        results = []
        for b, s, hw in zip(boxes, scores, image_sizes):
            flat = s.flatten()
            keep = (flat > self.conf).nonzero().squeeze(1)
            point, label = keep // self.C, keep % self.C
            kept = batched_nms(b[point], flat[keep], label, self.iou)[: self.max_det]
            results.append({"boxes": unletterbox(b[point][kept], *hw, self.imgsz), "scores": flat[keep][kept],
                            "labels": label[kept]})
        return results


def build_yolov1(*, num_classes: int, **kwargs: Any) -> YOLOv1:
    """YOLOv1 with the paper's S = 7, B = 2, lambda_coord = 5, lambda_noobj = 0.5 (kwargs: ``YOLOv1``'s)."""
    return YOLOv1(num_classes, **kwargs)

