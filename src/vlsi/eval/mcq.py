"""Multiple-choice scorers: plain accuracy (AI2D, MMStar, BLINK, SEED-2-Plus, Q-Bench), MMBench CircularEval,
MMMU (open questions as VLMEvalKit re-poses them) and CV-Bench (2D averaged over sources).

Matching is VLMEvalKit's exact-matching mode (`mcq_vanilla_eval` / `mcq_circular_eval` in
vlmeval/dataset/utils/multiple_choice.py): no LLM picks the option; an unreadable answer is wrong. The VLMEvalKit
rules read the cells as pandas does and compare the picked letter with the answer cell as it is; the lenient rules
read more ways of stating a letter and the answer "(B)" as B.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

from .cells import NA, is_na, read_like_pandas
from .common import VLMEVALKIT, accuracy_by, group_accuracies, percent, row_name
from .extract import infer_option, infer_option_vlmevalkit, options_from_row
from .io import ScoreError

# MMBench stores rotation k of question g (options shifted k places) at index g + k * 1e6.
ROTATION_STRIDE = 1_000_000
LETTERS = tuple(string.ascii_uppercase)
_LETTER = re.compile(r"^\(?([A-Z])\)?\.?$")


def answer_letter(row: dict) -> str:
    """Ground-truth option letter; "(B)" and "B." are read as "B"."""
    answer = str(row["answer"]).strip()
    match = _LETTER.match(answer)
    return match.group(1) if match else answer


def options_vlmevalkit(row: dict) -> dict[str, str]:
    """VLMEvalKit's `build_choices` on a row read by pandas: every letter column with a value, as text."""
    return {letter: str(row[letter]) for letter in LETTERS if letter in row and not is_na(row[letter])}


def mcq_hits(rows: list[dict], rules: str) -> list[bool]:
    """Per row, whether the prediction picks the answer: VLMEvalKit's `can_infer` compared with the answer cell as
    pandas reads it, or the lenient reading compared with the answer letter."""
    if rules == VLMEVALKIT:
        typed = read_like_pandas(rows)
        return [
            infer_option_vlmevalkit(str(row["prediction"]), options_vlmevalkit(row)) == row["answer"] for row in typed
        ]
    return [infer_option(str(row["prediction"]), options_from_row(row)) == answer_letter(row) for row in rows]


