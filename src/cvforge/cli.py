"""The ``cvforge`` command (DESIGN §4): one vocabulary for the command line and the Python API.

A user's mistake ends with one line ``cvforge: error: <what>, <where> — <how to fix>`` and exit
status 2, never a traceback (DESIGN §6).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvforge import __version__
from cvforge.config import TASKS
from cvforge.errors import CvforgeError


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="check, summarise or generate data sets")
    verbs = data.add_subparsers(dest="data_command", required=True, metavar="check|stats|make-shapes|proposals")
    for name, text in (("check", "read every image and label; exit 1 if errors are found"),
                       ("stats", "classes, instances per class, boxes per image, image sizes")):
        p = verbs.add_parser(name, help=text)
        p.add_argument("data", help="shapes, a data YAML, a COCO JSON, a VOC root or a folder")
        p.add_argument("--task", choices=TASKS)
    shapes = verbs.add_parser("make-shapes", help="write the built-in shapes data set to a folder")
    shapes.add_argument("out", type=Path)
    shapes.add_argument("--train", type=int, default=512)
    shapes.add_argument("--val", type=int, default=128)
    shapes.add_argument("--size", type=int, default=128)
    shapes.add_argument("--seed", type=int, default=0)
    from cvforge.models.detection.proposals import add_proposals_parser
    add_proposals_parser(verbs)  # `cvforge data proposals DATA` (selective search, cached)


def _train_parser(sub) -> None:
    """`cvforge train`: one flag per TrainConfig field, so the CLI and the Python API share one vocabulary."""
    import dataclasses
    from cvforge.config import TrainConfig
    # allow_abbrev=False: a model option may be a prefix of a train flag (--backbone of --backbone-lr-mult), and
    # argparse would otherwise take the one for the other
    train = sub.add_parser("train", help="train a model (default: the task's default model on the built-in data)",
                           argument_default=argparse.SUPPRESS, allow_abbrev=False,
                           epilog="Any other --name value is an option of the model's builder, e.g. "
                                  "--upsample bilinear (FCN) or --close-mosaic 5 (YOLO).")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag, default = "--" + field.name.replace("_", "-"), getattr(defaults, field.name)
        if field.name == "model_args":  # any flag train does not know goes to the model (model_options)
            continue
        if field.name == "resume":
            train.add_argument(flag, nargs="?", const="auto", metavar="PATH",
                               help="continue a stopped run from its last.pt (alone: the newest unfinished run)")
        elif isinstance(default, bool) or default is None:
            train.add_argument(flag, type=_boolean, metavar="BOOL", help=f"(default: {default})")
        else:
            train.add_argument(flag, type=type(default), metavar=field.name.upper(), help=f"(default: {default!r})")


def model_options(args: argparse.Namespace, extra: list[str]) -> dict:
    """``--name value`` flags that train's own flags do not know -> the model builder's keyword arguments,
    each converted to the type of the builder's default; a name the builder does not take is an error."""
    from cvforge.recipes import resolve_model
    from cvforge.zoo import builder_options
    task, model = resolve_model(getattr(args, "model", ""), getattr(args, "task", ""),
                                getattr(args, "data", "shapes"))
    parameters = builder_options(model, task)
    known = ", ".join(f"--{name.replace('_', '-')}" for name in parameters) or "none"
    options, words = {}, list(extra)
    while words:
        flag = words.pop(0)
        name, _, value = flag.removeprefix("--").partition("=")
        name = name.replace("-", "_")
        if not flag.startswith("--") or name not in parameters:
            raise CvforgeError(f"unknown option {flag} for model {model}", None,
                               f"train's flags are in `cvforge train -h`; the model's own are: {known}")
        if not value:
            if not words:
                raise CvforgeError(f"option {flag} needs a value", None, f"write e.g. {flag} VALUE")
            value = words.pop(0)
        options[name] = _typed(value, parameters[name], flag)
    return options


