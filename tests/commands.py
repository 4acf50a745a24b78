"""Command lines shared by the tests that run `vlsi train` (test_cli.py, test_resume.py) or hold a folder's lock."""

from pathlib import Path

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")


def train_argv(teacher, student, data, output, *settings: str) -> list[str]:
    """`vlsi train` on configs/tiny-cpu.yaml, without the program name: for `vlsi.cli.main`, or after
    `python -m vlsi`."""
    return [
        "train",
        *("--teacher", str(teacher), "--student", str(student), "--data", str(data)),
        *("--output", str(output), "--config", CONFIG),
        *settings,
    ]


# `python -c HOLD_LOCK FOLDER`: a second run holding FOLDER's lock; prints "locked" once it does, then sleeps
HOLD_LOCK = """import sys, time
from vlsi import runfolder
with runfolder.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""
