"""On-policy micro-batches of the interaction stage (docs/METHOD.md#on-policy-distillation): the student samples its
own response to each prompt, and the batch is rebuilt around it for the student and the teacher alike, so that the
step's losses are taken on the student's own tokens, teacher-forced, labels masked to them.

  prompt   = a row's tokens before its last answer's first token (the template's role header included)
  response = the student's sample, up to and with its first end token, or interact.sample.max_new_tokens tokens
             (capped: kept as it is)
  row      = prompt + response, labels on the response only; a row whose sample ends at once (empty) keeps its
             fixed response

Which micro-batches are on-policy (share interact.on_policy) and each sampling's seed come from one generator that
every process holds alike (seeded with `seed`, saved in checkpoints): at every micro-step all processes take the
same kind of batch and log the same metrics, and each samples its own prompts (seed + its process index).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ..config import InteractConfig
from ..data.collate import SEQUENCE_PAD
from ..data.encode import IGNORE_INDEX


def special_tokens(tokenizer, ends: set[int]) -> list[int]:
    """The tokenizer's special tokens but the end tokens, which a sampled response never draws: one of the processor's
    image or video placeholders in a response has the model expect image features it was not given (a crash), and
    the rest (role headers, vision delimiters) are the template's, not an answer's."""
    return sorted({i for i, token in tokenizer.added_tokens_decoder.items() if token.special} - ends)


def end_tokens(model, tokenizer) -> set[int]:
    """The ids that end a response: the model's `generation_config.eos_token_id`, else the tokenizer's end token."""
    ends = model.generation_config.eos_token_id
    return set(ends if isinstance(ends, list) else [tokenizer.eos_token_id if ends is None else ends])


def answer_start(labels: Tensor) -> int:
    """Where a row's last answer begins: the first token of the last run of labelled tokens in labels [T]."""
    labelled = labels != IGNORE_INDEX
    starts = (labelled & ~F.pad(labelled, (1, 0))[:-1]).nonzero()  # [runs, 1]
    if len(starts) == 0:
        raise ValueError("an on-policy row has no response tokens: nothing marks where its prompt ends")
    return int(starts[-1])


def _per_token(encoded: dict) -> list[str]:
    """input_ids and the other per-token keys an encoded batch holds (labels apart), in its order."""
    return [key for key in encoded if key == "input_ids" or (key in SEQUENCE_PAD and key != "labels")]


def prompts(encoded: dict, pad_id: int) -> dict:
    """One model's encoded batch cut to its rows' prompts and left-padded, as `vlsi eval` feeds `generate`: every row's
    last prompt token in the last column, so the new tokens of all rows start at the same column. Per-image tensors
    (pixel_values, image_grid_thw, ...) as they are: the images lie in the prompts."""
    starts = [answer_start(row) for row in encoded["labels"]]
    longest = max(starts)
    inputs = {key: value for key, value in encoded.items() if key not in SEQUENCE_PAD and key != "input_ids"}
    for key in _per_token(encoded):
        fill = pad_id if key == "input_ids" else 0  # attention_mask 0 on the padding
        rows = [F.pad(row[:start], (longest - start, 0), value=fill) for row, start in zip(encoded[key], starts)]
        inputs[key] = torch.stack(rows)
    return inputs


@dataclasses.dataclass
class Responses:
    """The student's samples for a batch's rows: ids [n] up to and with the first end token (None: the sample ended
    at once), the tokens before the end, and whether the sample hit the length cap without ending."""

    tokens: list[Tensor | None]
    lengths: list[int]
    capped: list[bool]


def cut(new_tokens: Tensor, ends: set[int]) -> Responses:
    """`generate`'s new tokens [B, n] (rows that ended early padded after their end) -> each row's response."""
    tokens, lengths, capped = [], [], []
    for row in new_tokens:
        at = next((k for k, token in enumerate(row.tolist()) if token in ends), None)  # the first end token
        tokens.append(row if at is None else row[: at + 1] if at > 0 else None)
        lengths.append(len(row) if at is None else at)
        capped.append(at is None)
    return Responses(tokens, lengths, capped)


