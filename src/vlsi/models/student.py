"""The student as every stage saves it: a plain Hugging Face checkpoint (the training policy that prepares it is
`vlsi.stages.student`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def save_student(model: nn.Module, processor, directory: Path) -> None:
    """A plain Hugging Face checkpoint (safetensors) with LoRA merged in and the processor beside it."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
