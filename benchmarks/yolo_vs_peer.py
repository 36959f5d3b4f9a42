"""cvforge ``yolo-n`` against ultralytics YOLOv8n, both from scratch on the same data, in one run.

The peer is an outside program: this script installs ultralytics (AGPL) into a virtual environment of
its own (default ``~/.cache/cvforge/peer-venv``) and runs it only as a subprocess — the same file,
``--peer-job``, in that environment; that part imports ultralytics and never cvforge, and cvforge never
imports ultralytics. By default the peer environment reuses the torch of the environment running this
script (a ``.pth`` line pointing at its site-packages, after the peer's own): both sides then run the
same torch build, and nothing of several GB is downloaded; ``--peer-torch install`` installs the same
torch version into the peer environment instead.

What is the same for both: the data (by default the shapes data set that ``cvforge data make-shapes
OUT/data --train 512 --val 128 --size 128`` writes, its ``data.yaml`` YOLO labels; the peer gets a copy
of ``data.yaml`` with an absolute path, and leaves its ``labels/*.cache`` files in the data folder),
image size, epochs, batch (the defaults are the demo's: 128 px, 30 epochs, batch 16), data-loader workers
(ultralytics forces 0 on CPU, so the default is 0), ``close_mosaic``, seed 0, CPU, and the torch thread
count (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for both processes; in the peer also ultralytics' own
``NUM_THREADS``, which it otherwise sets to cores - 1 for training and prediction). Everything else is
each side's own default recipe (optimizer, lr, augmentation, EMA, warm-up) and inference path
(ultralytics fuses each convolution with its batch norm when it loads weights for prediction).

How each number is computed:
- mAP50-95 / mAP50: cvforge's ``DetectionEvaluator`` (pycocotools) on the val split of ``data.yaml``,
  fed with the detections of each model's ``--weights`` checkpoint (default ``last``: the EMA weights
  after the last epoch, both sides) at batch 1, confidence 0.001, NMS IoU 0.7, at most 300 per image;
  the peer's come from ``YOLO.predict`` with those settings. "own val" is what each framework's own
  validator reported for the last epoch (a cross-check, not the comparison).
- train s/epoch: mean wall seconds of the training loop per epoch, validation excluded, data loading
  included: cvforge's ``metrics.csv`` ``time`` column; for the peer, ``on_train_epoch_start`` to
  ``on_train_epoch_end`` callbacks.
- latency: median wall ms per val image at batch 1 on CPU, over ``--rounds`` alternating passes (after
  3 warm-up calls per pass), images decoded beforehand. cvforge: one ``model([uint8 [3, H, W]])`` call
  = letterbox + normalise + network + decode + NMS + boxes back to image pixels. Peer, "call": one
  ``YOLO.predict(BGR array)`` call (the same steps plus its ``Results`` objects and per-call set-up);
  "pre+net+post": the sum of ultralytics' own ``preprocess + inference + postprocess`` timings of that
  call, i.e. without its wrapper. The target ratio uses the stricter of the two (the smaller peer time).
  With ``--runtimes torch,onnx`` (the default) the same again through onnxruntime, each side with its own
  ONNX export of the same checkpoint (``cvforge export``; ultralytics' ``export(format="onnx")``) and its
  own pre- and postprocessing around the graph: latency is compared like for like, per runtime.

    nice -n 19 .venv/bin/python benchmarks/yolo_vs_peer.py --out runs/yolo_vs_peer            # full run
    nice -n 19 .venv/bin/python benchmarks/yolo_vs_peer.py --train 64 --val 16 --epochs 1 --out /tmp/yvp

Prints a Markdown table and writes ``results.json`` and ``results.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PEER_VENV = Path.home() / ".cache" / "cvforge" / "peer-venv"
WARMUP_CALLS = 3
TARGET_RATIO = 0.8  # the target: cvforge train s/epoch and latency <= 0.8x the peer's
NOTES = """How measured (benchmarks/yolo_vs_peer.py docstring has the details):
- mAP50-95 / mAP50: cvforge's DetectionEvaluator (pycocotools) on the val split, detections of each model's
  checkpoint at batch 1 (conf 0.001, NMS IoU 0.7, max 300); the peer's from YOLO.predict. "own val": each
  framework's own validator after the last epoch (cross-check only).
