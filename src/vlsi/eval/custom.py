"""The `custom` benchmark's matching and score: held-out records in the training format, each answer matched with
its reference (the record's last assistant turn) by the reference's question type (docs/EVALUATION.md).

Torch-free, so that `vlsi score --benchmark custom` stays light; `vlsi eval` builds the items (eval/generate.py).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from .common import percent
from .extract import infer_option, normalize_punctuation, number_values, numbers_in, stated_answer, yes_no

CUSTOM = "custom"
# Fields of a custom predictions file (vlsi eval writes them), besides `prediction`.
REQUIRED = ("index", "answer")


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
