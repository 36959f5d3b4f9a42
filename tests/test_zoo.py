"""The model registry: names to builders, specs that rebuild a model, clear errors."""
from __future__ import annotations

import pytest
import torch

from cvforge import zoo
from cvforge.errors import CvforgeError
from cvforge.models.classifier import Classifier


def test_registry_is_consistent():
    assert zoo.MODELS.keys() == zoo.MODEL_TASKS.keys()
    assert set(zoo.MODEL_TASKS.values()) <= set(zoo.TASKS)
    listed = zoo.list_models()
    assert ("resnet18", "classify") in listed and len(listed) == len(zoo.MODELS)
    assert all(task == "classify" for _, task in zoo.list_models("classify"))


@pytest.mark.parametrize("name", ["resnet18", "mnasnet0_5"])  # listed, and a torchvision name that is not
def test_build_classifier_and_rebuild_from_spec(name):
    model = zoo.build_model(name, task="classify", num_classes=4, dropout=0.1)
    assert isinstance(model, Classifier) and model.head.fc.out_features == 4
    spec = model.cvforge_spec
    assert spec == {"name": name, "task": "classify", "kwargs": {"num_classes": 4, "dropout": 0.1}}
    rebuilt = zoo.build_model(spec["name"], task=spec["task"], **spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # same architecture: every key and shape agrees
    model.eval(), rebuilt.eval()
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(images)["scores"], rebuilt(images)["scores"])


def test_errors_name_what_to_do():
    with pytest.raises(CvforgeError, match="cvforge models"):
        zoo.build_model("resnet19", task="classify", num_classes=2)
    with pytest.raises(CvforgeError, match="unknown task"):
        zoo.build_model("resnet18", task="classification", num_classes=2)
    with pytest.raises(CvforgeError, match="unknown segment model 'resnet18'"):
        zoo.build_model("resnet18", task="segment", num_classes=2)
    with pytest.raises(CvforgeError, match="bad options"):
        zoo.build_model("resnet18", task="classify", num_classes=2, depth=3)
    with pytest.raises(CvforgeError, match="plain value"):
        zoo.build_model("resnet18", task="classify", num_classes=2, dropout=torch.tensor(0.1))
