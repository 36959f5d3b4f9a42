"""Classifier: losses in train mode, probabilities in eval mode, freezing and learning-rate groups."""
from __future__ import annotations

import pytest
import torch

from cvforge.errors import CvforgeError
from cvforge.models.backbones import get_backbone
from cvforge.models.classifier import Classifier, build_classifier


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)


LABELS = {"label": torch.tensor([0, 1, 2, 1])}


def _bn_stats(model: Classifier) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.backbone.named_buffers() if "running" in name]


def test_train_loss_and_backward_reach_every_part(images):
    torch.manual_seed(0)
    model = build_classifier("resnet18", num_classes=3).train()
    losses = model(images, LABELS)
    assert set(losses) == {"loss_cls"} and torch.isfinite(losses["loss_cls"])
    losses["loss_cls"].backward()
    assert model.head.fc.weight.grad.abs().sum() > 0
    assert model.backbone.body["conv1"].weight.grad.abs().sum() > 0
    assert model.backbone.body["layer4"][1].conv2.weight.grad.abs().sum() > 0


def test_eval_scores_are_probabilities_and_normalisation_is_inside(images):
    model = build_classifier("mobilenet_v3_small", num_classes=3).eval()
    with torch.no_grad():
        scores = model(images)["scores"]
        as_float = model(images.float() / 255)["scores"]
        as_list = model(list(images))["scores"]
    assert scores.shape == (4, 3) and scores.dtype == torch.float32
    assert torch.allclose(scores.sum(dim=1), torch.ones(4))
    assert torch.allclose(scores, as_float, atol=1e-6) and torch.allclose(scores, as_list)


def test_targets_as_list_and_label_smoothing(images):
    torch.manual_seed(0)
    model = build_classifier("resnet18", num_classes=3).train()
    model.backbone.freeze(len(model.backbone.stages))  # deterministic features (BN in eval)
    per_image = [{"label": label} for label in LABELS["label"]]
    plain = model(images, LABELS)["loss_cls"]
    assert torch.allclose(plain, model(images, per_image)["loss_cls"])
    model.label_smoothing = 0.3
    assert not torch.allclose(plain, model(images, LABELS)["loss_cls"])
    with pytest.raises(ValueError, match="targets"):
        model(images)


@pytest.mark.parametrize("how", ["all", "probe"])
def test_linear_probe_freezes_backbone_and_its_statistics(images, how):
    model = build_classifier("mobilenet_v3_small", num_classes=3)
    model.freeze(how)
    model.train()
    before = _bn_stats(model)
    assert before and not any(p.requires_grad for p in model.backbone.parameters())
    model(images, LABELS)["loss_cls"].backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(model)))
    assert model.head.fc.weight.grad is not None and model.head.training
    assert [g["name"] for g in model.param_groups(lr=0.1, backbone_lr_mult=0.1)] == ["head", "head/no_decay"]


def test_freeze_n_stages_is_stem_plus_first_stages():
    model = Classifier(get_backbone("resnet18"), num_classes=3)
    model.freeze(2)
    stages = model.backbone.stages
    assert [any(p.requires_grad for p in s.parameters()) for s in stages] == [False, False, True, True, True]
    body = model.backbone.body
    assert not body["conv1"].weight.requires_grad and not body["layer1"][0].conv1.weight.requires_grad
    assert body["layer2"][0].conv1.weight.requires_grad and model.head.fc.weight.requires_grad
    model.train()
    assert not body["bn1"].training and not body["layer1"].training and body["layer2"].training
    model.freeze("0")
    assert all(p.requires_grad for p in model.parameters())
    for bad in ("some", -1, 9):
        with pytest.raises(CvforgeError, match="freeze"):
            model.freeze(bad)


def test_param_groups_give_backbone_a_lower_lr():
    model = build_classifier("resnet18", num_classes=3)
    groups = model.param_groups(lr=0.01, backbone_lr_mult=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.001) and by_name["head"]["lr"] == pytest.approx(0.01)
    assert by_name["head/no_decay"]["weight_decay"] == 0.0 and "weight_decay" not in by_name["head"]
    optimizer = torch.optim.SGD(groups, lr=0.01, weight_decay=1e-4)  # the optimizer's default fills the rest
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
