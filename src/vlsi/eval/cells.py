"""Cells as VLMEvalKit sees them: what `pandas.read_csv(path, sep="\\t")` makes of a predictions file.

VLMEvalKit loads every TSV with pandas, which types each column from all its cells: a column of whole numbers
becomes integers, or floats when a cell is empty ("4" -> 4.0, printed "4.0"); numbers with a decimal point or an
exponent become floats; True / false become booleans; the cells "", "NA", "N/A", "None", "null", "nan", ... are
missing (NaN, printed "nan"); any other column stays text as written. The scorers' VLMEvalKit rules read rows
through `read_like_pandas` so that such cells score as they do there (docs/EVALUATION.md, "Quirks").
"""

from __future__ import annotations

import math
import re

# pandas' default na_values (pandas >= 2.0): a cell equal to one of these is missing.
PANDAS_NA = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
     "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip
NA = float("nan")
# pandas' C parser: ASCII digits, an optional sign, spaces around; floats may have a point, an exponent, or be inf.
_INT = re.compile(r" *[+-]?[0-9]+ *")
_FLOAT = re.compile(r" *[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf(?:inity)?)) *")
_BOOL = {"true": True, "false": False}
_INT64 = (-(2**63), 2**63)


def is_na(value) -> bool:
    """True for a missing cell as pandas holds it (NaN)."""
    return isinstance(value, float) and math.isnan(value)


def _as_bool(cell: str) -> bool:
    return _BOOL[cell.lower()]


def column_like_pandas(cells: list) -> list:
    """One column's cells (text, or a JSON list kept as it is) as pandas types them: int, float, bool, the text
    itself, or NA (NaN) for a missing cell."""
    missing = [not isinstance(cell, list) and cell in PANDAS_NA for cell in cells]
    texts = [cell for cell, gone in zip(cells, missing, strict=True) if not gone]
    if not texts or any(isinstance(cell, list) for cell in texts):
        convert = None
    elif all(_INT.fullmatch(cell) for cell in texts):
        values = [int(cell) for cell in texts]
        complete = not any(missing)  # a missing cell turns the integers into floats
        fits = all(_INT64[0] <= v < _INT64[1] for v in values) or (complete and all(0 <= v < 2**64 for v in values))
        convert = (int if complete else float) if fits else None
    elif all(_FLOAT.fullmatch(cell) and (math.isfinite(float(cell)) or "n" in cell.lower()) for cell in texts):
        convert = float  # a number that overflows ("1e999") keeps the column as text; "inf" is a float
    elif all(cell.lower() in _BOOL for cell in texts):
        convert = _as_bool
    else:
        convert = None
    return [
        NA if gone else cell if convert is None else convert(cell) for cell, gone in zip(cells, missing, strict=True)
    ]


def read_like_pandas(rows: list[dict]) -> list[dict]:
    """The rows as VLMEvalKit's DataFrame holds them: every column typed as pandas types it, and every row given
    every column (a field absent from a JSONL line is missing)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    typed = {column: column_like_pandas([row.get(column, "") for row in rows]) for column in columns}
    return [{column: typed[column][i] for column in columns} for i in range(len(rows))]


def as_written(value) -> str:
    """How pandas writes a value back to a TSV cell (VLMEvalKit stores intermediate results and reads them again)."""
    return "" if value is None or is_na(value) else str(value)
