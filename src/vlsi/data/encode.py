"""Sample -> model inputs: the processor's tensors plus `labels` that keep only the assistant tokens.

Assistant tokens are found from the chat template itself (rendering the conversation turn by turn), not from
hard-coded role markers, so any processor whose template renders earlier turns unchanged works.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import torch
from jinja2.exceptions import TemplateError
from torch import Tensor

from vlsi.data.images import load_image
from vlsi.data.records import Sample, is_labelled

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("refuse", "text")  # data.special_tokens: what a special token's string in a record's text does


class Unencodable(ValueError):
    """A sample the processor cannot encode as it is (a special token's string in its text, a chat template that
    rejects the conversation, an image outside the processor's limits): the record is bad, not the run."""

    def __init__(self, sample_id: str, reason: str):
        self.sample_id, self.reason = sample_id, reason
        super().__init__(f"sample {sample_id}: {reason}")


class Overlong(ValueError):
    """A sample's token count exceeds `max_length`; it is never truncated (that could cut through image tokens)."""

    def __init__(self, sample_id: str, length: int, max_length: int):
        self.sample_id, self.length, self.max_length = sample_id, length, max_length
        super().__init__(f"sample {sample_id}: {length} tokens > data.max_length={max_length}")


def encode(
    sample: Sample, processor, max_length: int | None = None, special_tokens: str = "refuse"
) -> dict[str, Tensor]:
    """The processor's tensors for `sample` (input_ids [1, T], attention_mask [1, T], pixel_values, ...) and
    labels [1, T]: the token id on assistant tokens (content and end-of-turn token), IGNORE_INDEX elsewhere.

    A special token's string in the record's text (`<|im_end|>`, the processor's image token, ...): Unencodable with
    `special_tokens="refuse"`; with "text" it is encoded as the plain text it is. Raises Overlong when
    T > max_length, Unencodable when the chat template or the processor rejects the sample.
    """
    found = special_strings(sample, special_pattern(processor))
    if found and special_tokens == "refuse":
        raise Unencodable(sample.id, special_reason(found))
    if found:
        return _encode_as_text(sample, processor, max_length, found)
    return _encode(sample, processor, max_length)


def _encode(sample: Sample, processor, max_length: int | None) -> dict[str, Tensor]:
    text = render(processor, sample.messages, sample.id)
    images = [load_image(source) for source in sample.images]
    # One image list per text: LLaVA-OneVision treats a flat list as one image per sample (batch_num_images). The
    # template already wrote the special tokens: no second <bos> (Gemma's tokenizer adds one by default).
    images_arg = [images] if images else None
    try:
        inputs = dict(processor(text=[text], images=images_arg, add_special_tokens=False, return_tensors="pt"))
    except ValueError as error:  # e.g. Qwen2-VL: "absolute aspect ratio must be smaller than 200"
        raise Unencodable(sample.id, refusal(error)) from None
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


def _encode_as_text(sample: Sample, processor, max_length: int | None, found: dict[str, int]) -> dict[str, Tensor]:
    """`encode` of a sample whose text holds special tokens' strings (`found`), each encoded as the plain text it is:
    the tokens `tokenizer(string, split_special_tokens=True)` gives, labelled when their turn is. A special token
    that the template, the processor and the sample leave alone (the sentinel) stands in for every such string while
    the sample is encoded; its k-th occurrence is then replaced by the k-th string's plain tokens (templates write
    the turns and their items in order), in every per-token tensor."""
    tokenizer = processor.tokenizer
    rendered = render(processor, sample.messages, sample.id)
    reserved = {v for k, v in vars(processor).items() if k.endswith("_token") and isinstance(v, str)}
    media = _media_ids(processor)
    # tried first: the tokenizer's own tokens, the least likely in an image expansion (Idefics3's holds <global-img>)
    named = [getattr(tokenizer, f"{kind}_token") for kind in ("pad", "unk", "bos", "eos")]
    free = [
        t
        for t in dict.fromkeys([*named, *reversed(special_tokens_of(processor))])
        if t and t not in rendered and t not in reserved and tokenizer.convert_tokens_to_ids(t) not in media
    ]
    pattern = re.compile("|".join(re.escape(t) for t in found))  # `found` is longest first
    strings = [s for text in _texts(sample.messages) for s in pattern.findall(text)]
    for sentinel in free:
        messages = [
            {**m, "content": [{**c, "text": pattern.sub(sentinel, c["text"])} if c["type"] == "text" else c
                              for c in m["content"]]}
            for m in sample.messages
        ]  # fmt: skip
        inputs = _encode(dataclasses.replace(sample, messages=messages), processor, None)
        ids = inputs["input_ids"][0].tolist()  # [T]
        token = tokenizer.convert_tokens_to_ids(sentinel)
        if ids.count(token) == len(strings):  # else the processor's expansions hold it too, or the template moved text
            break
    else:
        raise Unencodable(sample.id, f"{special_reason(found)}: no unused special token can stand in for it")
    plain = iter(tokenizer(strings, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    pieces = [next(plain) if t == token else [t] for t in ids]
    repeats = torch.tensor([len(piece) for piece in pieces])  # [T]
    spliced = torch.tensor([t for piece in pieces for t in piece])[None]  # [1, T']
    labelled = (inputs["labels"][0] != IGNORE_INDEX).repeat_interleave(repeats)[None]
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):  # per token; the sentinel is text
        if key in inputs:
            inputs[key] = inputs[key][0].repeat_interleave(repeats)[None]
    inputs["input_ids"], inputs["labels"] = spliced, torch.where(labelled, spliced, IGNORE_INDEX)
    if max_length is not None and spliced.shape[1] > max_length:
        raise Overlong(sample.id, spliced.shape[1], max_length)
    return inputs


def response_positions(labels: Tensor) -> Tensor:
    """[B, T] bool, True at t when labels[:, t + 1] is a response token.

    These are the positions whose logits predict a response token: where the distillation losses compare teacher
    and student. The last column is always False (there is no next token).
    """
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def render(processor, messages: list[dict], sample_id: str, generation_prompt: bool = False) -> str:
    """The chat template's text; Unencodable when the template raises (Gemma's and Mistral's reject two user turns
    in a row)."""
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as error:
        raise Unencodable(sample_id, refusal(error)) from None


def refusal(error: Exception) -> str:
    """One line saying why the template or the processor rejects a sample."""
    if isinstance(error, Unencodable):
        return error.reason
    if isinstance(error, TemplateError):
        what = "the chat template rejects the conversation"
    else:
        what = "an image cannot be read" if isinstance(error, OSError) else "the processor refuses it"
    return f"{what} ({type(error).__name__}: {' '.join(str(error).split())})"


def special_tokens_of(processor) -> list[str]:
    """The strings the tokenizer turns into special tokens, and the processor's image / video tokens, longest
    first (so that `<|im_start|>` is found before `<|im`)."""
    tokenizer = processor.tokenizer
    found = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    found |= set(tokenizer.all_special_tokens)
    found |= {getattr(processor, f"{kind}_token", None) for kind in ("image", "video")} - {None}
    return sorted((t for t in found if t), key=lambda t: (-len(t), t))


def special_pattern(processor) -> re.Pattern:
    """A regex matching any of `special_tokens_of(processor)` (build it once per processor: it costs ~0.3 ms)."""
    tokens = special_tokens_of(processor)
    return re.compile("|".join(re.escape(t) for t in tokens) if tokens else "(?!)")  # (?!) never matches


def special_strings(sample: Sample, pattern: re.Pattern) -> dict[str, int]:
    """{special token string: first turn} of those `pattern` (`special_pattern`) finds in the sample's text items."""
    found: dict[str, int] = {}
    for i, message in enumerate(sample.messages):
        for text in _texts([message]):
            for match in pattern.finditer(text):
                found.setdefault(match.group(), i)
    return found


def _texts(messages: list[dict]) -> list[str]:
    return [item["text"] for message in messages for item in message["content"] if item["type"] == "text"]


def special_reason(found: dict[str, int]) -> str:
    tokens = ", ".join(f"{token!r} (turn {turn})" for token, turn in found.items())
    return (
        f"special token text {tokens}: it would be read as a control token, not as the text it is; remove it, or set "
        "data.special_tokens=text to encode it as plain text"
    )


def _media_ids(processor) -> set[int]:
    """Ids of the image/video tokens: the placeholder the template writes and the token the processor repeats
    (the same id for most families; Gemma 3 writes `<start_of_image>` and repeats `<image_soft_token>`)."""
    owners = (processor, processor.tokenizer)
    ids = {getattr(o, f"{kind}_token_id", None) for o in owners for kind in ("image", "video")}
    return {i for i in ids if isinstance(i, int) and i >= 0}


def _assistant_spans(sample: Sample, processor, text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of every labelled assistant turn (not weighted out: `records.is_labelled`) in
    the rendered `text`: the turn's content and its end-of-turn token, without the role header (generation prompt)
    or the whitespace after it."""
    spans = []
    for k, message in enumerate(sample.messages):
        if not is_labelled(message):
            continue
        prefix = render(processor, sample.messages[:k], sample.id, generation_prompt=True)
        with_turn = render(processor, sample.messages[: k + 1], sample.id).rstrip()
        if not (with_turn.startswith(prefix) and text.startswith(with_turn)):
            raise Unencodable(
                sample.id,
                f"the chat template of {type(processor).__name__} renders the first {k} turns (plus generation "
                f"prompt) or {k + 1} turns differently from the start of the whole conversation, so assistant "
                "tokens cannot be located; use a template that leaves earlier turns unchanged",
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
            raise Unencodable(
                sample_id,
                f"the processor's input_ids differ from its tokenizer's {where}, away from any image/video "
                "placeholder; only image/video placeholders may expand",
            )
        if any(mask[head + i1 : head + i2]):
            raise Unencodable(
                sample_id,
                f"the processor's image/video expansion {where} changes assistant tokens; put images in user "
                "turns, or separate them from the answer text",
            )
    return out
