"""Pretrained weights: torchvision files, cvforge checkpoints, hub names offline, and refusals."""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

from cvforge.data import build_dataset
from cvforge.data.fewshot import FEWSHOT_CLASSES, draw_fewshot_image
from cvforge.errors import CvforgeError
from cvforge.models.backbones import get_backbone
from cvforge.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from cvforge.models.classifier import build_classifier
from cvforge.models.weights import load_pretrained

RESNET18_FILE = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)


@pytest.fixture(scope="module")
def tv_resnet18():
    """A torchvision resnet18 (1000 classes) with BN statistics that differ from the defaults."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for name, buffer in model.named_buffers():
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tv_file(tmp_path, tv_resnet18):
    path = tmp_path / "resnet18.pth"
    torch.save(tv_resnet18.state_dict(), path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache in tmp_path; any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("CVFORGE_ALLOW_DOWNLOAD", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_torchvision_state_dict_into_classifier_of_other_size(tv_file, tv_resnet18, capsys):
    model = build_classifier("resnet18", num_classes=5)
    report = load_pretrained(model, tv_file)
    out = capsys.readouterr().out
    assert "head: 1000 classes in file, 5 in model — re-initialised" in out
    assert str(report) in out and str(report).count("\n") == 0
    tv_state = tv_resnet18.state_dict()
    assert torch.equal(model.backbone.body["layer3"][0].conv1.weight, tv_state["layer3.0.conv1.weight"])
    assert torch.equal(model.backbone.body["bn1"].running_var, tv_state["bn1.running_var"])
    assert report.head_reinitialised and report.mismatched == []
    assert report.unexpected == ["fc.weight", "fc.bias"] and report.missing == ["head.fc.weight", "head.fc.bias"]
    assert len(report.loaded) == len([k for k in tv_state if not k.startswith("fc.")])


def test_same_size_head_loads_and_reproduces_torchvision(tv_file, tv_resnet18, capsys):
    model = build_classifier("resnet18", num_classes=1000).eval()
    report = load_pretrained(model, tv_file)
    assert "re-initialised" not in capsys.readouterr().out
    assert not report.missing and not report.unexpected and not report.head_reinitialised
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    normalised = (images / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        expected = tv_resnet18(normalised).softmax(dim=1)
        assert torch.allclose(model(images)["scores"], expected, atol=1e-5)


def test_cvforge_checkpoint_into_classifier_and_backbone(tmp_path, capsys):
    torch.manual_seed(0)
    source = build_classifier("mobilenet_v3_small", num_classes=3).train()
    source(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), {"label": torch.tensor([0, 2])})  # move BN stats
    path = tmp_path / "best.pt"
    torch.save({"model": source.state_dict(), "cvforge_version": "0.1.0", "epoch": 3}, path)

    same = build_classifier("mobilenet_v3_small", num_classes=3)
    report = load_pretrained(same, path)
    assert not (report.missing or report.mismatched or report.unexpected)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))

    load_pretrained(build_classifier("mobilenet_v3_small", num_classes=5), path)
    assert "head: 3 classes in file, 5 in model — re-initialised" in capsys.readouterr().out

    backbone = get_backbone("mobilenet_v3_small")
    report = load_pretrained(backbone, path)
    assert report.unexpected == ["head.fc.weight", "head.fc.bias"] and not report.missing
    assert torch.equal(backbone.body["features"][3].block[0][0].weight,
                       source.backbone.body["features"][3].block[0][0].weight)


def test_wrapped_and_nested_state_dict(tmp_path, tv_resnet18):
    """DDP ("module.") and Lightning-style nesting ({"state_dict": ...}) load as well."""
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv_resnet18.state_dict().items()}}, path)
    backbone = get_backbone("resnet18")
    report = load_pretrained(backbone, path)
    assert not report.missing and torch.equal(backbone.body["conv1"].weight, tv_resnet18.conv1.weight)


def test_hub_names_resolve_from_the_cache(hub, tv_resnet18):
    hub.mkdir(parents=True)
    torch.save(tv_resnet18.state_dict(), hub / RESNET18_FILE)
    for spec in ("ResNet18_Weights.IMAGENET1K_V1", "ResNet18_Weights.DEFAULT", "DEFAULT", "IMAGENET1K_V1"):
        backbone = get_backbone("resnet18", pretrained=spec)
        assert torch.equal(backbone.body["layer4"][1].conv2.weight, tv_resnet18.layer4[1].conv2.weight), spec


def test_offline_error_names_the_expected_file(hub):
    with pytest.raises(CvforgeError) as error:
        load_pretrained(build_classifier("resnet18", num_classes=2), "ResNet18_Weights.IMAGENET1K_V1")
    message = str(error.value)
    assert str(hub / RESNET18_FILE) in message
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in message and "copy it there" in message


def test_wrong_names_and_files_are_refused(tmp_path, hub):
    model = build_classifier("resnet18", num_classes=2)
    (tmp_path / "other.pt").parent.mkdir(exist_ok=True)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "mobilenet.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    cases = {
        str(tmp_path / "other.pt"): "no weights in the file match",
        str(tmp_path / "mobilenet.pt"): "no weights in the file match",
        str(tmp_path / "absent.pt"): "weights file not found",
        str(tmp_path / "broken.pt"): "cannot read weights file",
        "ResNet18_Weights.NOPE": "unknown pretrained weights",
        "ResNet50_Weights.DEFAULT": "not for resnet18",
    }
    for spec, message in cases.items():
        with pytest.raises(CvforgeError, match=message):
            load_pretrained(model, spec)


class _Payload:
    """Unpickling this would create a file: the side effect a hostile checkpoint would have."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickle_with_code_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    with pytest.raises(CvforgeError, match="unsafe"):
        load_pretrained(get_backbone("resnet18"), path)
    assert not marker.exists()


