"""What `vlsi eval` feeds the model and how it reads the answers back.

Benchmark rows (VLMEvalKit's TSV layout, typed as pandas types them) -> the message VLMEvalKit builds for the row
(eval/prompts.py) and the images it resolves -> batched greedy answers, each marked when it hit the length limit.
The `custom` benchmark takes held-out records in the training format instead: the prompt is the conversation up to
its last assistant turn, that turn is the reference, and answers are matched by question type (eval/custom.py).
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.images import UnusableImage, describe, image_header, load_image
from .benchmarks import JUDGED, REQUIRED, SCORERS
from .cells import PANDAS_NA, read_like_pandas
from .common import RULES
from .extract import is_missing
from .io import ScoreError, read_rows  # importing .io also lifts csv's cell size limit for base64 images
from .prompts import DATASET, KIND, PromptError, build_message, builder_used


class EvalError(ValueError):
    """Bad input for `vlsi eval`; the message is one line naming the file, the row and the fix."""


# VLMEvalKit TSVs store an image once; other rows' `image` cell holds that row's index (at most 64 characters).
IMAGE_REFERENCE_MAX_LEN = 64


@dataclass
class Item:
    """One question: chat `messages` up to the answer, its images (encoded bytes or a file, in the order of the
    image items in `messages`), and `row`, which is written out with the prediction. `index` keys resume."""

    index: str
    messages: list[dict]
    images: list[bytes | Path]
    row: dict


class Answer(str):
    """A generated answer (the text) that knows whether it was `cut`: it reached the token limit before any end
    token, so the text stops where the limit fell."""

    cut: bool

    def __new__(cls, text: str, cut: bool = False):
        answer = super().__new__(cls, text)
        answer.cut = cut
        return answer


# ---------------------------------------------------------------- named benchmarks


def read_benchmark(path: str | Path, benchmark: str) -> list[dict]:
    """Rows of a VLMEvalKit-layout .tsv (or .jsonl with the same fields), image column kept, each with a string
    `index` (the row number when the file has none). Raises EvalError for a file the benchmark cannot use,
    including what its scorer would reject under either rules (checked now, before any generation)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file; pass the benchmark's TSV (VLMEvalKit layout) with --data")
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".jsonl"):
        raise EvalError(f"{path}: unsupported file type '{suffix}'; give the benchmark as .tsv or .jsonl")
    rows = read_rows(path, error=EvalError, drop=())
    if not rows:
        raise EvalError(f"{path}: no rows; write one row per benchmark question")
    columns = set().union(*rows)
    missing = [name for name in ("question", *REQUIRED[benchmark]) if name not in columns]
    if missing:
        raise EvalError(
            f"{path}: missing {', '.join(missing)} for {benchmark}; its rows need question, "
            f"{', '.join(REQUIRED[benchmark])} and image or image_path (see docs/EVALUATION.md)"
        )
    if not {"image", "image_path"} & columns:
        raise EvalError(f"{path}: no image column; give base64 images in 'image' or files in 'image_path'")
    seen: dict[str, int] = {}
    for number, row in enumerate(rows):
        row["index"] = str(row.get("index", number))
        if row["index"] in seen:
            raise EvalError(f"{path}: index {row['index']} appears twice (rows {seen[row['index']]} and {number})")
        seen[row["index"]] = number
        if is_missing(row.get("question")):
            raise EvalError(f"{path}: row with index {row['index']}: empty question")
    if benchmark not in JUDGED:
        try:
            for rules in RULES:
                SCORERS[benchmark]([{**row, "prediction": ""} for row in rows], rules=rules)
        except ScoreError as e:
            raise EvalError(f"{path}: {e}") from None
    return rows


