"""Region proposal network (Ren et al., 2015): the proposal source that made Faster R-CNN one network.

Selective search ran on the CPU and took seconds per image. The RPN slides a small conv net over the
backbone's feature map; at every position it scores k anchors (3 scales x 3 aspect ratios; with an
FPN, one scale per pyramid level x 3 ratios) as object / not object and regresses each anchor to a
box. Training labels anchors by IoU with the ground truth: >= 0.7 (or the best anchor of an object)
positive, < 0.3 negative, the rest ignored; 256 anchors per image are sampled, at most half positive.
At inference the boxes are decoded, clipped, the top ``pre_nms_top_n`` per level kept, NMS at 0.7
applied, and the best 2000 (training) / 300 (test) become the proposals of the region head.

Built on torchvision's ``RegionProposalNetwork``, ``RPNHead`` and ``AnchorGenerator`` (same maths,
tested there); what is ours is the configuration with the paper's defaults and anchors whose sizes
follow the model's input size: ``anchor_sizes`` are pixels of an image whose longer side is
``anchor_reference`` (the paper's 128/256/512 on ~600-px images), scaled to the side the model runs at,
so the same defaults suit a 128-px and an 800-px training size.

    rpn = RPN(in_channels=256, num_levels=1)
    proposals, losses = rpn(features, image_sizes, padded_size, targets)
    # proposals: list (per image) of float [P_i, 4] xyxy in input pixels; losses {"rpn_obj", "rpn_box"}
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

PAPER_SIZES = (128, 256, 512)  # three scales, on ~600-px images
PAPER_RATIOS = (0.5, 1.0, 2.0)  # height / width
FPN_SIZES = (32, 64, 128, 256, 512)  # one per pyramid level (Lin et al., 2017), on ~800-px images


class ScaledAnchors(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` whose sizes scale with the model's input side.

    sizes: one tuple of anchor sizes per feature level (pixels at ``reference``); ratios: the aspect
    ratios (h / w), the same at every level. ``set_input_size(side)`` rescales the cell anchors.
    """

    def __init__(self, sizes: tuple[tuple[float, ...], ...], ratios: tuple[float, ...], reference: int):
        super().__init__(sizes, (tuple(ratios),) * len(sizes))
        self.base_sizes, self.reference, self.side = sizes, reference, reference

    def set_input_size(self, side: int) -> None:
        if side == self.side:
            return
        self.side = side
        scale = side / self.reference
        self.sizes = tuple(tuple(s * scale for s in level) for level in self.base_sizes)
        self.cell_anchors = [self.generate_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]


class RPN(nn.Module):
    """Anchors + 3x3 conv head + torchvision's proposal network, with the paper's defaults.

    in_channels: channels of every feature level; num_levels: 1 (a single map) or the FPN's levels.
    anchor_sizes: pixels at an input side of ``anchor_reference`` (default 600 for one level, 800 with
    an FPN); for one level all of them at every position, for an FPN one per level, or a tuple of
    tuples (sizes per level). pre_nms_top_n: boxes kept per level before NMS; post_nms_top_n:
    proposals kept per image after NMS; both (train, test). rpn_score_thresh: proposals whose objectness
    probability is below it are dropped, in training too (the papers: 0, keep the top n; torchvision's
    mobilenet Faster R-CNN: 0.05, so a trained RPN hands the box head far fewer, mostly object, regions).
    """

    def __init__(self, in_channels: int, num_levels: int = 1, *, anchor_sizes: tuple[float, ...] | None = None,
                 ratios: tuple[float, ...] = PAPER_RATIOS, anchor_reference: int | None = None,
                 fg_iou: float = 0.7, bg_iou: float = 0.3, batch_per_image: int = 256,
                 positive_fraction: float = 0.5, pre_nms_top_n: tuple[int, int] = (2000, 1000),
                 post_nms_top_n: tuple[int, int] = (2000, 300), nms: float = 0.7, rpn_score_thresh: float = 0.0):
        super().__init__()
        sizes = tuple(anchor_sizes or (PAPER_SIZES if num_levels == 1 else FPN_SIZES[:num_levels]))
        if all(isinstance(s, (list, tuple)) for s in sizes) and len(sizes) == num_levels:
            levels = tuple(tuple(s) for s in sizes)  # explicit sizes per level
        elif num_levels == 1:
            levels = (sizes,)
        elif len(sizes) == num_levels:
            levels = tuple((s,) for s in sizes)
        else:
            raise ValueError(f"{num_levels} feature levels need {num_levels} anchor sizes, got {sizes}")
        reference = anchor_reference or (600 if num_levels == 1 else 800)  # the papers' image sides
        self.anchors = ScaledAnchors(levels, ratios, reference)
        head = RPNHead(in_channels, self.anchors.num_anchors_per_location()[0])
        self.network = RegionProposalNetwork(
            self.anchors, head, fg_iou, bg_iou, batch_per_image, positive_fraction,
            pre_nms_top_n={"training": pre_nms_top_n[0], "testing": pre_nms_top_n[1]},
            post_nms_top_n={"training": post_nms_top_n[0], "testing": post_nms_top_n[1]}, nms_thresh=nms,
            score_thresh=rpn_score_thresh)

    @property
    def head(self) -> RPNHead:
        return self.network.head

    def forward(self, batch: torch.Tensor, features: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                input_side: int, targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """batch: the padded input [B, 3, H, W] (only its shape is read); features: per level float
        [B, C, H_l, W_l]; image_sizes: (h, w) of each image's content inside the batch (proposals are
        clipped to it); input_side: the side anchors are sized for; targets: {"boxes" [N, 4] in input
        pixels} (training only). Returns (proposals per image float [P_i, 4] xyxy in input pixels,
        losses {"rpn_obj", "rpn_box"}; empty in eval mode)."""
        self.anchors.set_input_size(input_side)
        # sizes as given: Python ints, or 0-dim tensors in an ONNX trace (int() would freeze them into the graph)
        images = ImageList(batch, [(h, w) for h, w in image_sizes])
        named = {str(i): f for i, f in enumerate(features)}
        boxes_only = [{"boxes": t["boxes"]} for t in targets] if targets is not None else None
        proposals, losses = self.network(images, named, boxes_only)
        if not losses:
            return proposals, {}
        return proposals, {"rpn_obj": losses["loss_objectness"], "rpn_box": losses["loss_rpn_box_reg"]}
