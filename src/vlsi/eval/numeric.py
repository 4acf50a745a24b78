"""Free-form answers: ChartQA (relaxed accuracy) and MathVista testmini (rule extraction, optional judge)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict

from .common import accuracy_by, as_list, group_accuracies, percent, row_name
from .extract import infer_option, is_missing, number_values, numbers_in, stated_answer
from .io import ScoreError
from .judge import JudgeFn, grade_all, mathvista_prompt, parse_extracted

RELATIVE_TOLERANCE = 0.05


def _answers(row: dict) -> list[str]:
    """ChartQA ground truths: one string, or a list (JSONL list or its text "['a', 'b']")."""
    value = row["answer"]
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [text]
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return [text]


def _plain_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match_vlmevalkit(target: str, prediction: str) -> bool:
    """VLMEvalKit's (and pix2struct's) relaxed correctness: a number within 5% of a non-zero target, else the
    lower-cased strings equal. Only bare numbers are read ("12%" is 0.12; "12 kg" or "$12" is text)."""
    p, t = _plain_float(prediction), _plain_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= RELATIVE_TOLERANCE
    return prediction.lower() == target.lower()


def relaxed_match(target: str, prediction: str) -> bool:
    """Relaxed correctness that also reads thousands separators, currency, units and percentages.

    Correct when VLMEvalKit's rule says so, or when both sides read as numbers ("1,234", "$12", "12 kg", "12%")
    and some reading of each is within 5% of the other; "12%" may mean 12 or 0.12.
    """
    if relaxed_match_vlmevalkit(target, prediction):
        return True
    targets, predictions = number_values(target), number_values(prediction)
    return any(p == t if t == 0 else abs(p - t) <= RELATIVE_TOLERANCE * abs(t) for p in predictions for t in targets)


def score_chartqa(rows: list[dict]) -> dict:
    """ChartQA relaxed accuracy (%): best match over the row's answers; per split (human / augmented)."""
    hits, strict = [], []
    for row in rows:
        prediction, answers = str(row["prediction"]).strip(), _answers(row)
        hits.append(any(relaxed_match(answer, prediction) for answer in answers))
        strict.append(any(relaxed_match_vlmevalkit(answer, prediction) for answer in answers))
    return {
        "score": percent(hits),
        "relaxed_accuracy_vlmevalkit": percent(strict),
        "num_questions": len(rows),
        **group_accuracies(rows, hits),
    }


def _mathvista_options(row: dict) -> tuple[dict[str, str], str]:
    """Options as {"A": ..., "B": ...} and the correct letter (answer_option, or the option equal to answer)."""
    options = {chr(ord("A") + i): str(choice) for i, choice in enumerate(as_list(row.get("choices"), row, "choices"))}
    if not is_missing(row.get("answer_option")):
        return options, str(row["answer_option"]).strip()
    for letter, option in options.items():
        if option.strip() == str(row["answer"]).strip():
            return options, letter
    raise ScoreError(f"{row_name(row)}: answer {row['answer']!r} is none of its choices; add an answer_option column")


def _number_cell(row: dict, column: str) -> float:
    try:
        return float(str(row[column]).replace(",", ""))
    except ValueError:
        raise ScoreError(f"{row_name(row)}: {column} should be a number, got {row[column]!r}") from None


def _precision(row: dict) -> int | None:
    """Decimal places a float answer is compared at (MathVista's `precision` field), None to compare exactly."""
    return None if is_missing(row.get("precision")) else int(_number_cell(row, "precision"))


def _same_item(got, want) -> bool:
    a, b = number_values(str(got)), number_values(str(want))
    return a[0] == b[0] if a and b else str(got).strip().lower() == str(want).strip().lower()


def _same_list(candidate: str, answer: str) -> bool:
    """Element-wise equality of two list answers ("[2007, 2008]"); False when either is not a list."""
    try:
        got, want = ast.literal_eval(candidate.strip()), ast.literal_eval(answer.strip())
    except (ValueError, SyntaxError):
        return False
    if not isinstance(got, (list, tuple)) or not isinstance(want, (list, tuple)):
        return False
    return len(got) == len(want) and all(_same_item(g, w) for g, w in zip(got, want, strict=True))


def mathvista_correct(row: dict, candidate: str) -> bool:
    """Whether `candidate` (a prediction or an extracted answer) reads as the right answer for the row's type:
    an option letter (VLMEvalKit's can_infer), one integer, one float compared at the row's precision, a list."""
    if row["question_type"] == "multi_choice":
        options, truth = _mathvista_options(row)
        return infer_option(candidate, options) == truth
    answer_type = row["answer_type"]
    if answer_type in ("integer", "float"):
        values = number_values(candidate)
        if not values:
            return False
        value, truth = values[0], _number_cell(row, "answer")
        if answer_type == "integer":
            return value.is_integer() and value == truth
        digits = _precision(row)
        return value == truth if digits is None else round(value, digits) == round(truth, digits)
    if answer_type == "list":
        return _same_list(candidate, str(row["answer"]))
    return candidate.strip().lower() == str(row["answer"]).strip().lower()


def _rule_extraction(row: dict, prediction: str) -> str:
    """Best rule-based guess at the answer in a worked solution: the first number (or list) of the stated
    answer ("The answer is 14.", "\\boxed{14}"), else the last one in the text."""
    stated = stated_answer(prediction)
    if row["answer_type"] == "list":
        lists = re.findall(r"\[[^\[\]]*\]", stated or prediction)
        return lists[-1] if lists else ""
    if row["answer_type"] in ("integer", "float"):
        numbers = numbers_in(stated)[:1] if stated else []
        numbers = numbers or numbers_in(prediction)[-1:]
        return numbers[0] if numbers else ""
    return stated or prediction


def score_mathvista(rows: list[dict], judge: JudgeFn | None = None) -> dict:
    """MathVista accuracy (%): per task, skill and question type.

    A prediction that is already right as written (an option VLMEvalKit's can_infer reads, a bare number) counts
    at once. Otherwise, as in VLMEvalKit, the judge extracts the answer when one is given; without a judge a
    rule reads the stated answer or the last number.
    """
    predictions = [str(row["prediction"]) for row in rows]
    hits = [mathvista_correct(row, p) for row, p in zip(rows, predictions, strict=True)]
    undecided = [i for i, hit in enumerate(hits) if not hit]
    if judge is not None:
        prompts = [mathvista_prompt(str(rows[i].get("question", "")), predictions[i]) for i in undecided]
        extracted = grade_all(judge, prompts, parse_extracted, (0.0,))
        for i, answer in zip(undecided, extracted, strict=True):
            hits[i] = answer is not None and mathvista_correct(rows[i], answer)
    else:
        for i in undecided:
            hits[i] = mathvista_correct(rows[i], _rule_extraction(rows[i], predictions[i]))
    skills: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        if is_missing(row.get("skills")):
            continue
        try:
            row_skills = as_list(row["skills"], row, "skills")
        except ScoreError:
            row_skills = [row["skills"]]
        for skill in row_skills:
            skills[str(skill)].append(hit)
    result = {
        "score": percent(hits),
        "num_questions": len(rows),
        "judge_calls": len(undecided) if judge is not None else 0,
        "question_types": accuracy_by(rows, hits, "question_type"),
        "tasks": accuracy_by(rows, hits, "task"),
    }
    if skills:
        result["skills"] = {name: percent(skills[name]) for name in sorted(skills)}
    return result
