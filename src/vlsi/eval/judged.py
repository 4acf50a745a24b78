"""Judge-scored benchmarks: MM-Vet, MM-Vet v2 (a 0-1 grade per answer) and LLaVA-Wilder (relative score)."""

from __future__ import annotations

from collections import defaultdict

from .common import percent
from .io import ScoreError
from .judge import (
    MMVET_TEMPERATURES,
    WILDER_SYSTEM,
    WILDER_TEMPERATURES,
    JudgeFn,
    grade_all,
    mmvet_prompt,
    parse_mmvet_grade,
    parse_wilder_scores,
    wilder_prompt,
)

MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
MMVET_V2_CAPABILITIES = (*MMVET_CAPABILITIES, "seq")


def _capabilities(row: dict) -> list[str]:
    """The row's capabilities: "rec,ocr" in a TSV or ["rec", "ocr"] in JSONL."""
    value = row["category"]
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _score_mmvet(rows: list[dict], judge: JudgeFn, capabilities: tuple[str, ...]) -> dict:
    prompts = [mmvet_prompt(str(row["question"]), str(row["answer"]), str(row["prediction"])) for row in rows]
    grades = grade_all(judge, prompts, parse_mmvet_grade, MMVET_TEMPERATURES)
    # As in VLMEvalKit, an answer the judge never graded legibly scores 0.0.
    scores = [0.0 if grade is None else grade for grade in grades]
    row_capabilities = [_capabilities(row) for row in rows]
    by_capability: dict[str, list[float]] = defaultdict(list)
    by_set: dict[str, list[float]] = defaultdict(list)
    for score, caps in zip(scores, row_capabilities, strict=True):
        for capability in caps:
            by_capability[capability].append(score)
        by_set["_".join(caps)].append(score)
    return {
        "score": percent(scores),
        "num_questions": len(rows),
        "capabilities": {c: percent(by_capability[c]) for c in capabilities if c in by_capability},
        "capability_sets": {name: percent(by_set[name]) for name in sorted(by_set)},
        "judge_failures": sum(grade is None for grade in grades),
    }


def score_mm_vet(rows: list[dict], judge: JudgeFn) -> dict:
    """MM-Vet: mean judge grade x 100, overall and per capability (rec, ocr, know, gen, spat, math)."""
    return _score_mmvet(rows, judge, MMVET_CAPABILITIES)


def score_mm_vet_v2(rows: list[dict], judge: JudgeFn) -> dict:
    """MM-Vet v2: as MM-Vet, with the extra capability seq (image-text sequence understanding)."""
    return _score_mmvet(rows, judge, MMVET_V2_CAPABILITIES)


def _relative(reviews: list[tuple[float, float]]) -> float:
    reference = sum(r for r, _ in reviews)
    if reference == 0:
        raise ScoreError("the judge gave every reference answer 0; relative score is undefined, check the judge")
    return 100 * sum(m for _, m in reviews) / reference


def score_llava_wilder(rows: list[dict], judge: JudgeFn) -> dict:
    """LLaVA-Wilder relative score (VLMEvalKit's LLaVABench rule): mean model score / mean reference score x 100.

    The judge scores the reference answer (`answer`) and the prediction 1-10; a review whose first line is not
    two numbers after every retry is left out and counted in judge_failures.
    """
    prompts = [wilder_prompt(str(row["question"]), str(row["answer"]), str(row["prediction"])) for row in rows]
    reviews = grade_all(judge, prompts, parse_wilder_scores, WILDER_TEMPERATURES, system=WILDER_SYSTEM)
    scored = [(row, review) for row, review in zip(rows, reviews, strict=True) if review is not None]
    if not scored:
        raise ScoreError("no judge review began with two scores (reference, model); check --judge-model")
    pairs = [review for _, review in scored]
    result = {
        "score": _relative(pairs),
        "model_score": 10 * sum(m for _, m in pairs) / len(pairs),
        "reference_score": 10 * sum(r for r, _ in pairs) / len(pairs),
        "num_questions": len(rows),
        "judge_failures": len(rows) - len(scored),
    }
    by_category: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row, review in scored:
        if str(row.get("category", "")).strip():
            by_category[str(row["category"])].append(review)
    if by_category:
        result["categories"] = {name: _relative(by_category[name]) for name in sorted(by_category)}
    return result