- train s/epoch: mean wall seconds of the training loop per epoch (data loading included, validation not).
- infer ms/img: median wall ms per val image at batch 1, CPU, images decoded beforehand. cvforge "call" =
  model([uint8 image]): letterbox, normalise, network, decode, NMS, boxes to image pixels. Peer "call" =
  YOLO.predict(BGR array); "pre+net+post" = ultralytics' own preprocess + inference + postprocess times.
- (onnxruntime) rows: the same, each side's own ONNX export run by onnxruntime (default session options),
  torch at one thread on both sides (it only pre/postprocesses there; as `cvforge predict` with .onnx)."""


# =========================================================================================== peer side
# Runs inside the peer environment (``--peer-job``): ultralytics and torch only, never cvforge.
def peer_job(job_file: Path) -> None:
    """Run one peer job described by a JSON file {"kind": "train" | "predict", ...}; writes job["result"]."""
    job = json.loads(job_file.read_text(encoding="utf-8"))
    # beside onnxruntime torch only pre/postprocesses: one thread, as on cvforge's side (and as ultralytics'
    # own NUM_THREADS, cores - 1, on a 2-core machine)
    _peer_setup(1 if job.get("runtime") == "onnx" else job["threads"])
    result = _peer_train(job) if job["kind"] == "train" else _peer_predict(job)
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")


def _peer_setup(threads: int) -> None:
    """Keep ultralytics offline and at ``threads`` torch threads (it resets them to its NUM_THREADS)."""
    import torch
    import ultralytics.data.utils as data_utils
    from ultralytics import settings
    from ultralytics.utils import torch_utils
    torch_utils.NUM_THREADS = threads
    torch.set_num_threads(threads)
    data_utils.check_font = lambda *args, **kwargs: None  # fonts are for plots, which are off
    off = {key: False for key in ("sync", "hub", "tensorboard", "wandb", "mlflow", "clearml", "comet", "dvc",
                                  "neptune", "raytune") if key in settings}
    settings.update(off)


def _peer_train(job: dict) -> dict:
    """Train YOLOv8n from its architecture file (random weights); per-epoch training-loop seconds."""
    import torch
    from ultralytics import YOLO
    model = YOLO("yolov8n.yaml")
    seconds: list[float] = []
    threads: list[int] = []

    def epoch_start(trainer: Any) -> None:
        threads.append(torch.get_num_threads())
        seconds.append(-time.perf_counter())

    def epoch_end(trainer: Any) -> None:
        seconds[-1] += time.perf_counter()

    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_epoch_end", epoch_end)
    model.train(data=job["data"], epochs=job["epochs"], imgsz=job["imgsz"], batch=job["batch"],
                workers=job["workers"], close_mosaic=job["close_mosaic"], device="cpu", amp=False, plots=False,
                pretrained=False, seed=0, project=job["project"], name="train", exist_ok=True)
    save_dir = Path(model.trainer.save_dir)
    return {"epoch_seconds": seconds, "threads": sorted(set(threads)), "save_dir": str(save_dir),
            "own_val": _peer_last_metrics(save_dir / "results.csv")}


def _peer_last_metrics(results_csv: Path) -> dict:
    """The last epoch's mAP50-95 / mAP50 from ultralytics' results.csv ({} if it is missing)."""
    if not results_csv.exists():
        return {}
    with results_csv.open(encoding="utf-8") as f:
        rows = [{key.strip(): value for key, value in row.items()} for row in csv.DictReader(f)]
    last = rows[-1] if rows else {}
    return {"mAP50-95": float(last.get("metrics/mAP50-95(B)", "nan")),
            "mAP50": float(last.get("metrics/mAP50(B)", "nan"))}


def _peer_predict(job: dict) -> dict:
    """Batch-1 predictions and timings over job["images"] (in order) with the weights job["weights"], in
    PyTorch or (job["runtime"] "onnx") through onnxruntime from ultralytics' own ONNX export."""
    import cv2
    import torch
    from ultralytics import YOLO
    weights = job["weights"]
    if job["runtime"] == "onnx":  # exported once, beside the weights (the benchmark's own output folder)
        onnx_file = Path(weights).with_suffix(".onnx")
        if not onnx_file.exists():
            YOLO(weights).export(format="onnx", imgsz=job["imgsz"], simplify=False, dynamic=False)
        weights = str(onnx_file)
    model = YOLO(weights, task="detect")
    options = {"imgsz": job["imgsz"], "conf": job["conf"], "iou": job["iou"], "max_det": job["max_det"],
               "device": "cpu", "verbose": False}
    images = [cv2.imread(path) for path in job["images"]]  # BGR, as ultralytics expects from OpenCV
    for _ in range(WARMUP_CALLS):
        model.predict(images[0], **options)
    calls, inner, detections = [], [], []
    for image in images:
        start = time.perf_counter()
        result = model.predict(image, **options)[0]
        calls.append(1000 * (time.perf_counter() - start))
        inner.append(sum(result.speed[k] for k in ("preprocess", "inference", "postprocess")))
        boxes = result.boxes
        detections.append({"boxes": boxes.xyxy.tolist(), "scores": boxes.conf.tolist(),
                           "labels": boxes.cls.int().tolist()})
    import ultralytics
    return {"call_ms": calls, "inner_ms": inner, "detections": detections, "threads": torch.get_num_threads(),
            "params": _peer_params(job["weights"]), "version": ultralytics.__version__,
            "torch": torch.__version__,
            "names": [model.names[k] for k in sorted(model.names)]}


