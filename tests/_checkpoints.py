"""A model saved the way ``cvforge train`` saves it, for tests that need weights without training."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from cvforge.config import TrainConfig
from cvforge.engine.checkpoint import FORMAT, save_checkpoint


def save_as_checkpoint(path: Path, model: nn.Module, classes: list[str], imgsz: int) -> Path:
    """``path`` <- a checkpoint of ``model`` (built by ``zoo.build_model``) that ``cvforge.load`` rebuilds."""
    spec = model.cvforge_spec
    config = TrainConfig(task=spec["task"], model=spec["name"], imgsz=imgsz)
    return save_checkpoint(path, {"format": FORMAT, "model": model.state_dict(), "model_spec": spec,
                                  "class_names": classes, "train_config": config.to_dict()})
