"""The bench's reports: ``bench.csv``, ``bench.md`` (the table, with each paper's own VOC07 figures beside it)
and the plots, written from the rows ``cvforge.bench`` collects in ``bench.jsonl``."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

# Each paper's own figures: PASCAL VOC 2007 test mAP (%) and test seconds per image, as reported (the GPUs
# of the time; what the time includes is in `setting`). `vgg16`: the same method with one backbone (VGG16,
# VOC07 trainval, K40, proposals excluded) as Fast R-CNN's Table 4 and Faster R-CNN's Tables 3 and 5 report it.
PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "rcnn": {"mAP": 58.5, "seconds": 13.0, "vgg16": (66.0, 47.0),
             "setting": "AlexNet, VOC07 trainval; GPU, proposals + features",
             "source": "Girshick et al., CVPR 2014: Table 2 (FT fc7 BB), Sec. 2.2 (13 s/image on a GPU)"},
    "sppnet": {"mAP": 59.2, "seconds": 0.382, "vgg16": (63.1, 2.3),
               "setting": "ZF-5, 5 scales, VOC07 trainval; GPU, selective search excluded",
               "source": "He et al., ECCV 2014: VOC 2007 detection table (SPP 5-scale, ftfc7 bb)"},
    "fast_rcnn": {"mAP": 66.9, "seconds": 0.32, "vgg16": (66.9, 0.32),
                  "setting": "VGG16, VOC07 trainval; K40, selective search (~2 s, CPU) excluded",
                  "source": "Girshick, ICCV 2015: Table 4"},
    "faster_rcnn": {"mAP": 69.9, "seconds": 0.198, "vgg16": (69.9, 0.198),
                    "setting": "VGG16, VOC07 trainval; K40, proposals (RPN) included",
                    "source": "Ren et al., NeurIPS 2015: Tables 3 and 5"},
    "yolov1": {"mAP": 63.4, "seconds": 1 / 45, "setting": "VOC07+12 trainval; Titan X, 45 fps, all included",
               "source": "Redmon et al., CVPR 2016: Table 1"},
}

# bench.csv's columns, in order (bench.jsonl holds these and a few more)
COLUMNS = ("model", "epochs", "train_min", "mAP50", "mAP50-95", "ms_b1", "ms_b1_proposals", "ms_b8",
           "ms_b8_proposals", "proposal_ms", "params_m", "gflops", "imgsz", "train_peak_mb", "test_peak_mb",
           "device", "threads", "load", "weights")


def write_reports(folder: Path, rows: list[dict], settings: dict) -> list[Path]:
    """bench.csv, bench.md, plots/accuracy_vs_latency.png and plots/training_curves.png in ``folder``."""
    folder = Path(folder)
    with open(folder / "bench.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "bench.md").write_text(markdown_report(rows, settings), encoding="utf-8")
    plots = [plot_accuracy_vs_latency(rows, folder / "plots" / "accuracy_vs_latency.png"),
             plot_training_curves(rows, folder / "plots" / "training_curves.png")]
    return [folder / "bench.csv", folder / "bench.md", *plots]


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown_report(rows: list[dict], settings: dict) -> str:
    """The table: measured columns, then each paper's own VOC07 mAP and test time; then how it was measured."""
    from cvforge.complexity import FLOPS_PROPOSALS
    header = ("| model | epochs | train min | mAP50 | mAP50-95 | ms/img b1 | ms/img b1 + proposals | ms/img b8 | "
              "ms/img b8 + proposals | params (M) | GFLOPs | peak MB train / test | paper VOC07 mAP | "
              "paper test s/img |")
    lines = [header, "|---" + "|---:" * 13 + "|"]
    for r in rows:
        paper = PAPER_FIGURES.get(r["model"], {})
        epochs = r["epochs"] if r.get("epochs") is not None else "–"
        lines.append(
            f"| {r['model']} | {epochs} | {_number(r.get('train_min'), 2)} "
            f"| {_number(r['mAP50'], 3)} | {_number(r['mAP50-95'], 3)} | {_number(r['ms_b1'], 1)} "
            f"| {_number(r['ms_b1_proposals'], 1)} | {_number(r['ms_b8'], 1)} | {_number(r['ms_b8_proposals'], 1)} "
            f"| {_number(r['params_m'], 2)} | {_number(r['gflops'], 2)} "
            f"| {_number(r.get('train_peak_mb'), 0)} / {_number(r['test_peak_mb'], 0)} "
            f"| {_number(paper.get('mAP'), 1)} | {_number(paper.get('seconds'), 3)} |")
    first = rows[0] if rows else {}
    loads = [r["load"] for r in rows if math.isfinite(r.get("load", math.nan))]
    busy = (" (more than the cores: other processes slowed the timings)"
            if max(loads, default=0) > (os.cpu_count() or 1) else "")
    notes = [
        "", f"Data `{settings['data']}`, {settings['budget']:g} min of training per model (the time budget sets "
        f"the epochs; a first epoch longer than it is cut); device {first.get('device', '?')}, "
        f"{first.get('threads', '?')} torch threads, load average up to {_number(max(loads, default=None), 1)} "
        f"while timing{busy}. mAP: the shared evaluator on the val split, as the "
        "training validated best.pt (given weights: `cvforge.evaluate`). "
        f"ms/img: median of up to {settings['repeats']} calls after a warm-up; the model alone reads its "
        "proposals from the cache, \"+ proposals\" adds selective search computed afresh. GFLOPs at the "
        f"training size (`cvforge.complexity`; selective-search models with {FLOPS_PROPOSALS} proposals). Peak memory: "
        "CUDA memory allocated on a GPU, else the process's peak RSS (Python and torch included).", "",
        "Paper figures (VOC 2007 test; the papers' GPUs):"]
    for name in [r["model"] for r in rows if r["model"] in PAPER_FIGURES]:
        paper = PAPER_FIGURES[name]
        vgg16 = paper.get("vgg16", (paper["mAP"], paper["seconds"]))
        same = f" (with VGG16: {vgg16[0]} % at {vgg16[1]} s)" if vgg16 != (paper["mAP"], paper["seconds"]) else ""
        notes.append(f"- {name}: {paper['setting']} — {paper['source']}{same}")
    return "\n".join(lines + notes) + "\n"


