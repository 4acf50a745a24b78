"""Pure answer-extraction helpers: an option letter, Yes/No, or a number from a model's free text.

`infer_option_vlmevalkit` and `yes_no_vlmevalkit` are VLMEvalKit's exact-matching rules (`can_infer` in
vlmeval/utils/matching_util.py, `YOrN_Extraction` in vlmeval/dataset/utils/yorn.py, commit e8e78f0), quirks
included; `infer_option` and `yes_no` are the lenient rules (docs/EVALUATION.md, "The lenient rules").
"""

from __future__ import annotations

import re

# A prediction containing one of these is a refusal; VLMEvalKit maps it to the impossible option "Z".
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"

_TOKEN_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# "answer is B" when the letter is not among the last few tokens ("The answer is B because ...").
_ANSWER_IS = re.compile(r"(?i:(?:correct\s+)?answer\s+is)\s*\**\s*\(?([A-Z])\)?(?![A-Za-z])")
# VLMEvalKit's version: case-insensitive, A-D only, no bracket and no word boundary, so "The answer is a cat"
# reads as A, "The answer is clear" as C, and "The answer is (B)" not at all.
_ANSWER_IS_VLMEVALKIT = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
# MMBench-CN style: "答案是B", "选项：(C)", "故选A".
_ANSWER_IS_CN = re.compile(
    r"(?:答案|选项|选择|应选|故选)\s*(?:是|为|应该是|应为)?\s*[:：]?\s*[(（]?\s*([A-Z])(?![A-Za-z])"
)

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_CURRENCY = "$€£¥₹"
# A whole answer that is one number: optional currency, the number, then "%" or a unit ("12 kg", "$3.5 million").
_NUMBER_ANSWER = re.compile(
    rf"^[{_CURRENCY}]?\s*(?P<num>{_NUMBER})\s*(?P<unit>%|percent|[A-Za-z°]+(?:\s+[A-Za-z]+)?)?\.?$", re.IGNORECASE
)
_ANY_NUMBER = re.compile(_NUMBER)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_FINAL_ANSWER = re.compile(r"(?i)answer\s*(?:is|:|=)\s*:?\s*(.+)")


def options_from_row(row: dict) -> dict[str, str]:
    """The row's options: single capital-letter columns with a value, e.g. {"A": "cat", "B": "dog"}."""
    return {
        key: str(value)
        for key, value in sorted(row.items())
        if len(key) == 1 and "A" <= key <= "Z" and not is_missing(value)
    }


def is_missing(value) -> bool:
    """True for an empty cell; pandas writes a missing option as "" or "nan"."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "nan", "NaN"))


def infer_option(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text prediction picks, "Z" for a refusal, or None when it cannot be told.

    Order (VLMEvalKit's `can_infer`): a lone option letter among the last five tokens ("B", "(B)",
    "The answer is (B).", "B. cat", "I think C is right"); "answer is X" anywhere, X a capital option letter
    standing alone ("The answer is (E) because ...") or, in Chinese, "答案是B" / "选项：C" / "故选A"; then the option
    text itself when exactly one option's text occurs in a short prediction ("cat" for "B. cat").
    """
    return _infer(prediction, options, _answer_is)