def _typed(text: str, default: object, flag: str) -> object:
    """``text`` as the type of ``default`` (YAML rules when the default is None or missing)."""
    import yaml
    try:
        if isinstance(default, bool):
            return _boolean(text)
        if isinstance(default, (int, float, str)):
            return type(default)(text)
        return yaml.safe_load(text)
    except (ValueError, argparse.ArgumentTypeError, yaml.YAMLError):
        raise CvforgeError(f"option {flag} expects a {type(default).__name__}, got {text!r}", None,
                           f"write e.g. {flag} {default}") from None


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _eval_predict_parsers(sub) -> None:
    evaluate = sub.add_parser("eval", help="metrics of trained weights on a data split")
    evaluate.add_argument("--weights", required=True, help="a checkpoint (.pt) or an exported model (.onnx)")
    evaluate.add_argument("--data", help="data SPEC (default: the data the model was trained on)")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--batch", type=int, default=16)
    evaluate.add_argument("--workers", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--out", type=Path, help="folder for plots (default: a new runs/<task>/eval)")
    predict = sub.add_parser("predict", help="run trained weights on images, videos and folders")
    predict.add_argument("--weights", required=True, help="a checkpoint (.pt) or an exported model (.onnx)")
    predict.add_argument("source", nargs="+", help="image or video files (videos: detectors), or folders")
    predict.add_argument("--out", type=Path, help="output folder (default: a new runs/<task>/predict)")
    predict.add_argument("--top", type=int, default=5, help="classes per image (classification)")
    predict.add_argument("--device", default="auto")
    export = sub.add_parser("export", help="export trained weights (ONNX) and check them against PyTorch")
    export.add_argument("--weights", required=True, help="a checkpoint written by cvforge train")
    export.add_argument("--format", default="onnx", choices=("onnx",))
    export.add_argument("--imgsz", type=int, help="side of the example input (default: the training imgsz)")
    export.add_argument("--out", type=Path, help="output file (default: the weights' path with .onnx)")
    export.add_argument("--opset", type=int, default=17)


def _bench_models_parsers(sub) -> None:
    from cvforge.bench import DEFAULT_BUDGET, DEFAULT_MODELS
    models = sub.add_parser("models", help="list the models cvforge can build, with parameters and FLOPs")
    models.add_argument("--task", choices=TASKS)
    models.add_argument("--imgsz", type=int, help="input side for the FLOPs (default: 224 classify, 512 segment, "
                                                  "640 detect and instance)")
    bench = sub.add_parser("bench", help="train detectors under one time budget and compare accuracy and speed",
                           epilog="Running the same command again (same --out, or --resume) skips finished models "
                                  "and resumes an unfinished training.")
    bench.add_argument("--data", default="shapes", help="data SPEC (default: the built-in shapes)")
    bench.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated (default: %(default)s)")
    bench.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="minutes of training per model "
                                                                           "(default: %(default)s)")
    bench.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                       help="use these weights for model NAME instead of training it (repeatable)")
    bench.add_argument("--out", help="the bench folder (an existing one is continued; default: a new "
                                     "PROJECT/bench-N)")
    bench.add_argument("--project", default="runs/bench")
    bench.add_argument("--resume", action="store_true", help="continue the newest bench under --project")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--repeats", type=int, default=10, help="timed calls per inference setting")
    bench.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvforge", description="Train, evaluate, run and export vision models.")
    parser.add_argument("--version", action="version", version=f"cvforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="train|eval|predict|export|bench|data|models|demo")
    _train_parser(sub)
    _eval_predict_parsers(sub)
    _bench_models_parsers(sub)
    _data_parser(sub)
    sub.add_parser("demo", help="the README's first command: show the built-in data set")
    return parser


def run_data(args: argparse.Namespace) -> int:
    if args.data_command == "proposals":
        from cvforge.models.detection.proposals import run_proposals
        return run_proposals(args)
    if args.data_command == "make-shapes":
        from cvforge.data.synthetic import make_shapes
        out = make_shapes(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
        print(f"wrote the shapes data set to {out} (COCO: annotations/, YOLO: data.yaml, masks/, crops/)")
        return 0
    from cvforge.data import resolve
    from cvforge.data.check import check, format_stats
    task = args.task or resolve(args.data).default_task()
    problems, stats = check(args.data, task)
    if args.data_command == "stats":
        print(format_stats(stats, task))
        return 0
    images = sum(s.images for s in stats)
    if not problems:
        print(f"{args.data}: {images} images in {len(stats)} split(s), no problems found")
        return 0
    print(problems.report())
    print(f"{args.data}: {images} images, {problems.errors} errors" + (" (fix them, then run again)"
                                                                      if problems.errors else ""))
    return 1 if problems.errors else 0


def run_train(args: argparse.Namespace) -> int:
    from cvforge.api import train
    options = {k: v for k, v in vars(args).items() if k != "command"}
    result = train(**options)
    if result.stopped:
        return 130  # the run saved last.pt and said how to resume
    best = f"{result.metric} {result.best_metric:.4f}" if result.best_metric is not None else "no validation"
    print(f"done: {result.epochs} epochs, best {best}; weights in {result.save_dir / 'weights'}, "
          f"plots in {result.save_dir / 'plots'}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from cvforge.api import evaluate
    out = args.out
    metrics = evaluate(args.weights, data=args.data, split=args.split, batch=args.batch, workers=args.workers,
                       out=out, device=args.device)
    from cvforge.predict import format_eval
    print(format_eval(metrics))  # overall metrics, then the per-class table (e.g. IoU per class)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from cvforge.predict import predict, summary_lines
    records, files = predict(args.weights, args.source, out=args.out, top=args.top, device=args.device)
    for line in summary_lines(records):
        print(line)
    print(f"wrote {', '.join(map(str, files))}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from cvforge.export import export_onnx
    path = export_onnx(args.weights, out=args.out, imgsz=args.imgsz, opset=args.opset)
    print(f"wrote {path}; run it with: cvforge predict --weights {path} IMAGES")
    return 0


def run_models(args: argparse.Namespace) -> int:
    """The listed models with parameters and GFLOPs (``cvforge.complexity.model_table``)."""
    from cvforge.complexity import TABLE_CLASSES, model_table
    if args.imgsz is not None and args.imgsz < 32:
        raise CvforgeError(f"--imgsz must be at least 32, got {args.imgsz}", None, "pass e.g. --imgsz 224")
    print(f"{'task':<9} {'model':<19} {'params (M)':>10} {'GFLOPs':>9} {'imgsz':>6}  note")
    for row in model_table(args.task, args.imgsz):
        print(f"{row['task']:<9} {row['model']:<19} {row['params'] / 1e6:>10.2f} {row['flops'] / 1e9:>9.2f} "
              f"{row['imgsz']:>6}  {row['note']}")
    if args.task in (None, "classify"):
        print("classify  (any other torchvision classification model name works too)")
    classes = ", ".join(f"{n} {t}" for t, n in TABLE_CLASSES.items() if args.task in (None, t))
    print(f"GFLOPs: one eval forward of one image, a multiply-add counted as 2 (torch FlopCounterMode); "
          f"untrained heads for {classes} classes")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from cvforge.bench import bench
    weights = {}
    for item in args.weights:
        name, _, path = item.partition("=")
        if not name or not path:
            raise CvforgeError(f"--weights {item!r} is not NAME=PATH", None, "write e.g. --weights yolo-n=best.pt")
        weights[name] = path
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    folder = bench(models, args.data, args.budget, weights=weights, out=args.out, project=args.project,
                   resume=args.resume, device=args.device, repeats=args.repeats, seed=args.seed)
    print((folder / "bench.md").read_text())
    print(f"wrote {folder / 'bench.csv'}, {folder / 'bench.md'} and {folder / 'plots'}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from cvforge.demo import demo
    return demo()


COMMANDS = {"train": run_train, "eval": run_eval, "predict": run_predict, "export": run_export, "models": run_models,
            "bench": run_bench, "data": run_data, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if extra:  # `cvforge train --model fcn8s --upsample bilinear`: the model builder's own options
            args.model_args = {**getattr(args, "model_args", {}), **model_options(args, extra)}
        return COMMANDS[args.command](args)
    except CvforgeError as e:
        print(f"cvforge: error: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
