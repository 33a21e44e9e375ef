"""Checked reading of Broden's CSV files: rows with their line numbers, numbers and paths
parsed or refused with an error naming the file and the line."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from pathlib import Path

from ..errors import DataError
from .images import read_utf8_text, shown

MAX_LABEL = 65535  # label numbers are stored as R + 256 * G in a label PNG
_MISSING_HINT = (": a Broden folder needs index.csv, category.csv, label.csv and "
                 "c_<category>.csv (download broden1_224, or write one with write_broden)")


def short(text: str, limit: int = 60) -> str:
    """``repr(text)`` for a message, cut to about ``limit`` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def read_csv(path: Path, required: tuple[str, ...], *, missing_hint: str = _MISSING_HINT,
             origin: str = "this Broden folder",
             whole_lines: bool = True) -> list[tuple[int, dict[str, str]]]:
    """The rows of a CSV file as ``(line number, row dict)``, header and rows checked.

    ``missing_hint`` ends the message for a missing file, ``origin`` names where the file should
    come from; ``whole_lines`` refuses a file whose last line has no line break (every Broden
    writer ends each line with one, so a file without it was cut short), which is too harsh for
    CSV files people write by hand."""
    text = read_utf8_text(path, shown(path), missing_hint, "CSV files must be UTF-8")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        lines = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        reason = str(exc)
        if "field larger than field limit" in reason:
            reason = (f"a field is longer than {csv.field_size_limit()} characters (a missing "
                      "closing quote, or not a Broden CSV file)")
        raise DataError(f"{path} line {reader.line_num}: {reason}") from None
    if not lines:
        raise DataError(f"{path} is empty: expected a header with columns {list(required)}")
    if whole_lines and not text.endswith(("\n", "\r")):
        raise DataError(f"{path} line {lines[-1][0]}: the file ends inside this line (no line "
                        "break after it): it may be cut short; if it is complete, end it with a "
                        "line break")
    line, header = lines[0]
    header = [h.strip() for h in header]
    columns = short(",".join(header), 200)
    duplicates = sorted(h for h, n in Counter(header).items() if n > 1)
    if duplicates:
        raise DataError(f"{path} line {line}: header {columns} names the columns {duplicates} "
                        "more than once; a column must appear once")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path} line {line}: header {columns} lacks the columns {missing}; is "
                        f"the file cut short, or not from {origin}?")
    for line, row in lines[1:]:
        if len(row) != len(header):
            raise DataError(
                f"{path} line {line}: malformed row with {len(row)} fields, expected "
                f"{len(header)} ({columns}); fix or remove the row"
            )
    return [(line, dict(zip(header, row, strict=True))) for line, row in lines[1:]]


def parse_int(
    value: str, path: Path, line: int, column: str, minimum: int = 0, maximum: int = MAX_LABEL
) -> int:
    value = value.strip()
    # ASCII digits only, and few of them: int() of a 5000-digit string raises ValueError
    if value.isascii() and value.isdigit() and len(value) < 20:
        number = int(value)
        if minimum <= number <= maximum:
            return number
    raise DataError(
        f"{path} line {line}: malformed row: column {column!r} is {short(value)}, "
        f"expected an integer in [{minimum}, {maximum}]"
    )


def parse_float(value: str, path: Path, line: int, column: str) -> float:
    value = value.strip()
    if not value:
        return 0.0
    try:
        out = float(value)
    except ValueError:
        out = math.nan
    if not math.isfinite(out):
        raise DataError(
            f"{path} line {line}: malformed row: column {column!r} is {short(value)}"
        )
    return out


def check_path(name: str, path: Path, line: int, column: str) -> None:
    """Refuse a path of index.csv that is absolute or climbs out of images/ with '..'."""
    problem = (  # (NUL characters never get here: read_utf8_text refuses NUL bytes)
        "is an absolute path" if name[0] in "/\\" or name[1:2] == ":"
        else "climbs out of the folder with '..'"
        if ".." in name and ".." in re.split(r"[/\\]", name)
        else None
    )
    if problem is not None:
        raise DataError(f"{path} line {line}: {column} path {short(name)} {problem}; paths in "
                        "index.csv are relative to images/ and must stay inside the folder")
