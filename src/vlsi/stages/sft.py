"""Stage 3, supervised fine-tuning (docs/METHOD.md#stage-3-sft): next-token cross-entropy of the student's own
output.

Verbalizers are unused. Also a plain SFT trainer for any supported VLM:

    vlsi sft --model DIR --data train.json --output OUT [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..card import CARD
from ..config import TrainConfig
from ..data import split_batch
from ..losses import cross_entropy_from_logits
from ..models.family import Parts
from ..models.loading import compute_dtype, load_processor
from .loop import MetricsLog, Run, checkpointing, make_accelerator, tracking, train
from .output import substate, write_output
from .samples import build_loader, load_samples
from .student import StudentRecipe, export_student, prepare_student


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


def setup(cfg: TrainConfig, model_path: str, samples=None) -> Run:
    """The model prepared to train (LoRA by default), the step module and the data loader."""
    dtype = compute_dtype(cfg.precision)
    accelerator = make_accelerator(cfg.sft, dtype, **tracking(cfg))
    processor = load_processor(model_path, cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)
    model, parts = prepare_student(StudentRecipe.of(model_path, dtype, cfg.sft, cfg))
    vocab = min(len(processor.tokenizer), parts.vocab_rows)
    samples = samples if samples is not None else load_samples(cfg)
    loader = build_loader(cfg, samples, {"model": processor}, cfg.sft.batch_size, cfg.seed, "sft")
    return Run(accelerator, SFTStep(model, parts, vocab), loader, dtype, processor)


def save(cfg: TrainConfig, model_path: str, output: Path, run: Run, state: dict | None, card=None) -> Path:
    """The fine-tuned model (LoRA merged), its processor and its model card (`card`, a `huggingface_hub.ModelCard`,
    when given) in `output` (`state`: the main process's gathered one)."""

    def write(folder: Path) -> None:
        weights = substate(state, "student")
        recipe = StudentRecipe.of(model_path, run.dtype, cfg.sft, cfg)
        export_student(run.accelerator, recipe, weights, run.processor, folder)
        if card is not None:
            card.save(folder / CARD)

    return write_output(cfg, run, "sft", output, write)


def sft(cfg: TrainConfig, model_path: str, output: Path, metrics: MetricsLog, samples=None, card=None) -> Path:
    """Fine-tune `model_path` on the data; save the merged model, its processor and `card` to `output`."""
    run = setup(cfg, model_path, samples)
    state = train(run.accelerator, run.step, run.loader, cfg.sft, "sft", metrics, **checkpointing(cfg, "sft"))
    return save(cfg, model_path, output, run, state, card)
