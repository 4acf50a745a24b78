"""Per-layer verbalized decoding (docs/METHOD.md#interpretability, the paper's fig. 3): what does each target
layer answer?

    vlsi explain --model STUDENT --verbalizers OUT/verbalizers/student --image digit.png --question "Which digit?"
    vlsi explain --model STUDENT --verbalizers OUT/verbalizers/student \
        --teacher TEACHER --teacher-verbalizers OUT/verbalizers/teacher --image digit.png --question "Which digit?"

Layer l's answer is decoded greedily with blocks 0..l and verbalizer l as the output head: at each step the next
token is argmax(LM head(final norm(verb-FFN_l(h_l)))) at the last position. The model is causal, so stopping the
forward pass right after block l (a hook raises `_EarlyExit`) gives exactly the states of a full pass. The KV cache
is kept and then holds only blocks 0..l, which is all the next step reads; Qwen2-VL's 3D rope positions continue
from the `rope_deltas` its prefill stored. The "final" row uses the model's own norm and head: it is plain greedy
`generate` (no repetition penalty), restricted to the tokenizer's real vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor, nn

from .data.images import UnusableImage
from .data.images import load_image as read_image
from .models.family import model_parts
from .models.verbalizer import Verbalizers, check_verbalizers, final_head

EOS_TOKEN = "<|im_end|>"


class ExplainError(ValueError):
    """Inputs `explain` cannot use: the message names the file and the fix."""


@dataclass(frozen=True)
class LayerAnswer:
    """The answer decoded through one layer: block `layer` (0-based) of `num_layers`, or "final"."""

    layer: int | Literal["final"]
    num_layers: int
    text: str
    token_ids: tuple[int, ...]

    @property
    def block(self) -> int:
        return self.num_layers - 1 if self.layer == "final" else self.layer

    @property
    def depth(self) -> float:
        """Fraction of the model's blocks that produced this answer (1.0 for the final layer)."""
        return (self.block + 1) / self.num_layers

    @property
    def label(self) -> str:
        where = f"block {self.block} / {self.num_layers}"
        return f"final ({where})" if self.layer == "final" else where


def explain(
    model: nn.Module,
    processor,
    verbalizers: Verbalizers,
    image: Image.Image | str | Path,
    question: str,
    max_new_tokens: int = 16,
) -> list[LayerAnswer]:
    """The greedy answer to `question` about `image` through each target layer's verbalizer, then the final layer."""
    parts = model_parts(model)
    check_verbalizers(verbalizers, parts)
    image = load_image(image) if isinstance(image, (str, Path)) else image
    device = parts.lm_head.weight.device
    inputs = {k: v.to(device) for k, v in prompt_inputs(processor, image, question).items()}
    vocab = min(len(processor.tokenizer), parts.vocab_rows)  # padded LM-head rows are not tokens
    eos = eos_ids(model, processor)
    verbalizers = verbalizers.to(device)
    heads = [
        (layer, verbalizers.head(k, parts.norm, parts.lm_head, vocab))
        for k, layer in enumerate(verbalizers.target_layers)
    ]
    heads.append(("final", final_head(parts.norm, parts.lm_head, vocab)))
    was_training = model.training
    model.eval()
    try:
        answers = []
        for layer, head in heads:
            block = parts.layers[-1] if layer == "final" else parts.layers[layer]
            ids = greedy_decode(model, block, head, inputs, eos, max_new_tokens)
            text = processor.tokenizer.decode(ids, skip_special_tokens=True)
            answers.append(LayerAnswer(layer, parts.num_layers, text, tuple(ids)))
    finally:
        model.train(was_training)
    return answers