def with_responses(encoded: dict, responses: list[Tensor | None], pad_id: int) -> dict:
    """One model's encoded batch with each row's last answer (and whatever followed it) replaced by its response,
    labels on the response alone; a row whose response is None kept as it was. Right-padded again, as collated."""
    keys = [*_per_token(encoded), "labels"]
    rows = {key: [] for key in keys}
    lengths = encoded["attention_mask"].sum(1).tolist()  # collated right-padded: row r's tokens are its first n
    for r, (response, n) in enumerate(zip(responses, lengths, strict=True)):
        if response is None:
            for key in keys:
                rows[key].append(encoded[key][r, :n])
            continue
        start = answer_start(encoded["labels"][r, :n])
        response = response.to(encoded["input_ids"].device)
        for key in keys:
            added = {"input_ids": response, "labels": response, "attention_mask": torch.ones_like(response)}
            prompt = encoded[key][r, :start] if key != "labels" else torch.full_like(encoded[key][r, :start], -100)
            rows[key].append(torch.cat([prompt, added.get(key, torch.zeros_like(response)).to(prompt.dtype)]))
    padding = {"input_ids": pad_id, **SEQUENCE_PAD}
    return encoded | {key: pad_sequence(rows[key], batch_first=True, padding_value=padding[key]) for key in keys}


@torch.no_grad()
def sample(
    student, inputs: dict, options, ends: set[int], pad_id: int, seed: int, suppressed: list[int] = ()
) -> Tensor:
    """The student's sampled continuations [B, n] of left-padded prompts: batched, with the KV cache, LoRA adapters
    active, in eval mode (back to its mode after), from its own distribution (`options`: interact.sample; no top-k,
    no repetition penalty) with the `suppressed` tokens never drawn (`special_tokens`). The sampling draws from the
    torch generator seeded with `seed`, inside a fork of the global RNG state, which is left as it was. Non-finite
    logits are replaced before sampling, so a diverged student yields a non-finite loss (skipped by the training
    loop) instead of a crash."""
    mode, device = student.training, inputs["input_ids"].device
    student.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            generated = student.generate(
                **inputs,
                do_sample=True,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=0,
                repetition_penalty=1.0,
                max_new_tokens=options.max_new_tokens,
                eos_token_id=sorted(ends),
                pad_token_id=pad_id,
                use_cache=True,
                remove_invalid_values=True,
                suppress_tokens=list(suppressed) or None,
            )
    finally:
        student.train(mode)
    return generated[:, inputs["input_ids"].shape[1] :]


class OnPolicy:
    """Draws which micro-batches are on-policy and rebuilds them around the student's samples. `generator` is the
    same on every process (seeded with `seed`); `pad_ids` holds each encoding's pad id ("student", "teacher");
    `suppressed` the tokens a sample never draws (`special_tokens`)."""

    def __init__(
        self,
        stage: InteractConfig,
        pad_ids: dict[str, int],
        ends: set[int],
        generator,
        process_index: int,
        suppressed: list[int] = (),
    ):
        self.share, self.options, self.pad_ids, self.ends = stage.on_policy, stage.sample, pad_ids, ends
        self.generator, self.process_index, self.suppressed = generator, process_index, list(suppressed)

    def draw(self) -> int | None:
        """This micro-batch's sampling seed for this process when it is on-policy (probability interact.on_policy),
        else None. Two draws every micro-batch, on every process alike."""
        on_policy = torch.rand((), generator=self.generator).item() < self.share
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return seed + self.process_index if on_policy else None

    def __call__(self, student, batch: dict, seed: int) -> tuple[dict, dict]:
        """The batch with every encoding's rows answered by the student's samples, and their logs: mean sampled
        length (tokens before the end), the share of rows that hit the cap, the share that ended at once."""
        inputs = prompts(batch["student"], self.pad_ids["student"])
        pad = self.pad_ids["student"]
        responses = cut(sample(student, inputs, self.options, self.ends, pad, seed, self.suppressed), self.ends)
        rebuilt = {name: with_responses(enc, responses.tokens, self.pad_ids[name]) for name, enc in batch.items()}
        rows = len(responses.tokens)
        return rebuilt, {
            "sample/length": sum(responses.lengths) / rows,
            "sample/capped": sum(responses.capped) / rows,
            "sample/empty": sum(t is None for t in responses.tokens) / rows,
        }
