"""The Python API, with the command line's vocabulary (DESIGN §4):

    import cvforge
    result = cvforge.train(task="classify", model="resnet18", data="shapes", epochs=5)
    metrics = cvforge.evaluate(result.best, data="shapes")
    model = cvforge.load(result.best)
    model.predict("cat.jpg")     # {"label": 3, "name": "cat", "score": 0.91, "top": [...]}

Each function here is glue: it resolves the data set, model, transforms and evaluator for the task,
and hands them to the engine. The work itself lives in the files those parts come from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvforge.config import TrainConfig
from cvforge.data import build_dataset
from cvforge.data.transforms import build_transforms
from cvforge.engine.checkpoint import load_checkpoint, load_model_state, next_run_dir, resume_target
from cvforge.engine.optim import resolve_device, seed_everything, to_device
from cvforge.engine.trainer import TrainResult, Trainer
from cvforge.errors import CvforgeError
from cvforge.eval import build_evaluator
from cvforge.recipes import DEFAULT_MODELS, resolve_config  # noqa: F401  (DEFAULT_MODELS: public name)
from cvforge.zoo import build_model


# --------------------------------------------------------------------------------------------- train
def train(**options: Any) -> TrainResult:
    """Train a model; ``options`` are ``TrainConfig``'s fields (the CLI's flags). Returns the run's result.

    What is not given comes from the model's recipe (``cvforge.recipes``): ``train()`` alone trains the
    default detector on the built-in data. ``model_args={"upsample": "bilinear"}`` are the model
    builder's own options. ``resume="path/to/last.pt"`` (or ``"auto"``) continues a stopped run exactly.
    """
    config = TrainConfig.from_dict(options)
    if config.resume:
        path, saved = resume_target(config.resume, config.project_dir)
        config = dataclasses.replace(saved, epochs=max(saved.epochs, config.epochs if "epochs" in options else 0))
    else:
        config = resolve_config(options)
    if config.devices > 1 and "RANK" not in os.environ:
        from cvforge.engine.distributed import launch
        launch(_train_worker, config.devices, config.to_dict())
        return _finished_run(config)
    return _train_worker(config.to_dict())


def _train_worker(values: dict) -> TrainResult:
    """One training process (also each process under --devices N)."""
    config = TrainConfig.from_dict(values)
    train_set = build_dataset(config.data, "train", config.task,
                              transforms=build_transforms(config.task, True, config.imgsz))
    val_set = build_dataset(config.data, "val", config.task,
                            transforms=build_transforms(config.task, False, config.imgsz))
    _report_problems(train_set, val_set)
    seed_everything(config.seed)  # the initial weights follow --seed too (the trainer reseeds for its stream)
    model = build_model(config.model, task=config.task, num_classes=len(train_set.classes), **_model_args(config))
    if config.pretrained and not config.resume:
        from cvforge.models.weights import load_pretrained
        load_pretrained(model, config.pretrained)  # prints what it loaded and what it re-initialised
    if config.freeze:
        model.freeze("all" if config.freeze < 0 else config.freeze)
    callbacks: list = [RunPlots()]
    if callable(getattr(model, "wrap_train_data", None)):  # a model's own data recipe, e.g. YOLO's mosaic
        train_set, extra = model.wrap_train_data(train_set, config)
        callbacks += extra
    trainer = Trainer(config, model, train_set, val_set, build_evaluator(config.task, train_set.classes),
                      class_names=train_set.classes, callbacks=callbacks)
    if config.resume:
        trainer.resume(config.resume)
    return trainer.fit()


def _model_args(config: TrainConfig) -> dict[str, Any]:
    """The builder's options: the user's, plus the training size for models that size themselves (YOLO)."""
    from cvforge.zoo import builder_options
    if "imgsz" in builder_options(config.model, config.task):
        return {"imgsz": config.imgsz, **config.model_args}
    return dict(config.model_args)


def _finished_run(config: TrainConfig) -> TrainResult:
    """After a multi-process run: the newest run folder's result, read back from its files."""
    runs = sorted(config.project_dir.glob(f"{config.name}*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CvforgeError("the distributed run wrote no checkpoint", config.project_dir, "see the messages above")
    state = load_checkpoint(runs[-1], mmap=True)
    best = runs[-1].parent / "best.pt"
    return TrainResult(save_dir=runs[-1].parent.parent, last=runs[-1], best=best if best.exists() else None,
                       metric=state.get("metric", ""), best_metric=state.get("best_metric"),
                       epochs=state.get("epoch", 0), stopped=not state.get("finished", False),
                       history=state.get("history", []))


def _report_problems(*datasets) -> None:
    for dataset in datasets:
        if dataset.problems:
            print(f"cvforge: warning: {dataset.source}: {dataset.problems.summary()} — "
                  f"run `cvforge data check {dataset.source}` for the files and lines")


class RunPlots:
    """Training callback: after the run, curves from metrics.csv and the task's plots of best.pt."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if not trainer.is_main or not (result.save_dir / "metrics.csv").exists():
            return
        from cvforge.viz import plot_metrics_csv
        plot_metrics_csv(result.save_dir / "metrics.csv", result.save_dir / "plots" / "curves.png")
        weights = result.best or result.last
        if weights.exists() and not result.stopped:
            config = trainer.config
            evaluate(weights, data=config.data, split="val", batch=config.batch, workers=config.workers,
                     out=result.save_dir / "plots", device=str(trainer.device), quiet=True)


# --------------------------------------------------------------------------------------------- load
class Model:
    """A trained model rebuilt from a checkpoint alone (``cvforge.load``): ``predict`` images."""

    def __init__(self, module: nn.Module, task: str, classes: list[str], config: TrainConfig, path: Path,
                 device: torch.device):
        self.module, self.task, self.classes, self.config, self.path = module, task, classes, config, path
        self.device = device
        self.transforms = build_transforms(task, False, config.imgsz)

    @property
    def data(self) -> str:
        """The SPEC of the data it was trained on (``export.OnnxModel`` has the same attribute)."""
        return self.config.data

    def __repr__(self) -> str:
        return f"cvforge.Model({self.config.model}, task={self.task}, classes={len(self.classes)}, from {self.path})"

    @torch.inference_mode()
    def predict(self, image: Any, top: int = 5) -> dict[str, Any]:
        """Predictions for one image (a path, a PIL image, or a uint8 [3, H, W] tensor)."""
        from cvforge.predict import as_image, describe
        tensor, _ = self.transforms(as_image(image), {})
        output = self.module(to_device(tensor[None], self.device))
        return describe(self.task, output, self.classes, top)[0]


def load(path: str | os.PathLike, device: str = "auto", fuse: bool = True, channels_last: bool = True) -> Model:
    """Rebuild the model stored in a cvforge checkpoint (architecture, weights, classes, settings), in
    eval mode; ``fuse`` folds batch norms into their convolutions (faster, same outputs; pass False to
    fine-tune ``model.module`` further). ``channels_last`` stores conv weights NHWC, the layout oneDNN's
    and cuDNN's fastest kernels use: on a 2-core CPU at batch 1, 1.07x (Faster R-CNN) to 1.6x (YOLOv1) faster
    inference, the same outputs up to float rounding."""
    path = Path(path)
    if is_onnx(path):
        raise CvforgeError("this is an exported ONNX model, not a checkpoint", path,
                           "run it with `cvforge predict` / `cvforge eval --weights`, or cvforge.export.load_onnx")
    state = load_checkpoint(path)
    spec, classes = state.get("model_spec"), state.get("class_names")
    if not isinstance(spec, dict) or not classes:
        raise CvforgeError("checkpoint does not say which model it holds", path,
                           "load a checkpoint written by `cvforge train` (weights/best.pt or last.pt)")
    kwargs = dict(spec["kwargs"])
    module = build_model(spec["name"], task=spec["task"], num_classes=kwargs.pop("num_classes"), **kwargs)
    load_model_state(module, state["model"], where=path)
    device = resolve_device(device)
    config = TrainConfig.from_dict(state["train_config"], path)
    module.eval()
    if fuse:
        from cvforge.models.fuse import fuse_conv_bn
        fuse_conv_bn(module)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return Model(module.to(device, memory_format=memory_format), spec["task"], list(classes), config, path, device)


def is_onnx(weights: str | os.PathLike) -> bool:
    return str(weights).lower().endswith(".onnx")


def load_for_inference(weights: str | os.PathLike, device: str = "auto") -> tuple[Any, contextlib.AbstractContextManager]:
    """A checkpoint (``load``) or an exported ``.onnx`` file (run by onnxruntime, ``export.OnnxModel``: the
    same ``task``, ``classes``, ``transforms``, ``device`` and ``module``), and the context to run it in:
    for ONNX, torch at one thread (``export.torch_beside_onnxruntime``), else nothing."""
    if is_onnx(weights):
        from cvforge.export import load_onnx, torch_beside_onnxruntime
        return load_onnx(weights), torch_beside_onnxruntime()
    return load(weights, device), contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- evaluate
@torch.inference_mode()
def evaluate(weights: str | os.PathLike, data: str | None = None, split: str = "val", *, batch: int = 16,
             workers: int = 0, out: str | os.PathLike | None = None, device: str = "auto",
             quiet: bool = False) -> dict[str, float]:
    """Metrics of a checkpoint (or an exported ``.onnx`` file) on a data split (default: the data it was
    trained on); writes the task's plots (e.g. the confusion matrix) to ``out`` (default: a new
    ``runs/<task>/eval`` folder)."""
    from cvforge.predict import write_eval_plots
    model, context = load_for_inference(weights, device)
    data = data or model.data
    if not data:  # an ONNX file exported before the training data went into its metadata
        raise CvforgeError("the ONNX file does not say which data it was trained on", weights,
                           "pass --data SPEC (e.g. --data shapes)")
    dataset = build_dataset(data, split, model.task, transforms=model.transforms)
    if dataset.classes != model.classes:
        raise CvforgeError(f"the data has classes {dataset.classes[:6]}, the model {model.classes[:6]}",
                           data, "evaluate on data with the classes the model was trained on")
    with context:
        evaluator = evaluate_module(model.module, dataset, model.task, model.device, batch=batch, workers=workers,
                                    desc=None if quiet else f"eval {split}")
    metrics = {key: float(value) for key, value in evaluator.compute().items()}
    out = Path(out) if out else next_run_dir(Path("runs") / model.task, "eval")
    write_eval_plots(model.task, evaluator, model.classes, out)
    return metrics


@torch.inference_mode()
def evaluate_module(module: nn.Module, dataset, task: str, device: torch.device, *, batch: int = 16,
                    workers: int = 0, desc: str | None = None):
    """The task's evaluator after ``module`` (in eval mode, on ``device``) predicted every sample of
    ``dataset``; ``compute()`` gives the metrics. desc: a progress bar's label (None: no bar)."""
    from tqdm import tqdm

    from cvforge.data.loader import build_loader
    evaluator = build_evaluator(task, dataset.classes)
    loader = build_loader(dataset, task, batch_size=batch, shuffle=False, num_workers=workers)
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        evaluator.update(to_device(module(to_device(images, device)), "cpu"), targets)
    return evaluator
