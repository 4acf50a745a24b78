"""What `vlsi eval` feeds the model and how it reads the answers back.

Benchmark rows (VLMEvalKit's TSV layout) -> the benchmark's standard prompt and images -> batched greedy
answers. The `custom` benchmark takes held-out records in the training format instead: the prompt is the
conversation up to its last assistant turn, that turn is the reference, and answers are matched by question type.

Prompts follow the wording VLMEvalKit's LLaVA / InternVL prompt builders use for each family of benchmark
(vlmeval/vlm/llava/llava.py, vlmeval/api/adapters/internvl2.py at commit e8e78f0); docs/EVALUATION.md lists them.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.images import UnusableImage, describe, image_header, load_image
from .benchmarks import JUDGED, REQUIRED, SCORERS
from .common import RULES, percent
from .extract import (
    infer_option,
    is_missing,
    normalize_punctuation,
    number_values,
    numbers_in,
    options_from_row,
    stated_answer,
    yes_no,
)
from .io import ScoreError, read_rows  # importing .io also lifts csv's cell size limit for base64 images


class EvalError(ValueError):
    """Bad input for `vlsi eval`; the message is one line naming the file, the row and the fix."""


MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
MCQ_SUFFIX_CN = "请直接回答选项字母。"
YES_NO_SUFFIX = "Please answer yes or no."
SHORT_SUFFIX = "Answer the question using a single word or phrase."

# Benchmark -> prompt family. "as_is": the question cell already is the whole prompt (MathVista's TSV holds the
# hint and choices in it) or the benchmark wants a free answer for a judge to grade.
PROMPT_FAMILY = {
    **dict.fromkeys(
        (
            "ai2d",
            "blink",
            "cv_bench",
            "cv_bench_2d",
            "cv_bench_3d",
            "mmbench_cn",
            "mmbench_en",
            "mmmu",
            "mmstar",
            "q_bench",
            "seed_2_plus",
        ),
        "mcq",
    ),
    **dict.fromkeys(("hallusionbench", "mme", "pope"), "yes_no"),
    "chartqa": "short",
    **dict.fromkeys(("llava_wilder", "mathvista", "mm_vet", "mm_vet_v2"), "as_is"),
}

# Long free-form answers for judge-graded benchmarks and MathVista's worked solutions; short answers elsewhere.
LONG_ANSWER_TOKENS, SHORT_ANSWER_TOKENS = 1024, 128
# VLMEvalKit TSVs store an image once; other rows' `image` cell holds that row's index (at most 64 characters).
IMAGE_REFERENCE_MAX_LEN = 64
_CJK = re.compile("[\u4e00-\u9fff]")


def default_max_new_tokens(benchmark: str) -> int:
    return LONG_ANSWER_TOKENS if benchmark in JUDGED or benchmark == "mathvista" else SHORT_ANSWER_TOKENS


@dataclass
class Item:
    """One question: chat `messages` up to the answer, its images (encoded bytes or a file, in the order of the
    image items in `messages`), and `row`, which is written out with the prediction. `index` keys resume."""

    index: str
    messages: list[dict]
    images: list[bytes | Path]
    row: dict


# ---------------------------------------------------------------- named benchmarks


def benchmark_prompt(benchmark: str, row: dict) -> str:
    """The text VLMEvalKit asks for the row (images go before it).

    mcq: "hint\\nquestion\\nA. ...\\nB. ...\\nAnswer with the option's letter from the given choices directly."
    (Chinese suffix when the prompt has Chinese characters; an MMMU question without options asks for a word
    or phrase); yes_no: question + " Please answer yes or no." unless the question already asks for yes or no
    (MME's do); short: question + "\\nAnswer the question using a single word or phrase."; as_is: the question.
    """
    question = str(row["question"]).strip()
    family = PROMPT_FAMILY[benchmark]
    if family == "mcq":
        hint = row.get("hint")
        prompt = question if is_missing(hint) else f"{str(hint).strip()}\n{question}"
        options = options_from_row(row)
        if not options:
            return f"{prompt}\n{SHORT_SUFFIX}"
        prompt += "".join(f"\n{letter}. {text}" for letter, text in options.items())
        return f"{prompt}\n{MCQ_SUFFIX_CN if _CJK.search(prompt) else MCQ_SUFFIX}"
    if family == "yes_no":
        return question if "yes or no" in question.lower() else f"{question} {YES_NO_SUFFIX}"
    if family == "short":
        return f"{question}\n{SHORT_SUFFIX}"
    return question


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


def benchmark_item(benchmark: str, row: dict, rows_by_index: dict[str, dict], image_root: Path, path: Path) -> Item:
    """The row as an Item: its images (decoded from base64 and checked, or files under `image_root`) first,
    then the prompt, as VLMEvalKit places them; `row` without the bulky image column."""
    where = f"{path}: row with index {row['index']}"
    images = _image_sources(row, rows_by_index, image_root, where)
    if not images:
        raise EvalError(f"{where}: no image; fill its 'image' (base64) or 'image_path' cell")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": benchmark_prompt(benchmark, row)}]
    output_row = {key: value for key, value in row.items() if key != "image"}
    return Item(row["index"], [{"role": "user", "content": content}], images, output_row)


def _cell_list(value) -> list[str]:
    """A cell holding one value or several: a JSON list, or its text "['a', 'b']" as VLMEvalKit writes it."""
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [text]


def _image_sources(row: dict, rows_by_index: dict[str, dict], root: Path, where: str) -> list[bytes | Path]:
    if not is_missing(row.get("image")):
        sources = []
        for cell in _cell_list(row["image"]):
            if len(cell) <= IMAGE_REFERENCE_MAX_LEN:
                referenced = rows_by_index.get(cell, {}).get("image", "")
                if len(str(referenced)) <= IMAGE_REFERENCE_MAX_LEN:
                    raise EvalError(
                        f"{where}: image cell {cell!r} is neither base64 data nor the index of a row holding an image"
                    )
                cell = str(referenced)
            sources.append(_decode_base64(cell, where))
        return sources
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
def generate_answers(model, processor, items: list[Item], max_new_tokens: int) -> list[str]:
    """Greedy answers for a batch of items, special tokens dropped and whitespace stripped."""
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
    return greedy(model, processor, inputs.to(model.device), max_new_tokens)


@torch.inference_mode()
def greedy(model, processor, inputs: dict, max_new_tokens: int, **generate_kwargs) -> list[str]:
    """Greedy continuations of left-padded `inputs` (the processor's tensors), special tokens dropped and whitespace
    stripped. Left padding puts every prompt's last token in the last column, so the new tokens of every row start
    at the same column."""
    generated = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=processor.tokenizer.pad_token_id,
        **generate_kwargs,
    )
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # [B, new]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def append_answers(
    model, processor, items: list[Item], max_new_tokens: int, batch_size: int, path: Path, record, bar, out_of_memory
) -> None:
    """Greedy answers for `items`, `batch_size` at a time: each batch's `record(item, answer)` dicts are appended to
    the JSONL file `path` and flushed, so a killed run loses at most the batch being generated and resumes with the
    rest. A batch that does not fit on the device raises `out_of_memory(saved)`, saved = items of `items` written."""
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
                f.write(json.dumps(record(item, answer), ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))


# ---------------------------------------------------------------- the custom benchmark


def custom_item(sample) -> Item:
    """A training-format Sample as an Item: the conversation up to its last assistant turn, whose text is the
    reference `answer`; `question` is the last user turn's text, `question_type` comes from the reference."""
    last = max(k for k, message in enumerate(sample.messages) if message["role"] == "assistant")
    prompt = sample.messages[:last]
    n_images = sum(item["type"] == "image" for message in prompt for item in message["content"])
    reference = _text(sample.messages[last]).strip()
    question = next((_text(m) for m in reversed(prompt) if m["role"] == "user"), "").strip()
    row = {"index": sample.id, "question": question, "answer": reference, "question_type": question_type(reference)}
    return Item(sample.id, prompt, list(sample.images[:n_images]), row)


def _text(message: dict) -> str:
    return "".join(item.get("text", "") for item in message["content"])


_LETTER = re.compile(r"^\(?([A-E])\)?[.:]?$")
_OPTION_LINE = re.compile(r"^\(?([A-Z])[.):]\s+(.+?)\s*$", re.MULTILINE)
NUMBER_WORDS = {
    word: float(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
RELATIVE_TOLERANCE = 1e-4
_ARTICLES = {"a", "an", "the"}


def question_type(reference: str) -> str:
    """ "multiple_choice" (a letter A-E: "B", "(B)", "B."), "yes_no", "number" ("7", "3.5", "1,200", "12%") or
    "open" (anything else), read from the reference answer."""
    reference = reference.strip()
    if _LETTER.match(reference):
        return "multiple_choice"
    if reference.rstrip(".!").lower() in ("yes", "no"):
        return "yes_no"
    if number_values(reference):
        return "number"
    return "open"


def custom_hit(reference: str, prediction: str, question: str = "") -> bool:
    """Whether `prediction` gives the reference answer; docs/EVALUATION.md has the examples.

    multiple_choice: the option letter VLMEvalKit's rule reads ("B", "(B)", "The answer is B.", the option's
    text when the question lists "B. cat"); yes_no: the prediction's words hold exactly one of yes / no;
    number: the whole prediction is a number (or a number word zero-twenty), else the number of its stated
    answer ("the answer is 7"), else its last number, equal within 1e-4 relative (12% may mean 12 or 0.12);
    open: equal after lower-casing and dropping punctuation, articles and extra spaces.
    """
    kind = question_type(reference)
    if kind == "multiple_choice":
        truth = _LETTER.match(reference.strip()).group(1)
        # Option texts when the question lists them ("B. cat"), so that "cat" reads as B; else bare letters.
        options = dict(_OPTION_LINE.findall(question))
        if truth not in options:
            options = dict.fromkeys("ABCDE", "")
        return infer_option(prediction, options) == truth
    if kind == "yes_no":
        return yes_no(prediction) == reference.strip().rstrip(".!").capitalize()
    if kind == "number":
        truths = number_values(reference)
        return any(math.isclose(p, t, rel_tol=RELATIVE_TOLERANCE) for p in _read_number(prediction) for t in truths)
    return _normalize(prediction) == _normalize(reference)


def _read_number(prediction: str) -> list[float]:
    text = prediction.strip()
    whole = number_values(text)
    if whole:
        return whole
    word = normalize_punctuation(text.lower()).strip()
    if word in NUMBER_WORDS:
        return [NUMBER_WORDS[word]]
    stated = stated_answer(text)
    candidates = (numbers_in(stated)[:1] if stated else []) or numbers_in(text)[-1:]
    return [float(candidates[0].replace(",", ""))] if candidates else []


def _normalize(text: str) -> str:
    words = normalize_punctuation(text.lower().strip()).split()
    return " ".join(word for word in words if word not in _ARTICLES)


def score_custom(rows: list[dict]) -> dict:
    """Accuracy (%) over the rows and per question type, with the number of rows in each."""
    hits = [custom_hit(str(row["answer"]), str(row["prediction"]), str(row.get("question", ""))) for row in rows]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        by_type[question_type(str(row["answer"]))].append(hit)
    return {
        "benchmark": "custom",
        "score": percent(hits),
        "num_questions": len(rows),
        "question_types": {
            kind: {"accuracy": percent(by_type[kind]), "num_questions": len(by_type[kind])} for kind in sorted(by_type)
        },
    }