def infer_option_vlmevalkit(prediction: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's `can_infer` exactly: as `infer_option`, but "answer is X" is its own pattern (any case, A-D,
    no bracket: "The answer is a cat." reads as A) and Chinese answers are not read."""
    if API_FAILURE in prediction:  # its letter rules give up here, but its option-text rule still runs
        return _infer_from_option_text(prediction, options)
    return _infer(prediction, options, _answer_is_vlmevalkit)


def _answer_is(prediction: str, options: dict[str, str]) -> str | None:
    for pattern in (_ANSWER_IS, _ANSWER_IS_CN):
        match = pattern.search(prediction)
        if match and match.group(1) in options:
            return match.group(1)
    return None


def _answer_is_vlmevalkit(prediction: str, options: dict[str, str]) -> str | None:
    match = _ANSWER_IS_VLMEVALKIT.search(prediction)
    letter = match.group(1).upper() if match else None
    return letter if letter in options else None


def _infer(prediction: str, options: dict[str, str], answer_is) -> str | None:
    if API_FAILURE in prediction:
        return None
    if any(refusal in prediction for refusal in REFUSALS):
        return "Z"
    tokens = prediction.translate(_TOKEN_SEPARATORS).split()
    found = [letter for letter in options if letter in tokens]
    if len(found) == 1:
        letter = found[0]
        # tokens.index(letter) is the letter's first occurrence; only a letter near the end counts as the answer
        if tokens.index(letter) > len(tokens) - 5:
            return letter
    elif not found and "Z" in tokens:
        return "Z"
    return answer_is(prediction, options) or _infer_from_option_text(prediction, options)


def _infer_from_option_text(prediction: str, options: dict[str, str]) -> str | None:
    text = prediction.lower()
    # A long answer mentions several options in passing; VLMEvalKit only trusts short ones.
    if len(text) > 2 * sum(len(option) for option in options.values()):
        return None
    hits = [letter for letter, option in options.items() if option.lower() in text]
    return hits[0] if len(hits) == 1 else None


def normalize_punctuation(text: str, max_periods: int = 0) -> str:
    """The VQA-eval punctuation rule used by VLMEvalKit before matching words.

    A punctuation mark is deleted when it touches a space (or the text has a digit group like 1,000),
    otherwise it becomes a space; a period not between digits is deleted (only the first `max_periods` of them
    when it is not 0).
    """
    out = text
    digit_comma = re.search(r"(\d)(,)(\d)", text) is not None
    for mark in ';/[]"{}()=+\\_-><@`,?!':
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return re.sub(r"(?<!\d)\.(?!\d)", "", out, count=max_periods)


def yes_no(prediction: str) -> str:
    """ "Yes", "No" or "Unknown": the prediction's words contain exactly one of yes / no ("Yes, there is ...")."""
    return _yes_no_words(normalize_punctuation(prediction.lower()).split())


def yes_no_vlmevalkit(prediction: str) -> str:
    """VLMEvalKit's `YOrN_Extraction` exactly: as `yes_no`, but its clean-up deletes only the first 32 stray
    periods (it passes re.UNICODE, 32, as re.sub's count), so "yes." after 32 periods is not the word yes."""
    return _yes_no_words(normalize_punctuation(prediction.lower(), max_periods=32).split())


def _yes_no_words(words: list[str]) -> str:
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "Yes"
    if has_no and not has_yes:
        return "No"
    return "Unknown"


def number_values(answer: str) -> list[float]:
    """The values a one-number answer can mean; [] when the answer is not one number.

    "1,234" -> [1234]; "$3.5 million" -> [3.5]; "12%" or "12 percent" -> [12, 0.12], because a chart may
    label a share as 12 while the answer is written 0.12 (or the other way round).
    """
    match = _NUMBER_ANSWER.match(answer.strip())
    if match is None:
        return []
    value = float(match["num"].replace(",", ""))
    unit = (match["unit"] or "").lower()
    return [value, value / 100] if unit in ("%", "percent") else [value]


def stated_answer(prediction: str) -> str | None:
    """The part of a worked solution that states the answer: the last \\boxed{...}, else what follows the
    last "answer is" / "answer:"; None when the prediction states neither."""
    boxed = _BOXED.findall(prediction)
    if boxed:
        return boxed[-1]
    stated = _FINAL_ANSWER.findall(prediction)
    return stated[-1] if stated else None


def numbers_in(text: str) -> list[str]:
    """Every number in `text` as written, in order ("1,250 dollars in 2 days" -> ["1,250", "2"])."""
    return _ANY_NUMBER.findall(text)
