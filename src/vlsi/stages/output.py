"""A finished stage's output folder: written whole by the main process (atomic rename, checksums recorded), reused by
a rerun only when every file is as written; the trained verbalizers of a step module's state."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import TrainConfig
from ..models.verbalizer import Verbalizers
from ..runfolder import RERUN, record_checksums, storage, verify_checksums
from .loop import Run, drop_checkpoints

log = logging.getLogger("vlsi")


def write_output(cfg: TrainConfig, run: Run, name: str, output: Path, write: Callable[[Path], None]) -> Path:
    """A finished stage's output: the main process (the only one holding the gathered state `train` returns) calls
    `write(folder)` on a temporary folder, renamed to `output` when it returns, then drops the stage's mid-stage
    checkpoints; every process waits for it."""
    if run.accelerator.is_main_process:
        with atomic_dir(output) as tmp:
            write(tmp)
            record_checksums(tmp)  # verified before a rerun reuses the output (`reuse`)
        drop_checkpoints(cfg, name)
    run.accelerator.wait_for_everyone()
    return output


def reuse(output: Path, what: str) -> bool:
    """Whether a stage's output is there to reuse: written whole (`write_output` renames it into place at the end) and
    every file as its checksums recorded; a damaged one stops the run naming the file."""
    if not output.exists():
        return False
    verify_checksums(output, f"delete {output} to have the {what} written again")
    log.info("%s: reusing %s", what, output)
    return True


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside `path`; rename it to `path` only when the block finishes. A write the storage
    refuses in the block (a full disk) is one line naming it; the half-written folder is removed."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with storage(path, RERUN):
            yield tmp
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a step module's state dict under `prefix.` (e.g. "student"), with the prefix removed."""
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


def save_verbalizers(like: Verbalizers, state: dict[str, torch.Tensor], folder: Path, **meta) -> None:
    """The verbalizers of a step module's gathered state dict (under `verbalizers.`), shaped as `like`, saved in
    `folder` with `meta` (model, num_layers, vocab) beside them."""
    trained = Verbalizers(like.hidden_size, like.target_layers, like.residual, like.family)
    trained.load_state_dict(substate(state, "verbalizers"))
    trained.save(folder, **meta)
