"""Folding batch norm into convolutions changes nothing but the speed."""
import pytest
import torch
from torch import nn

from cvforge.models.fuse import fuse_conv_bn
from cvforge.zoo import build_model


def _settle_batch_norms(model: nn.Module) -> None:
    """Give every batch norm non-trivial statistics and affine weights, as after training."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)


@pytest.mark.parametrize("name", ["yolo-n", "yolov1"])
def test_fused_detector_gives_the_same_raw_outputs(name):
    model = build_model(name, task="detect", num_classes=3, imgsz=64)
    _settle_batch_norms(model)
    model.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.forward_raw(x)
        count = fuse_conv_bn(model)
        after = model.forward_raw(x)
    assert count > 10
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_fusing_a_training_model_is_refused():
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