def plot_accuracy_vs_latency(rows: list[dict], path: Path) -> Path:
    """One labelled point per model: mAP50 against ms per image at batch 1 (with proposals), log scale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for r in rows:
        ax.scatter(r["ms_b1_proposals"], r["mAP50"], s=40)
        ax.annotate(r["model"], (r["ms_b1_proposals"], r["mAP50"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 20, not 2 x 10^1
    ax.xaxis.set_major_formatter(plain)
    # minor ticks labelled at 2x and 5x only: all nine run into each other
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if _leading_digit(value) in (2, 5) else ""))
    ax.set_xlabel("ms per image, batch 1, proposals included (log)")
    ax.set_ylabel("val mAP50")
    ax.set_title("accuracy against latency")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _leading_digit(value: float) -> int:
    return int(round(value / 10 ** math.floor(math.log10(value)))) if value > 0 else 0


def plot_training_curves(rows: list[dict], path: Path) -> Path:
    """Each trained model's val mAP50 after each epoch, against its minutes of training (from metrics.csv)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for r in rows:
        table = Path(r["run"]) / "metrics.csv" if r.get("run") else None
        if table is None or not table.exists():
            continue
        with open(table, newline="", encoding="utf-8") as file:
            history = list(csv.DictReader(file))
        minutes = [sum(float(h["time"]) for h in history[: i + 1]) / 60 for i in range(len(history))]
        ax.plot(minutes, [float(h.get("metrics/mAP50") or "nan") for h in history], marker="o", label=r["model"])
    ax.set_xlabel("minutes of training (validation excluded)")
    ax.set_ylabel("val mAP50")
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path