# ------------------------------------------------------------------ transfer learning, honestly
# Pretrain on the built-in shapes crops (circle, cross, square, star, triangle on textured backgrounds),
# save a cvforge checkpoint, then learn 4 NEW classes (hexagon, ellipse, arrow, ring on noise) from
# 20 images per class (cvforge.data.fewshot): starting from the checkpoint must beat starting from
# scratch, same budget.

SIDE = 32
def _new_classes_set(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images = torch.stack([draw_fewshot_image(rng, c) for c in range(len(FEWSHOT_CLASSES)) for _ in range(per_class)])
    labels = torch.arange(len(FEWSHOT_CLASSES)).repeat_interleave(per_class)
    return TF.resize(images, [SIDE, SIDE], antialias=True), labels


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*[(image, int(target["label"])) for image, target in dataset])
    return TF.resize(torch.stack(images), [SIDE, SIDE], antialias=True), torch.tensor(labels)


def _fit(model, images, labels, *, epochs: int, lr: float, backbone_lr_mult: float = 1.0, batch: int = 16,
         seed: int = 0) -> None:
    """A plain AdamW + one-cycle loop with horizontal flips (the engine has its own tests)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.param_groups(lr, backbone_lr_mult, weight_decay=0.05), lr=lr)
    steps = epochs * math.ceil(len(images) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in optimizer.param_groups],
                                                   total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            index = order[start:start + batch]
            flip = (torch.rand(len(index), generator=generator) < 0.5)[:, None, None, None]
            batch_images = torch.where(flip, images[index].flip(-1), images[index])
            loss = model(batch_images, {"label": labels[index]})["loss_cls"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def _accuracy(model, images, labels) -> float:
    model.eval()
    return (model(images)["scores"].argmax(dim=1) == labels).float().mean().item()


@pytest.mark.slow
def test_transfer_learning_beats_training_from_scratch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path / "home"))  # the built-in data set is generated here
    spec = "shapes:train=400,val=60,size=96"
    train_images, train_labels = _as_tensors(build_dataset(spec, "train", task="classify"))
    val_images, val_labels = _as_tensors(build_dataset(spec, "val", task="classify"))
    torch.manual_seed(0)
    pretrained = build_classifier("resnet18", num_classes=5)
    _fit(pretrained, train_images, train_labels, epochs=6, lr=3e-3, batch=64)
    pretrain_accuracy = _accuracy(pretrained, val_images, val_labels)
    checkpoint = tmp_path / "shapes.pt"
    torch.save({"model": pretrained.state_dict(), "cvforge_version": "0.1.0"}, checkpoint)

    few_images, few_labels = _new_classes_set(per_class=20, seed=1)
    test_images, test_labels = _new_classes_set(per_class=50, seed=2)
    # Same budget for both: 40 epochs over the same 80 images.
    torch.manual_seed(1)
    transferred = build_classifier("resnet18", num_classes=4)
    assert load_pretrained(transferred, checkpoint).head_reinitialised
    transferred.freeze("probe")  # linear probe first, so the new head does not scramble the features
    _fit(transferred, few_images, few_labels, epochs=10, lr=1e-2)
    transferred.freeze(0)
    _fit(transferred, few_images, few_labels, epochs=30, lr=1e-3, backbone_lr_mult=0.3)
    torch.manual_seed(1)
    scratch = build_classifier("resnet18", num_classes=4)
    _fit(scratch, few_images, few_labels, epochs=40, lr=3e-3)

    fine_tuned = _accuracy(transferred, test_images, test_labels)
    from_scratch = _accuracy(scratch, test_images, test_labels)
    with capsys.disabled():
        print(f"\ntransfer learning: pretrain top1 on shapes {pretrain_accuracy:.3f}; 4 new classes, "
              f"20 images each: fine-tuned {fine_tuned:.3f} vs from scratch {from_scratch:.3f}")
    assert pretrain_accuracy > 0.5
    assert fine_tuned > from_scratch + 0.1


def test_a_classifier_backbone_loads_into_faster_rcnn(tmp_path):
    """A cvforge-trained classifier is a pretrained backbone for the detectors, whose backbone sits deeper."""
    from cvforge.zoo import build_model
    classifier = build_model("resnet18", task="classify", num_classes=3)
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    detector = build_model("faster_rcnn", task="detect", num_classes=3)
    report = load_pretrained(detector, tmp_path / "classifier.pt")
    stem = "features.backbone.body.conv1.weight"
    assert stem in report.loaded
    assert torch.equal(detector.state_dict()[stem], classifier.state_dict()["backbone.body.conv1.weight"])