def explain_pair(
    student: nn.Module,
    student_processor,
    student_verbalizers: Verbalizers,
    teacher: nn.Module,
    teacher_processor,
    teacher_verbalizers: Verbalizers,
    image: Image.Image | str | Path,
    question: str,
    max_new_tokens: int = 16,
) -> list[tuple[LayerAnswer | None, LayerAnswer | None]]:
    """Student and teacher answers per layer, as (student, teacher) rows aligned by relative depth (`align`)."""
    image = load_image(image) if isinstance(image, (str, Path)) else image
    s = explain(student, student_processor, student_verbalizers, image, question, max_new_tokens)
    t = explain(teacher, teacher_processor, teacher_verbalizers, image, question, max_new_tokens)
    return align(s, t)


def align(
    student: list[LayerAnswer], teacher: list[LayerAnswer]
) -> list[tuple[LayerAnswer | None, LayerAnswer | None]]:
    """(student, teacher) rows in order of depth: each student target layer shares a row with the teacher target
    layer nearest in relative depth ((block + 1) / blocks), the closer student winning a contested one; unmatched
    layers get rows of their own, and the final layers share the last row. Both columns stay in layer order."""
    s_layers = [a for a in student if a.layer != "final"]
    t_layers = [a for a in teacher if a.layer != "final"]
    partner: dict[int, int] = {}  # teacher index -> student index
    if t_layers:
        nearest = [min(range(len(t_layers)), key=lambda j: abs(t_layers[j].depth - a.depth)) for a in s_layers]
        for i in sorted(range(len(s_layers)), key=lambda i: abs(t_layers[nearest[i]].depth - s_layers[i].depth)):
            partner.setdefault(nearest[i], i)
    paired = {i: j for j, i in partner.items()}
    rows = [(a, t_layers[paired[i]] if i in paired else None) for i, a in enumerate(s_layers)]
    rows += [(None, a) for j, a in enumerate(t_layers) if j not in partner]
    # Keyed by the student's depth where there is one: a nearest-neighbour pairing keeps teacher rows in order too.
    rows.sort(key=lambda row: (row[0] or row[1]).depth)
    finals = (
        next((a for a in student if a.layer == "final"), None),
        next((a for a in teacher if a.layer == "final"), None),
    )
    return rows + ([finals] if any(finals) else [])


def greedy_decode(
    model: nn.Module,
    block: nn.Module,
    head: Callable[[Tensor], Tensor],
    inputs: dict[str, Tensor],
    eos: set[int],
    max_new_tokens: int,
) -> list[int]:
    """Token ids (without the end token) of the greedy answer read from `block`'s output through `head`.

    Each step runs the model only up to `block`; the KV cache then holds blocks up to `block`, the ones it needs.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # transformers renamed `past_key_values` to `cache`; the wrong name would be swallowed by **kwargs.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step = dict(inputs)  # prefill: prompt and image; then one new token a step
    ids: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            h = block_output(model, block, {**step, cache_arg: cache, "use_cache": True})[:, -1]  # [1, d]
            token = int(head(h).argmax(-1))
            if token in eos:
                break
            ids.append(token)
            step = {"input_ids": torch.tensor([[token]], device=h.device)}
    return ids


class _EarlyExit(Exception):
    """Raised by the hook on the last block needed, so the blocks above it never run."""


def block_output(model: nn.Module, block: nn.Module, inputs: dict) -> Tensor:
    """Output [B, T, d] of decoder `block` for `model(**inputs)`, stopping the forward pass right after it."""
    seen: list[Tensor] = []

    def stop(_module, _inputs, output):
        seen.append(output if isinstance(output, Tensor) else output[0])
        raise _EarlyExit

    handle = block.register_forward_hook(stop)
    try:
        model(**inputs)
    except _EarlyExit:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the forward pass of {type(model).__name__} never reached the hooked decoder block")
    return seen[0]


def prompt_inputs(processor, image: Image.Image, question: str) -> dict[str, Tensor]:
    """The processor's tensors for one user turn (the image, then the question) plus the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # One image list per text, as in vlsi.data.encode: LLaVA-OneVision reads a flat list as one image per sample.
    return dict(processor(text=[text], images=[[image.convert("RGB")]], add_special_tokens=False, return_tensors="pt"))


