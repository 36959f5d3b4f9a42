"""Checkpoint files: atomic writes, safe loading (no code, no corrupt files), strict model loading,
RNG round trips, run folders and the graceful-stop flag."""
from __future__ import annotations

import os
import pickle
import random
import signal
import time

import numpy as np
import pytest
import torch
from torch import nn

from cvforge.engine import checkpoint
from cvforge.engine.checkpoint import (IgnoreStopSignals, StopSignals, capture_rng, find_last_run,
                                       load_checkpoint, load_model_state, next_run_dir, restore_rng,
                                       save_checkpoint)
from cvforge.errors import CvforgeError


class Hostile:
    """Unpickling this calls ``open(path, "w")``, creating a file: the side effect we must never see."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_save_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "w" / "last.pt"
    save_checkpoint(path, {"step": 1, "x": torch.arange(3)})
    save_checkpoint(path, {"step": 2, "x": torch.arange(4)})
    state = load_checkpoint(path)
    assert state["step"] == 2 and torch.equal(state["x"], torch.arange(4))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_failing_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_that_would_run_code_is_refused_without_side_effect(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    state = {"model": {"w": torch.zeros(2)}, "payload": Hostile(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    for mmap in (False, True):
        with pytest.raises(CvforgeError) as error:
            load_checkpoint(path, mmap=mmap)
        message = str(error.value)
        assert "\n" not in message and str(path) in message and "refused" in message
    assert not marker.exists()


def test_find_last_run_skips_hostile_and_corrupt_files(tmp_path):
    marker = tmp_path / "pwned"
    good = tmp_path / "train" / "weights" / "last.pt"
    save_checkpoint(good, {"resume": {}, "finished": False})
    for name, content in (("train-2", pickle.dumps({"x": Hostile(marker)})), ("train-3", b"PK\x03\x04 cut")):
        bad = tmp_path / name / "weights" / "last.pt"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(content)
    assert find_last_run(tmp_path) == good and not marker.exists()


def test_truncated_missing_and_non_dict_files_give_one_line_errors(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    torch.save([1, 2], tmp_path / "list.pt")
    for bad, words in ((path, "truncated or corrupt"), (tmp_path / "list.pt", "not a dict"),
                       (tmp_path / "none.pt", "not found")):
        with pytest.raises(CvforgeError) as error:
            load_checkpoint(bad)
        assert words in str(error.value) and str(bad) in str(error.value) and "\n" not in str(error.value)


def test_load_model_state_names_missing_unexpected_and_mismatched_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"] = torch.zeros(5, 4)  # another head size
    del state["0.bias"]
    state["2.weight"] = torch.zeros(1)
    before = model[1].weight.clone()
    with pytest.raises(CvforgeError) as error:
        load_model_state(model, state, "x.pt")
    message = str(error.value)
    assert "missing: 0.bias" in message and "unexpected: 2.weight" in message
    assert "1.weight (5, 4) vs model (2, 4)" in message and "x.pt" in message
    assert torch.equal(model[1].weight, before)  # nothing was loaded


def test_load_model_state_refuses_non_finite_weights_and_loads_good_ones():
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    load_model_state(model, state)
    assert torch.equal(model.weight, other.weight)
    state["weight"][0, 1] = float("nan")
    with pytest.raises(CvforgeError, match="non-finite values .* in weight"):
        load_model_state(model, state)


def test_rng_states_survive_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng()})
    expected = random.random(), np.random.randn(3).tolist(), torch.rand(3)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = random.random(), np.random.randn(3).tolist(), torch.rand(3)
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_run_folders_are_never_reused(tmp_path):
    first = next_run_dir(tmp_path, "train")
    (first / "keep.txt").write_text("earlier run")
    (tmp_path / "train-3").mkdir()
    names = [next_run_dir(tmp_path, "train").name for _ in range(3)]
    assert first.name == "train" and names == ["train-2", "train-4", "train-5"]
    assert (first / "keep.txt").read_text() == "earlier run"


def test_find_last_run_takes_the_newest_unfinished_run(tmp_path):
    for name, finished in (("a", False), ("b", False), ("c", True)):
        save_checkpoint(tmp_path / name / "weights" / "last.pt", {"resume": {}, "finished": finished})
        time.sleep(0.01)
    os.utime(tmp_path / "a" / "weights" / "last.pt")  # touched last: the newest
    assert find_last_run(tmp_path) == tmp_path / "a" / "weights" / "last.pt"
    with pytest.raises(CvforgeError, match="no unfinished run"):
        find_last_run(tmp_path / "c")


def test_stop_signals_set_a_flag_and_restore_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.signal == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_ctrl_c_aborts_at_once():
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_target_finds_the_run_and_its_config(tmp_path):
    from cvforge.config import TrainConfig
    from cvforge.engine.checkpoint import resume_target
    last = tmp_path / "train" / "weights" / "last.pt"
    save_checkpoint(last, {"resume": {}, "finished": False, "train_config": TrainConfig(epochs=7).to_dict()})
    save_checkpoint(tmp_path / "train" / "weights" / "best.pt", {"train_config": TrainConfig().to_dict()})
    for resume in ("auto", str(last)):
        path, config = resume_target(resume, tmp_path)
        assert path == last and config.epochs == 7 and config.resume == str(last)
    with pytest.raises(CvforgeError, match="no training state"):
        resume_target(str(tmp_path / "train" / "weights" / "best.pt"), tmp_path)


def _init_then_signal(path: str) -> None:
    IgnoreStopSignals(lambda worker_id: open(path, "w").write(f"init {worker_id}"))(5)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    with open(path, "a") as f:
        f.write(", survived")


def test_data_loader_workers_ignore_stop_signals(tmp_path):
    import multiprocessing
    path = tmp_path / "worker.txt"
    # A worker killed by the group's SIGTERM would make the loader raise while the run is saving.
    process = multiprocessing.get_context("fork").Process(target=_init_then_signal, args=(str(path),))
    process.start()
    process.join(30)
    assert process.exitcode == 0 and path.read_text() == "init 5, survived"