def benchmark_items(
    benchmark: str, rows: list[dict], root: Path, path: Path, builder: str = DATASET, skip: frozenset = frozenset()
) -> list[Item]:
    """The rows (but those whose index is in `skip`) as Items: VLMEvalKit's message for each (eval/prompts.py), built
    from the rows typed as pandas types the whole file, with the images VLMEvalKit resolves (decoded from base64 and
    checked, or files under `root`); `row` is the row as written, without the bulky image column."""
    typed = read_like_pandas(rows)
    images = _image_cells(rows, path)
    items = []
    for row, typed_row in zip(rows, typed, strict=True):
        if row["index"] in skip:
            continue
        where = f"{path}: row with index {row['index']}"
        sources = _image_sources(row, images, root, where)
        if not sources:
            raise EvalError(f"{where}: no image; fill its 'image' (base64) or 'image_path' cell")
        own_prompt = KIND[benchmark] == "cv_bench" and builder_used(benchmark, builder) == DATASET
        if own_prompt and is_missing(row.get("prompt")):
            raise EvalError(
                f"{where}: no 'prompt' cell; VLMEvalKit's CV-Bench TSVs hold the whole prompt (question and choices) "
                "there, and its builder sends it as it is"
            )
        try:
            content, ordered = build_message(benchmark, typed_row, sources, builder)
        except PromptError as e:
            raise EvalError(f"{where}: {e}") from None
        output_row = {key: value for key, value in row.items() if key != "image"}
        items.append(Item(row["index"], [{"role": "user", "content": content}], ordered, output_row))
    return items


def _image_cells(rows: list[dict], path: Path) -> dict[str, str]:
    """{index: image cell} with references resolved as VLMEvalKit's ImageBaseDataset does: a cell of 1-64 characters
    is the index of the row whose cell (base64, or a list of them) stands for it; a missing cell is ""."""
    cells = {}
    for row in rows:
        cell = row.get("image", "")
        cells[row["index"]] = "" if isinstance(cell, str) and cell in PANDAS_NA else cell
    resolved = {}
    for index, cell in cells.items():
        if isinstance(cell, str) and 0 < len(cell) <= IMAGE_REFERENCE_MAX_LEN:
            target = cells.get(cell, "")
            if isinstance(target, str) and len(target) <= IMAGE_REFERENCE_MAX_LEN:
                raise EvalError(
                    f"{path}: row with index {index}: image cell {cell!r} is neither base64 data nor the index of "
                    "a row holding an image"
                )
            cell = target
        resolved[index] = cell
    return resolved


def _cell_list(value) -> list[str]:
    """VLMEvalKit's `toliststr`: a JSON list, or a cell "['a', 'b']" read as the Python list it spells."""
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    if len(text) > 1 and text[0] == "[" and text[-1] == "]":
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [text]


def _image_sources(row: dict, images: dict[str, str], root: Path, where: str) -> list[bytes | Path]:
    if images.get(row["index"]):
        return [_decode_base64(cell, where) for cell in _cell_list(images[row["index"]])]
    if is_missing(row.get("image_path")):
        return []
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in _cell_list(row["image_path"])]
    for image_path in paths:
        _check_image(image_path, where)
    return paths


def _decode_base64(cell: str, where: str) -> bytes:
    try:
        data = base64.b64decode(cell, validate=False)
    except (binascii.Error, ValueError) as e:
        raise EvalError(f"{where}: the 'image' cell is not base64 ({e}); store images base64-encoded") from None
    _check_image(data, where)
    return data


def _check_image(source: bytes | Path, where: str) -> None:
    """Reads the header only: cheap enough for every row before generation starts."""
    try:
        image_header(source)
    except FileNotFoundError:
        raise EvalError(f"{where}: image file {source} not found; check --image-root") from None
    except UnusableImage as e:
        raise EvalError(f"{where}: image {describe(source)}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise EvalError(f"{where}: image cannot be decoded ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- generation


@torch.inference_mode()
def generate_answers(model, processor, items: list[Item], max_new_tokens: int) -> list[Answer]:
    """Greedy answers for a batch of items under the model's `generation_config` (do_sample off), special tokens
    dropped, spaces left as decoded (no clean-up, as VLMEvalKit decodes) and the ends stripped. Each answer is a str
    whose `cut` says it reached `max_new_tokens` without an end token (`generation_config.eos_token_id`, else the
    tokenizer's)."""
    texts = [processor.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True) for item in items]
    images = [[load_image(source) for source in item.images] for item in items]  # one list per text
    # Left padding puts every prompt's last token in the last column, so generation continues each prompt
    # directly and the new tokens of every row start at the same column. The caller's side is restored: the same
    # processor may encode training samples afterwards.
    side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
    try:
        inputs = processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            add_special_tokens=False,  # the chat template already wrote any BOS (Gemma 3 would get two)
            return_tensors="pt",
        )
    finally:
        processor.tokenizer.padding_side = side
    new_tokens = new_greedy_tokens(model, processor, inputs.to(model.device), max_new_tokens)
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [processor.tokenizer.eos_token_id if ends is None else ends])
    full = new_tokens.shape[1] == max_new_tokens  # every row of a narrower batch stopped before the limit
    decoded = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [
        Answer(text.strip(), full and not ends & set(row.tolist()))
        for text, row in zip(decoded, new_tokens, strict=True)
    ]


