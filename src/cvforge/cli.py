"""The ``cvforge`` command (DESIGN §4): one vocabulary for the command line and the Python API.

A user's mistake ends with one line ``cvforge: error: <what>, <where> — <how to fix>`` and exit
status 2, never a traceback (DESIGN §6).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvforge import __version__
from cvforge.errors import CvforgeError


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="check, summarise or generate data sets")
    verbs = data.add_subparsers(dest="data_command", required=True, metavar="check|stats|make-shapes")
    for name, text in (("check", "read every image and label; exit 1 if errors are found"),
                       ("stats", "classes, instances per class, boxes per image, image sizes")):
        p = verbs.add_parser(name, help=text)
        p.add_argument("data", help="shapes, a data YAML, a COCO JSON, a VOC root or a folder")
        p.add_argument("--task", choices=("classify", "segment", "detect", "instance"))
    shapes = verbs.add_parser("make-shapes", help="write the built-in shapes data set to a folder")
    shapes.add_argument("out", type=Path)
    shapes.add_argument("--train", type=int, default=512)
    shapes.add_argument("--val", type=int, default=128)
    shapes.add_argument("--size", type=int, default=128)
    shapes.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvforge", description="Train, evaluate, run and export vision models.")
    parser.add_argument("--version", action="version", version=f"cvforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="train|eval|predict|export|data|models|demo")
    _data_parser(sub)
    sub.add_parser("demo", help="the README's first command: show the built-in data set")
    return parser


def run_data(args: argparse.Namespace) -> int:
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


def run_demo(args: argparse.Namespace) -> int:
    from cvforge.demo import demo
    return demo()


COMMANDS = {"data": run_data, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CvforgeError as e:
        print(f"cvforge: error: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
