"""Every check made before a stage trains, each named after what it refuses: settings that cannot work with these
models, a run folder made from other settings or inputs, a cache that does not fit. Each raises one line naming the
file or setting and the fix (`ConfigError`, `ModelError`, `FolderError`)."""

from __future__ import annotations

from .config import TrainConfig
from .models.family import Parts, check_target_layers, default_target_layers


def target_layers(cfg: TrainConfig, parts: Parts, who: str) -> list[int]:
    explicit = getattr(cfg.verbalizer, f"{who}_layers")
    if explicit is None:
        layers = default_target_layers(parts.num_layers, cfg.verbalizer.stride, cfg.verbalizer.offset)
    else:
        layers = explicit
    return check_target_layers(layers, parts.num_layers, f"verbalizer.{who}_layers")
