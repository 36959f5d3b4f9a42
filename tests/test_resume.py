"""Training survives interruption: SIGTERM + resume is bit-exact, and kill -9 at any moment (also in
the middle of writing a checkpoint) leaves a last.pt that loads and resumes to the same weights."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import _toy
from cvforge.engine.checkpoint import find_last_run, load_checkpoint
from cvforge.errors import CvforgeError


@pytest.fixture(scope="module")
def context():
    return _toy.forkserver()


def assert_same_run(a: dict, b: dict) -> None:
    """Two final last.pt dicts hold identical weights (EMA and raw), optimizer state and history."""
    for key in ("model",):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    for name in a["resume"]["model"]:
        assert torch.equal(a["resume"]["model"][name], b["resume"]["model"][name]), name
    for index, state in a["resume"]["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["resume"]["optimizer"]["state"][index]["momentum_buffer"])
    columns = [k for k in a["history"][0] if k.startswith(("train/", "metrics/", "lr", "epoch"))]
    assert [[row[c] for c in columns] for row in a["history"]] == [[row[c] for c in columns] for row in b["history"]]
    assert a["step"] == b["step"] and a["finished"] and b["finished"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_resume_ends_with_identical_weights(tmp_path, context, workers):
    _toy.run_child(context, project=str(tmp_path / "whole"), log=str(tmp_path / "whole.log"), workers=workers)
    # Step 4 of 9 is in the middle of epoch 2. With workers the whole process group gets SIGTERM.
    log = _toy.run_child(context, project=str(tmp_path / "cut"), log=str(tmp_path / "cut.log"), stop_at=4,
                         group=workers > 0, workers=workers)
    last = tmp_path / "cut" / "train" / "weights" / "last.pt"
    assert f"stopped at epoch 2 step 4; resume with: cvforge train --resume {last}" in log
    stopped = load_checkpoint(last)
    assert (stopped["step"], stopped["epoch"], stopped["resume"]["batch_in_epoch"]) == (4, 1, 2)
    assert stopped["resume"]["sampler"] == {"epoch": 1, "position": 8} and not stopped["finished"]

    log = _toy.run_child(context, project=str(tmp_path / "cut"), log=str(tmp_path / "resume.log"),
                         resume=str(last), workers=workers)
    assert "resuming" in log and not (tmp_path / "cut" / "train-2").exists()  # continues in the same folder
    assert_same_run(load_checkpoint(tmp_path / "whole" / "train" / "weights" / "last.pt"), load_checkpoint(last))
    rows = (tmp_path / "cut" / "train" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header + one row per epoch, none repeated


def _wait_for(progress: Path, marker: str, process, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.is_alive():
        if progress.exists() and progress.read_text().split("\n").count(marker) >= count:
            return
        time.sleep(0.005)


def crash_repeatedly(tmp_path: Path, context, kills: int, epochs: int, seed: int) -> None:
    """kill -9 a training child ``kills`` times (every other kill while a checkpoint is being
    written, the others at a random moment), resuming each time from the newest last.pt."""
    rng, project, progress = random.Random(seed), tmp_path / "crash", tmp_path / "progress.txt"
    during_save = 0
    for i in range(kills):
        try:
            last = str(find_last_run(project))
        except CvforgeError:
            last = None  # killed before the first checkpoint: start again
        progress.write_text("")
        process = context.Process(target=_toy.child, kwargs=dict(
            project=str(project), log=str(tmp_path / "crash.log"), progress=str(progress), resume=last,
            slow_save=0.15, epochs=epochs))
        process.start()
        if i % 2 == 0:
            _wait_for(progress, "save-begin", process, count=rng.randint(1, 2))
            time.sleep(rng.uniform(0.0, 0.15))
        else:
            _wait_for(progress, "started", process)
            time.sleep(rng.uniform(0.0, 0.6))
        assert process.is_alive(), "the run finished before it could be killed: raise epochs"
        os.killpg(process.pid, signal.SIGKILL)
        process.join()
        saves = [line for line in progress.read_text().split("\n") if line.startswith("save-")]
        during_save += bool(saves) and saves[-1] == "save-begin"
        for path in project.glob("**/weights/last.pt"):  # every last.pt on disk loads, at every moment
            assert "resume" in load_checkpoint(path)
    assert during_save >= max(1, kills // 3), f"only {during_save} kills hit a checkpoint write"

    last = find_last_run(project)
    _toy.run_child(context, project=str(project), log=str(tmp_path / "final.log"), resume=str(last), epochs=epochs)
    assert not list(last.parent.glob(".*.tmp"))  # temporary files of killed writes were cleaned up
    _toy.run_child(context, project=str(tmp_path / "whole"), log=str(tmp_path / "whole.log"), epochs=epochs)
    assert_same_run(load_checkpoint(tmp_path / "whole" / "train" / "weights" / "last.pt"), load_checkpoint(last))


def test_kill_9_five_times_then_resume(tmp_path, context):
    crash_repeatedly(tmp_path, context, kills=5, epochs=12, seed=1)


@pytest.mark.slow
def test_kill_9_twenty_times_then_resume(tmp_path, context):
    crash_repeatedly(tmp_path, context, kills=20, epochs=40, seed=2)
