"""`vlsi demo`: an offline, CPU-sized comparison of SFT only, final-layer KD and VLsI (experiment.py, docs/DEMO.md),
and `vlsi ablate`: the paper's ablations on the same task and models (ablate.py, docs/ABLATE.md).

`vlsi study`: accuracy against the number of labelled questions, several seeds (study.py, docs/STUDY.md).

The CLI wires `add_parser`, `add_ablate_parser` and `add_study_parser`; heavy imports wait for the command.
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

    parser = _experiment_parser(
        subparsers,
        "demo",
        DemoSettings,
        run,
        help="compare SFT only, SFT with the teacher's answers, final-layer KD and VLsI on CPU, in about 4 minutes",
        description=(
            "150 labelled questions and 2000 more that the shipped tiny Qwen2-VL teacher answers "
            "(data.answers=teacher); a smaller student learns from them four ways, from the same initialisation and "
            "on the same budget: (a) SFT on the labelled questions only; (b) SFT on the labelled and the teacher's "
            "answers; (c) KL to the teacher's output, then SFT; (d) VLsI: verbalize -> interact -> SFT. All are "
            "evaluated on a held-out test split, before and after their last SFT stage, compared pair by pair on "
            "the same questions; writes DIR/results.json and DIR/report.md. No network, no GPU. See docs/DEMO.md."
        ),
        fast_help="a tiny budget that finishes in seconds (CI smoke test)",
    )
    parser.add_argument("--seed", type=int, help="seed of the students' training (default 0)")
    return parser


def _experiment_parser(subparsers, name: str, settings, func, help: str, description: str, fast_help: str):
    """A `vlsi demo / ablate / study` parser: --output, --fast and the experiment's key=value settings."""
    fields = ", ".join(f.name for f in dataclasses.fields(settings))
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("--output", default=f"vlsi-{name}", help=f"output folder (default: ./vlsi-{name})")
    parser.add_argument("--fast", action="store_true", help=fast_help)
    parser.add_argument("settings", nargs="*", metavar="key=value", help=f"{name} settings: {fields}")
    parser.set_defaults(func=func)
    return parser


def parse_settings(cls, texts: list[str], values: dict, command: str):
    """`cls(**values, key=value ...)` from command-line texts, each value converted to its field's type."""
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for text in texts:
        key, sep, raw = text.partition("=")
        if not sep or key not in hints:
            known = ", ".join(hints)
            raise ValueError(f"{command} setting '{text}' is not key=value with a known key ({known})")
        try:
            values[key] = hints[key](raw)
        except ValueError:
            raise ValueError(f"{command} setting {key}: expected {hints[key].__name__}, got {raw!r}") from None
    return cls(**values).check()


def settings_from_args(args: argparse.Namespace):
    from .experiment import FAST, DemoSettings

    values = dict(FAST) if args.fast else {}
    if args.seed is not None:
        values["seed"] = args.seed
    return parse_settings(DemoSettings, args.settings, values, "demo")


def run(args: argparse.Namespace) -> int:
    """Run the demo. Bad settings or a missing shipped model raise ValueError / FileNotFoundError, which
    `vlsi.cli.main` prints as one error line (exit 2)."""
    from .experiment import run_demo

    run_demo(Path(args.output), settings_from_args(args), fast=args.fast)
    return 0


def add_ablate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `ablate` on an argparse subparsers object."""
    from .ablate import AblateSettings

    return _experiment_parser(
        subparsers,
        "ablate",
        AblateSettings,
        run_ablate_command,
        help="the paper's ablations (matching, loss operations, SFT stage) at demo scale, 3 seeds, on CPU",
        description=(
            "Reproduce the paper's ablation tables on the demo's task and models: matching strategies (random, "
            "uniform, bottom-1/3, multinomial, + search range, + order, + adaptive temperature), intermediate / "
            "last-layer loss operations (CE, L2, KLD, none), and the SFT stage (VLsI with and without it, SFT "
            "alone). Every row from the same student initialisation and budget, several seeds; writes "
            "DIR/results.json and DIR/report.md (mean +- std per row, the paper's numbers beside them). "
            "Re-running the same command reuses finished runs. No network, no GPU. See docs/ABLATE.md."
        ),
        fast_help="a tiny budget and 2 seeds (CI smoke test)",
    )


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Register `study` on an argparse subparsers object."""
    from .study import StudySettings

    return _experiment_parser(
        subparsers,
        "study",
        StudySettings,
        run_study_command,
        help="should I distil? accuracy vs labelled questions for SFT only, KD and VLsI, 3 seeds, on CPU",
        description=(
            "On the demo's task and models: for several numbers of labelled training questions (sizes=...), train "
            "the demo's four students (SFT only, SFT with the teacher's answers, final-layer KD, VLsI; with a pool "
            "of questions the teacher answers), several seeds each; writes DIR/results.json, DIR/report.md and "
            "DIR/study.png (accuracy vs labelled questions, mean +- std). Re-running the same command reuses "
            "finished runs. No network, no GPU. See docs/STUDY.md."
        ),
        fast_help="two tiny sizes, one seed, a tiny budget (CI smoke test)",
    )


def run_ablate_command(args: argparse.Namespace) -> int:
    from .ablate import FAST, AblateSettings, run_ablate

    return _run_jobs(args, "ablate", AblateSettings, FAST, run_ablate)


def run_study_command(args: argparse.Namespace) -> int:
    from .study import FAST, StudySettings, run_study

    return _run_jobs(args, "study", StudySettings, FAST, run_study)


def _run_jobs(args: argparse.Namespace, name: str, settings, fast: dict, runner) -> int:
    """Run `vlsi ablate` / `vlsi study`. Bad settings, a changed output folder or a missing shipped model raise
    errors that `vlsi.cli.main` prints as one line (exit 2); a failed run is reported the same way, naming its log."""
    chosen = parse_settings(settings, args.settings, dict(fast) if args.fast else {}, name)
    try:
        runner(Path(args.output), chosen, fast=args.fast)
    except RuntimeError as e:  # raised for a failed run, with the path of that run's log
        print(f"vlsi {name}: error: {e}", file=sys.stderr)
        return 2
    return 0
