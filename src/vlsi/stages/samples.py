"""The data as every stage reads it: the samples (answered by the teacher where asked) and a stage's loader."""

from __future__ import annotations

import logging
from pathlib import Path

from ..answers import teacher_answers
from ..config import TrainConfig
from ..data import VLDataset, make_collate
from ..data.skipping import with_skipped
from ..data.sources import parse_sources, read_sources
from ..distributed import on_main_process, process_state
from .loop import make_loader

log = logging.getLogger("vlsi")


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
