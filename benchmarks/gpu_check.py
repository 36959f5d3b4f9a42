"""CUDA paths, AMP speed and a recipe sweep, for a machine with a GPU (CI has none; every test runs on CPU).

Three parts, each writing one JSON file to ``--out``:

- ``smoke``: every task trains on ``cuda`` with the default AMP (float16 + GradScaler), resumes from its
  ``last.pt``, evaluates, predicts and exports to ONNX: resnet18, fcn8s, yolo-n, yolov1, faster_rcnn,
  mask_rcnn on a small shapes copy. A failure is recorded with its last traceback line and the part goes on.
- ``speed``: yolo-n training steps per second (forward + backward + AdamW) on random 640-px batches:
  float32, AMP, AMP + channels_last; and batch-1 inference latency, float32 and AMP.
- ``sweep``: the demo's training (yolo-n, built-in shapes, 30 epochs) under several recipe variants and seeds,
  ``--parallel`` processes at a time, float32 like the CPU demo; the best val mAP50 of each run. What the
  demo would reach on a CPU, minus float-rounding differences, found in minutes instead of hours.

    PYTHONPATH=src python3 benchmarks/gpu_check.py smoke speed sweep --out OUT
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

SMOKE_MODELS = [  # (task, model, imgsz)
    ("classify", "resnet18", 64), ("segment", "fcn8s", 128), ("detect", "yolo-n", 128),
    ("detect", "yolov1", 128), ("detect", "faster_rcnn", 128), ("instance", "mask_rcnn", 128),
]
SWEEP = {  # name -> extra `cvforge train` flags (on top of the demo's recipe)
    "demo": [],
    "batch8": ["--batch", "8"],
    "batch8-lr2e-3": ["--batch", "8", "--lr", "0.002"],
    "no-mosaic": ["--close-mosaic", "30"],
    "lr6e-3": ["--lr", "0.006"],
    "warmup1": ["--warmup-epochs", "1"],
}


def smoke(out: Path, models: list[str], device: str) -> dict:
    import cvforge
    from cvforge.export import export_onnx
    results = {}
    data = "shapes:train=64,val=16"
    for task, model, imgsz in [m for m in SMOKE_MODELS if m[1] in models]:
        row, start = {}, time.perf_counter()
        try:
            project = str(out / "smoke" / model)
            first = cvforge.train(task=task, model=model, data=data, epochs=1, imgsz=imgsz, batch=8,
                                  workers=4, device=device, project=project)
            row["epoch1"] = first.history[-1]
            resumed = cvforge.train(resume=str(first.last), epochs=2)
            row["resumed_epochs"] = resumed.epochs
            row["eval"] = cvforge.evaluate(resumed.best or resumed.last, device=device, out=out / "smoke" / f"{model}-eval",
                                           quiet=True)
            loaded = cvforge.load(resumed.best or resumed.last, device=device)
            image = torch.randint(0, 255, (3, imgsz, imgsz), dtype=torch.uint8)
            row["predict"] = str(loaded.predict(image))[:200]
            try:
                row["onnx"] = str(export_onnx(resumed.best or resumed.last))
            except Exception as error:  # export is not every model's yet: record, go on
                row["onnx_error"] = f"{type(error).__name__}: {error}"[:300]
            row["ok"] = True
        except Exception:
            row["ok"], row["error"] = False, traceback.format_exc()[-1500:]
        row["seconds"] = round(time.perf_counter() - start, 1)
        results[model] = row
        _report("smoke", results)
        print(model, "ok" if row["ok"] else row["error"], flush=True)
    return results


def _yolo_batch(batch: int, size: int, device: str):
    images = [torch.randint(0, 255, (3, size, size), dtype=torch.uint8, device=device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(6, 2, device=device) * (size - 100)
        wh = torch.rand(6, 2, device=device) * 80 + 16
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 5, (6,), device=device)})
    return images, targets


def _time_steps(model, images, targets, amp: bool, steps: int = 20) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    model.train()
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


@torch.inference_mode()
def _latency_ms(model, image, amp: bool, runs: int = 50) -> float:
    model.eval()
    times = []
    for i in range(runs + 10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            model([image])
        torch.cuda.synchronize()
        if i >= 10:
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def speed(out: Path) -> dict:
    from cvforge.zoo import build_model
    results = {}
    images, targets = _yolo_batch(32, 640, "cuda")
    for name, amp, channels_last in (("fp32", False, False), ("amp", True, False), ("amp+channels_last", True, True)):
        torch.manual_seed(0)
        model = build_model("yolo-n", task="detect", num_classes=5, imgsz=640).cuda()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        results[f"train steps/s batch 32 @640 {name}"] = round(_time_steps(model, images, targets, amp), 2)
        if not channels_last:
            results[f"latency ms batch 1 @640 {name}"] = round(_latency_ms(model, images[0], amp), 2)
        print(results, flush=True)
        _report("speed", results)
    return results


def _sweep_run(out: Path, name: str, seed: int, epochs: int, device: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys; from cvforge.cli import main; sys.exit(main())", "train",
               "--data", "shapes", "--epochs", str(epochs), "--workers", "3", "--device", device, "--amp", "false",
               "--seed", str(seed), "--project", str(out / "sweep"), "--name", f"{name}-s{seed}", *SWEEP[name]]
    log = open(out / "sweep" / f"{name}-s{seed}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def sweep(out: Path, names: list[str], seeds: list[int], epochs: int, parallel: int, device: str) -> dict:
    from cvforge.data import build_dataset
    build_dataset("shapes", "train", "detect")  # generate the cache once, before processes race for it
    (out / "sweep").mkdir(parents=True, exist_ok=True)
    jobs, running, results = list(itertools.product(names, seeds)), [], {}
    while jobs or running:
        while jobs and len(running) < parallel:
            name, seed = jobs.pop(0)
            running.append((name, seed, _sweep_run(out, name, seed, epochs, device), time.perf_counter()))
        time.sleep(2)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            name, seed, process, start = job
            results[f"{name}-s{seed}"] = _sweep_result(out / "sweep" / f"{name}-s{seed}", process.returncode,
                                                       time.perf_counter() - start)
            _report("sweep", results)
            print(f"{name}-s{seed}", results[f"{name}-s{seed}"], flush=True)
    return results


def _sweep_result(run: Path, returncode: int, seconds: float) -> dict:
    metrics = run / "metrics.csv"
    if returncode != 0 or not metrics.exists():
        return {"returncode": returncode}
    rows = list(csv.DictReader(open(metrics)))
    curve = [round(float(r["metrics/mAP50"]), 3) for r in rows]
    return {"best_mAP50": max(curve), "last_mAP50": curve[-1], "curve": curve[::5], "seconds": round(seconds)}


REPORT = Path("runs/gpu_check")


def _report(part: str, result: dict) -> None:
    """Write what a part has so far, so a run stopped at its time limit still leaves its figures."""
    REPORT.mkdir(parents=True, exist_ok=True)
    (REPORT / f"{part}.json").write_text(json.dumps(result, indent=1, default=str))


def main() -> None:
    global REPORT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=("smoke", "speed", "sweep"))
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="runs and their files")
    parser.add_argument("--report", type=Path, default=None, help="where the JSON summaries go (default: --out)")
    parser.add_argument("--sweep", default=",".join(SWEEP), help="comma-separated names of SWEEP")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--smoke-models", default=",".join(m[1] for m in SMOKE_MODELS))
    parser.add_argument("--device", default="cuda", help="smoke and sweep (cpu: try the script here)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    REPORT = args.report or args.out
    print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", flush=True)
    for part in args.parts:
        start = time.perf_counter()
        if part == "smoke":
            result = smoke(args.out, args.smoke_models.split(","), args.device)
        elif part == "speed":
            result = speed(args.out)
        else:
            result = sweep(args.out, args.sweep.split(","), [int(s) for s in args.seeds.split(",")], args.epochs,
                           args.parallel, args.device)
        result["_seconds"] = round(time.perf_counter() - start, 1)
        _report(part, result)


if __name__ == "__main__":
    main()
