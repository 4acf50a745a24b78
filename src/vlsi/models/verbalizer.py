"""Verbalizers (docs/METHOD.md#the-verbalizer): a verb-FFN per target layer, then the backbone's own frozen final
norm and LM head.

The norm and head are shared with the backbone (not copied): a verbalizer file holds only the FFN weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..config import TrainConfig
from ..runfolder import read_json, read_safetensors
from .family import Parts, default_target_layers

WEIGHTS = "verbalizers.safetensors"
META = "verbalizers.json"


class VerbalizerError(ValueError):
    """Verbalizers used with a model they were not trained for: the message names both and the fix."""


class VerbFFN(nn.Module):
    """v(h) = W_down(SiLU(W_gate h) * W_up h): gated like the backbone MLP, no expansion (3 d^2 parameters)."""

    def __init__(self, d: int, residual: bool = False):
        super().__init__()
        self.gate = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, d, bias=False)
        self.down = nn.Linear(d, d, bias=False)
        self.residual = residual
        if residual:  # h + v(h) starts as the identity: the frozen head then reads the layer as a logit lens
            nn.init.zeros_(self.down.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        v = self.down(F.silu(self.gate(h)) * self.up(h))
        return h + v if self.residual else v


class Verbalizers(nn.Module):
    """One VerbFFN per target layer; `head(k, norm, lm_head, vocab)` is the k-th layer's full verbalizer."""

    def __init__(self, hidden_size: int, target_layers: list[int], residual: bool = False, family: str = ""):
        super().__init__()
        self.hidden_size = hidden_size
        self.target_layers = list(target_layers)
        self.residual = residual
        self.family = family
        self.ffns = nn.ModuleList(VerbFFN(hidden_size, residual) for _ in target_layers)

    def __len__(self) -> int:
        return len(self.target_layers)

    def verb_ffn(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """hidden [n, d] -> verb-FFN k's output [n, d]: the trained part of head k, before the frozen norm and head."""
        ffn = self.ffns[k]
        return ffn(h.to(ffn.gate.weight.dtype))

    def head(self, k: int, norm: nn.Module, lm_head: nn.Module, vocab: int):
        """hidden [n, d] -> logits [n, vocab] through verb-FFN k, the frozen final norm and LM head."""
        read = final_head(norm, lm_head, vocab)

        def run(h: torch.Tensor) -> torch.Tensor:
            return read(self.verb_ffn(k, h))

        return run

    def save(self, directory: str | Path, **extra) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS)
        meta = dict(
            family=self.family,
            hidden_size=self.hidden_size,
            target_layers=self.target_layers,
            residual=self.residual,
            **extra,
        )
        (directory / META).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Verbalizers:
        directory = Path(directory)
        if not (directory / META).is_file() or not (directory / WEIGHTS).is_file():
            raise FileNotFoundError(f"{directory}: no verbalizers here (expected {META} and {WEIGHTS})")
        fix = f"train the verbalizers in {directory} again, or give others"
        meta = read_json(directory / META, fix)
        verbalizers = cls(meta["hidden_size"], meta["target_layers"], meta["residual"], meta.get("family", ""))
        verbalizers.load_state_dict(read_safetensors(directory / WEIGHTS, fix))
        return verbalizers


def target_layers(cfg: TrainConfig, parts: Parts, who: str) -> list[int]:
    """The blocks `who`'s verbalizers read (verbalizer.`who`_layers, or by default every verbalizer.stride-th from
    verbalizer.offset: `default_target_layers`); refused unless strictly increasing block indices of the model."""
    explicit = getattr(cfg.verbalizer, f"{who}_layers")
    if explicit is None:
        layers = default_target_layers(parts.num_layers, cfg.verbalizer.stride, cfg.verbalizer.offset)
    else:
        layers = explicit
    num_layers, name = parts.num_layers, f"verbalizer.{who}_layers"
    if not layers:
        raise ValueError(f"{name}: no target layers (the model has {num_layers} decoder blocks)")
    if sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(
            f"{name}: target layers {layers} must be strictly increasing block indices in [0, {num_layers - 1}]"
        )
    return list(layers)


def final_head(norm: nn.Module, lm_head: nn.Module, vocab: int):
    """hidden [n, d] (the last block's output, or a verb-FFN's) -> logits [n, vocab]: the model's own output head."""

    def run(h: torch.Tensor) -> torch.Tensor:
        return lm_head(norm(h.to(norm.weight.dtype)))[..., :vocab]

    return run


def check_verbalizers(
    verbalizers: Verbalizers, parts: Parts, verbalizers_name: str = "the verbalizers", model_name: str = "the model"
) -> None:
    """Verbalizers must come from this model (`parts`; `models.loading.model_outline` gives them without reading a
    weight): same family, hidden size, and target layers within its blocks."""
    family, hidden_size, num_layers = parts.family, parts.hidden_size, parts.num_layers
    fix = f"give the verbalizers trained for {model_name} (`vlsi verbalize --model {model_name}` writes them)"
    if verbalizers.family and verbalizers.family != family:
        raise VerbalizerError(
            f"{verbalizers_name} were trained for a {verbalizers.family} model, but {model_name} is {family}: {fix}"
        )
    if verbalizers.hidden_size != hidden_size:
        raise VerbalizerError(
            f"{verbalizers_name} have hidden size {verbalizers.hidden_size}, but {model_name} has hidden size "
            f"{hidden_size}: {fix}"
        )
    if not verbalizers.target_layers or max(verbalizers.target_layers) >= num_layers:
        raise VerbalizerError(
            f"{verbalizers_name} are for blocks {verbalizers.target_layers}, but {model_name} has {num_layers} "
            f"decoder blocks: {fix}"
        )
