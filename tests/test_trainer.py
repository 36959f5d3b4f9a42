"""The training loop in one process: run folder and files, optimizer groups, schedule, EMA, AMP,
non-finite losses, graceful stop, early stopping and the config."""
from __future__ import annotations

import csv
import dataclasses
import math
import signal

import pytest
import torch
from torch import nn

import _toy
from cvforge.config import TrainConfig
from cvforge.engine.checkpoint import find_last_run, load_checkpoint
from cvforge.engine.optim import LRFactor, ModelEMA, build_optimizer, to_device
from cvforge.errors import CvforgeError


def test_fit_writes_config_metrics_and_weights_into_a_new_run_folder(tmp_path):
    result = _toy.train(tmp_path)
    run = tmp_path / "train"
    assert result.save_dir == run and not result.stopped and result.epochs == 3
    assert TrainConfig.load_yaml(run / "config.yaml") == TrainConfig(**{**_toy.TOY, "project": str(tmp_path)})
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"train/ce", "train/l2", "train/loss", "metrics/top1", "lr", "images_per_s", "time"} <= rows[0].keys()
    assert result.metric == "top1" and result.best_metric == max(float(r["metrics/top1"]) for r in rows)
    last, best = load_checkpoint(result.last), load_checkpoint(result.best)
    assert last["finished"] and last["step"] == 9  # 6 batches per epoch, accumulate 2 -> 3 steps
    assert last["model_spec"] == {"name": "toy", "task": "classify", "kwargs": {}}
    assert last["class_names"] == ["c0", "c1", "c2"] and last["cvforge_version"]
    assert TrainConfig.from_dict(last["train_config"]).epochs == 3
    assert "resume" not in best and "resume" in last  # best.pt holds the weights to run, only
    assert _toy.train(tmp_path, epochs=1).save_dir == tmp_path / "train-2"  # never overwritten


def test_checkpoints_hold_ema_weights_to_run_and_raw_weights_to_resume(tmp_path):
    trainer = _toy.build(tmp_path, epochs=1)
    trainer.fit()
    state = load_checkpoint(trainer.weights_dir / "last.pt")
    for name, value in trainer.ema.module.state_dict().items():
        assert torch.equal(state["model"][name], value)
    for name, value in trainer.raw_model.state_dict().items():
        assert torch.equal(state["resume"]["model"][name], value)
    assert not torch.equal(state["model"]["conv.weight"], state["resume"]["model"]["conv.weight"])
    assert state["resume"]["ema_updates"] == 3


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.backbone[0].bias.requires_grad_(False)  # frozen: must not reach the optimizer

    def param_groups(self, lr, backbone_lr_mult):
        return [{"params": list(self.backbone.parameters()), "lr": lr * backbone_lr_mult},
                {"params": [self.head.weight], "lr": lr},
                {"params": [self.head.bias], "lr": lr, "weight_decay": 0.5, "name": "own"}]


