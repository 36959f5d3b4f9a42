"""Training engine: the loop (``trainer.py``), crash-safe checkpoints and run folders
(``checkpoint.py``) and multi-process data parallelism (``distributed.py``)."""
from __future__ import annotations

from cvforge.engine.checkpoint import (find_last_run, load_checkpoint, load_model_state, next_run_dir,
                                       save_checkpoint)
from cvforge.engine.distributed import launch
from cvforge.engine.optim import seed_everything, to_device
from cvforge.engine.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "find_last_run", "launch", "load_checkpoint", "load_model_state",
           "next_run_dir", "save_checkpoint", "seed_everything", "to_device"]
