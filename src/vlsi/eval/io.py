"""Reading prediction files: VLMEvalKit-layout TSV, or JSONL with the same fields, plus a `prediction` column."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path


class ScoreError(ValueError):
    """Bad input for `vlsi score`; the message is one line naming the file, the row and the fix."""


# Base64 images in VLMEvalKit TSVs run to megabytes per cell; csv's default limit is 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

IGNORED_COLUMNS = ("image",)


def column_name(name: str) -> str:
    """VLMEvalKit's rule: option columns keep their capital letter, every other name is lower-cased."""
    name = name.strip()
    return name if len(name) == 1 and "A" <= name <= "Z" else name.lower()


def read_predictions(path: str | Path, required: Sequence[str] = (), benchmark: str = "") -> list[dict]:
    """Rows of a .tsv or .jsonl prediction file as dicts (column -> value; the image column is dropped).

    TSV cells stay strings; JSONL scalars become strings (null -> "") and lists stay lists. Raises ScoreError
    when the file is unreadable, has no rows, or lacks `prediction` or a field in `required`.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file; pass the predictions file written by your inference run")
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".jsonl"):
        raise ScoreError(
            f"{path}: unsupported file type '{suffix}'; write the predictions as .tsv "
            "(e.g. pandas df.to_csv(path, sep='\\t', index=False)) or as .jsonl (one JSON object per line)"
        )
    rows = read_rows(path, ("prediction", *required), benchmark)
    if not rows:
        raise ScoreError(f"{path}: no prediction rows; write one row per benchmark question")
    return rows


def read_rows(
    path: Path, needed: Sequence[str] = (), benchmark: str = "", error=ScoreError, drop=IGNORED_COLUMNS
) -> list[dict]:
    """Rows of a .tsv (`read_tsv`) or a .jsonl file (`read_jsonl`); a file that is not UTF-8 or not well-formed TSV
    raises `error` (a ValueError class) with the fix."""
    read = read_tsv if path.suffix.lower() == ".tsv" else read_jsonl
    try:
        return read(path, needed, benchmark, error, drop)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except csv.Error as e:
        raise error(f"{path}: unreadable TSV ({e}); write it with a tab delimiter and standard quoting") from None


def _missing_message(where: str, missing: list[str], needed: Sequence[str], benchmark: str) -> str:
    if "prediction" in missing:
        return f"{where}: no 'prediction' field; add the model's answer for every row in a column named 'prediction'"
    return (
        f"{where}: missing {', '.join(missing)} for {benchmark}; "
        f"its rows need {', '.join(needed)} (see docs/EVALUATION.md)"
    )


def read_tsv(
    path: Path, needed: Sequence[str] = (), benchmark: str = "", error=ScoreError, drop=IGNORED_COLUMNS
) -> list[dict]:
    """Rows of a VLMEvalKit-style TSV (header line, tab-separated, csv quoting) as {column: text}, without the
    `drop` columns; `error` (a ValueError class) names the line for a malformed file or a missing `needed` column."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise error(f"{path}: empty file; expected a header line of tab-separated column names")
        columns = [column_name(name) for name in header]
        duplicates = sorted({name for name in columns if columns.count(name) > 1})
        if duplicates:
            raise error(f"{path} line 1: duplicate columns {', '.join(duplicates)}; keep one of each")
        missing = [name for name in needed if name not in columns]
        if missing:
            raise error(_missing_message(f"{path} line 1", missing, needed, benchmark))
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(columns):
                raise error(
                    f"{path} line {reader.line_num}: {len(cells)} fields but the header has {len(columns)}; "
                    "quote cells that contain tabs or newlines"
                )
            rows.append({k: v for k, v in zip(columns, cells, strict=True) if k not in drop})
    return rows


def _jsonl_value(value):
    if value is None:
        return ""
    if isinstance(value, list):
        return value
    return str(value)


def read_jsonl(
    path: Path, needed: Sequence[str] = (), benchmark: str = "", error=ScoreError, drop=IGNORED_COLUMNS
) -> list[dict]:
    """Rows of a JSONL file read as `read_tsv` reads a TSV: scalars as text (null -> ""), lists kept."""
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path} line {line_number}: not valid JSON ({e.msg}); write one object per line") from None
            if not isinstance(record, dict):
                raise error(f"{path} line {line_number}: expected a JSON object, got {type(record).__name__}")
            row = {column_name(k): _jsonl_value(v) for k, v in record.items() if column_name(k) not in drop}
            missing = [name for name in needed if name not in row]
            if missing:
                raise error(_missing_message(f"{path} line {line_number}", missing, needed, benchmark))
            rows.append(row)
    return rows
