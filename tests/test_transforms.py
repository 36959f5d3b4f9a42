"""Per-task transform presets: shapes and dtypes, boxes/labels/masks staying aligned, sanitising."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from cvforge.data.transforms import (Letterbox, RandomHSV, RandomZoomShift, build_transforms, hsv_matrix,
                                    per_box_tensors)
from cvforge.errors import CvforgeError

H, W = 96, 128
BACKGROUND = (40, 40, 40)
# label -> (colour, XYXY box, iscrowd, difficult); rectangles do not overlap
OBJECTS = {
    0: ((255, 0, 0), (8, 10, 48, 40), False, True),
    1: ((0, 255, 0), (60, 20, 120, 70), True, False),
    2: ((0, 0, 255), (20, 55, 50, 90), False, False),
}


def scene(labels=(0, 1, 2)) -> tuple[tv_tensors.Image, dict]:
    """A flat background with solid colour rectangles; an instance target for the given labels."""
    image = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, H, W)
    masks = torch.zeros((len(labels), H, W), dtype=torch.uint8)
    for i, label in enumerate(labels):
        colour, (x0, y0, x1, y1), _, _ = OBJECTS[label]
        image[:, y0:y1, x0:x1] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
        masks[i, y0:y1, x0:x1] = 1
    boxes = torch.tensor([OBJECTS[k][1] for k in labels], dtype=torch.float32).reshape(-1, 4)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": torch.tensor(7),
        "iscrowd": torch.tensor([OBJECTS[k][2] for k in labels], dtype=torch.bool),
        "difficult": torch.tensor([OBJECTS[k][3] for k in labels], dtype=torch.bool),
        "masks": tv_tensors.Mask(masks),
    }
    return tv_tensors.Image(image), target


def colour_pixels(image: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor:
    """bool [H, W]: pixels that are clearly this pure colour (interpolated edges excluded)."""
    channel = colour.index(255)
    others = [c for c in range(3) if c != channel]
    return (image[channel] > 200) & (image[others[0]] < 70) & (image[others[1]] < 70)


def check_aligned(image: torch.Tensor, target: dict) -> None:
    n = len(target["boxes"])
    assert all(len(target[k]) == n for k in ("labels", "iscrowd", "difficult", "masks"))
    for box, label, crowd, difficult, mask in zip(target["boxes"], target["labels"], target["iscrowd"],
                                                  target["difficult"], target["masks"]):
        colour, _, want_crowd, want_difficult = OBJECTS[int(label)]
        assert (bool(crowd), bool(difficult)) == (want_crowd, want_difficult)
        x0, y0, x1, y1 = box.tolist()
        inside = torch.zeros(image.shape[-2:], dtype=torch.bool)
        inside[max(0, int(y0) - 1):int(y1) + 2, max(0, int(x0) - 1):int(x1) + 2] = True
        pixels = colour_pixels(image, colour)
        assert pixels.any(), "the box's colour vanished"
        assert not (pixels & ~inside).any(), "colour of the box found outside the box"
        assert set(mask.unique().tolist()) <= {0, 1}  # nearest interpolation: no blended mask values
        assert not (mask.bool() & ~inside).any(), "mask outside its box"
        if x1 - x0 >= 3 and y1 - y0 >= 3:  # a sliver cut by the image edge is all blended border
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert pixels[cy, cx], "box centre is not the object's colour"
            assert mask[cy, cx] == 1, "box centre is not in the object's mask"


@pytest.mark.parametrize("seed", range(8))
def test_detect_train_keeps_targets_aligned(seed):
    transform = build_transforms("instance", train=True, imgsz=64, hsv=False)
    torch.manual_seed(seed)
    image, target = transform(*scene())
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert target["boxes"].canvas_size == (64, 64)
    assert torch.equal(target["image_id"], torch.tensor(7))
    check_aligned(image, target)


def test_detect_flip_and_letterbox_move_boxes_exactly():
    """Flip then letterbox 128x96 -> 64x64: x mirrored, halved, 8 px of padding on top."""
    transform = build_transforms("instance", train=True, imgsz=64, hsv=False, hflip=1.0, scale=(1, 1), translate=0)
    image, out = transform(*scene())
    expected = [[(W - x1) / 2, y0 / 2 + 8, (W - x0) / 2, y1 / 2 + 8] for _, (x0, y0, x1, y1), _, _ in OBJECTS.values()]
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor(expected))
    assert (image[:, :8] == 114).all()  # letterbox padding
    check_aligned(image, out)


def test_degenerate_boxes_removed_with_their_tensors():
    image, target = scene()
    # a fourth, 1.5 px wide box: 0.75 px after the 2x downscale of the letterbox -> must go
    boxes = torch.cat([target["boxes"], torch.tensor([[100.0, 80.0, 101.5, 90.0]])])
    target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W))
    target["labels"] = torch.tensor([0, 1, 2, 2])
    target["iscrowd"] = torch.tensor([False, True, False, True])
    target["difficult"] = torch.tensor([True, False, False, True])
    target["masks"] = tv_tensors.Mask(torch.cat([target["masks"], torch.ones((1, H, W), dtype=torch.uint8)]))
    transform = build_transforms("instance", train=True, imgsz=64, hsv=False, hflip=0.0, scale=(1, 1), translate=0)
    image, out = transform(image, target)
    assert out["labels"].tolist() == [0, 1, 2]
    assert out["iscrowd"].tolist() == [False, True, False] and out["difficult"].tolist() == [True, False, False]
    assert out["masks"].shape == (3, 64, 64)
    check_aligned(image, out)


def test_boxes_pushed_off_canvas_are_removed():
    image, target = scene()
    transform = build_transforms("instance", train=True, imgsz=64, hsv=False, scale=(1.5, 1.5), translate=0.45)
    removed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out = transform(image, dict(target))
        check_aligned(out_image, out)
        removed += 3 - len(out["boxes"])
    assert removed > 0  # large shifts must push some objects off the image


def test_zoom_shift_scales_about_the_centre_and_fills_the_border():
    """Scale 0.5, no shift: the 128 x 96 scene shrinks to 64 x 48 in the middle of an unchanged canvas."""
    image, target = scene()
    out_image, out = RandomZoomShift(scale=(0.5, 0.5), translate=0.0)(image, target)
    expected = [[x0 / 2 + 32, y0 / 2 + 24, x1 / 2 + 32, y1 / 2 + 24] for _, (x0, y0, x1, y1), _, _ in OBJECTS.values()]
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor(expected))
    assert out_image.shape == (3, H, W) and out["boxes"].canvas_size == (H, W) and out["masks"].shape == (3, H, W)
    assert (out_image[:, :24] == 114).all() and (out_image[:, :, 96:] == 114).all()  # image border: grey
    assert (out["masks"][:, :24] == 0).all() and (out["masks"][:, :, 96:] == 0).all()  # mask border: empty
    check_aligned(out_image, out)


def test_zoom_shift_draws_scales_and_whole_pixel_shifts_in_range():
    """One central square, 200 draws: the factor spans 0.5-1.5, the shift +-10 % of each side in whole
    pixels (the square's centre lands where the scale about the canvas centre and the shift put it)."""
    image = tv_tensors.Image(torch.zeros((3, 100, 200), dtype=torch.uint8))
    box = tv_tensors.BoundingBoxes(torch.tensor([[80.0, 30.0, 120.0, 70.0]]), format="XYXY", canvas_size=(100, 200))
    zoom = RandomZoomShift(scale=(0.5, 1.5), translate=0.1)
    torch.manual_seed(0)
    factors, shifts = [], []
    for _ in range(200):
        (x0, y0, x1, y1), = zoom(image, {"boxes": box})[1]["boxes"].tolist()
        factor = (x1 - x0) / 40
        factors.append(factor)
        shifts.append(((x0 + x1) / 2 - 100, (y0 + y1) / 2 - 50))
    assert 0.5 - 0.02 <= min(factors) < 0.6 and 1.4 < max(factors) <= 1.5 + 0.02
    dx, dy = torch.tensor(shifts).T
    assert dx.abs().max() <= 20.5 + 1e-3 and dy.abs().max() <= 10.5 + 1e-3  # half a pixel: centring of an odd size
    assert dx.abs().max() > 15 and dy.abs().max() > 7


def test_letterbox_leaves_a_square_image_of_its_size_alone():
    image, target = tv_tensors.Image(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)), scene()[1]
    target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"] / 2, format="XYXY", canvas_size=(64, 64))
    del target["masks"]
    out_image, out = Letterbox(64)(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["boxes"], target["boxes"])


