"""Small pieces the stages share: batch splitting, target-layer choice, data set-up, atomic output folders."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import VLDataset, make_collate, read_dataset, response_positions
from ..models.family import Parts, check_target_layers, default_target_layers

log = logging.getLogger("vlsi")


def split_batch(batch: dict[str, torch.Tensor]):
    """-> (model inputs, response mask [B, T], next-token targets [N]) for one model's encoded batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    mask = response_positions(labels)  # [B, T]: positions whose next token is a response token
    targets = labels.roll(-1, dims=1)[mask]  # [N]
    return inputs, mask, targets


def target_layers(cfg: TrainConfig, parts: Parts, who: str) -> list[int]:
    explicit = getattr(cfg.verbalizer, f"{who}_layers")
    if explicit is None:
        layers = default_target_layers(parts.num_layers, cfg.verbalizer.stride, cfg.verbalizer.offset)
    else:
        layers = explicit
    return check_target_layers(layers, parts.num_layers, f"verbalizer.{who}_layers")


def load_samples(cfg: TrainConfig):
    samples, skipped = read_dataset(cfg.data.path, cfg.data.image_root or None, cfg.data.skip_invalid)
    if skipped:
        log.warning("skipped %d invalid records in %s (data.skip_invalid=true)", len(skipped), cfg.data.path)
    return samples


def build_loader(cfg: TrainConfig, samples, processors: dict, batch_size: int, seed: int, name: str):
    """A seeded, shuffling loader; the length scan is cached in OUT/.cache/NAME-lengths.json for restarts."""
    cache = Path(cfg.output) / ".cache" / f"{name}-lengths.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    dataset = VLDataset(samples, processors, cfg.data.max_length, cfg.data.overlong, cache_path=cache)
    if dataset.n_dropped:
        log.warning("dropped %d samples longer than data.max_length=%d tokens", dataset.n_dropped, cfg.data.max_length)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.data.path}: no usable samples (all were invalid or longer than data.max_length)")
    from .loop import make_loader

    return make_loader(dataset, batch_size, make_collate(processors), seed, cfg.data.num_workers)


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside `path`; rename it to `path` only when the block finishes."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
