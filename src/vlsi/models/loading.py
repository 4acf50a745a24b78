"""Loading teacher / student VLMs and processors, the shared-vocabulary check, LoRA and freezing."""

from __future__ import annotations

import re

import torch
from torch import nn

from .family import Parts


class ModelError(ValueError):
    """A model that cannot be used: the message names it and the fix."""


def compute_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def load_processor(path: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load a processor from '{path}': {str(e).splitlines()[0]} "
            "(give a local model directory, or a hub id on a machine that can reach the hub)"
        ) from None


def load_model(path: str, dtype: torch.dtype, trust_remote_code: bool = False, empty: bool = False) -> nn.Module:
    """The model in `path`; with `empty`, its architecture only, on the meta device (no weights read or allocated)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        if empty:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                return AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a vision-language model from '{path}': {str(e).splitlines()[0]}") from None


def check_same_vocabulary(teacher_processor, student_processor, teacher: str, student: str) -> None:
    """Teacher and student must give the same ids to the same tokens
    (docs/METHOD.md#models-and-the-shared-vocabulary); sizes alone are not enough."""
    t_vocab = teacher_processor.tokenizer.get_vocab()
    s_vocab = student_processor.tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return
    differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])
    token, _ = differing[0]
    raise ModelError(
        f"teacher '{teacher}' and student '{student}' have different tokenizers ({len(t_vocab)} vs {len(s_vocab)} "
        f"tokens; e.g. {token!r} is {t_vocab.get(token)} vs {s_vocab.get(token)}): VLsI compares next-token "
        "distributions, so both models must share one vocabulary; pick a student of the teacher's family"
    )


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def add_lora(model: nn.Module, parts: Parts, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap `model` with LoRA adapters on the language model's linear layers only (never the vision tower)."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(re.escape(m) for m in target_modules)
    pattern = rf"{re.escape(parts.language_model_path)}\..*\.({names})"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    return get_peft_model(model, config)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
