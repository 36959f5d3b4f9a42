"""``cvforge bench``: the detection lineage side by side, each model trained for the same minutes on the same data.

    cvforge bench                                        # rcnn ... yolo-n on shapes, 2 minutes of training each
    cvforge bench --models fast_rcnn,yolo-n --budget 5 --weights yolo-n=runs/detect/train/weights/best.pt

For each model, in a fresh process of its own (so that its peak memory is its own): train with the model's
recipe under the time budget (``cvforge.train(time=budget)``; selective search proposals are computed
before the clock starts), or take the given weights. Then, in a second process: the mAP of ``best.pt`` by
the shared evaluator on the val split (the training's own validation of it; given weights are evaluated),
inference times at batch 1 and 8 (median after a warm-up; proposals read from the cache, and selective
search timed afresh for the "+ proposals" figures), parameters and FLOPs (``cvforge.complexity``).
A bar shows which model runs; each finished model is one line of ``bench.jsonl``, so running the same
command again (``--out`` the same folder, or ``--resume``) skips finished models and resumes an unfinished
training from its ``last.pt``. At the end the folder holds ``bench.csv``, ``bench.md`` (the table, with
each paper's own VOC07 figures beside it) and ``plots/accuracy_vs_latency.png``, ``plots/training_curves.png``
(written by ``cvforge.bench_report``).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from cvforge.bench_report import write_reports
from cvforge.config import DETECTION_TASKS
from cvforge.errors import CvforgeError

DEFAULT_MODELS = ("rcnn", "sppnet", "fast_rcnn", "faster_rcnn", "yolov1", "yolo-n")
DEFAULT_BUDGET = 2.0  # minutes of training per model
BATCH_SIZES = (1, 8)
TIMED_IMAGES = 16  # val images the timings cycle over
TIMING_SECONDS = 20.0  # a timing stops after this long once it has 3 samples (R-CNN at batch 8 is slow)


# ------------------------------------------------------------------------------------------- the bench
def bench(models: list[str] | tuple[str, ...] = DEFAULT_MODELS, data: str = "shapes",
          budget: float = DEFAULT_BUDGET, *, weights: dict[str, str] | None = None, out: str | None = None,
          project: str = "runs/bench", resume: bool = False, device: str = "auto", repeats: int = 10,
          seed: int = 0) -> Path:
    """Train (or load ``weights[name]``) and measure every model (module docstring); returns the folder
    holding bench.jsonl, bench.csv, bench.md and plots/. ``out``: the folder (an existing one is
    continued); ``resume``: continue the newest bench under ``project``; else a new ``project/bench-N``."""
    from tqdm import tqdm
    weights = dict(weights or {})
    models = list(dict.fromkeys([*models, *weights]))
    _check_inputs(models, data, budget, weights, repeats)
    settings = {"data": data, "budget": budget, "device": device, "seed": seed, "repeats": repeats}
    folder = _bench_folder(out, project, resume, settings)
    done = {row["model"]: row for row in read_rows(folder)}
    bar = tqdm(models, desc="bench", unit="model", dynamic_ncols=True)
    for name in bar:
        bar.set_description(f"bench {name}")
        if name in done:
            continue
        try:
            row = _run_model(folder, name, settings, weights.get(name), bar)
        except KeyboardInterrupt:
            tqdm.write(f"bench interrupted at {name}; to resume: cvforge bench --out {folder} (same options)")
            raise
        append_row(folder, row)
        done[name] = row
        tqdm.write(f"{name}: mAP50 {row['mAP50']:.3f}, {row['ms_b1_proposals']:.1f} ms/image, "
                   f"{row['epochs'] or 0} epochs in {row['train_min'] or 0:.1f} min")
    bar.close()
    write_reports(folder, [done[name] for name in models], settings)
    return folder


def _check_inputs(models: list[str], data: str, budget: float, weights: dict[str, str], repeats: int) -> None:
    """The user's mistakes, before any process starts."""
    from cvforge.data import resolve
    from cvforge.zoo import MODEL_TASKS, list_models
    detectors = [name for name, task in list_models() if task in DETECTION_TASKS]
    for name in models:
        if MODEL_TASKS.get(name) not in DETECTION_TASKS:
            raise CvforgeError(f"cannot bench model {name!r}", None,
                               f"bench compares detectors: {', '.join(detectors)}")
    for name, path in weights.items():
        if not Path(path).is_file():
            raise CvforgeError(f"weights for {name} not found", path, "pass --weights NAME=PATH to a best.pt")
    if budget <= 0:
        raise CvforgeError(f"the budget must be positive, got {budget}", None, "pass e.g. --budget 2 (minutes)")
    if repeats < 1:
        raise CvforgeError(f"repeats must be at least 1, got {repeats}", None, "pass e.g. --repeats 10")
    resolve(data)


