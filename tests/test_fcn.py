"""FCN-32s/16s/8s (models/fcn.py): output size, bilinear initialisation, zero-initialised skips, loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvforge.models.fcn import FCN, Upsample, bilinear_kernel, build_fcn, segmentation_loss
from cvforge.zoo import build_model

torch.set_num_threads(1)


def _randomise_scores(model: FCN) -> None:
    """Score layers start at zero (paper §4.3): give the coarse one weights so outputs differ per pixel."""
    torch.nn.init.normal_(model.head.score.weight, std=0.05)
    torch.nn.init.normal_(model.head.score.bias, std=0.05)


@pytest.mark.parametrize("upsample", ["deconv", "bilinear"])
@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_output_has_the_input_size_for_odd_sizes(variant, upsample):
    model = build_fcn(variant, num_classes=3, upsample=upsample).eval()
    for height, width in [(33, 47), (1, 5), (65, 64)]:
        images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
        with torch.no_grad():
            out = model(images)
        assert out["scores"].shape == (2, 3, height, width)
        assert out["masks"].shape == (2, height, width) and out["masks"].dtype == torch.int64
        assert torch.allclose(out["scores"].sum(dim=1), torch.ones(2, height, width), atol=1e-5)
        assert model.logits(images).shape == (2, 3, height, width)


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_bilinear_kernel_keeps_a_constant_constant_in_the_interior(factor):
    k = 2 * factor
    weight = bilinear_kernel(2, k)
    assert weight.shape == (2, 2, k, k) and torch.all(weight[0, 1] == 0)  # channels do not mix
    x = torch.full((1, 2, 6, 7), 3.0)
    y = F.conv_transpose2d(x, weight, stride=factor, padding=factor // 2)
    assert y.shape == (1, 2, 6 * factor, 7 * factor)
    interior = y[..., factor:-factor, factor:-factor]
    assert torch.allclose(interior, torch.full_like(interior, 3.0), atol=1e-5)
    assert y[0, 0, 0, 0] < 3.0  # the border is attenuated (zero padding), which is why it is interior only


def test_bilinear_deconv_matches_interpolation_in_the_interior():
    x = torch.randn(1, 4, 5, 6)
    up = Upsample(4, 2, "deconv", learnable=True)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        got = up(x, (10, 12))
    assert torch.allclose(got[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5)
    assert up.deconv.weight.requires_grad  # the x2 steps are learned ...
    assert not list(Upsample(4, 8, "deconv", learnable=False).parameters())  # ... the final one is fixed


@pytest.mark.parametrize("upsample", ["deconv", "bilinear"])
def test_skip_scores_start_at_zero_so_8s_starts_as_the_coarse_net(upsample):
    torch.manual_seed(0)
    model = build_fcn("8s", num_classes=4, upsample=upsample).eval()
    assert len(model.skip_scores) == 2 and len(build_fcn("16s", num_classes=4).skip_scores) == 1
    for score in model.skip_scores:
        assert torch.all(score.weight == 0) and torch.all(score.bias == 0)
    _randomise_scores(model)
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        before = model.logits(images)
        # The stride-8 and stride-16 features do not reach the output at init: replace them with noise.
        hooks = [s.register_forward_pre_hook(lambda m, args: (torch.randn_like(args[0]) * 10,))
                 for s in model.skip_scores]
        after = model.logits(images)
        for hook in hooks:
            hook.remove()
    assert torch.allclose(before, after)
    assert before.std() > 0  # and the output is not trivially constant
    with torch.no_grad():  # once trained (non-zero), the skips do change the output
        model.skip_scores[1].weight.normal_()
        assert not torch.allclose(model.logits(images), before)


def test_8s_equals_32s_at_init_when_interpolating():
    """With zero skips, FCN-8s's x2, x2, x8 interpolation of the coarse scores stays close to FCN-32s's x32."""
    torch.manual_seed(0)
    eight = build_fcn("8s", num_classes=3, upsample="bilinear").eval()
    _randomise_scores(eight)
    thirty_two = build_fcn("32s", num_classes=3, upsample="bilinear").eval()
    missing, unexpected = thirty_two.load_state_dict(eight.state_dict(), strict=False)
    assert not missing and all(k.startswith("skip_scores") for k in unexpected)
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        a, b = eight.logits(images), thirty_two.logits(images)
    # Same coarse scores, both bilinear; composing interpolations differs slightly only.
    assert (a - b).abs().mean() < 0.1 * b.abs().mean()


def test_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    masks = torch.randint(0, 3, (2, 5, 6))
    masks[:, :2] = 255
    loss = segmentation_loss(logits, masks)
    keep = masks != 255
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert torch.allclose(loss, manual)
    loss.backward()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[~keep] == 0)  # ignored pixels get no gradient
    everything_ignored = segmentation_loss(logits, torch.full_like(masks, 255))
    assert everything_ignored.item() == 0.0 and everything_ignored.requires_grad


def test_train_mode_returns_the_loss_and_learns_one_batch():
    torch.manual_seed(0)
    model = build_model("fcn8s", task="segment", num_classes=2, upsample="bilinear").train()
    assert model.cvforge_spec["kwargs"] == {"num_classes": 2, "upsample": "bilinear"}
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 8:24, 8:24] = 255
    masks = (images[:, 0] > 0).long()
    masks[:, 0] = 255
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(images, [{"mask": m} for m in masks])["loss_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError):
        model(images)


@pytest.mark.parametrize("backbone", ["vgg16", "mobilenet_v3_large", "resnet34"])
def test_other_backbones(backbone):
    model = build_fcn("8s", num_classes=3, backbone=backbone).eval()
    assert ("fc6" in dict(model.head.named_children())) == (backbone == "vgg16")  # reduced fc6/fc7 on VGG
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 37, 41, dtype=torch.uint8))["masks"].shape == (1, 37, 41)
