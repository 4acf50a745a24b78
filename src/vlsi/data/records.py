"""Conversation records -> validated `Sample`s in Hugging Face chat format.

Reads a JSON array or JSONL file of LLaVA-style (`conversations`) or OpenAI-style (`messages`) records. Every
problem in the file is collected and reported at once, each naming the file, the record and its line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")
REMOTE_PREFIXES = ("http://", "https://", "data:")
MAX_SHOWN = 20
_SEPARATORS = re.compile(r"[\s,]*")


@dataclass
class Sample:
    """One conversation: `messages` in HF chat format, `{"type": "image"}` items in the order of `images`."""

    id: str
    messages: list[dict]
    images: list[Path]


class DataError(ValueError):
    """Invalid data: `problems` holds one line per problem; `str()` shows a header and the first MAX_SHOWN."""

    def __init__(self, problems: list[str], header: str):
        self.problems = problems
        more = [f"... and {len(problems) - MAX_SHOWN} more"] if len(problems) > MAX_SHOWN else []
        super().__init__("\n".join([header, *problems[:MAX_SHOWN], *more]))


def load_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON array (or single object) or JSONL file, in order; DataError if it is empty or malformed."""
    entries, problems = _parse(Path(path))
    if problems:
        raise DataError(problems, f"{path} is not a valid JSON / JSONL data file:")
    return [record for _, _, record in entries]


