"""Box conversions, paired IoU / CIoU against torchvision, letterbox round trip."""
import torch
from torchvision import ops

from cvforge.boxes import (box_iou, cxcywh_to_xyxy, letterbox_params, paired_iou, unletterbox, xyxy_to_cxcywh,
                           xyxy_to_xywh)


def _boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 40], 1)


def test_conversions_round_trip():
    b = _boxes(8)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b, atol=1e-5)
    assert torch.allclose(xyxy_to_xywh(b), ops.box_convert(b, "xyxy", "xywh"))


def test_paired_iou_is_the_diagonal_of_torchvision():
    a, b = _boxes(6, 1), _boxes(6, 2)
    assert torch.allclose(paired_iou(a, b), box_iou(a, b).diagonal(), atol=1e-5)
    assert torch.allclose(paired_iou(a, b, ciou=True), ops.complete_box_iou(a, b).diagonal(), atol=1e-4)


def test_ciou_has_gradient_without_overlap():
    a = torch.tensor([[0.0, 0, 10, 10]], requires_grad=True)
    b = torch.tensor([[20.0, 20, 30, 30]])
    loss = (1 - paired_iou(a, b, ciou=True)).sum()
    loss.backward()
    assert paired_iou(a, b).item() == 0 and a.grad.abs().sum() > 0


def test_unletterbox_inverts_the_letterbox():
    h, w, size = 60, 100, 128
    ratio, new_h, new_w, top, left = letterbox_params(h, w, size)
    assert (new_w, top, left) == (128, (128 - new_h) // 2, 0)
    box = torch.tensor([[10.0, 5, 50, 40]])
    on_canvas = box * ratio + torch.tensor([left, top, left, top])
    assert torch.allclose(unletterbox(on_canvas, h, w, size), box, atol=0.5)
