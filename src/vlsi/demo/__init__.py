"""`vlsi demo`: an offline, CPU-sized comparison of SFT only, final-layer KD and VLsI (experiment.py, docs/DEMO.md).

The CLI wires `add_parser(subparsers)`; the parsed arguments go to `run(args)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on an argparse subparsers object."""
    from .experiment import DemoSettings

    fields = ", ".join(f.name for f in dataclasses.fields(DemoSettings))
    parser = subparsers.add_parser(
        "demo",
        help="compare SFT only, final-layer KD and VLsI on a real task, on CPU, in about 3 minutes",
        description=(
            "Distil the shipped tiny Qwen2-VL teacher into a smaller student three ways (SFT only; KL to the "
            "teacher's output, then SFT; VLsI: verbalize -> interact -> SFT) from the same initialisation and on the "
            "same budget, evaluate all on a held-out test split, and write DIR/results.json and DIR/report.md. "
            "No network, no GPU. See docs/DEMO.md."
        ),
    )
    parser.add_argument("--output", default="vlsi-demo", help="output folder (default: ./vlsi-demo)")
    parser.add_argument("--fast", action="store_true", help="a tiny budget that finishes in seconds (CI smoke test)")
    parser.add_argument("--seed", type=int, help="seed of the students' training (default 0)")
    parser.add_argument("settings", nargs="*", metavar="key=value", help=f"demo settings: {fields}")
    parser.set_defaults(func=run)
    return parser


def settings_from_args(args: argparse.Namespace):
    from .experiment import FAST, DemoSettings

    values = dict(FAST) if args.fast else {}
    hints = typing.get_type_hints(DemoSettings)
    for text in args.settings:
        key, sep, raw = text.partition("=")
        if not sep or key not in hints:
            known = ", ".join(hints)
            raise ValueError(f"demo setting '{text}' is not key=value with a known key ({known})")
        try:
            values[key] = hints[key](raw)
        except ValueError:
            raise ValueError(f"demo setting {key}: expected {hints[key].__name__}, got {raw!r}") from None
    if args.seed is not None:
        values["seed"] = args.seed
    return DemoSettings(**values).check()


def run(args: argparse.Namespace) -> int:
    """Run the demo; on bad settings or a missing shipped model print one error line and return 2."""
    import logging

    from .experiment import run_demo

    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"vlsi demo: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_demo(Path(args.output), settings, fast=args.fast)
    except FileNotFoundError as e:
        print(f"vlsi demo: error: {e}", file=sys.stderr)
        return 2
    return 0
