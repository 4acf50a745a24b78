"""Where each VLM family keeps its decoder layers, final norm, LM head and vision tower.

One row per family; any other `AutoModelForImageTextToText` whose `get_decoder()` has `.layers` and `.norm`
and whose `get_output_embeddings()` is the LM head works through the generic row.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    layers: str  # dotted paths from the *ForConditionalGeneration model
    norm: str
    lm_head: str
    vision: tuple[str, ...]  # frozen with freeze_vision=true
    language_model: str  # LoRA targets are restricted to modules under this path


_QWEN_VL = Family(
    layers="model.language_model.layers",
    norm="model.language_model.norm",
    lm_head="lm_head",
    vision=("model.visual",),
    language_model="model.language_model",
)
FAMILIES = {
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "llava_onevision": Family(
        layers="model.language_model.layers",
        norm="model.language_model.norm",
        lm_head="lm_head",
        vision=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
        language_model="model.language_model",
    ),
}


@dataclass
class Parts:
    """The pieces of one VLM that VLsI touches (references into the model, not copies)."""

    family: str
    layers: nn.ModuleList  # decoder blocks, in order
    norm: nn.Module  # final RMSNorm
    lm_head: nn.Linear
    vision: list[nn.Module | nn.Parameter]
    language_model_path: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return _full_shape(self.lm_head.weight)[1]

    @property
    def vocab_rows(self) -> int:
        return _full_shape(self.lm_head.weight)[0]


def _full_shape(param: nn.Parameter) -> torch.Size:
    """A weight's whole shape, also when DeepSpeed ZeRO-3 has partitioned it (its data is then an empty tensor)."""
    return getattr(param, "ds_shape", param.shape)


def _get(model: nn.Module, path: str):
    obj = model
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def model_parts(model: nn.Module) -> Parts:
    """Find decoder layers, final norm, LM head and vision modules of `model` via the family table."""
    family = getattr(model.config, "model_type", "")
    row = FAMILIES.get(family)
    if row is not None:
        parts = [_get(model, p) for p in (row.layers, row.norm, row.lm_head)]
        vision = [m for m in (_get(model, p) for p in row.vision) if m is not None]
        lm_path = row.language_model
    else:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        parts = [getattr(decoder, "layers", None), getattr(decoder, "norm", None), model.get_output_embeddings()]
        vision = [m for m in (getattr(model.model, n, None) for n in ("visual", "vision_tower")) if m is not None]
        lm_path = next((n for n, m in model.named_modules() if m is decoder), "")
    if any(p is None for p in parts):
        raise ValueError(
            f"model type '{family}' ({type(model).__name__}) has no decoder layers / final norm / LM head where "
            f"vlsi looks; supported: {', '.join(FAMILIES)} (add a row to vlsi.models.family.FAMILIES)"
        )
    layers, norm, lm_head = parts
    return Parts(family or "generic", layers, norm, lm_head, vision, lm_path)


def default_target_layers(num_layers: int, stride: int = 4, offset: int = 2) -> list[int]:
    """Blocks offset, offset+stride, ... below the last block (docs/METHOD.md#target-layers: 28 -> [2, 6, ..., 26],
    80 -> 20 layers)."""
    return list(range(offset, num_layers - 1, stride))


def check_target_layers(layers: list[int], num_layers: int, who: str) -> list[int]:
    if not layers:
        raise ValueError(f"{who}: no target layers (the model has {num_layers} decoder blocks)")
    if sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(
            f"{who}: target layers {layers} must be strictly increasing block indices in [0, {num_layers - 1}]"
        )
    return list(layers)


@contextmanager
def capture(layers: nn.ModuleList, indices: list[int]):
    """Record the output hidden states [B, T, d] of the chosen decoder blocks during a forward pass."""
    states: dict[int, torch.Tensor] = {}

    def hook(index):
        def record(_module, _inputs, output):
            states[index] = output if isinstance(output, torch.Tensor) else output[0]

        return record

    handles = [layers[i].register_forward_hook(hook(i)) for i in indices]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
