"""The time budget (``--time MINUTES``): after the first epoch the run gets the epochs that fit, the cosine
schedule is fitted to them, a first epoch longer than the budget is cut, and a resumed run keeps its epochs.

The trainer's clock is replaced by a fake one that the model advances by a fixed cost per batch, so the
epochs a budget buys are exact and the test does not depend on the machine's speed or load.
"""
from __future__ import annotations

import signal
import types

import pytest
import torch

import _toy
from cvforge.cli import build_parser
from cvforge.config import TrainConfig
from cvforge.engine import trainer as trainer_module
from cvforge.engine.checkpoint import load_checkpoint
from cvforge.engine.optim import COSINE_FINAL, seed_everything
from cvforge.engine.trainer import Trainer
from cvforge.errors import CvforgeError


class Clock:
    """A ``time`` stand-in whose ``perf_counter`` only moves when the model says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class CostlyModel(_toy.ToyModel):
    """The toy model, each forward call (a batch, training or validation) costing ``cost`` fake seconds.
    The clock is a class attribute: the EMA's deep copy, which validates, must advance the same clock."""

    clock: Clock

    def __init__(self, cost: float):
        super().__init__()
        self.cost = cost

    def forward(self, images, targets=None):
        CostlyModel.clock.now += self.cost
        return super().forward(images, targets)


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    monkeypatch.setattr(CostlyModel, "clock", fake, raising=False)
    return fake


def fit(clock: Clock, config: TrainConfig, cost: float, resume=None, callbacks=()):
    """24 train images (6 batches of 4), 9 val images (3 batches): a 1-s batch makes a 9-s epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical runs, for the resume comparison
    try:
        seed_everything(0)
        trainer = Trainer(config, CostlyModel(cost), _toy.ToyData(24), _toy.ToyData(9, augment=False),
                          _toy.ToyEvaluator(), callbacks=list(callbacks))
        if resume is not None:
            trainer.resume(resume)
        return trainer.fit()
    finally:
        torch.set_num_threads(threads)


def config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**{**_toy.TOY, "project": str(tmp_path), "epochs": 30, "time": 1.0, **overrides})


def test_the_budget_sets_the_epochs_and_cosine_ends_at_its_floor(tmp_path, clock, capsys):
    result = fit(clock, config(tmp_path), cost=1.0)
    assert "time budget 1 min: 6 epochs, the first took 9.0 s with validation" in capsys.readouterr().out
    assert result.epochs == 6 and len(result.history) == 6 and not result.stopped  # 60 s // 9 s
    assert clock.now <= 60.0
    last = load_checkpoint(result.last)
    assert last["finished"] and last["train_config"]["epochs"] == 6 and last["train_config"]["time"] == 1.0
    assert TrainConfig.load_yaml(result.save_dir / "config.yaml").epochs == 6
    lrs = [row["lr"] for row in result.history]
    assert lrs[-1] == pytest.approx(_toy.TOY["lr"] * COSINE_FINAL)  # 18 steps: the schedule was 90
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


class WarmingModel(CostlyModel):
    """Its first three training batches cost three times as much (warm-up, an image cache filling)."""

    def forward(self, images, targets=None):
        self.warm_calls = getattr(self, "warm_calls", 0) + self.training
        if self.training and self.warm_calls <= 3:
            CostlyModel.clock.now += 2 * self.cost
        return super().forward(images, targets)


def test_later_epochs_are_timed_by_the_first_epochs_second_half(tmp_path, clock, capsys, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "CostlyModel", WarmingModel)  # what fit() builds
    result = fit(clock, config(tmp_path), cost=1.0)
    # epoch 1: 3 x 3 s + 3 x 1 s of training + 3 s of validation = 15 s; then 9 s each: 1 + (60 - 15) // 9
    assert "6 epochs, the first took 15.0 s with validation, the next ~9.0 s each" in capsys.readouterr().out
    assert result.epochs == 6 and clock.now <= 60.0  # timed by the whole first epoch: 60 // 15 = 4


@pytest.mark.parametrize("cost, batches", [(10.0, 3), (40.0, 1)])  # a batch: a third of the budget, more than all
def test_a_first_epoch_longer_than_the_budget_is_cut_where_the_budget_ends(tmp_path, clock, capsys, cost, batches):
    result = fit(clock, config(tmp_path, time=0.5, accumulate=1), cost=cost)  # an epoch: 6 batches
    assert f"time budget 0.5 min: 1 epoch, the first cut after {batches} of 6 batches" in capsys.readouterr().out
    assert result.epochs == 1 and load_checkpoint(result.last)["finished"]
    assert result.history[0]["time"] == cost * batches
    assert result.history[0]["lr"] == pytest.approx(_toy.TOY["lr"] * COSINE_FINAL)  # fitted to the steps made


def test_a_resumed_run_keeps_the_epochs_its_budget_set_and_ends_identical(tmp_path, clock, capsys):
    whole = fit(clock, config(tmp_path / "whole"), cost=1.0)
    cut = fit(clock, config(tmp_path / "cut"), cost=1.0, callbacks=[_toy.SignalAt(7, signal.SIGINT)])
    assert cut.stopped and cut.epochs == 2
    saved = TrainConfig.from_dict(load_checkpoint(cut.last)["train_config"])  # what `--resume` runs with
    assert saved.epochs == 6
    capsys.readouterr()
    clock.now += 1000.0  # time passed while stopped does not count
    resumed = fit(clock, saved, cost=1.0, resume=cut.last)
    assert "time budget" not in capsys.readouterr().out  # set once, at the end of the first epoch
    assert resumed.epochs == 6 and len(resumed.history) == 6
    a, b = load_checkpoint(whole.last), load_checkpoint(resumed.last)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["lr"] for r in a["history"]] == [r["lr"] for r in b["history"]]


def test_time_is_a_train_flag_and_must_not_be_negative():
    assert build_parser().parse_args(["train", "--time", "2.5"]).time == 2.5
    assert TrainConfig().time == 0.0
    with pytest.raises(CvforgeError, match="time must not be negative"):
        TrainConfig(time=-1)


def test_val_period_validates_every_nth_epoch_and_the_budget_gives_the_time_saved_to_training(tmp_path, clock,
                                                                                                capsys):
    result = fit(clock, config(tmp_path, val_period=3), cost=1.0)
    # epoch 1: 6 s + 3 s of validation; later epochs 6 s + 3 s / 3 on average; the last is validated in full:
    # 1 + (60 - 9 - 3 * 2 / 3) // 7 = 8 epochs, validated after epochs 1, 3, 6 and 8
    assert "time budget 1 min: 8 epochs, the first took 9.0 s with validation" in capsys.readouterr().out
    assert result.epochs == 8 and clock.now == 8 * 6 + 4 * 3
    validated = [row["epoch"] for row in result.history if "metrics/top1" in row]
    assert validated == [1, 3, 6, 8]
    best_epoch = next(row["epoch"] for row in result.history if row.get("metrics/top1") == result.best_metric)
    assert load_checkpoint(result.best)["epoch"] == best_epoch  # best.pt is one of the validated epochs
    header, *rows = (result.save_dir / "metrics.csv").read_text().splitlines()
    top1 = header.split(",").index("metrics/top1")
    assert [row.split(",")[top1] != "" for row in rows] == [e in validated for e in range(1, 9)]


def test_val_period_is_a_train_flag_of_at_least_one():
    assert build_parser().parse_args(["train", "--val-period", "5"]).val_period == 5
    with pytest.raises(CvforgeError, match="val_period must be at least 1"):
        TrainConfig(val_period=0)
