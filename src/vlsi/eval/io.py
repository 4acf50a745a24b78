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
    `drop` columns; `error` (a ValueError class) names the line for a malformed file or a missing `needed` column.

    Quoting is read as pandas reads it (a quote inside an unquoted cell is text, `"x"y` is xy), and a quoted cell
    that is never closed is refused, as pandas refuses it ("EOF inside string"): csv alone would read the rest of
    the file into that cell."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        record: list[str] = []  # the physical lines of the record being read

        def lines():
            for line in f:
                record.append(line)
                yield line

        reader = csv.reader(lines(), delimiter="\t")
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
        first_line, last = reader.line_num + 1, (0, [])
        record.clear()
        for cells in reader:
            if cells and len(cells) != len(columns):
                _check_quotes(path, record, first_line, error)
                raise error(
                    f"{path} line {reader.line_num}: {len(cells)} fields but the header has {len(columns)}; "
                    "quote cells that contain tabs or newlines"
                )
            if cells:
                rows.append({k: v for k, v in zip(columns, cells, strict=True) if k not in drop})
            last = first_line, list(record)
            first_line = reader.line_num + 1
            record.clear()
    _check_quotes(path, last[1], last[0], error)  # an unclosed quote runs to the end: only the last record can
    return rows


def _check_quotes(path: Path, record: list[str], line: int, error) -> None:
    """Refuse a record whose lines end inside a quoted cell (the strict csv reader stops there)."""
    try:
        list(csv.reader(record, delimiter="\t", strict=True))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise error(
                f"{path} line {line}: a quoted cell opens here and is never closed (pandas: EOF inside string); "
                'close its quote, or write a quote inside a quoted cell as ""'
            ) from None


# JSONL columns whose readers take a list (VLMEvalKit's TSVs hold these as the text of a Python list): images,
# MathVista's choices and skills, ChartQA's answers. A list of categories is what the TSVs spell "a,b".
LIST_COLUMNS = frozenset({"image", "image_path", "choices", "skills", "answer"})
JOINED_COLUMNS = frozenset({"category"})


def _jsonl_value(value, column: str, where: str, error):
    if value is None:
        return ""
    if isinstance(value, list):
        if column in LIST_COLUMNS:
            return value
        if column in JOINED_COLUMNS:
            return ",".join(str(item) for item in value)
        raise error(
            f"{where}: column '{column}' holds a list; VLMEvalKit's TSVs hold one value there, so write it as text "
            f'(lists are read in {", ".join(sorted(LIST_COLUMNS))}; a category list as "a,b")'
        )
    if isinstance(value, dict):
        raise error(f"{where}: column '{column}' holds a JSON object; write its value as text")
    return str(value)


def read_jsonl(
    path: Path, needed: Sequence[str] = (), benchmark: str = "", error=ScoreError, drop=IGNORED_COLUMNS
) -> list[dict]:
    """Rows of a JSONL file read as `read_tsv` reads a TSV: scalars as text (null -> ""), lists kept where a list is
    read (LIST_COLUMNS), category lists joined with commas, other lists refused. Lines end at "\\n" only (a U+2028
    inside a string is part of its line)."""
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg}); write one object per line") from None
            if not isinstance(record, dict):
                raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
            row = {
                column_name(k): _jsonl_value(v, column_name(k), where, error)
                for k, v in record.items()
                if column_name(k) not in drop
            }
            missing = [name for name in needed if name not in row]
            if missing:
                raise error(_missing_message(where, missing, needed, benchmark))
            rows.append(row)
    return rows
