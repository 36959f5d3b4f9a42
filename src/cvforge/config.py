"""Training configuration: one frozen dataclass whose field names are the command line's and the
Python API's vocabulary (DESIGN §4), saved beside every run as ``config.yaml`` and inside every
checkpoint as a plain dict.

    config = TrainConfig(task="classify", model="resnet18", data="shapes", epochs=10)
    config.save_yaml("runs/classify/train/config.yaml")
    same = TrainConfig.load_yaml("runs/classify/train/config.yaml")
    changed = dataclasses.replace(config, lr=0.001)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvforge.errors import CvforgeError

TASKS = ("classify", "segment", "detect", "instance")
DETECTION_TASKS = ("detect", "instance")  # models that take a list of images and return boxes
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step")
AMP_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, resolved; defaults are sensible for a first run.

    ``None`` means "decide from the device": ``amp`` is on for CUDA (float16 + GradScaler) and off on
    CPU (``True`` there uses bfloat16 autocast; ``amp_dtype`` picks bfloat16 on CUDA too, without a
    GradScaler: float32's range, so no float16 overflow); ``channels_last`` is on where AMP runs on CUDA (float16
    convolutions alone were slower than float32 for yolo-n on an H100, 1.24x faster with NHWC weights);
    ``pin_memory`` is on for CUDA.
    """

    task: str = ""  # classify | segment | detect | instance; "" = the model's task, else the data's first
    model: str = ""  # a name in cvforge.zoo; "" = the task's default model
    # the model builder's own options (e.g. FCN's upsample, YOLO's close_mosaic); CLI: --upsample bilinear
    model_args: dict = field(default_factory=dict)
    data: str = "shapes"  # a data SPEC (DESIGN §4)
    epochs: int = 30
    # minutes for the whole run (training + validation); > 0: after the first epoch the number of epochs
    # becomes what fits (at least 1; --epochs is then ignored) and the schedule is fitted to it
    time: float = 0.0
    imgsz: int = 224
    batch: int = 16  # images per optimizer micro-step over all processes (split across --devices)
    workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N | N
    devices: int = 1  # local processes for DistributedDataParallel (--devices N)
    pretrained: str = ""  # a torchvision weight name or a local file; "" = random init
    freeze: int = 0  # 0 = train all, N = freeze the first N backbone stages, -1 = whole backbone
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9  # SGD momentum, AdamW beta1
    weight_decay: float = 5e-4  # not applied to biases and normalisation weights
    backbone_lr_mult: float = 0.1  # backbone lr = lr * this, for models that expose param_groups()
    scheduler: str = "cosine"  # cosine | step, stepped every iteration after a linear warm-up
    warmup_epochs: float = 1.0
    amp: bool | None = None
    amp_dtype: str = ""  # "" = float16 on CUDA, bfloat16 on CPU; or float16 | bfloat16
    channels_last: bool | None = None  # NHWC weights: faster convolutions with AMP (CPU with AMX, CUDA tensor cores)
    grad_clip: float = 10.0  # max gradient norm; 0 = off
    accumulate: int = 1  # micro-batches per optimizer step
    ema: bool = False  # keep an exponential moving average of the weights (validated and saved)
    ema_decay: float = 0.9999
    patience: int = 50  # epochs without improvement before stopping early; 0 = never
    metric: str = ""  # validation metric for best.pt ("" = the task's main metric); "loss" = train loss
    seed: int = 0
    project: str = ""  # "" = runs/<task>
    name: str = "train"
    resume: str = ""  # "" = a new run; a path to last.pt; "auto" = the newest unfinished run
    pin_memory: bool | None = None
    drop_last: bool = False
    persistent_workers: bool = False
    save_period: int = 0  # also keep weights/epoch<N>.pt every N epochs; 0 = off
    # validate after every N-th epoch (and always after the first and the last): validation costs ~15 % of
    # a short detection epoch, time a time budget then gives to training; best.pt is chosen among these
    val_period: int = 1
    max_bad_steps: int = 10  # non-finite losses in a row before the run stops with an error

    def __post_init__(self) -> None:
        if self.task:  # "" is resolved by cvforge.train before a run starts
            _check_choice("task", self.task, TASKS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        if self.amp_dtype:
            _check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        for name in ("epochs", "batch", "accumulate", "devices", "max_bad_steps", "imgsz", "val_period"):
            if getattr(self, name) < 1:
                raise CvforgeError(f"{name} must be at least 1, got {getattr(self, name)}", None,
                                   f"pass --{name} 1 or more")
        for name in ("workers", "patience", "save_period", "lr", "weight_decay", "grad_clip", "warmup_epochs",
                     "time"):
            if getattr(self, name) < 0:
                raise CvforgeError(f"{name} must not be negative, got {getattr(self, name)}", None,
                                   f"pass --{name} 0 or more")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CvforgeError(f"ema_decay must be in [0, 1), got {self.ema_decay}", None, "use e.g. 0.9999")

    @property
    def project_dir(self) -> Path:
        """Where runs go: ``project``, or ``runs/<task>`` when it is empty."""
        return Path(self.project) if self.project else Path("runs") / self.task

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (str, int, float, bool, None): safe for YAML and ``weights_only`` checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str | os.PathLike | None = None) -> TrainConfig:
        """A config from plain values (a YAML file, a checkpoint); unknown keys or wrong types raise
        ``CvforgeError`` naming ``where``."""
        if not isinstance(values, dict):
            raise CvforgeError("a training config must be a mapping of settings", where,
                               "write one `name: value` per line")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CvforgeError(f"unknown setting(s) {', '.join(map(str, unknown))}", where,
                               f"valid settings are: {', '.join(known)}")
        defaults = cls()
        coerced = {k: _coerce(k, v, getattr(defaults, k), where) for k, v in values.items()}
        return cls(**coerced)

    def save_yaml(self, path: str | os.PathLike) -> Path:
        """Write ``config.yaml`` (keys in field order)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path

    @classmethod
    def load_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CvforgeError(f"cannot read the config ({e.strerror})", path, "check the path") from None
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "syntax error"
            raise CvforgeError(f"config is not valid YAML ({first})", path, "fix the YAML syntax") from None
        return cls.from_dict(values or {}, path)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CvforgeError(f"unknown {name} {value!r}", None, f"choose one of {', '.join(choices)}")


def _coerce(name: str, value: Any, default: Any, where: str | os.PathLike | None) -> Any:
    """``value`` as the type of the field's default (YAML writes 0.01 as float but 1 as int)."""
    def wrong() -> CvforgeError:
        kind = "true/false" if isinstance(default, bool) or default is None else type(default).__name__
        return CvforgeError(f"setting {name} must be {kind}, got {value!r}", where, f"write e.g. {name}: {default!r}")

    if isinstance(default, dict):  # model_args: the builder checks names and types when it is built
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise CvforgeError(f"setting {name} must be a mapping of option names to values, got {value!r}", where,
                           f"write e.g. {name}: {{upsample: bilinear}}")
    if default is None or isinstance(default, bool):  # optional flags: true, false or null
        if value is None and default is None or isinstance(value, bool):
            return value
        raise wrong()
    if isinstance(value, bool):  # bool is an int subclass: `epochs: true` is a mistake
        raise wrong()
    if isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(default, int) and isinstance(value, int):
        return value
    if isinstance(default, str) and isinstance(value, (str, int, float)):
        return str(value)  # e.g. `device: 0` in YAML
    raise wrong()