def test_optimizer_uses_model_groups_and_spares_biases_and_norms_from_weight_decay():
    config = TrainConfig(lr=0.1, backbone_lr_mult=0.01, weight_decay=0.05, optimizer="adamw", momentum=0.8)
    model = TwoPart()
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.8, 0.999)
    groups = [(g["lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]
    bb, head = model.backbone, model.head
    assert groups == [(pytest.approx(0.001), 0.05, {id(bb[0].weight)}),
                      (pytest.approx(0.001), 0.0, {id(bb[1].weight), id(bb[1].bias)}),
                      (0.1, 0.05, {id(head.weight)}), (0.1, 0.5, {id(head.bias)})]  # a group's own decay stays
    assert optimizer.param_groups[-1]["name"] == "own"
    plain = build_optimizer(nn.Linear(2, 2), TrainConfig())
    assert isinstance(plain, torch.optim.SGD) and len(plain.param_groups) == 2


def test_lr_factor_warms_up_linearly_then_follows_cosine_or_steps():
    cosine = LRFactor("cosine", total=100, warmup=10)
    assert [cosine(i) for i in range(3)] == pytest.approx([0.1 * c for c in (1, 2, 3)], rel=1e-2)
    assert cosine(50) == pytest.approx(0.505) and cosine(100) == pytest.approx(0.01)
    assert all(cosine(i) >= cosine(i + 1) for i in range(10, 100))
    step = LRFactor("step", total=100, warmup=0)
    assert (step(0), step(69), step(70), step(90)) == pytest.approx((1, 1, 0.1, 0.01))


def test_model_ema_warms_up_its_decay_and_copies_integer_buffers():
    model = nn.BatchNorm1d(2)
    ema = ModelEMA(model, decay=0.5, tau=1.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)  # d = 0.5 * (1 - e^-1) = 0.316: ema = 0.316 * 1 + 0.684 * 3
    d = 0.5 * (1 - math.exp(-1))
    assert torch.allclose(ema.module.weight, torch.full((2,), d * 1 + (1 - d) * 3))
    assert int(ema.module.num_batches_tracked) == 7 and not ema.module.weight.requires_grad


def test_to_device_moves_nested_tensors_and_keeps_structure():
    batch = ([torch.zeros(2)], {"boxes": torch.ones(1, 4), "meta": ("a", torch.tensor(1)), "n": 3})
    moved = to_device(batch, "meta")
    assert isinstance(moved, tuple) and isinstance(moved[0], list) and moved[0][0].is_meta
    assert moved[1]["boxes"].is_meta and moved[1]["meta"][0] == "a" and moved[1]["meta"][1].is_meta
    assert moved[1]["n"] == 3


class Snapshots:
    def __init__(self):
        self.weights = {}

    def on_step_end(self, trainer):
        self.weights[trainer.global_step] = trainer.raw_model.head.weight.detach().clone()


def test_a_non_finite_loss_skips_its_step_and_is_counted(tmp_path):
    snapshots = Snapshots()
    trainer = _toy.build(tmp_path, nan_calls={3}, accumulate=1, callbacks=[snapshots])
    result = trainer.fit()
    assert trainer.bad_steps_total == 1 and trainer.bad_steps == 0 and not result.stopped
    assert torch.equal(snapshots.weights[4], snapshots.weights[3])  # the 4th batch: no step, no momentum
    assert not torch.equal(snapshots.weights[5], snapshots.weights[4])
    assert [row["skipped_steps"] for row in result.history] == [1, 0, 0]
    assert all(math.isfinite(row["train/loss"]) for row in result.history)


class LastBytes:
    def on_epoch_end(self, trainer, metrics):
        self.data = (trainer.weights_dir / "last.pt").read_bytes()


def test_consecutive_non_finite_losses_stop_with_an_error_and_keep_last_pt(tmp_path):
    saved = LastBytes()
    trainer = _toy.build(tmp_path, nan_calls=set(range(8, 100)), accumulate=1, max_bad_steps=3, callbacks=[saved])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(CvforgeError) as error:
        trainer.fit()
    last = tmp_path / "train" / "weights" / "last.pt"
    message = str(error.value)
    assert "3 non-finite losses in a row" in message and str(last) in message and "\n" not in message
    assert last.read_bytes() == saved.data  # the epoch-1 checkpoint, untouched
    assert load_checkpoint(last)["epoch"] == 1 and signal.getsignal(signal.SIGTERM) == before


def test_sigint_saves_at_the_step_boundary_and_says_how_to_resume(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background
    result = _toy.train(tmp_path, callbacks=[_toy.SignalAt(2, signal.SIGINT)])
    assert result.stopped and result.epochs == 0
    state = load_checkpoint(result.last)
    assert state["step"] == 2 and state["resume"]["batch_in_epoch"] == 4 and not state["finished"]
    assert f"stopped at epoch 1 step 2; resume with: cvforge train --resume {result.last}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # the run put the caller's handler back
    assert find_last_run(tmp_path) == result.last
    resumed = _toy.train(tmp_path, resume=result.last)
    assert resumed.save_dir == result.save_dir and not resumed.stopped and resumed.epochs == 3


class Flat(_toy.ToyEvaluator):
    def compute(self):
        return {"top1": 0.5, "top5": 1.0}


def test_early_stopping_ends_a_run_that_stopped_improving(tmp_path):
    trainer = _toy.build(tmp_path, epochs=6, patience=2)
    trainer.evaluator = Flat()
    result = trainer.fit()
    assert result.epochs == 3 and result.best_metric == 0.5 and not result.stopped
    assert load_checkpoint(result.last)["finished"]
    with pytest.raises(CvforgeError, match="already finished"):
        _toy.build(tmp_path, epochs=6, patience=2).resume(result.last)
    with pytest.raises(CvforgeError, match="no training state"):
        _toy.build(tmp_path).resume(result.best)


def test_an_unknown_metric_names_the_ones_available(tmp_path):
    with pytest.raises(CvforgeError, match="metric 'mAP50' is not reported.*top1, loss"):
        _toy.train(tmp_path, metric="mAP50", epochs=1)


class AutocastProbe(_toy.ToyModel):
    def forward(self, images, targets=None):
        if self.training:
            self.dtype = self.conv(images[:1].float()).dtype
        return super().forward(images, targets)


def test_amp_on_cpu_uses_bfloat16_autocast(tmp_path):
    config = TrainConfig(**{**_toy.TOY, "project": str(tmp_path), "amp": True, "epochs": 1})
    model = AutocastProbe()
    from cvforge.engine.trainer import Trainer
    result = Trainer(config, model, _toy.ToyData(8), _toy.ToyData(3, augment=False), _toy.ToyEvaluator()).fit()
    assert model.dtype == torch.bfloat16 and math.isfinite(result.history[0]["train/loss"])
    assert model.conv.weight.dtype == torch.float32  # autocast, not a cast of the weights


def test_amp_dtype_picks_the_autocast_type_and_float16_needs_a_gpu(tmp_path):
    from cvforge.engine.trainer import Trainer, autocast_dtype
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (autocast_dtype("", cpu), autocast_dtype("", cuda)) == (torch.bfloat16, torch.float16)
    assert autocast_dtype("bfloat16", cuda) == torch.bfloat16 and autocast_dtype("float16", cuda) == torch.float16
    with pytest.raises(CvforgeError, match="emulated.*--amp-dtype bfloat16"):
        Trainer(TrainConfig(**{**_toy.TOY, "project": str(tmp_path), "amp": True, "amp_dtype": "float16"}),
                AutocastProbe(), _toy.ToyData(8))
    with pytest.raises(CvforgeError, match="unknown amp_dtype 'half'"):
        TrainConfig(amp_dtype="half")


def test_config_round_trips_through_yaml_and_rejects_mistakes(tmp_path):
    config = TrainConfig(task="detect", lr=0.02, amp=True, device="0")
    assert TrainConfig.load_yaml(config.save_yaml(tmp_path / "c.yaml")) == config
    assert TrainConfig.from_dict({"lr": 1, "device": 0}) == dataclasses.replace(TrainConfig(), lr=1.0, device="0")
    (tmp_path / "bad.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(CvforgeError, match=r"unknown setting\(s\) learning_rate, .*bad.yaml — valid settings"):
        TrainConfig.load_yaml(tmp_path / "bad.yaml")
    for values, words in (({"epochs": "ten"}, "epochs must be int"), ({"ema": 1}, "ema must be true/false"),
                          ({"optimizer": "lion"}, "unknown optimizer 'lion'"), ({"batch": 0}, "batch must be")):
        with pytest.raises(CvforgeError, match=words):
            TrainConfig.from_dict(values)