def _bench_folder(out: str | None, project: str, resume: bool, settings: dict) -> Path:
    """``out`` or the newest bench under ``project`` (``resume``) or a new one; its settings.json must match."""
    from cvforge.engine.checkpoint import next_run_dir
    if out:
        folder = Path(out)
    elif resume:
        found = sorted(Path(project).glob("*/settings.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CvforgeError("no bench to resume", project, "start one with `cvforge bench`")
        folder = found[-1].parent
    else:
        folder = next_run_dir(project, "bench")
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "settings.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        changed = [key for key in ("data", "budget", "device", "seed") if before.get(key) != settings[key]]
        if changed:
            raise CvforgeError(f"this bench ran with other {', '.join(changed)} ({before})", folder,
                               "rerun it with the same options, or choose a new --out")
    else:
        saved.write_text(json.dumps(settings, indent=1))
    return folder


def read_rows(folder: Path) -> list[dict]:
    """The rows of ``folder/bench.jsonl`` (one per finished model)."""
    path = Path(folder) / "bench.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_row(folder: Path, row: dict) -> None:
    with open(Path(folder) / "bench.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _run_model(folder: Path, name: str, settings: dict, weights: str | None, bar: Any) -> dict:
    """Train (unless ``weights``) and measure one model, each in a child process; its bench.jsonl row."""
    train: dict[str, Any] = {"epochs": None, "train_min": None, "run": None, "train_peak_mb": math.nan}
    if weights is None:
        bar.set_postfix_str(f"training, {settings['budget']:g} min")
        done = folder / name / "train.json"
        train = json.loads(done.read_text()) if done.exists() else _child("train", folder, name, settings)
        weights = train["weights"]
    bar.set_postfix_str("evaluating and timing")
    measured = _child("measure", folder, name, settings, weights)
    bar.set_postfix_str("")
    row = {"model": name, **{k: v for k, v in train.items() if k != "weights"}, **measured}
    return {**row, "weights": str(weights), "data": settings["data"], "budget": settings["budget"]}


def _child(phase: str, folder: Path, name: str, settings: dict, weights: str | None = None) -> dict:
    """Run ``phase`` of model ``name`` in a new Python process (output to ``folder/name/<phase>.log``)
    and return the dict it wrote. On Ctrl-C the child gets the signal too: wait for it to save."""
    model_dir = folder / name
    model_dir.mkdir(parents=True, exist_ok=True)
    log, result = model_dir / f"{phase}.log", model_dir / f"{phase}.json"
    result.unlink(missing_ok=True)
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "cvforge.bench", phase, str(folder), name, json.dumps(settings), weights or ""]
    with open(log, "a", encoding="utf-8") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.wait()  # it saves last.pt at its next step, then exits
            raise
    if code == 130:
        raise KeyboardInterrupt
    if code != 0 or not result.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise CvforgeError(f"{phase} of {name} failed (exit {code}: {lines[-1] if lines else 'no output'})", log,
                           "read the log, then run the same command again to resume")
    return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------- child processes
def train_phase(folder: Path, name: str, settings: dict, weights: str = "") -> dict:
    """Train ``name`` under the budget in ``folder/name/train``, or resume it from its last.pt, or find
    it finished. Returns {"weights", "run", "epochs", "train_min" (training without validation)}."""
    import cvforge
    from cvforge.engine.checkpoint import load_checkpoint
    project = folder / name
    runs = sorted(project.glob("train*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    last = runs[-1] if runs else None
    trained = last is None or not load_checkpoint(last, mmap=True).get("finished")
    if trained:
        _precompute_proposals(name, settings["data"])  # before the clock starts
        if last is not None:
            result = cvforge.train(resume=str(last), workers=0)
        else:
            result = cvforge.train(model=name, data=settings["data"], time=settings["budget"], workers=0,
                                   device=settings["device"], seed=settings["seed"], project=str(project), name="train")
        if result.stopped:
            raise KeyboardInterrupt
        last = result.last
    state = load_checkpoint(last, mmap=True)
    best = last.parent / "best.pt"
    seconds = sum(row.get("time", 0.0) for row in state["history"])
    return {"weights": str(best if best.exists() else last), "run": str(last.parent.parent),
            "epochs": state["epoch"], "train_min": seconds / 60,
            "train_peak_mb": peak_memory_mb(settings["device"]) if trained else math.nan}


def _precompute_proposals(name: str, data: str) -> None:
    """Fill the selective search cache for the train and val splits when ``name`` uses it."""
    from cvforge.complexity import uses_selective_search
    from cvforge.data import build_dataset
    from cvforge.models.detection.proposals import precompute
    from cvforge.zoo import MODEL_TASKS, build_model
    train = build_dataset(data, "train", MODEL_TASKS[name])
    model = build_model(name, task=MODEL_TASKS[name], num_classes=len(train.classes))
    if uses_selective_search(model):
        for dataset in (train, build_dataset(data, "val", MODEL_TASKS[name])):
            precompute(dataset, model.source, workers=os.cpu_count() or 1, progress=False)


def measure_phase(folder: Path, name: str, settings: dict, weights: str) -> dict:
    """mAP of ``weights`` on the val split, inference times, parameters, FLOPs and this process's peak memory."""
    import cvforge
    from cvforge.complexity import params_and_flops
    from cvforge.data import build_dataset
    metrics = _validated(weights, settings["data"])
    if metrics is None:
        metrics = cvforge.evaluate(weights, data=settings["data"], split="val", device=settings["device"],
                                   out=folder / name / "eval", quiet=True)
    model = cvforge.load(weights, device=settings["device"])
    dataset = build_dataset(settings["data"], "val", model.task)
    images = [dataset[i][0] for i in range(min(TIMED_IMAGES, len(dataset)))]
    load = _load_average()  # timings on a busy CPU mean little: the table shows the load they ran under
    timings = time_inference(model.module, images, settings["repeats"], model.device)
    params, flops = params_and_flops(cvforge.load(weights, device="cpu", fuse=False).module, model.config.imgsz)
    return {"mAP50": metrics["mAP50"], "mAP50-95": metrics["mAP50-95"], **timings, "params_m": params / 1e6,
            "gflops": flops / 1e9, "imgsz": model.config.imgsz, "test_peak_mb": peak_memory_mb(settings["device"]),
            "device": _device_name(model.device), "threads": torch.get_num_threads(),
            "load": max(load, _load_average())}


def _validated(weights: str, data: str) -> dict[str, float] | None:
    """The shared evaluator's metrics of ``weights`` on ``data``'s val split as its training measured them
    (a best.pt's last history row is the validation that saved it), or None (then evaluate it): R-CNN needs
    minutes for one pass over the val split on a CPU, and the training has just made that pass."""
    from cvforge.engine.checkpoint import load_checkpoint
    state = load_checkpoint(weights, mmap=True)
    row = state["history"][-1] if state.get("history") else {}
    if state["train_config"].get("data") != data or "resume" in state or "metrics/mAP50" not in row:
        return None
    return {key.removeprefix("metrics/"): value for key, value in row.items() if key.startswith("metrics/")}


@torch.inference_mode()
def time_inference(model: torch.nn.Module, images: list[torch.Tensor], repeats: int,
                   device: torch.device) -> dict[str, float]:
    """Milliseconds per image at each of BATCH_SIZES: ``ms_b<N>`` with proposals read from the cache (the
    model alone), ``ms_b<N>_proposals`` plus selective search computed afresh (``proposal_ms`` per image)."""
    from cvforge.complexity import uses_selective_search
    from cvforge.models.detection.proposals import SelectiveSearch
    images = [image.to(device) for image in images]
    source = model.source if uses_selective_search(model) else None
    if source is not None:
        for image in images:  # in the cache already when the bench trained the model
            source(image.cpu())
    proposal_ms = 0.0
    if isinstance(source, SelectiveSearch):
        fresh = SelectiveSearch(source.mode, source.max_proposals, source.min_size, cache=False)
        proposal_ms = 1000 * statistics.median(_seconds(partial(fresh, image.cpu()), device) for image in images)
    timings: dict[str, float] = {"proposal_ms": proposal_ms}
    for nominal in BATCH_SIZES:
        size = min(nominal, len(images))  # a val split smaller than the batch is timed whole
        batches = [images[i:i + size] for i in range(0, len(images) - size + 1, size)]
        calls = itertools.cycle(batches)
        timings[f"ms_b{nominal}"] = 1000 * median_seconds(lambda c=calls: model(next(c)), repeats, device) / size
        timings[f"ms_b{nominal}_proposals"] = timings[f"ms_b{nominal}"] + proposal_ms
    return timings


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` calls; stops early after TIMING_SECONDS
    once it has 3 samples."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats and not (len(samples) >= 3 and time.perf_counter() - started > TIMING_SECONDS):
        samples.append(_seconds(fn, device))
    return statistics.median(samples)


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_memory_mb(device: str | torch.device) -> float:
    """This process's peak memory in MiB: CUDA memory allocated by torch on a GPU, else the peak resident
    set size (``ru_maxrss``; it includes the Python interpreter and torch itself)."""
    from cvforge.engine.optim import resolve_device
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _load_average() -> float:
    """The 1-minute load average (processes wanting a CPU), NaN where the system does not say."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


PHASES = {"train": train_phase, "measure": measure_phase}


def _child_main(argv: list[str]) -> int:
    """``python -m cvforge.bench PHASE FOLDER MODEL SETTINGS_JSON [WEIGHTS]``: what ``_child`` starts."""
    phase, folder, name, settings, weights = argv
    print(f"cvforge bench: {phase} of {name}, process {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    try:
        result = PHASES[phase](Path(folder), name, json.loads(settings), weights)
    except KeyboardInterrupt:
        print(f"{phase} of {name} interrupted", flush=True)
        return 130
    except CvforgeError as error:
        print(f"cvforge: error: {error.line()}", flush=True)
        return 2
    path = Path(folder) / name / f"{phase}.json"
    path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
