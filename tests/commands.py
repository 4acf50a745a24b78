"""What the tests share: command lines of the tests that run `vlsi train` (test_cli.py, test_resume.py) or hold a
folder's lock, one process run as each launched one runs, and the digits written as a dataset."""

from contextlib import contextmanager
from pathlib import Path

import torch

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


@contextmanager
def one_thread():
    """Torch on one thread for the block, as `accelerate launch` (OMP_NUM_THREADS=1) runs each process: the
    one-process reference of a launch test computes in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def onevision_dataset(folder, records, turns: str = "conversations"):
    """`vlsi.toy` digit records as a `datasets.Dataset` in LLaVA-OneVision-Data's columns (id, `turns`, image with
    the PNG's bytes inside, no path)."""
    import datasets

    rows = {
        "id": [r["id"] for r in records],
        turns: [r["conversations"] for r in records],
        "image": [{"bytes": (Path(folder) / r["image"]).read_bytes(), "path": None} for r in records],
    }
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
