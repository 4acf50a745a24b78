"""Where each VLM family keeps its decoder layers, final norm, LM head and vision tower, and which of its weights
LoRA adapts by default.

One row per family. Any other `AutoModelForImageTextToText` whose `get_decoder()` has `.layers` and `.norm` and whose
`get_output_embeddings()` is the LM head works through the generic row; a model without them (BLIP-2, Kosmos-2, GIT,
Pix2Struct, ...) is refused with one line saying what is missing.

Image tokens need no row: `vlsi.data.encode` reads the placeholder and image-token ids from the processor and accepts
any expansion around them (wrapper, tile and newline tokens), never labelled.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Qwen3.5's Gated DeltaNet (linear attention) blocks: fused q/k/v, output gate z, per-head beta / decay, output
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


@dataclass(frozen=True)
class Family:
    layers: str  # dotted paths from the *ForConditionalGeneration model
    norm: str
    lm_head: str
    vision: tuple[str, ...]  # vision tower, projector and other vision-only weights: frozen with freeze_vision=true
    language_model: str  # LoRA targets are restricted to modules under this path
    lora_targets: tuple[str, ...] = ATTENTION + MLP  # nn.Linear names LoRA wraps by default (lora.target_modules)
    # MoE expert weights stored as 3-D parameters [experts, ...], which target_modules cannot reach: adapted through
    # peft's target_parameters with lora.experts=true (docs/CONFIG.md#lora-and-moe-experts)
    experts: tuple[str, ...] = ()


_QWEN_VL = Family(
    layers="model.language_model.layers",
    norm="model.language_model.norm",
    lm_head="lm_head",
    vision=("model.visual",),  # the ViT, its patch merger and (Qwen3) the DeepStack mergers
    language_model="model.language_model",
)
_LLAVA_LIKE = Family(  # vision_tower -> multi_modal_projector -> language_model
    layers="model.language_model.layers",
    norm="model.language_model.norm",
    lm_head="lm_head",
    vision=("model.vision_tower", "model.multi_modal_projector"),
    language_model="model.language_model",
)
_IDEFICS3 = Family(
    layers="model.text_model.layers",
    norm="model.text_model.norm",
    lm_head="lm_head",
    vision=("model.vision_model", "model.connector"),
    language_model="model.text_model",
)
FAMILIES = {
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "qwen3_vl": _QWEN_VL,
    # Experts are 3-D parameters; the router (mlp.gate) is never adapted; MLP names reach dense `mlp_only_layers`.
    "qwen3_vl_moe": replace(_QWEN_VL, experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    # Linear-attention blocks alternate with full-attention ones: LoRA reaches both kinds.
    "qwen3_5": replace(_QWEN_VL, lora_targets=ATTENTION + LINEAR_ATTENTION + MLP),
    # Qwen3.5-MoE: the same, with 3-D experts beside a shared expert (gate/up/down_proj) and its gate (not adapted)
    "qwen3_5_moe": replace(
        _QWEN_VL,
        lora_targets=ATTENTION + LINEAR_ATTENTION + MLP,
        experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
    # GLM fuses the MLP's gate and up projections into one nn.Linear.
    "glm4v": replace(_QWEN_VL, lora_targets=ATTENTION + ("gate_up_proj", "down_proj")),
    "llava_onevision": replace(_LLAVA_LIKE, vision=_LLAVA_LIKE.vision + ("model.image_newline",)),
    "internvl": _LLAVA_LIKE,
    "gemma3": _LLAVA_LIKE,
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
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
    lora_targets: tuple[str, ...] = ATTENTION + MLP
    experts: tuple[str, ...] = ()

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
    """Find decoder layers, final norm, LM head and vision modules of `model` via the family table.

    Raises ValueError, one line naming the model type and what is missing, for an architecture vlsi cannot use."""
    family = getattr(model.config, "model_type", "")
    row = FAMILIES.get(family)
    if row is not None:
        names = {"decoder layers": row.layers, "final norm": row.norm, "LM head": row.lm_head}
        found = {what: _get(model, path) for what, path in names.items()}
        vision = [m for m in (_get(model, p) for p in row.vision) if m is not None]
        lm_path, targets, experts = row.language_model, row.lora_targets, row.experts
    else:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {"decoder layers": "get_decoder().layers", "final norm": "get_decoder().norm"}
        names["LM head"] = "get_output_embeddings()"
        found = {
            "decoder layers": getattr(decoder, "layers", None),
            "final norm": getattr(decoder, "norm", None),
            "LM head": head,
        }
        inner = getattr(model, "model", model)
        vision = [m for n in ("visual", "vision_tower", "vision_model") if (m := getattr(inner, n, None)) is not None]
        lm_path = next((n for n, m in model.named_modules() if m is decoder), "")
        targets, experts = ATTENTION + MLP, ()
    missing = [f"{what} ({names[what]})" for what, part in found.items() if part is None]
    if missing:
        raise ValueError(
            f"model type '{family}' ({type(model).__name__}) is not supported: vlsi finds no {', '.join(missing)}; "
            f"supported: {', '.join(FAMILIES)}, or any decoder with .layers and .norm (to add this architecture, "
            "give it a row in vlsi.models.family.FAMILIES with the dotted paths of its decoder layers, final norm, "
            "LM head and vision modules)"
        )
    return Parts(family or "generic", *found.values(), vision, lm_path, targets, experts)


def default_target_layers(num_layers: int, stride: int = 4, offset: int = 2) -> list[int]:
    """Blocks offset, offset+stride, ... below the last block (docs/METHOD.md#target-layers: 28 -> [2, 6, ..., 26],
    80 -> 20 layers)."""
    return list(range(offset, num_layers - 1, stride))


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
