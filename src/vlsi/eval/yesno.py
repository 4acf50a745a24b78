"""Yes/No scorers: MME, POPE and HallusionBench (VLMEvalKit's `MME_rating`, `POPE_rating`, `Hallusion_rating`
in vlmeval/dataset/utils/yorn.py). A prediction with both or neither of yes / no is "Unknown" and wrong.

The VLMEvalKit rules compare the extracted Yes / No with the answer cell as pandas reads it (so "yes" matches
nothing); the lenient rules read the answer in any case."""

from __future__ import annotations

from collections import defaultdict

from .cells import is_na, read_like_pandas
from .common import VLMEVALKIT, percent, row_name, yes_no_answer
from .extract import yes_no, yes_no_vlmevalkit
from .io import ScoreError

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_MME_SUBTASKS = {name.lower(): name for name in MME_PERCEPTION + MME_COGNITION}


def yes_no_pairs(rows: list[dict], rules: str) -> list[tuple[object, str]]:
    """(answer, extracted Yes / No / Unknown) per row. VLMEvalKit: the answer cell as pandas reads it, the
    prediction by `YOrN_Extraction`; lenient: the answer read as Yes or No in any case (anything else is an error)."""
    if rules == VLMEVALKIT:
        return [(row["answer"], yes_no_vlmevalkit(str(row["prediction"]))) for row in read_like_pandas(rows)]
    return [(yes_no_answer(row), yes_no(str(row["prediction"]))) for row in rows]


def yes_no_hits(rows: list[dict], rules: str) -> list[bool]:
    return [truth == extracted for truth, extracted in yes_no_pairs(rows, rules)]


def score_mme(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """MME total = perception + cognition, each the sum of its subtasks' acc + acc+ (points, 0-200 a subtask).

    acc is the percentage of questions answered right; acc+ the percentage of images (rows sharing
    category and image_path) whose two questions are both right.
    """
    images: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for row, hit in zip(rows, yes_no_hits(rows, rules), strict=True):
        subtask = _MME_SUBTASKS.get(str(row["category"]).strip().lower())
        if subtask is None:
            raise ScoreError(
                f"{row_name(row)}: unknown MME category {row['category']!r}; "
                f"expected one of {', '.join(_MME_SUBTASKS.values())}"
            )
        images[subtask, str(row["image_path"])].append(hit)
    by_subtask: dict[str, list[list[bool]]] = defaultdict(list)
    for (subtask, image_path), hits in images.items():
        if len(hits) != 2:
            raise ScoreError(
                f"MME image {image_path} ({subtask}) has {len(hits)} question(s); acc+ needs exactly the two "
                "questions of every image, so keep both rows (same category and image_path)"
            )
        by_subtask[subtask].append(hits)
    subtasks = {}
    for subtask, pairs in by_subtask.items():
        acc = percent([hit for pair in pairs for hit in pair])
        acc_plus = percent([all(pair) for pair in pairs])
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(subtasks[name]["score"] for name in MME_PERCEPTION if name in subtasks)
    cognition = sum(subtasks[name]["score"] for name in MME_COGNITION if name in subtasks)
    return {
        "score": perception + cognition,
        "perception": perception,
        "cognition": cognition,
        "num_questions": len(rows),
        "subtasks": {name: subtasks[name] for name in MME_PERCEPTION + MME_COGNITION if name in subtasks},
        "missing_subtasks": [name for name in MME_PERCEPTION + MME_COGNITION if name not in subtasks],
    }


def _pope_metrics(pairs: list[tuple[object, str]]) -> dict:
    """pairs: (truth, extracted). "Yes" is the positive class; an Unknown prediction (or a truth other than "Yes")
    counts as a "No"."""
    tp = sum(truth == "Yes" and pred == "Yes" for truth, pred in pairs)
    fp = sum(truth != "Yes" and pred == "Yes" for truth, pred in pairs)
    fn = sum(truth == "Yes" and pred != "Yes" for truth, pred in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": 100 * f1,
        "accuracy": percent([truth == pred for truth, pred in pairs]),
        "precision": 100 * precision,
        "recall": 100 * recall,
    }


def _pope_splits(category, rules: str) -> list[str | None]:
    """The splits a row counts in (None: no split). VLMEvalKit cuts the category cell at every comma and keeps the
    parts as they are ("a, b" gives "a" and " b"); the lenient rules strip the parts and drop empty ones."""
    if category is None or is_na(category):
        return [None]
    if rules == VLMEVALKIT:
        return str(category).split(",")
    return [part.strip() for part in str(category).split(",") if part.strip()] or [None]


def score_pope(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """POPE F1 (%) with "yes" as positive, plus accuracy, precision and recall, overall and per category.

    As in VLMEvalKit a row whose category lists several splits ("adversarial,popular") counts once in each,
    and the overall numbers pool those copies.
    """
    pairs: list[tuple[object, str]] = []
    by_category: dict[str, list[tuple[object, str]]] = defaultdict(list)
    cells = read_like_pandas(rows) if rules == VLMEVALKIT else rows
    for row, pair in zip(cells, yes_no_pairs(rows, rules), strict=True):
        for category in _pope_splits(row.get("category"), rules):
            pairs.append(pair)
            if category is not None:
                by_category[category].append(pair)
    overall = _pope_metrics(pairs)
    result = {"score": overall["f1"], **overall, "num_questions": len(pairs)}
    if by_category:
        result["categories"] = {name: _pope_metrics(by_category[name]) for name in sorted(by_category)}
    return result


def _hallusion_ids(row: dict) -> tuple[str, str, str]:
    parts = str(row["index"]).split("_")
    if len(parts) < 6:
        raise ScoreError(
            f"{row_name(row)}: HallusionBench index must read category_subcategory_visual_set_figure_question "
            "(e.g. VD_chart_1_0_2_1), as in VLMEvalKit's HallusionBench.tsv"
        )
    return parts[3], parts[4], parts[5]


def _hallusion_metrics(rows: list[dict], hits: list[bool]) -> dict:
    figures: dict[tuple, list[bool]] = defaultdict(list)
    questions: dict[tuple, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        set_id, figure_id, question_id = _hallusion_ids(row)
        figures[row["l2-category"], set_id, figure_id].append(hit)
        questions[row["l2-category"], set_id, question_id].append(hit)
    return {
        "aAcc": percent(hits),
        "fAcc": percent([all(group) for group in figures.values()]),
        "qAcc": percent([all(group) for group in questions.values()]),
    }


def score_hallusionbench(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """Mean of aAcc, fAcc and qAcc (%), the OpenCompass leaderboard's HallusionBench number.

    aAcc: all questions. fAcc: a figure (same l2-category, set and figure id) counts if all its questions are
    right. qAcc: a question (same l2-category, set and question id) counts if it is right on every figure.
    """
    hits = yes_no_hits(rows, rules)
    overall = _hallusion_metrics(rows, hits)
    result = {"score": sum(overall.values()) / 3, **overall, "num_questions": len(rows)}
    for column, key in (("category", "categories"), ("l2-category", "l2_categories")):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            if column in row:
                groups[str(row[column])].append(i)
        if groups:
            result[key] = {
                value: _hallusion_metrics([rows[i] for i in groups[value]], [hits[i] for i in groups[value]])
                for value in sorted(groups)
            }
    return result