def eos_ids(model: nn.Module, processor) -> set[int]:
    """Ids that end an answer: the generation config's EOS ids, the tokenizer's, and <|im_end|> if it is a token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    tokenizer = processor.tokenizer
    ids.add(tokenizer.eos_token_id)
    if EOS_TOKEN in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    return ids - {None}


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ExplainError(f"image {path} not found: give the path of an existing image file (PNG, JPEG, ...)")
    try:
        return read_image(path)
    except UnusableImage as e:
        raise ExplainError(f"image {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise ExplainError(
            f"image {path} cannot be decoded ({type(e).__name__}: {e}): give a PNG or JPEG file"
        ) from None


def format_answers(answers: list[LayerAnswer]) -> str:
    """A two-column table: layer label | answer."""
    return _table(["layer", "answer"], [[a.label, _shown(a.text)] for a in answers])


def format_pair(rows: list[tuple[LayerAnswer | None, LayerAnswer | None]]) -> str:
    """student layer | student answer | teacher layer | teacher answer, one row per `align` row; each target
    layer's label carries its relative depth, the measure rows are aligned by."""
    return _table(
        ["student", "student answer", "teacher", "teacher answer"], [[*_cells(s), *_cells(t)] for s, t in rows]
    )


def _cells(answer: LayerAnswer | None) -> list[str]:
    if answer is None:
        return ["", ""]
    depth = "" if answer.layer == "final" else f" ({answer.depth:.0%})"
    return [answer.label + depth, _shown(answer.text)]


def _shown(text: str) -> str:
    """One line: control characters (newlines too) escaped, "(empty)" for an answer that ended at once."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text.strip())
    return text if text else "(empty)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell and separated by " | "; a row's empty trailing cells are left off."""
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(row: list[str]) -> str:
        while row and not row[-1]:
            row = row[:-1]
        return " | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def explain_command(
    model: str,
    verbalizers: str,
    image: str | Path,
    question: str,
    teacher: str | None = None,
    teacher_verbalizers: str | None = None,
    max_new_tokens: int = 16,
) -> str:
    """`vlsi explain`: the table of answers `model` gives through each of its verbalizers (a folder), side by side
    with `teacher`'s when given. Bad input raises ExplainError (a ValueError) or OSError with a one-line message."""
    if (teacher is None) != (teacher_verbalizers is None):
        raise ExplainError("--teacher and --teacher-verbalizers go together: give both or neither")
    if max_new_tokens < 1:
        raise ExplainError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    image = load_image(image)  # the cheap checks first: loading a large teacher takes minutes
    models = [(model, verbalizers)] + ([(teacher, teacher_verbalizers)] if teacher else [])
    loaded = [_load_verbalizers(model_path, directory) for model_path, directory in models]
    answers = []
    for (model_path, _), verb in zip(models, loaded):
        vlm, processor = _load(model_path)
        answers.append(explain(vlm, processor, verb, image, question, max_new_tokens))
        del vlm
    return format_answers(answers[0]) if len(answers) == 1 else format_pair(align(*answers))


def _load_verbalizers(model_path: str, directory: str) -> Verbalizers:
    """The verbalizers in `directory`, checked against `model_path`'s architecture before its weights are loaded."""
    from .models.loading import model_outline

    try:
        verbalizers = Verbalizers.load(directory)
    except FileNotFoundError as e:
        raise ExplainError(f"{e}: give the folder `vlsi verbalize` or `vlsi train` wrote") from None
    check_verbalizers(verbalizers, model_outline(model_path), f"verbalizers in {directory}", model_path)
    return verbalizers


def _load(model_path: str):
    from .models.loading import compute_dtype, load_model, load_processor

    processor = load_processor(model_path)
    model = load_model(model_path, compute_dtype("auto"))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), processor
