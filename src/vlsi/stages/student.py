"""The student as every stage trains it: loaded with LoRA or fully trainable, with the parts the method keeps frozen
frozen (docs/METHOD.md#what-trains-in-stage-2), and rebuilt whole on the main process to be saved
(`vlsi.models.student.save_student`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import InteractConfig, SFTConfig, TrainConfig
from ..distributed import deepspeed_loading
from ..models.family import model_parts
from ..models.loading import add_lora, freeze, load_model
from ..models.student import save_student


@dataclass(frozen=True)
class StudentRecipe:
    """How a stage builds its student: the checkpoint it starts from, the compute dtype, the stage's settings (LoRA,
    freeze_vision; the interaction stage's also freeze the final norm) and the run's model options."""

    path: str
    dtype: torch.dtype
    stage: SFTConfig | InteractConfig
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    @classmethod
    def of(cls, path: str, dtype: torch.dtype, stage: SFTConfig | InteractConfig, cfg: TrainConfig) -> StudentRecipe:
        return cls(path, dtype, stage, cfg.trust_remote_code, cfg.gradient_checkpointing)


def prepare_student(recipe: StudentRecipe):
    """Load a student to train: LoRA on the LLM (or the whole LLM), LM head frozen, vision tower frozen by default;
    for the interaction stage the final norm is frozen too."""
    path, dtype, stage = recipe.path, recipe.dtype, recipe.stage
    lora = stage.lora
    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 compute); LoRA trains fp32 adapters
    # on a base kept in the compute dtype.
    model = load_model(path, dtype if lora.enabled else torch.float32, recipe.trust_remote_code)
    parts = model_parts(model)
    if lora.enabled:
        freeze(model)
        model = add_lora(model, parts, lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.experts)
    freeze(parts.lm_head)
    if isinstance(stage, InteractConfig):
        # Interaction: every verbalizer head is lm_head(norm(verb_ffn(h))) with the norm and LM head frozen and
        # shared (docs/METHOD.md#the-verbalizer, #what-trains-in-stage-2); under full fine-tuning the layer terms
        # would otherwise train the norm. LoRA has frozen it already. SFT is plain SFT of the model's own output
        # (verbalizers unused): its norm trains under full fine-tuning like any other LLM weight.
        freeze(parts.norm)
    if stage.freeze_vision:
        for module in parts.vision:
            freeze(module) if isinstance(module, nn.Module) else module.requires_grad_(False)
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, parts


def export_student(accelerator, recipe: StudentRecipe, weights: dict, processor, directory) -> None:
    """Save a trained student, built by `recipe`, from its whole state dict `weights` (`train`'s result under the step's
    `student.`), with `processor` beside it in `directory`.

    The main process rebuilds the student on the CPU as it was trained (LoRA and all), whole even under ZeRO-3, and
    loads the trained weights, so the checkpoint is the same whether training ran replicated (one process, DDP) or
    sharded (FSDP2, ZeRO-3).
    """
    with deepspeed_loading(accelerator, partition=False):
        model, _ = prepare_student(recipe)
    model.load_state_dict(weights)
    save_student(model, processor, directory)
