"""Stage 3, supervised fine-tuning (docs/METHOD.md#stage-3-sft): next-token cross-entropy of the student's own
output.

Verbalizers are unused. Also a plain SFT trainer for any supported VLM:

    vlsi sft --model DIR --data train.json --output OUT [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import InteractConfig, SFTConfig, TrainConfig
from ..losses import cross_entropy_from_logits
from ..models.family import Parts, model_parts
from ..models.loading import add_lora, compute_dtype, freeze, load_model, load_processor
from .common import (
    atomic_dir,
    build_loader,
    checkpointing,
    deepspeed_loading,
    drop_checkpoints,
    load_samples,
    split_batch,
    substate,
    tracking,
)
from .loop import MetricsLog, make_accelerator, train


def prepare_student(path: str, dtype: torch.dtype, stage: SFTConfig | InteractConfig, cfg: TrainConfig):
    """Load a student to train: LoRA on the LLM (or the whole LLM), LM head frozen, vision tower frozen by default;
    for the interaction stage the final norm is frozen too."""
    lora = stage.lora
    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 compute); LoRA trains fp32 adapters
    # on a base kept in the compute dtype.
    model = load_model(path, dtype if lora.enabled else torch.float32, cfg.trust_remote_code)
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
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, parts


def save_student(model: nn.Module, processor, directory: Path) -> None:
    """A plain Hugging Face checkpoint (safetensors) with LoRA merged in and the processor beside it."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def export_student(
    accelerator, state: dict, path: str, dtype: torch.dtype, stage, cfg: TrainConfig, processor, directory
):
    """Save a trained student from its full state dict (`train`'s result, keys under the step's `student.`).

    The main process rebuilds the student on the CPU as it was trained (LoRA and all), whole even under ZeRO-3, and
    loads the trained weights, so the checkpoint is the same whether training ran replicated (one process, DDP) or
    sharded (FSDP2, ZeRO-3).
    """
    with deepspeed_loading(accelerator, partition=False):
        model, _ = prepare_student(path, dtype, stage, cfg)
    model.load_state_dict(substate(state, "student"))
    save_student(model, processor, directory)


class SFTStep(nn.Module):
    def __init__(self, model: nn.Module, parts: Parts, vocab: int):
        super().__init__()
        self.student = model
        self.vocab = vocab
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP2 wraps these blocks

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs, mask, targets = split_batch(batch["model"])
        logits = self.student(**inputs, logits_to_keep=mask).logits[:, : self.vocab]  # [N, V]
        return cross_entropy_from_logits(logits, targets), {}


def sft(cfg: TrainConfig, model_path: str, output: Path, metrics: MetricsLog, samples=None) -> Path:
    """Fine-tune `model_path` on the data; save the merged model and its processor to `output`."""
    stage = cfg.sft
    dtype = compute_dtype(cfg.precision)
    accelerator = make_accelerator(stage, dtype, **tracking(cfg))
    processor = load_processor(model_path, cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)
    model, parts = prepare_student(model_path, dtype, stage, cfg)
    vocab = min(len(processor.tokenizer), parts.vocab_rows)
    samples = samples if samples is not None else load_samples(cfg)
    loader = build_loader(cfg, samples, {"model": processor}, stage.batch_size, cfg.seed, "sft")
    state = train(accelerator, SFTStep(model, parts, vocab), loader, stage, "sft", metrics, **checkpointing(cfg, "sft"))
    if accelerator.is_main_process:
        with atomic_dir(output) as tmp:
            export_student(accelerator, state, model_path, dtype, stage, cfg, processor, tmp)
        drop_checkpoints(cfg, "sft")
    accelerator.wait_for_everyone()
    return output
