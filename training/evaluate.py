"""Evaluation on held-out labelled windows: the autoencoder and two baselines.

All three detectors see the same prepared windows (z-scored, denoised,
``(F, 10, 10)``), are fitted on the same normal training windows and calibrated
on the same held-out normal windows at the same false-alarm target:

- ``autoencoder``: any feature's reconstruction error above its threshold;
- ``isolation_forest``: scikit-learn IsolationForest on the flattened window;
- ``pca``: PCA keeping 95 % of the variance; alarms on Hotelling's T^2 or the
  residual Q (squared prediction error), the two thresholds calibrated jointly.

Metrics (windows labelled as in :mod:`windfleet.training.data`; excluded windows
are not scored):

- overall: precision, recall, F1 of "anomalous" vs normal, and the false-alarm
  rate = alarms on normal windows / normal windows;
- per kind K: the same on the normal windows plus the windows of kind K, so
  precision_K = TP_K / (TP_K + all false alarms); ``false_alarm_rate`` is the same
  for every kind; ``recall`` is what differs between kinds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import thresholds as th
from .data import NORMAL


def metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """Binary metrics of ``pred`` (bool per window) against labels ("" = normal)."""
    anomalous = labels != NORMAL
    tp = int((pred & anomalous).sum())
    fp = int((pred & ~anomalous).sum())
    fn = int((~pred & anomalous).sum())
    tn = int((~pred & ~anomalous).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    far = fp / (fp + tn) if fp + tn else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "false_alarm_rate": round(far, 5), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def report(pred: np.ndarray, labels: np.ndarray) -> dict:
    """``{"overall": {...}, "per_kind": {kind: {...}}}``."""
    out = {"overall": metrics(pred, labels), "per_kind": {}}
    for kind in sorted(set(labels) - {NORMAL}):
        keep = (labels == NORMAL) | (labels == kind)
        out["per_kind"][kind] = metrics(pred[keep], labels[keep])
    return out


# --- baselines ------------------------------------------------------------------------------

def isolation_forest(train: np.ndarray, calib: np.ndarray, rate: float, seed: int = 0,
                     max_train: int = 20000) -> Callable[[np.ndarray], np.ndarray]:
    from sklearn.ensemble import IsolationForest

    rng = np.random.default_rng(seed)
    x = train.reshape(len(train), -1)
    if len(x) > max_train:
        x = x[rng.choice(len(x), max_train, replace=False)]
    forest = IsolationForest(n_estimators=200, random_state=seed, n_jobs=1).fit(x)
    # score_samples: lower = more abnormal; calibrate on the negated score
    t = th.calibrate(-forest.score_samples(calib.reshape(len(calib), -1))[:, None], rate)
    return lambda w: th.alarms(-forest.score_samples(w.reshape(len(w), -1))[:, None], t)


def pca(train: np.ndarray, calib: np.ndarray, rate: float, variance: float = 0.95) -> Callable[[np.ndarray], np.ndarray]:
    from sklearn.decomposition import PCA

    model = PCA(n_components=variance, svd_solver="full").fit(train.reshape(len(train), -1))

    def stats(w: np.ndarray) -> np.ndarray:
        x = w.reshape(len(w), -1)
        t = model.transform(x)
        t2 = (t * t / model.explained_variance_).sum(axis=1)
        q = ((x - model.inverse_transform(t)) ** 2).sum(axis=1)
        return np.stack([t2, q], axis=1)

    t = th.calibrate(stats(calib), rate)
    return lambda w: th.alarms(stats(w), t)


# --- reporting ------------------------------------------------------------------------------

def table(result: dict) -> str:
    """A plain-text table: one row per detector x (overall + kinds)."""
    rows = [("detector", "subset", "precision", "recall", "F1", "FAR", "windows")]
    for name, rep in result["detectors"].items():
        for subset, m in [("overall", rep["overall"]), *rep["per_kind"].items()]:
            rows.append((name, subset, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                         f"{100 * m['false_alarm_rate']:.2f}%", str(m["tp"] + m["fn"] + m["fp"] + m["tn"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def evaluate(ae_pred: np.ndarray, windows: np.ndarray, labels: np.ndarray, train: np.ndarray,
             calib: np.ndarray, rate: float, seed: int = 0, baselines: Sequence[str] = ("isolation_forest", "pca")) -> dict:
    """Score the autoencoder's predictions and fit+score the baselines on the same windows."""
    result = {"detectors": {"autoencoder": report(ae_pred, labels)},
              "windows": {"total": int(len(labels)), "normal": int((labels == NORMAL).sum()),
                          "anomalous": int((labels != NORMAL).sum())},
              "target_false_alarm_rate": rate}
    if "isolation_forest" in baselines:
        result["detectors"]["isolation_forest"] = report(isolation_forest(train, calib, rate, seed)(windows), labels)
    if "pca" in baselines:
        result["detectors"]["pca"] = report(pca(train, calib, rate)(windows), labels)
    return result


def write(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
