"""Region poolers: SPP output length for any RoI size, RoIPool/RoIAlign shapes, crop-and-warp with context."""
import pytest
import torch

from cvforge.models.detection.region_pool import RoIAlign, RoIPool, SpatialPyramidPool, context_boxes, crop_and_warp


@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (1, 2), (4,)])
def test_spp_output_size_for_any_roi_size(levels):
    torch.manual_seed(0)
    features = torch.randn(2, 8, 10, 12)  # stride 16 -> a 160 x 192 image
    spp = SpatialPyramidPool(levels, spatial_scale=1 / 16)
    regions = [torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 191.0, 159.0], [30.0, 40.0, 35.0, 140.0]]),
               torch.tensor([[100.0, 10.0, 190.0, 20.0]])]
    out = spp(features, regions)
    assert out.shape == (4, spp.out_features(8)) == (4, 8 * sum(n * n for n in levels))
    # the 1x1 level of the whole-image region is the global max of the map
    if levels[0] == 1:
        assert torch.allclose(out[1, :8], features[0].amax((1, 2)))


def test_spp_paper_levels_and_no_regions():
    spp = SpatialPyramidPool()
    assert spp.levels == (1, 2, 3, 6) and spp.out_features(256) == 256 * 50
    assert spp(torch.randn(1, 4, 5, 5), [torch.zeros(0, 4)]).shape == (0, 200)


@pytest.mark.parametrize("pooler", [RoIPool(7, 1 / 8), RoIAlign(7, 1 / 8)])
def test_roi_poolers_shapes(pooler):
    features = torch.randn(2, 16, 8, 8, requires_grad=True)
    regions = [torch.tensor([[0.0, 0.0, 64.0, 64.0]]), torch.tensor([[8.0, 8.0, 20.0, 40.0], [1, 2, 3, 4.0]])]
    out = pooler(features, regions)
    assert out.shape == (3, 16, 7, 7)
    out.sum().backward()
    assert features.grad[0].abs().sum() > 0 and features.grad[1].abs().sum() > 0
    assert pooler(features, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 16, 7, 7)


def test_crop_and_warp_context():
    # a white square on black: warped with 4 px of context at size 24, the square fills the central 16 x 16
    image = torch.zeros(1, 3, 40, 40)
    image[:, :, 10:30, 10:30] = 1.0
    region = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    assert torch.allclose(context_boxes(region, 24, 4), torch.tensor([[5.0, 5.0, 35.0, 35.0]]))
    crops = crop_and_warp(image, [region], size=24, context=4)
    assert crops.shape == (1, 3, 24, 24)
    assert torch.allclose(crops[0, :, 5:19, 5:19], torch.ones(3, 14, 14))
    assert crops[0, :, :3].abs().max() < 1e-6 and crops[0, :, :, -3:].abs().max() < 1e-6
    # without context the crop is all square; off-image parts are 0 (the mean after normalisation)
    assert torch.allclose(crop_and_warp(image, [region], 8, context=0), torch.ones(1, 3, 8, 8))
    off = crop_and_warp(image, [torch.tensor([[-40.0, -40.0, -20.0, -20.0]])], 8, context=0)
    assert off.abs().max() == 0
