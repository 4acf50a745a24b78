"""Batch `{name: encoded sample}` items into `{name: batched tensors}`, for any processor family."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from vlsi.data.encode import IGNORE_INDEX, response_positions

# Per-token keys [1, T], right-padded to the longest (input_ids with the tokenizer's pad id); every other key is
# per image / per sample and concatenated along dim 0.
SEQUENCE_PAD = {"attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0, "token_type_ids": 0}


def collate(batch: list[dict[str, dict[str, Tensor]]], pad_token_id: dict[str, int]) -> dict[str, dict[str, Tensor]]:
    """Right-pad the sequence keys to [B, T_max]; concatenate the others along dim 0 (pixel_values,
    image_grid_thw, image_sizes, ...), zero-padding differing trailing dims first (e.g. LLaVA-OneVision's
    [n_img, n_crops, 3, H, W] with different n_crops). Keys absent from a sample (text-only: no image keys)
    are taken from the samples that have them."""
    return {name: _collate_model([item[name] for item in batch], pad_token_id[name]) for name in batch[0]}


def make_collate(processors: dict) -> functools.partial:
    """`collate` bound to each processor's pad token id, for DataLoader(collate_fn=...)."""
    pad_token_id = {name: processor.tokenizer.pad_token_id for name, processor in processors.items()}
    missing = [name for name, pad in pad_token_id.items() if pad is None]
    if missing:
        raise ValueError(f"the tokenizers of {missing} have no pad token; set tokenizer.pad_token before training")
    return functools.partial(collate, pad_token_id=pad_token_id)


def _collate_model(encoded: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    pad_values = {"input_ids": pad_id, **SEQUENCE_PAD}
    keys = dict.fromkeys(key for sample in encoded for key in sample)  # union, in first-seen order
    batch = {}
    for key in keys:
        tensors = [sample[key] for sample in encoded if key in sample]
        if key in pad_values:
            if len(tensors) < len(encoded):
                raise ValueError(f"collate: '{key}' is missing from some samples of the batch")
            batch[key] = _right_pad(tensors, pad_values[key])
        else:
            batch[key] = torch.cat(_zero_pad_trailing(tensors, key))
    return batch


def _right_pad(rows: list[Tensor], value: int) -> Tensor:
    """[1, T_i] each -> [B, max T_i]."""
    longest = max(row.shape[1] for row in rows)
    return torch.cat([F.pad(row, (0, longest - row.shape[1]), value=value) for row in rows])


def _zero_pad_trailing(tensors: list[Tensor], key: str) -> list[Tensor]:
    """Zero-pad every dim but the first to the largest size among `tensors`, so they concatenate along dim 0."""
    if len({t.dim() for t in tensors}) > 1:
        raise ValueError(f"collate: '{key}' has different numbers of dims across samples: {[t.shape for t in tensors]}")
    sizes = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=True)]
    padded = []
    for t in tensors:  # F.pad takes (left, right) pairs from the last dim backwards
        missing = [size - dim for size, dim in zip(sizes, t.shape[1:], strict=True)]
        padded.append(F.pad(t, [p for n in reversed(missing) for p in (0, n)]))
    return padded


def split_batch(batch: dict[str, Tensor]):
    """-> (model inputs, response mask [B, T], next-token targets [N]) for one model's encoded batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    mask = response_positions(labels)  # [B, T]: positions whose next token is a response token
    targets = labels.roll(-1, dims=1)[mask]  # [N]
    return inputs, mask, targets