@pytest.mark.parametrize("task", ["detect", "instance"])
def test_image_without_boxes(task):
    image, target = scene(labels=())
    if task == "detect":
        del target["masks"]
    torch.manual_seed(0)
    out_image, out = build_transforms(task, train=True, imgsz=64)(image, target)
    assert out_image.shape == (3, 64, 64) and out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    if task == "instance":
        assert out["masks"].shape == (0, 64, 64)


def test_labels_getter_skips_image_id_and_tv_tensors():
    _, target = scene()
    found = per_box_tensors((None, target))
    assert [t.shape[0] for t in found] == [3, 3, 3]
    assert all(t is not target["image_id"] for t in found)


def test_eval_detect_and_segment_are_identity():
    image, target = scene()
    for task in ("detect", "segment"):
        out_image, out = build_transforms(task, train=False, imgsz=32)(image, target)
        assert torch.equal(out_image, image) and out.keys() == target.keys()
        assert all(out[k] is target[k] for k in target)


@pytest.mark.parametrize("train", [True, False])
def test_classify_preset_shape(train):
    image = tv_tensors.Image(torch.randint(0, 256, (3, 50, 90), dtype=torch.uint8))
    out, target = build_transforms("classify", train=train, imgsz=32)(image, {"label": torch.tensor(4)})
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and int(target["label"]) == 4