def new_greedy_tokens(model, processor, inputs: dict, max_new_tokens: int, **generate_kwargs) -> torch.Tensor:
    """[B, new] token ids generated greedily after left-padded `inputs` (a row that ends early is padded)."""
    generated = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=processor.tokenizer.pad_token_id,
        **generate_kwargs,
    )
    return generated[:, inputs["input_ids"].shape[1] :]


@torch.inference_mode()
def greedy(model, processor, inputs: dict, max_new_tokens: int, **generate_kwargs) -> list[str]:
    """Greedy continuations of left-padded `inputs` (the processor's tensors), special tokens dropped and whitespace
    stripped. Left padding puts every prompt's last token in the last column, so the new tokens of every row start
    at the same column."""
    new_tokens = new_greedy_tokens(model, processor, inputs, max_new_tokens, **generate_kwargs)
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


# JSON lets these stand inside a string, but str.splitlines (runfolder.read_jsonl, many tools) ends a line at them.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def json_line(row: dict) -> str:
    """One JSONL line: the text as written (not \\u-escaped), but for the characters other readers split lines at."""
    text = json.dumps(row, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text + "\n"


def append_answers(
    model, processor, items: list[Item], max_new_tokens: int, batch_size: int, path: Path, record, bar, out_of_memory
) -> None:
    """Greedy answers for `items`, `batch_size` at a time: each batch's `record(item, answer)` dicts (answer: an
    `Answer`) are appended to the JSONL file `path` and flushed, so a killed run loses at most the batch being
    generated and resumes with the rest. A batch that does not fit on the device raises `out_of_memory(saved)`,
    saved = items of `items` written."""
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    with path.open("a", encoding="utf-8") as f:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            try:
                answers = generate_answers(model, processor, batch, max_new_tokens)
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory(start) from None
            for item, answer in zip(batch, answers, strict=True):
                f.write(json_line(record(item, answer)))
            f.flush()
            bar.update(len(batch))


# ---------------------------------------------------------------- the custom benchmark


def custom_item(sample, path: Path) -> Item:
    """A training-format Sample as an Item: the conversation up to its last assistant turn, whose text is the
    reference `answer`; `question` is the last user turn's text, `question_type` comes from the reference. A user
    turn after the last assistant turn has no reference to score against: EvalError."""
    from .custom import question_type

    last = max(k for k, message in enumerate(sample.messages) if message["role"] == "assistant")
    if any(message["role"] == "user" for message in sample.messages[last + 1 :]):
        raise EvalError(
            f"{path}: record {sample.id} ends with a user turn after its last assistant turn; the reference answer is "
            "the last assistant turn, so drop the trailing user turn or add the answer it asks for"
        )
    prompt = sample.messages[:last]
    n_images = sum(item["type"] == "image" for message in prompt for item in message["content"])
    reference = _text(sample.messages[last]).strip()
    question = next((_text(m) for m in reversed(prompt) if m["role"] == "user"), "").strip()
    row = {"index": sample.id, "question": question, "answer": reference, "question_type": question_type(reference)}
    return Item(sample.id, prompt, list(sample.images[:n_images]), row)


def _text(message: dict) -> str:
    return "".join(item.get("text", "") for item in message["content"])