def score_mcq(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """Accuracy (%) over all rows, plus per split / l2-category / category (VLMEvalKit `report_acc`)."""
    hits = mcq_hits(rows, rules)
    return {"score": percent(hits), "num_questions": len(rows), **group_accuracies(rows, hits)}


def _integer_index(row: dict) -> int:
    try:
        value = float(row["index"])
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise ScoreError(
            f"{row_name(row)}: MMBench needs integer indices (rotation k of question g is g + k*{ROTATION_STRIDE})"
        )
    return int(value)


def score_mmbench(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """CircularEval accuracy (%): question g counts only if it and every rotation g + k*1e6 are answered right.

    As in VLMEvalKit, a question is the row whose index is below 1e6 and its group is every row with the same
    index modulo 1e6; categories are read from that main row.
    """
    hits = mcq_hits(rows, rules)
    by_index: dict[int, tuple[dict, bool]] = {}
    for row, hit in zip(rows, hits, strict=True):
        index = _integer_index(row)
        if index in by_index:
            raise ScoreError(f"{row_name(row)}: index appears twice; keep one prediction per index")
        by_index[index] = row, hit
    groups: dict[int, list[int]] = defaultdict(list)
    for index in sorted(by_index):
        groups[index % ROTATION_STRIDE].append(index)
    orphans = sorted(g for g in groups if g not in by_index)
    if orphans:
        raise ScoreError(
            f"{row_name(by_index[groups[orphans[0]][0]][0])}: a rotation of question {orphans[0]}, whose main row "
            f"(index {orphans[0]}) is missing; include every question's main row"
        )
    questions = sorted(groups)
    main_rows = [by_index[g][0] for g in questions]
    question_hits = [all(by_index[index][1] for index in groups[g]) for g in questions]
    return {
        "score": percent(question_hits),
        "num_questions": len(questions),
        "num_rows": len(rows),
        "vanilla_accuracy": percent(hits),
        **group_accuracies(main_rows, question_hits),
    }


def _mmmu_hits_vlmevalkit(rows: list[dict]) -> list[bool]:
    """VLMEvalKit's MMMU_preproc on rows read by pandas: a row without option A becomes "A. <answer>  B. Other
    Answers", and the truth is the answer when it is one capital letter, else A (for every row, so an answer
    written "(B)" counts as A)."""
    hits = []
    for row in read_like_pandas(rows):
        if is_na(row.get("A", NA)):
            row = {**row, "A": row["answer"], "B": "Other Answers"}
        truth = row["answer"] if row["answer"] in LETTERS else "A"
        hits.append(infer_option_vlmevalkit(str(row["prediction"]), options_vlmevalkit(row)) == truth)
    return hits


def _mmmu_hit(row: dict) -> bool:
    options = options_from_row(row)
    if "A" in options:
        return infer_option(str(row["prediction"]), options) == answer_letter(row)
    # VLMEvalKit's MMMU_preproc: an open question becomes "A. <answer>  B. Other Answers" with truth A
    # (or the answer itself when that is a single capital letter).
    answer = str(row["answer"])
    truth = answer if len(answer) == 1 and "A" <= answer <= "Z" else "A"
    return infer_option(str(row["prediction"]), {"A": answer, "B": "Other Answers"}) == truth


def score_mmmu(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """MMMU accuracy (%) on the validation split (all rows when no row has split == "validation").

    Details give multiple-choice and open accuracy on that split, accuracy per split, and per subject.
    """
    hits = _mmmu_hits_vlmevalkit(rows) if rules == VLMEVALKIT else [_mmmu_hit(row) for row in rows]
    has_validation = any(row.get("split") == "validation" for row in rows)
    chosen = [i for i, row in enumerate(rows) if not has_validation or row.get("split") == "validation"]
    chosen_rows, chosen_hits = [rows[i] for i in chosen], [hits[i] for i in chosen]
    is_open = ["A" not in options_from_row(row) for row in chosen_rows]
    result = {
        "score": percent(chosen_hits),
        "split": "validation" if has_validation else "all",
        "num_questions": len(chosen),
        **group_accuracies(chosen_rows, chosen_hits),
    }
    multiple_choice = [hit for hit, open_ in zip(chosen_hits, is_open, strict=True) if not open_]
    open_ended = [hit for hit, open_ in zip(chosen_hits, is_open, strict=True) if open_]
    if multiple_choice:
        result["multiple_choice"] = percent(multiple_choice)
    if open_ended:
        result["open"] = percent(open_ended)
    splits = accuracy_by(rows, hits, "split")
    if splits:
        result["splits"] = splits
    return result


def score_cv_bench(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """CV-Bench as Cambrian-1 reports it: mean of 2D (mean of per-source accuracy: ADE20K, COCO) and 3D accuracy,
    each as VLMEvalKit scores CV-Bench-2D and CV-Bench-3D. A file with only 2D or only 3D rows scores that part."""
    return _score_cv_bench(rows, rules, ("2D", "3D"))


def score_cv_bench_2d(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """VLMEvalKit's CV-Bench-2D: the mean of the per-source accuracies (ADE20K, COCO)."""
    return _score_cv_bench(rows, rules, ("2D",))


def score_cv_bench_3d(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """VLMEvalKit's CV-Bench-3D: accuracy over the rows (all from Omni3D)."""
    return _score_cv_bench(rows, rules, ("3D",))


def _score_cv_bench(rows: list[dict], rules: str, splits: tuple[str, ...]) -> dict:
    hits = mcq_hits(rows, rules)
    parts: dict[str, list[tuple[dict, bool]]] = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        split = str(row["split"]).strip().upper()
        if split not in splits:
            hint = "" if len(splits) > 1 else f"; this benchmark is CV-Bench-{splits[0]}, use cv_bench for both parts"
            raise ScoreError(
                f"{row_name(row)}: CV-Bench split must be {' or '.join(splits)}, got {row['split']!r}{hint}"
            )
        parts[split].append((row, hit))
    result = {}
    if parts["2D"]:
        sources: dict[str, list[bool]] = defaultdict(list)
        for row, hit in parts["2D"]:
            sources[str(row["source"])].append(hit)
        result["2d"] = sum(percent(source_hits) for source_hits in sources.values()) / len(sources)
    if parts["3D"]:
        result["3d"] = percent([hit for _, hit in parts["3D"]])
    details = group_accuracies(rows, hits)
    details.pop("splits", None)
    return {
        "score": sum(result.values()) / len(result),
        **(result if len(splits) > 1 else {}),
        "num_questions": len(rows),
        "sources": accuracy_by(rows, hits, "source"),
        **details,
    }
