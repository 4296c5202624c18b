"""Worklist rows as CSV for spreadsheets, safe against formula injection.

A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is taken by Excel,
LibreOffice and Google Sheets as a formula (``=HYPERLINK(...)`` in a PatientName would run when
the file is opened). As OWASP recommends, such a cell is written with a leading apostrophe, which
spreadsheets show as text; numbers (scores, negative or not) are written as numbers. The web
export (``POST /export.csv``) and ``cxr-triage worklist --format csv`` both write through here.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import TextIO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: Not exported: a film's every path is a list (the row's ``path`` is its newest one).
LEFT_OUT = frozenset({"paths"})


def spreadsheet_safe(value: object) -> object:
    """``value`` unchanged, unless it is text a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(rows: list[dict], stream: TextIO, columns: Iterable[str] | None = None) -> None:
    """A header and one line per row (every column of the first row but ``paths`` by default)."""
    if columns is None:
        columns = [c for c in (rows[0] if rows else {}) if c not in LEFT_OUT]
    fieldnames = list(columns)
    writer = csv.DictWriter(stream, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: spreadsheet_safe(row.get(name)) for name in fieldnames})