def _peer_params(weights: str) -> int:
    from ultralytics import YOLO
    return sum(p.numel() for p in YOLO(weights).model.parameters())


# ===================================================================================== orchestration
def thread_env(threads: int) -> dict[str, str]:
    """The environment of every subprocess: the same torch thread count."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_logged(command: list[str], log: Path, env: dict[str, str], what: str) -> float:
    """Run ``command`` with its output in ``log``; wall seconds. Exits with the log's tail on failure."""
    print(f"[yolo_vs_peer] {what} (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        code = subprocess.run(command, check=False, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"[yolo_vs_peer] {what} failed (exit {code}); last lines of {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def prepare_data(args: argparse.Namespace) -> Path:
    """The data set's data.yaml: ``--data`` if given, else a shapes data set generated into OUT/data."""
    if args.data:
        yaml_file = args.data / "data.yaml" if args.data.is_dir() else args.data
        if not yaml_file.exists():
            sys.exit(f"[yolo_vs_peer] {yaml_file} not found: --data takes a YOLO data set folder or its data.yaml")
        return yaml_file.resolve()
    folder = args.out / "data"
    if not (folder / "shapes.json").exists():  # shapes.json is written last: a complete folder
        from cvforge.data.synthetic import make_shapes
        make_shapes(folder, train=args.train, val=args.val, size=args.size, progress=False)
    return (folder / "data.yaml").resolve()


def peer_data_yaml(data_yaml: Path, out: Path) -> Path:
    """A copy of data.yaml whose ``path`` is absolute (ultralytics reads a relative one from its cwd)."""
    import yaml
    spec = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    spec["path"] = str((data_yaml.parent / spec.get("path", ".")).resolve())
    copy = out / "peer_data.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return copy


# ----------------------------------------------------------------------------- the peer environment
def ensure_peer_env(venv: Path, spec: str, torch_mode: str, log_dir: Path) -> Path:
    """The peer environment's python, created and ultralytics installed on first use (an existing one
    that imports ultralytics is reused as it is: delete it to change --peer-spec or --peer-torch)."""
    python = venv / "bin" / "python"
    if python.exists() and _imports_ultralytics(python, log_dir):
        return python
    if venv.exists() and not (venv / "pyvenv.cfg").exists():
        sys.exit(f"[yolo_vs_peer] {venv} exists and is not a virtual environment: pass another --peer-venv")
    env = dict(os.environ)
    run_logged([sys.executable, "-m", "venv", str(venv)], log_dir / "peer_venv.log", env, f"creating {venv}")
    packages = [spec]
    if torch_mode == "shared":
        _share_site_packages(python)
    else:
        import torch
        import torchvision
        packages = [f"torch=={_base_version(torch.__version__)}",
                    f"torchvision=={_base_version(torchvision.__version__)}", spec]
    run_logged([str(python), "-m", "pip", "install", *packages], log_dir / "peer_install.log", env,
               f"installing {' '.join(packages)} into {venv}")
    return python


def _imports_ultralytics(python: Path, out: Path) -> bool:
    return subprocess.run([str(python), "-c", "import ultralytics"], check=False, capture_output=True,
                          env=peer_env(1, out)).returncode == 0


def _share_site_packages(python: Path) -> None:
    """Let the peer environment import this environment's packages (torch) after its own."""
    import sysconfig
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    theirs = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(theirs, "cvforge-shared-torch.pth").write_text("\n".join(sorted(ours)) + "\n", encoding="utf-8")


def _base_version(version: str) -> str:
    return version.split("+")[0]  # "2.14.1+cu130" -> "2.14.1": pip finds the build for this machine


def peer_env(threads: int, out: Path) -> dict[str, str]:
    """Subprocess environment of the peer: offline, no auto-installs, settings kept under OUT."""
    return {**thread_env(threads), "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False",
            "YOLO_CONFIG_DIR": str(out / "peer" / "config")}


def run_peer(python: Path, job: dict, args: argparse.Namespace, name: str) -> dict:
    """Run one peer job in the peer environment (this file, ``--peer-job``); its result dict."""
    folder = args.out / "peer"
    job = {**job, "threads": args.threads, "result": str(folder / f"{name}.result.json")}
    job_file = folder / f"{name}.job.json"
    job_file.write_text(json.dumps(job), encoding="utf-8")
    run_logged([str(python), str(Path(__file__).resolve()), "--peer-job", str(job_file)],
               folder / f"{name}.log", peer_env(args.threads, args.out), f"peer: {name}")
    return json.loads(Path(job["result"]).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- training
def train_cvforge(data_yaml: Path, args: argparse.Namespace) -> dict:
    """``cvforge train --model yolo-n`` in a subprocess; per-epoch seconds and the weights path."""
    project = args.out / "cvforge"
    command = [sys.executable, "-m", "cvforge.cli", "train", "--model", "yolo-n", "--data", str(data_yaml),
               "--epochs", str(args.epochs), "--imgsz", str(args.imgsz), "--batch", str(args.batch),
               "--workers", str(args.workers), "--device", "cpu", "--seed", "0", "--project", str(project),
               "--name", "train", "--close-mosaic", str(args.close_mosaic), *shlex.split(args.cvforge_options)]
    wall = run_logged(command, args.out / "cvforge_train.log", thread_env(args.threads), "cvforge: training yolo-n")
    run = max(project.glob("train*/metrics.csv"), key=lambda p: p.stat().st_mtime).parent
    with (run / "metrics.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return {"epoch_seconds": [float(row["time"]) for row in rows], "wall_s": wall, "save_dir": str(run),
            "weights": str(run / "weights" / f"{args.weights}.pt"), "command": " ".join(command),
            "own_val": {"mAP50-95": float(last.get("metrics/mAP50-95", "nan")),
                        "mAP50": float(last.get("metrics/mAP50", "nan"))}}


def train_peer(python: Path, peer_yaml: Path, args: argparse.Namespace) -> dict:
    job = {"kind": "train", "data": str(peer_yaml), "epochs": args.epochs, "imgsz": args.imgsz,
           "batch": args.batch, "workers": args.workers, "close_mosaic": args.close_mosaic,
           "project": str(args.out / "peer")}
    start = time.perf_counter()
    result = run_peer(python, job, args, "train")
    result["wall_s"] = time.perf_counter() - start
    result["weights"] = str(Path(result["save_dir"]) / "weights" / f"{args.weights}.pt")
    return result


# ----------------------------------------------------------------------------- latency and accuracy
def cvforge_pass(weights: str, images: list, onnx_file: Path | None = None) -> dict:
    """Batch-1 predictions and ms per call of a cvforge checkpoint over ``images`` (uint8 [3, H, W]): in
    PyTorch, or through onnxruntime when ``onnx_file`` (its ``cvforge export``) is given."""
    import torch

    from cvforge.api import load_for_inference
    # the ONNX model's Python module is the same detector (its graph stands in for the network): same parameters;
    # threads: torch at one thread beside onnxruntime, as `cvforge predict` runs it
    model, threads = load_for_inference(onnx_file or weights, device="cpu")
    module = model.module
    with threads, torch.inference_mode():
        for _ in range(WARMUP_CALLS):
            module([images[0]])
        calls, detections = [], []
        for image in images:
            start = time.perf_counter()
            output = module([image])[0]
            calls.append(1000 * (time.perf_counter() - start))
            detections.append({key: output[key] for key in ("boxes", "scores", "labels")})
    return {"call_ms": calls, "detections": detections, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in module.parameters()), "classes": model.classes}


def score(detections: list[dict], targets: list[dict], classes: list[str]) -> dict[str, float]:
    """cvforge's DetectionEvaluator on per-image detections (xyxy image pixels, 0-based labels)."""
    import torch

    from cvforge.eval.detection import DetectionEvaluator
    evaluator = DetectionEvaluator(classes)
    predictions = [{"boxes": torch.as_tensor(d["boxes"], dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.as_tensor(d["scores"], dtype=torch.float32),
                    "labels": torch.as_tensor(d["labels"], dtype=torch.int64)} for d in detections]
    evaluator.update(predictions, targets)
    metrics = evaluator.compute()
    return {"mAP50-95": metrics["mAP50-95"], "mAP50": metrics["mAP50"]}


def measure(python: Path, data_yaml: Path, ours: dict, peer: dict, args: argparse.Namespace) -> dict:
    """Alternating latency passes (cvforge, peer, cvforge, ...) per runtime; each first pass's detections
    are scored. Returns {(side, runtime): summary} as {"cvforge torch": ..., "peer onnx": ...}."""
    import torch

    from cvforge.data import build_dataset
    from cvforge.export import export_onnx
    val = build_dataset(str(data_yaml), "val", "detect")
    images, targets = zip(*(val[i] for i in range(len(val))))
    images = [image.as_subclass(torch.Tensor) for image in images]  # plain uint8 [3, H, W]
    paths = [str(sample.image) for sample in val.samples]
    job = {"kind": "predict", "weights": peer["weights"], "images": paths, "imgsz": args.imgsz,
           "conf": args.conf, "iou": args.iou, "max_det": args.max_det}
    onnx_file = None
    if "onnx" in args.runtimes:
        onnx_file = export_onnx(ours["weights"], args.out / "cvforge-yolo-n.onnx")
    passes: dict[str, list[dict]] = {f"{side} {runtime}": [] for side in ("cvforge", "peer")
                                     for runtime in args.runtimes}
    for r in range(args.rounds):
        for runtime in args.runtimes:
            print(f"[yolo_vs_peer] latency round {r + 1}/{args.rounds} ({runtime}) over {len(images)} val images",
                  flush=True)
            passes[f"cvforge {runtime}"].append(
                cvforge_pass(ours["weights"], images, onnx_file if runtime == "onnx" else None))
            passes[f"peer {runtime}"].append(run_peer(python, {**job, "runtime": runtime}, args,
                                                      f"predict-{runtime}{r + 1}"))
    names = passes[f"peer {args.runtimes[0]}"][0]["names"]
    if names != list(val.classes):
        sys.exit(f"[yolo_vs_peer] class names differ: peer {names}, data {val.classes}")
    return {key: summarise(runs, list(targets), val.classes) for key, runs in passes.items()} | {
        "val_images": len(images)}


def summarise(passes: list[dict], targets: list[dict], classes: list[str]) -> dict:
    """One side's latency (median over every timed call of every pass, and each pass's median, to see the
    drift), its first pass's mAP and what the passes reported about themselves."""
    first = passes[0]
    out = {"call_ms": statistics.median(t for p in passes for t in p["call_ms"]),
           "call_ms_per_round": [statistics.median(p["call_ms"]) for p in passes]}
    if "inner_ms" in first:
        out["inner_ms"] = statistics.median(t for p in passes for t in p["inner_ms"])
    out.update({key: first[key] for key in ("params", "threads", "version", "torch") if key in first})
    return out | score(first["detections"], targets, classes)


# ----------------------------------------------------------------------------- report
RUNTIME_NAMES = {"torch": "", "onnx": " (onnxruntime)"}


def build_rows(ours: dict, peer: dict, measured: dict, runtimes: list[str]) -> list[dict]:
    """One row per side and runtime, cvforge's first; the training columns are per side."""
    rows = []
    version = measured[f"peer {runtimes[0]}"]["version"]
    for runtime in runtimes:
        for side, name, trained in (("cvforge", "cvforge yolo-n", ours),
                                    ("peer", f"ultralytics {version} YOLOv8n", peer)):
            m = measured[f"{side} {runtime}"]
            rows.append({"model": name + RUNTIME_NAMES[runtime], "params (M)": m["params"] / 1e6,
                         "mAP50-95": m["mAP50-95"], "mAP50": m["mAP50"],
                         "own val mAP50-95": trained["own_val"].get("mAP50-95", float("nan")),
                         "train s/epoch": statistics.mean(trained["epoch_seconds"]),
                         "infer ms/img (call)": m["call_ms"],
                         "infer ms/img (pre+net+post)": m.get("inner_ms", m["call_ms"])})
    return rows


def verdicts(rows: list[dict], runtimes: list[str]) -> list[str]:
    """The issue's three targets, cvforge against the peer; latency like for like, per runtime."""
    ours, peer = rows[0], rows[1]
    train = ours["train s/epoch"] / peer["train s/epoch"]
    mark = {True: "met", False: "NOT met"}
    lines = [(f"- mAP50-95: cvforge {100 * ours['mAP50-95']:.1f} vs peer {100 * peer['mAP50-95']:.1f} "
              f"(target >=): {mark[ours['mAP50-95'] >= peer['mAP50-95']]}"),
             (f"- train s/epoch ratio cvforge/peer: {train:.2f}x (target <= {TARGET_RATIO}x): "
              f"{mark[train <= TARGET_RATIO]}")]
    for i, runtime in enumerate(runtimes):
        ours, peer = rows[2 * i], rows[2 * i + 1]
        latency = ours["infer ms/img (call)"] / min(peer["infer ms/img (call)"], peer["infer ms/img (pre+net+post)"])
        latency_call = ours["infer ms/img (call)"] / peer["infer ms/img (call)"]
        lines.append(f"- batch-1 latency ratio cvforge/peer, both in {runtime}: {latency:.2f}x against the peer's "
                     f"pre+net+post ({latency_call:.2f}x against its whole predict() call) (target <= "
                     f"{TARGET_RATIO}x): {mark[latency <= TARGET_RATIO]}")
    return lines


def table(rows: list[dict]) -> str:
    from _markdown import markdown_table  # benchmarks/_markdown.py
    return markdown_table(rows, lambda k, v: f"{100 * v:.1f}" if "mAP" in k else f"{v:.2f}" if isinstance(v, float)
                          else str(v), right_align=True)


def setup_line(args: argparse.Namespace, data_yaml: Path, measured: dict) -> str:
    import torch
    first = args.runtimes[0]
    return (f"data {data_yaml} ({measured['val_images']} val images), {args.epochs} epochs, imgsz {args.imgsz}, "
            f"batch {args.batch}, workers {args.workers}, close_mosaic {args.close_mosaic}, from scratch, CPU, "
            f"{args.threads} torch threads (cvforge latency {measured[f'cvforge {first}']['threads']}, peer "
            f"{measured[f'peer {first}']['threads']}), torch {torch.__version__} "
            f"(peer {measured[f'peer {first}']['torch']}), "
            f"weights: {args.weights}.pt, "
            f"eval conf {args.conf} / NMS IoU {args.iou} / max {args.max_det} det, latency median of "
            f"{args.rounds} alternating passes; mAP in points (cvforge's evaluator)")


def report(args: argparse.Namespace, data_yaml: Path, ours: dict, peer: dict, measured: dict) -> None:
    """results.md / results.json in --out (a --reuse-training run: results-remeasured.*, the first kept)."""
    rows = build_rows(ours, peer, measured, args.runtimes)
    load = f"load average (1 min) at start {args.load_start:.2f}, at end {os.getloadavg()[0]:.2f}"
    text = "\n".join([setup_line(args, data_yaml, measured), "", table(rows), "", *verdicts(rows, args.runtimes),
                      "", NOTES, "", load, f"command: {' '.join(sys.argv)}"])
    print(text)
    name = "results-remeasured" if args.reuse_training else "results"
    (args.out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    for trained in (ours, peer):
        trained.pop("detections", None)
    summary = {"setup": setup_line(args, data_yaml, measured), "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows, "verdicts": verdicts(rows, args.runtimes), "cvforge_train": ours, "peer_train": peer,
               "measured": measured, "load_average_start": args.load_start, "load_average_end": os.getloadavg()[0]}
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"[yolo_vs_peer] wrote {args.out / name}.md and .json")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/yolo_vs_peer"), help="output folder")
    parser.add_argument("--data", type=Path, help="an existing YOLO data set (folder or data.yaml) instead of shapes")
    parser.add_argument("--train", type=int, default=512, help="generated training images")
    parser.add_argument("--val", type=int, default=128, help="generated val images")
    parser.add_argument("--size", type=int, default=128, help="generated image side")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="(ultralytics uses 0 on CPU whatever is asked)")
    parser.add_argument("--close-mosaic", type=int, default=10, help="last epochs without mosaic (both sides)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    parser.add_argument("--cvforge-options", default="",
                        help='more `cvforge train` flags, e.g. "--amp true --channels-last true" (bfloat16 on a CPU '
                             "with AMX; the peer trains in float32 on a CPU whatever it is asked)")
    parser.add_argument("--weights", choices=("last", "best"), default="last")
    parser.add_argument("--rounds", type=int, default=2, help="alternating latency passes per model")
    parser.add_argument("--reuse-training", action="store_true",
                        help="measure the checkpoints of an earlier run in --out again (its results.json) instead "
                             "of training")
    parser.add_argument("--runtimes", type=lambda text: text.split(","), default=["torch", "onnx"],
                        help="latency in PyTorch and/or onnxruntime (each side's own ONNX export), e.g. torch")
    parser.add_argument("--conf", type=float, default=0.001)
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--max-det", type=int, default=300)
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV)
    parser.add_argument("--peer-spec", default="ultralytics", help="pip requirement of the peer")
    parser.add_argument("--peer-torch", choices=("shared", "install"), default="shared")
    return parser.parse_args()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--peer-job":  # inside the peer environment
        peer_job(Path(sys.argv[2]))
        return
    args = parse_args()
    args.out, args.load_start = args.out.resolve(), os.getloadavg()[0]
    (args.out / "peer").mkdir(parents=True, exist_ok=True)
    import torch
    torch.set_num_threads(args.threads)
    data_yaml = prepare_data(args)
    python = ensure_peer_env(args.peer_venv.expanduser().resolve(), args.peer_spec, args.peer_torch, args.out)
    previous = args.out / "results.json"
    if args.reuse_training and previous.exists():  # latency and mAP again, from the same checkpoints
        saved = json.loads(previous.read_text(encoding="utf-8"))
        ours, peer = saved["cvforge_train"], saved["peer_train"]
    else:
        ours = train_cvforge(data_yaml, args)
        peer = train_peer(python, peer_data_yaml(data_yaml, args.out), args)
    measured = measure(python, data_yaml, ours, peer, args)
    report(args, data_yaml, ours, peer, measured)


if __name__ == "__main__":
    main()
