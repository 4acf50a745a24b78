"""Small pure helpers shared by the scorers: percentages, per-group accuracy, cell parsing."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Sequence

from .extract import is_missing
from .io import ScoreError

# Which rules produce `score`: VLMEvalKit's exact-matching evaluation, or the lenient reading (docs/EVALUATION.md).
VLMEVALKIT, LENIENT = "vlmevalkit", "lenient"
RULES = (VLMEVALKIT, LENIENT)

# Detail keys for the grouping columns of VLMEvalKit's `report_acc`.
GROUP_COLUMNS = {"split": "splits", "l2-category": "l2_categories", "category": "categories"}


def percent(hits: Sequence[float]) -> float:
    """Mean of 0/1 (or fractional) hits, in percent."""
    return 100.0 * sum(hits) / len(hits)


def accuracy_by(rows: Sequence[dict], hits: Sequence[float], column: str) -> dict[str, float]:
    """Accuracy (%) per value of `column`, sorted by value; rows with an empty cell are left out."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        if not is_missing(row.get(column)):
            groups[str(row[column])].append(hit)
    return {value: percent(groups[value]) for value in sorted(groups)}


def group_accuracies(rows: Sequence[dict], hits: Sequence[float]) -> dict[str, dict[str, float]]:
    """{"splits": ..., "l2_categories": ..., "categories": ...} for the grouping columns the rows have."""
    out = {}
    for column, key in GROUP_COLUMNS.items():
        groups = accuracy_by(rows, hits, column)
        if groups:
            out[key] = groups
    return out


def row_name(row: dict) -> str:
    """How an error message points at a row."""
    return f"row with index {row['index']}" if "index" in row else "a row"


def as_list(value, row: dict, column: str) -> list:
    """A list cell: a JSON list (from JSONL) or its Python/JSON text ("['3/11', '8/11']") from a TSV."""
    if isinstance(value, list):
        return value
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        parsed = None
    if not isinstance(parsed, (list, tuple)):
        raise ScoreError(f"{row_name(row)}: column '{column}' should be a list like ['a', 'b'], got {value!r}")
    return list(parsed)


def yes_no_answer(row: dict) -> str:
    """The row's ground truth as "Yes" / "No"; anything else is a data error."""
    answer = str(row["answer"]).strip().rstrip(".").capitalize()
    if answer not in ("Yes", "No"):
        raise ScoreError(f"{row_name(row)}: answer must be Yes or No, got {row['answer']!r}")
    return answer
