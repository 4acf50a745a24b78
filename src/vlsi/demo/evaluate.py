"""Accuracy on the demo task: batched greedy generation, exact match after normalisation (`tasks.is_correct`)."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..eval.generate import greedy
from .tasks import CHAIN, Item, chain_exact, is_correct, possible_answers


def prompts(processor, items: list[Item]) -> list[str]:
    """The chat-template text of each item's question with the generation prompt (the image first, as in training)."""
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for item in items
    ]


def encode_batches(processor, items: list[Item], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Left-padded model inputs, `batch_size` items each; computed once and reused for every model compared."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    try:
        texts = prompts(processor, items)
        return [
            dict(
                processor(
                    text=texts[k : k + batch_size],
                    images=[[item.render()] for item in items[k : k + batch_size]],
                    padding=True,
                    add_special_tokens=False,  # the chat template wrote the special tokens
                    return_tensors="pt",
                )
            )
            for k in range(0, len(items), batch_size)
        ]
    finally:
        tokenizer.padding_side = side


def answer_tokens(tokenizer, tasks, styles) -> int:
    """New tokens an answer to `tasks` x `styles` can need: the longest possible answer (`tasks.possible_answers`)
    plus the end-of-turn token that ends it. The teacher's answers (`data.answer_max_tokens`) and every reply
    scored are generated to this length, so a long answer is never cut."""
    answers = possible_answers(tuple(tasks), tuple(styles))
    return 1 + max(len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers)


def generate_answers(model, processor, batches: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy replies (special tokens removed) for pre-encoded batches, in order; the demo's models stop at the
    tokenizer's end-of-turn token."""
    model.eval()
    eos = processor.tokenizer.eos_token_id
    return [reply for inputs in batches for reply in greedy(model, processor, inputs, max_new_tokens, eos_token_id=eos)]


def score(items: list[Item], replies: list[str]) -> dict:
    """{"accuracy", "n", "by_task": {task: accuracy}, "by_style": {style: accuracy}, "hits": [0 or 1 per item]}, and
    with chain items "chain_exact": the share of them whose whole chain is right (`tasks.chain_exact`)."""
    hits = [int(is_correct(reply, item)) for item, reply in zip(items, replies, strict=True)]
    chains = [chain_exact(reply, item) for item, reply in zip(items, replies) if item.style == CHAIN]
    groups: dict[str, dict[str, list[int]]] = {"by_task": defaultdict(list), "by_style": defaultdict(list)}
    for item, hit in zip(items, hits):
        groups["by_task"][item.task].append(hit)
        groups["by_style"][item.style].append(hit)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return {
        "accuracy": mean(hits),
        "n": len(hits),
        **{name: {k: mean(v) for k, v in sorted(g.items())} for name, g in groups.items()},
        **({"chain_exact": mean(chains)} if chains else {}),
        "hits": hits,
    }


def evaluate(
    model,
    processor,
    items: list[Item],
    batches: list[dict] | None = None,
    batch_size: int = 128,
    max_new_tokens: int | None = None,
) -> dict:
    """Score `model` on `items`; `batches` from `encode_batches` (same processor settings) skips re-encoding. Replies
    are `max_new_tokens` long at most, by default what the items' tasks and styles can need (`answer_tokens`)."""
    batches = batches if batches is not None else encode_batches(processor, items, batch_size)
    if max_new_tokens is None:
        tasks, styles = sorted({item.task for item in items}), sorted({item.style for item in items})
        max_new_tokens = answer_tokens(processor.tokenizer, tasks, styles)
    replies = generate_answers(model, processor, batches, max_new_tokens)
    return {**score(items, replies), "replies": replies}


@torch.inference_mode()
def layer_accuracy(
    model, verbalizers, processor, items: list[Item], batches: list[dict]
) -> dict[str, dict[str, float]]:
    """{task: {"block N": accuracy, ..., "output": accuracy}}: how often each verbalized layer's most likely next token
    after the prompt is the answer's first token (teacher forcing; a number answer is one token, a chain's first
    token is its first intermediate result). `batches` from `encode_batches`: left-padded, so every prompt's last
    token is in the last column."""
    from ..models.family import capture, model_parts

    model.eval()
    parts = model_parts(model)
    tokenizer = processor.tokenizer
    gold = torch.tensor([tokenizer(item.answer, add_special_tokens=False).input_ids[0] for item in items])
    heads = {
        f"block {layer}": verbalizers.head(k, parts.norm, parts.lm_head, len(tokenizer))
        for k, layer in enumerate(verbalizers.target_layers)
    }
    guesses: dict[str, list[torch.Tensor]] = defaultdict(list)
    for inputs in batches:
        with capture(parts.layers, verbalizers.target_layers) as states:
            logits = model(**inputs).logits[:, -1]  # [B, V]
        for layer in verbalizers.target_layers:
            guesses[f"block {layer}"].append(heads[f"block {layer}"](states[layer][:, -1]).argmax(-1))
        guesses["output"].append(logits.argmax(-1))
    right = {name: (torch.cat(g) == gold).float() for name, g in guesses.items()}  # [N] each
    tasks = {task: torch.tensor([item.task == task for item in items]) for task in sorted({i.task for i in items})}
    return {task: {name: float(hits[mask].mean()) for name, hits in right.items()} for task, mask in tasks.items()}
