"""Score a CSV with a model package, as the edge would: windows of the card's size
every ``stride`` rows, the card's preprocessing, onnxruntime.

Policy, the streaming detector's:

- a row with a non-finite value (empty, NaN, inf, a number beyond float range) is
  dropped, like a readings message with one; windows never span it and windowing
  restarts after it (the first window of a run ends ``size`` rows later);
- a window whose errors overflow (finite but huge values, e.g. 1e308) is
  anomalous with score ``inf``, and counted in ``windows_non_finite``;
- every input row gets the verdict of the latest window ending at or before it
  (the detector's last verdict holds until the next); rows before the first
  window -- and dropped rows before it -- take the first window's verdict.

``score`` is the largest per-feature error / threshold ratio; ``anomaly`` is ``score > 1``.
With labels, :func:`skab_metrics` gives point-wise F1, FAR and MAR as the SKAB
benchmark defines them (FAR = FP / (FP + TN), MAR = FN / (FN + TP)).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from windfleet import model_contract as mc
from windfleet.preprocessing import DataError, prepare, sliding_windows

from . import thresholds as th
from .csv import read as read_csv
from .export import session


def finite_runs(x: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the runs of rows whose values are all finite."""
    ok = np.concatenate([[False], np.isfinite(x).all(axis=1), [False]])
    edges = np.flatnonzero(np.diff(ok.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def score_windows(model_dir: str | Path, x: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows ``(n, F)`` -> the windows' last rows ``(k,)`` and scores ``(k,)``
    (``inf`` for a window whose errors are not finite)."""
    card = mc.load_card(model_dir)
    window, stride = card["window"]["size"], card["window"]["stride"]
    shape = tuple(card["window"]["shape"][1:])
    parts = [(w, e + a) for a, b in finite_runs(x) for w, e in [sliding_windows(x[a:b], window, stride)] if len(e)]
    if not parts:
        raise DataError(f"{len(x)} rows: no {window} consecutive rows with finite values (one window)")
    windows = np.concatenate([w for w, _ in parts])
    ends = np.concatenate([e for _, e in parts])
    sess = session(Path(model_dir) / mc.MODEL_FILE)
    thr = [card["thresholds"][f] for f in card["features"]]
    scores = np.empty(len(windows))
    for i in range(0, len(windows), batch):
        inp = prepare(windows[i : i + batch], card["statistics"], shape)
        rec = sess.run([card["output_name"]], {card["input_name"]: inp})[0]
        with np.errstate(over="ignore", invalid="ignore"):
            scores[i : i + batch] = th.scores(mc.window_errors(inp, rec), thr)
    scores[~np.isfinite(scores)] = np.inf
    return ends, scores


def score_rows(model_dir: str | Path, x: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows ``(n, F)`` in the card's feature order -> per-row (anomaly 0/1, score)
    (the module's policy)."""
    return score_rows_from(*score_windows(model_dir, x, batch), len(x))


def skab_metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Point-wise F1, false-alarm rate and missed-alarm rate (SKAB's definitions), in %."""
    pred, labels = np.asarray(pred, bool), np.asarray(labels, bool)
    tp, fp = int((pred & labels).sum()), int((pred & ~labels).sum())
    fn, tn = int((~pred & labels).sum()), int((~pred & ~labels).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"f1": round(100 * f1, 2), "far": round(100 * fp / (fp + tn), 2) if fp + tn else 0.0,
            "mar": round(100 * fn / (fn + tp), 2) if fn + tp else 0.0, "rows": int(len(pred)),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def score_csv(model_dir: str | Path, csv_path: str | Path, out_csv: str | Path, *,
              features: Sequence[str] | None = None, sep: str = ",", label: str | None = None) -> dict:
    """Score ``csv_path`` into ``out_csv`` (columns ``row,anomaly,score``[,``label``]).

    ``features`` names the CSV's columns for the card's features, in the card's
    order (default: the card's names).  Returns counts (``rows``, ``rows_non_finite``,
    ``windows``, ``windows_non_finite``) and, with ``label``, SKAB metrics.
    """
    card = mc.load_card(model_dir)
    names = list(features) if features else list(card["features"])
    if len(names) != len(card["features"]):
        raise DataError(f"--features gives {len(names)} columns, the model takes {len(card['features'])} "
                        f"({','.join(card['features'])})")
    table = read_csv(csv_path, names, label, sep, min_rows=card["window"]["size"], gaps=False)
    ends, win_scores = score_windows(model_dir, table.x)
    pred, scores = score_rows_from(ends, win_scores, len(table.x))
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("row,anomaly,score" + (",label" if label else "") + "\n")
            for i in range(len(pred)):
                fh.write(f"{i},{pred[i]},{scores[i]:.6g}" + (f",{int(table.labels[i])}" if label else "") + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    counts = {"rows_non_finite": int((~np.isfinite(table.x).all(axis=1)).sum()), "windows": int(len(ends)),
              "windows_non_finite": int(np.isinf(win_scores).sum())}
    if label:
        return {**skab_metrics(pred, table.labels), **counts}
    return {"rows": int(len(pred)), **counts}


def score_rows_from(ends: np.ndarray, win_scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Window verdicts -> per-row (anomaly 0/1, score) for ``n`` rows (the module's policy)."""
    latest = np.searchsorted(ends, np.arange(n), side="right") - 1
    scores = win_scores[np.maximum(latest, 0)]
    return (scores > 1.0).astype(np.int64), scores
