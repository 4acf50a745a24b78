"""Sample -> model inputs: the processor's tensors plus `labels` that keep only the assistant tokens.

Assistant tokens are found from the chat template itself (rendering the conversation turn by turn), not from
hard-coded role markers, so any processor whose template renders earlier turns unchanged works.
"""

from __future__ import annotations

import difflib

import torch
from torch import Tensor

from vlsi.data.images import load_image
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
    images = [load_image(source) for source in sample.images]
    # One image list per text: LLaVA-OneVision treats a flat list as one image per sample (batch_num_images). The
    # template already wrote the special tokens: no second <bos> (Gemma's tokenizer adds one by default).
    images_arg = [images] if images else None
    inputs = dict(processor(text=[text], images=images_arg, add_special_tokens=False, return_tensors="pt"))
    ids = inputs["input_ids"][0]  # [T]
    if max_length is not None and len(ids) > max_length:
        raise Overlong(sample.id, len(ids), max_length)
    spans = _assistant_spans(sample, processor, text)  # a token is labelled when it overlaps a span
    tokens = processor.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    in_span = [any(start < b and a < end for a, b in spans) for start, end in tokens["offset_mapping"]]
    media = _media_ids(processor)
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


def _media_ids(processor) -> set[int]:
    """Ids of the image/video tokens: the placeholder the template writes and the token the processor repeats
    (the same id for most families; Gemma 3 writes `<start_of_image>` and repeats `<image_soft_token>`)."""
    owners = (processor, processor.tokenizer)
    ids = {getattr(o, f"{kind}_token_id", None) for o in owners for kind in ("image", "video")}
    return {i for i in ids if isinstance(i, int) and i >= 0}


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
    `ids`, where each image/video placeholder became the processor's expansion: a run of `media` tokens, for some
    families wrapped in start / end / tile tokens and newlines (InternVL `<img>` ... `</img>`, Gemma 3
    `\n\n<start_of_image>` ... `<end_of_image>\n\n`, Idefics3 / SmolVLM `<fake_token_around_image><row_1_col_1>` ...),
    whose newlines may merge with the neighbouring text's. Tokens outside the expansions match one to one and keep
    their flag; expansion tokens are never labelled.

    Raises ValueError, naming the sample, when ids and text_ids differ away from an expansion, or when an expansion
    would swallow an assistant token (labels would no longer cover exactly the assistant turns).
    """
    # Common prefix and suffix first (linear): the diff then only runs over the stretch holding the expansions.
    head = 0
    while head < min(len(text_ids), len(ids)) and text_ids[head] == ids[head] and ids[head] not in media:
        head += 1
    tail = 0
    while (
        tail < min(len(text_ids), len(ids)) - head
        and text_ids[-1 - tail] == ids[-1 - tail]
        and ids[-1 - tail] not in media
    ):
        tail += 1
    out = mask[:head] + [False] * (len(ids) - head - tail) + mask[len(mask) - tail :]
    a, b = text_ids[head : len(text_ids) - tail], ids[head : len(ids) - tail]
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            for k in range(i2 - i1):
                out[head + j1 + k] = mask[head + i1 + k] and b[j1 + k] not in media
            continue
        near_media = media & ({*b[max(j1 - 1, 0) : j2 + 1]} | {*a[max(i1 - 1, 0) : i2 + 1]})
        where = f"at token {head + j1} (processor {b[j1 : j1 + 3]} vs tokenizer {a[i1 : i1 + 3]})"
        if not near_media:
            raise ValueError(
                f"sample {sample_id}: the processor's input_ids differ from its tokenizer's {where}, away from any "
                "image/video placeholder; only image/video placeholders may expand"
            )
        if any(mask[head + i1 : head + i2]):
            raise ValueError(
                f"sample {sample_id}: the processor's image/video expansion {where} changes assistant tokens; "
                "put images in user turns, or separate them from the answer text"
            )
    return out
