"""Read any numeric CSV into model rows: named feature columns, an optional label column.

Errors are :class:`windfleet.preprocessing.DataError` with a one-line reason:
missing file, missing or non-numeric column, a label other than 0/1, too few rows, non-finite gaps
longer than ``preprocessing.MAX_GAP`` rows (shorter gaps -- empty cells, NaN,
inf -- are interpolated; see ``preprocessing.clean_gaps``).
"""

from __future__ import annotations

import csv as _csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from windfleet.preprocessing import DataError, clean_gaps

_MISSING = {"", "nan", "NaN", "NA", "null", "None"}


@dataclass
class Table:
    features: list[str]
    x: np.ndarray  # (n, F) float64, gaps interpolated
    labels: np.ndarray | None  # (n,) bool: row labelled anomalous, or None without a label column


def parse_features(text: str | Sequence[str] | None) -> list[str] | None:
    if text is None:
        return None
    names = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    if not names:
        raise DataError("--features names no column")
    if len(set(names)) != len(names):
        raise DataError(f"--features repeats a column: {','.join(names)}")
    return names


def _float(cell: str, column: str, row: int) -> float:
    cell = cell.strip()
    if cell in _MISSING:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"column {column!r} row {row}: {cell[:30]!r} is not a number") from None


def read(path: str | Path, features: Sequence[str], label: str | None = None, sep: str = ",",
         min_rows: int = 1, gaps: bool = True) -> Table:
    """Read ``features`` (and ``label``) columns of a CSV with a header row, in file order.

    ``gaps``: interpolate short non-finite gaps (training); ``False`` keeps NaN/inf
    as they are (scoring drops such rows, as the edge detector drops such readings).
    Labels must be 0 or 1."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if len(sep) != 1:
        raise DataError(f"--sep must be one character, got {sep!r}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = _csv.reader(fh, delimiter=sep)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise DataError(f"{path}: empty file")
        wanted = list(features) + ([label] if label else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            hint = f" (columns: {', '.join(header[:12])}{', ...' if len(header) > 12 else ''})"
            if len(header) == 1 and sep not in header[0] and any(s in header[0] for s in ";,\t|"):
                hint = " (wrong --sep?)"
            raise DataError(f"{path}: missing column {missing[0]!r}{hint}")
        idx = [header.index(c) for c in wanted]
        rows, line_of = [], []
        for lineno, rec in enumerate(reader, start=2):
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) < len(header):
                raise DataError(f"{path}: line {lineno} has {len(rec)} fields, the header has {len(header)}")
            rows.append([_float(rec[i], c, lineno) for i, c in zip(idx, wanted)])
            line_of.append(lineno)
    if len(rows) < min_rows:
        raise DataError(f"{path}: {len(rows)} data rows, at least {min_rows} needed")
    data = np.array(rows, dtype=np.float64).reshape(len(rows), len(wanted))
    x = data[:, : len(features)]
    if not gaps:
        return Table(list(features), x, _labels(path, data, label, line_of))
    try:
        x = clean_gaps(x)
    except DataError as exc:  # name the column, not its index
        msg = str(exc)
        for j, name in enumerate(features):
            msg = msg.replace(f"feature {j} ", f"column {name!r} ").replace(f"column {j} ", f"column {name!r} ")
        raise DataError(f"{path}: {msg}") from None
    return Table(list(features), x, _labels(path, data, label, line_of))


def _labels(path: Path, data: np.ndarray, label: str | None, line_of: list[int]) -> np.ndarray | None:
    labels = None
    if label:
        lab = data[:, -1]
        bad = np.flatnonzero(~np.isin(lab, (0.0, 1.0)))
        if len(bad):
            raise DataError(f"{path}: label column {label!r} line {line_of[bad[0]]}: {lab[bad[0]]:g} is not 0 or 1 "
                            f"({len(bad)} such rows; labels must be 0 = normal, 1 = anomalous)")
        labels = lab == 1
    return labels