def read_dataset(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    unanswered: bool = False,
) -> tuple[list[Sample], list[str]]:
    """Validated samples of a data file and the problems of the records skipped (only with `skip_invalid`).

    Relative image paths resolve against `image_root`, by default the data file's directory. Without `skip_invalid`
    any problem raises DataError listing all of them; with it, invalid records are dropped, unless none is left.
    `unanswered` accepts records with no assistant turn that end with a user turn (data.answers=teacher: the teacher
    answers them before training, `vlsi.answers`).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    entries, problems = _parse(path)
    samples, lines_by_id, image_problems = [], {}, {}
    for index, line, record in entries:
        sample_id = str(record["id"]) if isinstance(record, dict) and "id" in record else str(index)
        sample, reasons = _to_sample(record, sample_id, root, image_problems, unanswered)
        if sample_id in lines_by_id:
            reasons.append(f"duplicate id (also on line {lines_by_id[sample_id]}); ids must be unique")
        lines_by_id.setdefault(sample_id, line)
        problems += [f"{path}: record {sample_id} (line {line}): {reason}" for reason in reasons]
        if not reasons:
            samples.append(sample)
    if problems and (not skip_invalid or not samples):
        fix = "set data.skip_invalid=true to skip them" if samples else "no valid record"
        raise DataError(problems, f"{len(problems)} invalid records in {path} ({fix}):")
    return samples, problems


def _parse(path: Path) -> tuple[list[tuple[int, int, object]], list[str]]:
    """(index, line, value) of every record in the file, and the problems that kept records from being parsed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        return [], [f"{path}: not UTF-8 text (byte {error.start}); save the data file as UTF-8 JSON or JSONL"]
    if not text.strip():
        return [], [f"{path}: empty file"]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            return [], [f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"]
        return _parse_jsonl(path, text)
    if not isinstance(value, list):
        leading = text[: len(text) - len(text.lstrip())]
        return [(0, leading.count("\n") + 1, value)], []
    if not value:
        return [], [f"{path}: empty JSON array, no records"]
    return [(i, line, record) for i, (line, record) in enumerate(zip(_array_item_lines(text), value, strict=True))], []


def _parse_jsonl(path: Path, text: str) -> tuple[list[tuple[int, int, object]], list[str]]:
    entries, problems = [], []
    numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    for index, (n, line) in enumerate(numbered):
        try:
            entries.append((index, n, json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append(f"{path}: record {index} (line {n}): malformed JSON at column {error.colno}: {error.msg}")
    return entries, problems


def _array_item_lines(text: str) -> list[int]:
    """1-based line on which each element of a valid top-level JSON array starts."""
    decoder = json.JSONDecoder()
    lines, line, seen, pos = [], 1, 0, text.index("[") + 1
    while True:
        pos = _SEPARATORS.match(text, pos).end()
        if text[pos] == "]":
            return lines
        line, seen = line + text.count("\n", seen, pos), pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)


def _to_sample(
    record: object, sample_id: str, root: Path, image_problems: dict[Path, str | None], unanswered: bool = False
) -> tuple[Sample | None, list[str]]:
    """The record as a Sample, and the reasons it is invalid (the sample is only usable when there are none).
    `unanswered`: a record with no assistant turn is valid when it ends with a user turn (the teacher answers it)."""
    if isinstance(record, dict) and isinstance(record.get("conversations"), list):
        messages, refs, reasons = _from_llava(record)
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages, refs, reasons = _from_openai(record)
    else:
        return None, ["neither LLaVA format (a 'conversations' list) nor OpenAI format (a 'messages' list)"]
    asks = bool(messages) and messages[-1]["role"] == "user"
    if not any(m["role"] == "assistant" for m in messages) and not (unanswered and asks):
        fix = "; set data.answers=teacher to have the teacher answer it" if asks else ""
        reasons.append(f"no assistant turn, so nothing to learn from{fix}")
    elif messages[0]["role"] == "assistant":
        reasons.append("the conversation starts with an assistant turn; add the user turn it answers")
    for i, message in enumerate(messages):
        text = "".join(item.get("text", "") for item in message["content"])
        if message["role"] == "assistant" and not text.strip():
            reasons.append(f"turn {i}: assistant turn has no text")
    images = []
    for ref in refs:
        image, problem = _check_image(ref, root, image_problems)
        images.append(image)
        if problem:
            reasons.append(problem)
    return Sample(sample_id, messages, images), reasons


def _from_llava(record: dict) -> tuple[list[dict], list[str], list[str]]:
    """Messages, image references and problems of a LLaVA record; `<image>` marks where each image goes."""
    refs = record.get("image", [])
    refs = [refs] if isinstance(refs, str) else refs
    reasons = []
    if not isinstance(refs, list) or not all(isinstance(ref, str) for ref in refs):
        reasons.append("'image' must be a path or a list of paths")
        refs = []
    messages, n_placeholders = [], 0
    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            reasons.append(f"turn {i}: expected {{'from': ..., 'value': <text>}}")
            continue
        if turn.get("from") not in LLAVA_ROLES:  # kept as is, so later checks do not report its absence
            reasons.append(f"turn {i}: unknown role {turn.get('from')!r} (expected 'human', 'gpt' or 'system')")
        n_placeholders += turn["value"].count(IMAGE_PLACEHOLDER)
        role = LLAVA_ROLES.get(turn.get("from"), turn.get("from"))
        messages.append({"role": role, "content": _split_placeholders(turn["value"])})
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if refs and n_placeholders == 0 and first_user is not None:
        first_user["content"] = [{"type": "image"} for _ in refs] + first_user["content"]
    elif n_placeholders != len(refs):
        reasons.append(f"{n_placeholders} <image> placeholders but {len(refs)} images")
    return messages, refs, reasons


def _split_placeholders(text: str) -> list[dict]:
    """'a<image>\\nb' -> [text 'a', image, text 'b']: the newline right after a placeholder belongs to it."""
    content = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
            part = part.removeprefix("\n")
        if part:
            content.append({"type": "text", "text": part})
    return content


def _from_openai(record: dict) -> tuple[list[dict], list[str], list[str]]:
    """Messages, image references and problems of an OpenAI-style record; images are content items."""
    messages, refs, reasons = [], [], []
    for i, message in enumerate(record["messages"]):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:  # kept as is, so later checks do not report its absence
            reasons.append(f"turn {i}: unknown role {role!r} (expected 'system', 'user' or 'assistant')")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            reasons.append(f"turn {i}: 'content' must be a string or a list of content items")
            continue
        items = []
        for item in content:
            ref = _image_ref(item)
            if ref is not None:
                refs.append(ref)
                items.append({"type": "image"})
            elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                items.append({"type": "text", "text": item["text"]})
            else:
                reasons.append(f"turn {i}: unsupported content item {json.dumps(item)[:80]}")
        messages.append({"role": role, "content": items})
    return messages, refs, reasons


def _image_ref(item: object) -> str | None:
    """The path or URL of an image content item (`image` or `image_url` type), None for anything else."""
    if not isinstance(item, dict):
        return None
    if item.get("type") == "image" and isinstance(item.get("image"), str):
        return item["image"]
    url = item.get("image_url")
    url = url.get("url") if isinstance(url, dict) else None
    return url if item.get("type") == "image_url" and isinstance(url, str) else None


def _check_image(ref: str, root: Path, image_problems: dict[Path, str | None]) -> tuple[Path, str | None]:
    """Resolved path of an image reference and why it is unusable (None if it decodes); memoised per path."""
    if ref.startswith(REMOTE_PREFIXES):
        return Path(ref), f"image {ref[:60]!r}: remote images are not supported; download them and give a local path"
    path = Path(ref.removeprefix("file://"))
    path = path if path.is_absolute() else root / path
    if path not in image_problems:
        image_problems[path] = _image_problem(path)
    problem = image_problems[path]
    return path, problem and f"image {ref!r}: {problem}"


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"file not found ({path})"
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        return f"cannot be decoded ({type(error).__name__}: {error})"
    return None
