"""Sample -> model inputs: the processor's tensors plus `labels` that keep only the assistant tokens.

Assistant tokens are found from the chat template itself (rendering the conversation turn by turn), not from
hard-coded role markers, so any processor whose template renders earlier turns unchanged works.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from vlsi.data.records import Sample

IGNORE_INDEX = -100


class Overlong(ValueError):
    """A sample's token count exceeds `max_length`; it is never truncated (that could cut through image tokens)."""

    def __init__(self, sample_id: str, length: int, max_length: int):
        self.sample_id, self.length, self.max_length = sample_id, length, max_length
        super().__init__(f"sample {sample_id}: {length} tokens > data.max_length={max_length}")


def encode(sample: Sample, processor, max_length: int | None = None) -> dict[str, Tensor]:
    """The processor's tensors for `sample` (input_ids [1, T], attention_mask [1, T], pixel_values, ...) and
    labels [1, T]: the token id on assistant tokens (content and end-of-turn token), IGNORE_INDEX elsewhere.

    Raises Overlong when T > max_length.
    """
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    images = [_rgb(path) for path in sample.images]
    # One image list per text: LLaVA-OneVision treats a flat list as one image per sample (batch_num_images).
    inputs = dict(processor(text=[text], images=[images] if images else None, return_tensors="pt"))
    ids = inputs["input_ids"][0]  # [T]
    if max_length is not None and len(ids) > max_length:
        raise Overlong(sample.id, len(ids), max_length)
    spans = _assistant_spans(sample, processor, text)  # a token is labelled when it overlaps a span
    tokens = processor.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    in_span = [any(start < b and a < end for a, b in spans) for start, end in tokens["offset_mapping"]]
    media = {getattr(processor, name, None) for name in ("image_token_id", "video_token_id")} - {None}
    mask = _expand(in_span, tokens["input_ids"], ids.tolist(), media, sample.id)
    inputs["labels"] = torch.where(torch.tensor(mask)[None], inputs["input_ids"], IGNORE_INDEX)  # [1, T]
    return inputs


def response_positions(labels: Tensor) -> Tensor:
    """[B, T] bool, True at t when labels[:, t + 1] is a response token.

    These are the positions whose logits predict a response token: where the distillation losses compare teacher
    and student. The last column is always False (there is no next token).
    """
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def _rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _assistant_spans(sample: Sample, processor, text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of every assistant turn in the rendered `text`: the turn's content and its
    end-of-turn token, without the role header (generation prompt) or the whitespace after it."""
    spans = []
    for k, message in enumerate(sample.messages):
        if message["role"] != "assistant":
            continue
        prefix = processor.apply_chat_template(sample.messages[:k], tokenize=False, add_generation_prompt=True)
        with_turn = processor.apply_chat_template(sample.messages[: k + 1], tokenize=False).rstrip()
        if not (with_turn.startswith(prefix) and text.startswith(with_turn)):
            raise ValueError(
                f"sample {sample.id}: the chat template of {type(processor).__name__} renders the first {k} turns "
                f"(plus generation prompt) or {k + 1} turns differently from the start of the whole conversation, "
                "so assistant tokens cannot be located; use a template that leaves earlier turns unchanged"
            )
        spans.append((len(prefix), len(with_turn)))
    return spans


def _expand(mask: list[bool], text_ids: list[int], ids: list[int], media: set[int], sample_id: str) -> list[bool]:
    """Carry `mask` (one flag per token of the template text tokenized alone, `text_ids`) over to the processor's
    `ids`, where each image/video placeholder became a run of the same token; those runs are never labelled."""
    out, i, j = [], 0, 0
    while i < len(text_ids) and j < len(ids) and text_ids[i] == ids[j]:
        if ids[j] in media:
            token = ids[j]
            while i < len(text_ids) and text_ids[i] == token:
                i += 1
            while j < len(ids) and ids[j] == token:
                out.append(False)
                j += 1
        else:
            out.append(mask[i])
            i, j = i + 1, j + 1
    if i < len(text_ids) or j < len(ids):
        raise ValueError(
            f"sample {sample_id}: the processor's input_ids differ from its tokenizer's at token {j} "
            f"(processor {ids[j : j + 3]} vs tokenizer {text_ids[i : i + 3]}); only image/video placeholders may expand"
        )
    return out
