"""`vlsi demo`: an offline, CPU-sized comparison of SFT only, final-layer KD and VLsI (experiment.py, docs/DEMO.md),
and `vlsi ablate`: the paper's ablations on the same task and models (ablate.py, docs/ABLATE.md).

`vlsi study`: accuracy against the number of labelled questions, several seeds (study.py, docs/STUDY.md).

One function per command, its parameters the command's options: `demo_command`, `ablate_command`, `study_command`
(vlsi.cli wires them); heavy imports wait for the command.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from pathlib import Path


def parse_settings(cls, texts: Sequence[str], values: dict, command: str):
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


def demo_command(output: str | Path, settings: Sequence[str] = (), fast: bool = False, seed: int | None = None) -> dict:
    """`vlsi demo`: run the demo into `output` under `settings` (key=value texts over DemoSettings' fields, on top
    of FAST's with `fast`; `seed` sets the seed) and return its results. Bad settings or a missing shipped model
    raise ValueError / FileNotFoundError, which `vlsi.cli.main` prints as one error line (exit 2)."""
    from .experiment import FAST, DemoSettings, run_demo

    values = dict(FAST) if fast else {}
    if seed is not None:
        values["seed"] = seed
    return run_demo(Path(output), parse_settings(DemoSettings, settings, values, "demo"), fast=fast)


def ablate_command(output: str | Path, settings: Sequence[str] = (), fast: bool = False) -> dict:
    """`vlsi ablate`: the ablation into `output` under `settings` (key=value over AblateSettings' fields, on top of
    FAST's with `fast`). Bad settings, a changed output folder or a missing shipped model raise ValueError /
    OSError; a failed run raises ablate.RunFailed naming its log. `vlsi.cli.main` prints each as one line (exit 2)."""
    from .ablate import FAST, AblateSettings, run_ablate

    chosen = parse_settings(AblateSettings, settings, dict(FAST) if fast else {}, "ablate")
    return run_ablate(Path(output), chosen, fast=fast)


def study_command(output: str | Path, settings: Sequence[str] = (), fast: bool = False) -> dict:
    """`vlsi study`: the study into `output` under `settings` (key=value over StudySettings' fields, on top of
    FAST's with `fast`); errors as for `ablate_command`."""
    from .study import FAST, StudySettings, run_study

    chosen = parse_settings(StudySettings, settings, dict(FAST) if fast else {}, "study")
    return run_study(Path(output), chosen, fast=fast)
