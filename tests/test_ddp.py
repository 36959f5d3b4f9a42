"""DistributedDataParallel with 2 CPU processes (gloo), started by ``cvforge.engine.launch``."""
from __future__ import annotations

import csv

import pytest
import torch

import _toy
from cvforge.engine import launch
from cvforge.engine.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def forkserver():
    _toy.forkserver()  # launch(start_method="forkserver") then forks from the preloaded server
    return "forkserver"


def ranks(out) -> tuple[dict, dict]:
    return torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_processes_train_in_step_and_only_rank_0_writes(tmp_path, forkserver):
    project, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    # Rank 1 runs with every file-writing function replaced by one that raises (see _toy.ddp_child).
    launch(_toy.ddp_child, 2, str(project), str(out), start_method=forkserver)
    rank0, rank1 = ranks(out)
    assert_equal_weights(rank0["model"], rank1["model"])
    # 24 images over 2 ranks: 6 batches of 2 per rank per epoch, accumulate 2 -> 3 steps, 3 epochs.
    assert rank0["step"] == rank1["step"] == 9 and not rank0["stopped"]
    assert rank0["save_dir"] == rank1["save_dir"] == str(project / "train")
    assert [p.name for p in project.iterdir()] == ["train"]
    run = project / "train"
    assert {p.name for p in (run / "weights").iterdir()} == {"last.pt", "best.pt"}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    last = load_checkpoint(run / "weights" / "last.pt")
    assert last["finished"] and last["resume"]["world_size"] == 2 and len(last["resume"]["rng"]) == 2
    assert_equal_weights(last["resume"]["model"], rank0["model"])  # EMA on: raw weights under "resume"


def test_sigterm_on_one_rank_stops_both_at_the_same_step_and_resume_is_exact(tmp_path, forkserver):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for folder in (whole, cut, tmp_path / "after"):
        folder.mkdir()
    launch(_toy.ddp_child, 2, str(tmp_path / "a"), str(whole), start_method=forkserver)
    # Rank 1 alone gets SIGTERM after step 4; the flag is all-reduced at the next step.
    launch(_toy.ddp_child, 2, str(tmp_path / "b"), str(cut), 4, start_method=forkserver)
    rank0, rank1 = ranks(cut)
    assert rank0["stopped"] and rank1["stopped"] and rank0["step"] == rank1["step"] == 5
    last = tmp_path / "b" / "train" / "weights" / "last.pt"
    assert load_checkpoint(last)["step"] == 5

    launch(_toy.ddp_child, 2, str(tmp_path / "b"), str(tmp_path / "after"), None, str(last),
           start_method=forkserver)
    resumed, uninterrupted = ranks(tmp_path / "after"), ranks(whole)
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["step"] == b["step"] == 9
        assert_equal_weights(a["model"], b["model"])
