"""Score a CSV with a model package, as the edge would: windows of the card's size
every ``stride`` rows, the card's preprocessing, onnxruntime.

Each input row gets the verdict of the latest window ending at or before it
(rows before the first full window get ``anomaly=0, score=0``).  ``score`` is the
largest per-feature error / threshold ratio; ``anomaly`` is ``score > 1``.

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


def score_rows(model_dir: str | Path, x: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows ``(n, F)`` in the card's feature order -> per-row (anomaly 0/1, score)."""
    card = mc.load_card(model_dir)
    window, stride = card["window"]["size"], card["window"]["stride"]
    if len(x) < window:
        raise DataError(f"{len(x)} rows: too few for one window of {window}")
    windows, ends = sliding_windows(x, window, stride)
    sess = session(Path(model_dir) / mc.MODEL_FILE)
    thr = [card["thresholds"][f] for f in card["features"]]
    win_scores = np.empty(len(windows))
    for i in range(0, len(windows), batch):
        inp = prepare(windows[i : i + batch], card["statistics"])
        rec = sess.run([card["output_name"]], {card["input_name"]: inp})[0]
        win_scores[i : i + batch] = th.scores(mc.window_errors(inp, rec), thr)
    scores = np.zeros(len(x))
    for k, end in enumerate(ends):  # each window's verdict holds until the next one
        scores[end : (ends[k + 1] if k + 1 < len(ends) else len(x))] = win_scores[k]
    return (scores > 1.0).astype(np.int64), scores


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
              features: Sequence[str] | None = None, sep: str = ",", label: str | None = None) -> dict | None:
    """Score ``csv_path`` into ``out_csv`` (columns ``row,anomaly,score``[,``label``]).

    ``features`` names the CSV's columns for the card's features, in the card's
    order (default: the card's names).  Returns SKAB metrics with ``label``.
    """
    card = mc.load_card(model_dir)
    names = list(features) if features else list(card["features"])
    if len(names) != len(card["features"]):
        raise DataError(f"--features gives {len(names)} columns, the model takes {len(card['features'])} "
                        f"({','.join(card['features'])})")
    table = read_csv(csv_path, names, label, sep, min_rows=card["window"]["size"])
    pred, scores = score_rows(model_dir, table.x)
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
    return skab_metrics(pred, table.labels) if label else None
