"""Small pieces the stages share: what a set-up returns, batch splitting, target-layer choice, data set-up, atomic
output folders, saving trained verbalizers."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..answers import teacher_answers
from ..config import TrainConfig
from ..data import VLDataset, make_collate
from ..data.skipping import with_skipped
from ..data.sources import parse_sources, read_sources
from ..distributed import on_main_process, process_state
from ..models.family import Parts, check_target_layers, default_target_layers
from ..models.verbalizer import Verbalizers
from ..runfolder import RERUN, record_checksums, storage, verify_checksums

log = logging.getLogger("vlsi")


@dataclass
class Run:
    """What a stage's `setup` builds, for its training call and its `save`."""

    accelerator: Accelerator
    step: nn.Module  # batch -> (loss, logs); its registered parameters are what trains
    loader: object
    dtype: torch.dtype
    processor: object  # the trained (or verbalized) model's processor
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # checkpointed with the run


def target_layers(cfg: TrainConfig, parts: Parts, who: str) -> list[int]:
    explicit = getattr(cfg.verbalizer, f"{who}_layers")
    if explicit is None:
        layers = default_target_layers(parts.num_layers, cfg.verbalizer.stride, cfg.verbalizer.offset)
    else:
        layers = explicit
    return check_target_layers(layers, parts.num_layers, f"verbalizer.{who}_layers")


def load_samples(cfg: TrainConfig):
    """The data's samples (one source, or a mixture: `data.sources`); with data.answers=teacher (or server) the
    unanswered ones carry the teacher's answers (generated once, cached in OUT/answers: `vlsi.answers`). The main
    process checks the data (on data.num_proc processes) and sends the result, an index into the data, to the others."""
    teacher = cfg.data.answers != "gold"  # teacher or server
    options = (cfg.seed, cfg.data.skip_invalid, teacher, cfg.data.num_proc or None, cfg.data.validate == "lazy")
    samples, skipped = on_main_process(_read, cfg.data, options)
    for name, problems in skipped.items():
        if problems:
            log.warning("skipped %d invalid records in %s (data.skip_invalid=true)", len(problems), name)
    return teacher_answers(cfg, samples) if teacher else samples


def _read(data, options: tuple):
    return read_sources(parse_sources(data), *options)


def build_loader(cfg: TrainConfig, samples, processors: dict, batch_size: int, seed: int, name: str):
    """A seeded, shuffling loader. The length scan runs on the main process (the others wait, then read it) and is
    cached in OUT/.cache/NAME-lengths.json, where the later stages find each processor's counts."""
    from .loop import make_loader

    cache = Path(cfg.output) / ".cache" / f"{name}-lengths.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    options = dict(num_proc=cfg.data.num_proc or None, lazy=cfg.data.validate == "lazy")
    with process_state().main_process_first():
        dataset = VLDataset(
            samples,
            processors,
            cfg.data.max_length,
            cfg.data.overlong,
            cache,
            **options,
            max_bad_fraction=cfg.data.max_bad_fraction,
            special_tokens=cfg.data.special_tokens,
            skip_invalid=cfg.data.skip_invalid,
        )
    if dataset.invalid:
        log.warning("skipped %d records that cannot be encoded (data.skip_invalid=true)", len(dataset.invalid))
    if dataset.n_dropped:
        log.warning("dropped %d samples longer than data.max_length=%d tokens", dataset.n_dropped, cfg.data.max_length)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.data.path}: no usable samples (all were invalid or longer than data.max_length)")
    return make_loader(dataset, batch_size, with_skipped(make_collate(processors)), seed, cfg.data.num_workers)


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a step module's state dict under `prefix.` (e.g. "student"), with the prefix removed."""
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


def save_verbalizers(like: Verbalizers, state: dict[str, torch.Tensor], folder: Path, **meta) -> None:
    """The verbalizers of a step module's gathered state dict (under `verbalizers.`), shaped as `like`, saved in
    `folder` with `meta` (model, num_layers, vocab) beside them."""
    trained = Verbalizers(like.hidden_size, like.target_layers, like.residual, like.family)
    trained.load_state_dict(substate(state, "verbalizers"))
    trained.save(folder, **meta)


def tracking(cfg: TrainConfig) -> dict:
    """`make_accelerator()` keyword arguments: trackers asked for with report_to, logging under OUT/logs."""
    return dict(report_to=cfg.report_to, logging_dir=Path(cfg.output) / "logs")


def checkpointing(cfg: TrainConfig, name: str) -> dict:
    """`train()` keyword arguments for mid-stage checkpoints of stage `name` in OUT/checkpoints/."""
    directory = Path(cfg.output) / "checkpoints" / name.replace("/", "-")
    return dict(checkpoint_dir=directory, every=cfg.checkpoint.every, max_nonfinite=cfg.max_nonfinite_steps)


def drop_checkpoints(cfg: TrainConfig, name: str) -> None:
    """A finished stage's output is written: its mid-stage checkpoints are no longer needed."""
    shutil.rmtree(checkpointing(cfg, name)["checkpoint_dir"], ignore_errors=True)


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
