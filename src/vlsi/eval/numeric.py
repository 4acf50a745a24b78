"""Free-form answers: ChartQA (relaxed accuracy) and MathVista testmini (answer extraction, optional judge).

ChartQA's VLMEvalKit rule reads bare numbers only; the lenient rule also reads "1,234", "$12", "12 kg" and "12%".
MathVista's VLMEvalKit rule is its `MathVista_auxeval` / `MathVista_acc` (vlmeval/dataset/utils/mathvista.py):
a prediction right as written is taken at once, every other one goes to the judge, and without a judge it is
scored as VLMEvalKit scores it when the judge never answers. The lenient rule reads worked solutions itself.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict

from .cells import as_written, column_like_pandas, read_like_pandas
from .common import VLMEVALKIT, accuracy_by, as_list, group_accuracies, percent, row_name
from .extract import infer_option, infer_option_vlmevalkit, is_missing, number_values, numbers_in, stated_answer
from .io import ScoreError
from .judge import JudgeFn, grade_all, mathvista_prompt, parse_extracted

RELATIVE_TOLERANCE = 0.05


def _answers(value) -> list[str]:
    """ChartQA ground truths: one string, or a list (a JSONL list, or text that is a Python list: "['a', 'b']")."""
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return [text]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [text]


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


def chartqa_hits(rows: list[dict], rules: str) -> list[bool]:
    """Per row, whether the stripped prediction matches any of the row's answers (VLMEvalKit reads both cells as
    pandas does: "NA" is "nan", and an answer column of numbers with a blank holds "12.0")."""
    if rules == VLMEVALKIT:
        return [
            any(relaxed_match_vlmevalkit(answer, str(row["prediction"]).strip()) for answer in _answers(row["answer"]))
            for row in read_like_pandas(rows)
        ]
    return [
        any(relaxed_match(answer, str(row["prediction"]).strip()) for answer in _answers(row["answer"])) for row in rows
    ]


def score_chartqa(rows: list[dict], rules: str = VLMEVALKIT) -> dict:
    """ChartQA relaxed accuracy (%): best match over the row's answers; per split (human / augmented)."""
    hits = chartqa_hits(rows, rules)
    return {"score": percent(hits), "num_questions": len(rows), **group_accuracies(rows, hits)}


# ---------------------------------------------------------------- MathVista, VLMEvalKit's rule


def _vlmevalkit_reading(row: dict, response) -> tuple[object, bool]:
    """VLMEvalKit's `post_check` of a response (the prediction, or the judge's extraction) on a row read by
    pandas: (what it read, whether that is right). Multiple choice: the letter `can_infer` reads, right when it is
    the answer_option cell. Integer / float: int() / float() of the response and of the answer, equal. Text and
    list answers: never right (it compares str(None) with the answer)."""
    if row["question_type"] == "multi_choice":
        listed = as_list(row.get("choices"), row, "choices")
        choices = {chr(ord("A") + i): str(choice) for i, choice in enumerate(listed)}
        letter = infer_option_vlmevalkit(str(response), choices)
        truth = row["answer_option"] if "answer_option" in row else _letter_of_answer(row, choices)
        return letter, letter is not None and letter == truth
    convert = {"integer": int, "float": float}.get(row["answer_type"])
    if convert is None:
        return None, False
    try:
        value, truth = convert(response), convert(row["answer"])
    except (ValueError, OverflowError):
        return None, False
    return value, value == truth


def _mathvista_vlmevalkit(rows: list[dict], judge: JudgeFn | None) -> tuple[list[bool], int]:
    """(hits, judge calls) as VLMEvalKit's MathVista.evaluate gives them.

    A response is "prefetched" when post_check reads it: any option letter, or a number equal to the answer (but
    not 0, which post_check returns and its caller takes as a failure). Every other row goes to the judge, whose
    stripped reply is the extraction; a judge that never answers leaves "" (read back as "nan"). VLMEvalKit stores
    the extractions in a TSV and reads them back, so the column is typed by pandas before the final post_check.
    """
    typed = read_like_pandas(rows)
    extracted: list[object] = []
    ask: list[int] = []
    for i, row in enumerate(typed):
        value, right = _vlmevalkit_reading(row, row["prediction"])
        prefetched = bool(value) and (right or row["question_type"] == "multi_choice")
        extracted.append(value if prefetched else "")
        if not prefetched:
            ask.append(i)
    if judge is not None:
        prompts = [mathvista_prompt(str(typed[i].get("question", "")), str(typed[i]["prediction"])) for i in ask]
        replies = grade_all(judge, prompts, str.strip, (0.0,))
        for i, reply in zip(ask, replies, strict=True):
            extracted[i] = reply
    stored = column_like_pandas([as_written(value) for value in extracted])
    hits = [_vlmevalkit_reading(row, value)[1] for row, value in zip(typed, stored, strict=True)]
    return hits, len(ask) if judge is not None else 0


# ---------------------------------------------------------------- MathVista, lenient rule


def _mathvista_options(row: dict) -> tuple[dict[str, str], str]:
    """Options as {"A": ..., "B": ...} and the correct letter (answer_option, or the option equal to answer)."""
    options = {chr(ord("A") + i): str(choice) for i, choice in enumerate(as_list(row.get("choices"), row, "choices"))}
    if not is_missing(row.get("answer_option")):
        return options, str(row["answer_option"]).strip()
    return options, _letter_of_answer(row, options)


def _letter_of_answer(row: dict, options: dict[str, str]) -> str:
    """The letter of the choice equal to the answer, for files without an answer_option column."""
    for letter, option in options.items():
        if option.strip() == str(row["answer"]).strip():
            return letter
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


def _mathvista_lenient(rows: list[dict], judge: JudgeFn | None) -> tuple[list[bool], int]:
    """(hits, judge calls): a prediction right as written counts at once; the judge (VLMEvalKit's prompt) extracts
    the answer of the others, or without a judge a rule reads the stated answer or the last number."""
    predictions = [str(row["prediction"]) for row in rows]
    hits = [mathvista_correct(row, p) for row, p in zip(rows, predictions, strict=True)]
    undecided = [i for i, hit in enumerate(hits) if not hit]
    if judge is None:
        for i in undecided:
            hits[i] = mathvista_correct(rows[i], _rule_extraction(rows[i], predictions[i]))
        return hits, 0
    prompts = [mathvista_prompt(str(rows[i].get("question", "")), predictions[i]) for i in undecided]
    extracted = grade_all(judge, prompts, parse_extracted, (0.0,))
    for i, answer in zip(undecided, extracted, strict=True):
        hits[i] = answer is not None and mathvista_correct(rows[i], answer)
    return hits, len(undecided)


def score_mathvista(rows: list[dict], judge: JudgeFn | None = None, rules: str = VLMEVALKIT) -> dict:
    """MathVista accuracy (%): per task, skill and question type; `judge_calls` counts the extractions asked."""
    score_rows = _mathvista_vlmevalkit if rules == VLMEVALKIT else _mathvista_lenient
    hits, judge_calls = score_rows(rows, judge)
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
        "judge_calls": judge_calls,
        "question_types": accuracy_by(rows, hits, "question_type"),
        "tasks": accuracy_by(rows, hits, "task"),
    }
    if skills:
        result["skills"] = {name: percent(skills[name]) for name in sorted(skills)}
    return result