def test_segment_train_pads_ignore_and_keeps_classes_on_their_colour():
    image = torch.zeros((3, 40, 60), dtype=torch.uint8)
    image[0, :, :30] = 255  # left half red = class 1
    image[2, :, 30:] = 255  # right half blue = class 2
    mask = torch.ones((40, 60), dtype=torch.int64)
    mask[:, 30:] = 2
    transform = build_transforms("segment", train=True, imgsz=64, scale=(0.5, 0.5))
    torch.manual_seed(0)
    out, target = transform(tv_tensors.Image(image), {"mask": tv_tensors.Mask(mask)})
    mask = target["mask"]
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8 and mask.shape == (64, 64)
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {1, 2, 255}
    assert (out[:, mask == 255] == 0).all()  # padding: black image, ignored mask
    assert (out[0][mask == 1] > 200).float().mean() > 0.9 and (out[2][mask == 2] > 200).float().mean() > 0.9


def apply(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return (matrix @ image.reshape(3, -1).float()).round().clamp(0, 255).reshape(image.shape)


def test_hsv_matrix_matches_torchvision_colour_ops():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    expected = F.adjust_brightness(F.adjust_saturation(image, 0.5), 1.3).float()
    assert (apply(hsv_matrix(0.0, 0.5, 1.3), image) - expected).abs().max() <= 2
    red = torch.tensor([200, 30, 30], dtype=torch.uint8).view(3, 1, 1)
    shifted = apply(hsv_matrix(0.1, 1.0, 1.0), red).flatten()
    assert shifted[1] > 60 and shifted[2] < 40  # a positive hue shift turns red towards yellow, as HSV


def test_random_hsv_changes_only_the_image():
    image, target = scene()
    torch.manual_seed(0)
    out, out_target = RandomHSV()(image, target)
    assert out.dtype == torch.uint8 and not torch.equal(out, image)
    assert torch.equal(out_target["boxes"], target["boxes"]) and torch.equal(out_target["masks"], target["masks"])


def test_unknown_task():
    with pytest.raises(CvforgeError, match="unknown task"):
        build_transforms("pose", train=True)
