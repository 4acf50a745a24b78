"""Judge-scored benchmarks: MM-Vet, MM-Vet v2 (a 0-1 grade per answer) and LLaVA-Wilder (relative score).

Both rules ask the judge the same prompts; they differ in how a reply is read, when it is asked again, and (MM-Vet)
how answers are counted per capability. VLMEvalKit's are its MMVet and LLaVABench procedures
(vlmeval/dataset/utils/mmvet.py, llavabench.py); MM-Vet v2 and LLaVA-Wilder, which it lacks, use those.
"""

from __future__ import annotations

from collections import defaultdict

from .cells import read_like_pandas
from .common import VLMEVALKIT, percent
from .io import ScoreError
from .judge import (
    MMVET_TEMPERATURES,
    WILDER_SYSTEM,
    WILDER_TEMPERATURES,
    JudgeFn,
    grade_all,
    mmvet_prompt,
    parse_mmvet_grade,
    parse_mmvet_grade_vlmevalkit,
    parse_wilder_scores,
    parse_wilder_scores_vlmevalkit,
    wilder_prompt,
)

MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
MMVET_V2_CAPABILITIES = (*MMVET_CAPABILITIES, "seq")


def _capabilities(row: dict) -> list[str]:
    """The row's capabilities: "rec,ocr" in a TSV or ["rec", "ocr"] in JSONL."""
    value = row["category"]
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _category_text(row: dict) -> str:
    """The category cell as a TSV holds it ("rec,ocr"; a JSONL list is joined)."""
    value = row["category"]
    return ",".join(str(item) for item in value) if isinstance(value, list) else str(value)


def _by_capability_vlmevalkit(categories: list[str], scores: list[float], capabilities: tuple[str, ...]):
    """VLMEvalKit's MMVet_acc: a row counts in every capability whose name is part of its category text, and its
    capability set ("rec,ocr" -> "rec_ocr") shares the same table, so a single-capability row counts twice there."""
    total: dict[str, int] = defaultdict(int)
    summed: dict[str, float] = defaultdict(float)
    for category, score in zip(categories, scores, strict=True):
        for key in [c for c in capabilities if c in category] + [category.replace(",", "_")]:
            total[key] += 1
            summed[key] += score
    sets = list(dict.fromkeys(category.replace(",", "_") for category in categories))
    return (
        {c: 100 * summed[c] / total[c] for c in capabilities if total[c]},
        {name: 100 * summed[name] / total[name] for name in sorted(sets)},
    )


def _score_mmvet(rows: list[dict], judge: JudgeFn, capabilities: tuple[str, ...], rules: str) -> dict:
    cells = read_like_pandas(rows) if rules == VLMEVALKIT else rows
    prompts = [mmvet_prompt(str(row["question"]), str(row["answer"]), str(row["prediction"])) for row in cells]
    parse = parse_mmvet_grade_vlmevalkit if rules == VLMEVALKIT else parse_mmvet_grade
    grades = grade_all(judge, prompts, parse, MMVET_TEMPERATURES)
    # As in VLMEvalKit, an answer the judge never graded legibly scores 0.0.
    scores = [0.0 if grade is None else grade for grade in grades]
    if rules == VLMEVALKIT:
        categories = [_category_text(row) for row in rows]
        by_capability, by_set = _by_capability_vlmevalkit(categories, scores, capabilities)
    else:
        row_capabilities = [_capabilities(row) for row in rows]
        capability_scores: dict[str, list[float]] = defaultdict(list)
        set_scores: dict[str, list[float]] = defaultdict(list)
        for score, caps in zip(scores, row_capabilities, strict=True):
            for capability in caps:
                capability_scores[capability].append(score)
            set_scores["_".join(caps)].append(score)
        by_capability = {c: percent(capability_scores[c]) for c in capabilities if c in capability_scores}
        by_set = {name: percent(set_scores[name]) for name in sorted(set_scores)}
    return {
        "score": percent(scores),
        "num_questions": len(rows),
        "capabilities": by_capability,
        "capability_sets": by_set,
        "judge_failures": sum(grade is None for grade in grades),
    }


def score_mm_vet(rows: list[dict], judge: JudgeFn, rules: str = VLMEVALKIT) -> dict:
    """MM-Vet: mean judge grade x 100, overall and per capability (rec, ocr, know, gen, spat, math)."""
    return _score_mmvet(rows, judge, MMVET_CAPABILITIES, rules)


def score_mm_vet_v2(rows: list[dict], judge: JudgeFn, rules: str = VLMEVALKIT) -> dict:
    """MM-Vet v2: as MM-Vet, with the extra capability seq (image-text sequence understanding)."""
    return _score_mmvet(rows, judge, MMVET_V2_CAPABILITIES, rules)


def _relative(reviews: list[tuple[float, float]]) -> float:
    reference = sum(r for r, _ in reviews)
    if reference == 0:
        raise ScoreError("the judge gave every reference answer 0; relative score is undefined, check the judge")
    return 100 * sum(m for _, m in reviews) / reference


def score_llava_wilder(rows: list[dict], judge: JudgeFn, rules: str = VLMEVALKIT) -> dict:
    """LLaVA-Wilder relative score (VLMEvalKit's LLaVABench rule): mean model score / mean reference score x 100.

    The judge scores the reference answer (`answer`) and the prediction 1-10. VLMEvalKit asks once and averages an
    unreadable review in as -1 / -1; the lenient rule re-asks it and then leaves it out. Either way it is counted
    in judge_failures.
    """
    prompts = [wilder_prompt(str(row["question"]), str(row["answer"]), str(row["prediction"])) for row in rows]
    if rules == VLMEVALKIT:
        reviews = grade_all(
            judge, prompts, parse_wilder_scores_vlmevalkit, WILDER_TEMPERATURES[:1], system=WILDER_SYSTEM
        )
        scored = [(row, (-1.0, -1.0) if review is None else review) for row, review in zip(rows, reviews, strict=True)]
    else:
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
        "judge_failures": sum(review is None for review in reviews),
    }
    by_category: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row, review in scored:
        if str(row.get("category", "")).strip():
            by_category[str(row["category"])].append(review)
    if by_category:
        result["categories"] = {name: _relative(by_category[name]) for name in sorted(by_category)}
    return result
