"""The training pipeline: data -> statistics -> autoencoder -> thresholds -> evaluation
-> ONNX + model card, written atomically.

One pipeline, two data sources:

- :func:`train_simulated` -- a simulated fleet (the edge's features, ``FEATURES``);
- :func:`train_csv` -- any numeric CSV in time order; the card's features are the
  CSV's columns (such models serve offline benchmarks; the edge uses ``FEATURES``).

The output directory is built in a temporary sibling and renamed into place, so a
failure (bad data, a failed parity check) never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from windfleet import model_contract as mc
from windfleet.preprocessing import DataError, fit_statistics_windows, prepare

from . import data as D
from . import evaluate as ev
from . import export as ex
from . import thresholds as th
from . import train as tr
from .csv import read as read_csv

# (training turbines, hours, max epochs); calibration and test fleets are as large.
QUICK = (3, 1.0, 12)
DEFAULT = (6, 2.0, 40)
TRAIN_STRIDE = 20  # training windows overlap 80 %; stride 10 would only repeat them
MIN_CSV_ROWS = 4 * mc.WINDOW


@dataclass
class Dataset:
    """Windows for each stage.  train/val/calib hold normal windows only."""

    features: list[str]
    train: D.Windows
    val: D.Windows
    calib: D.Windows
    test: D.Windows | None  # evaluable labelled windows, or None
    circular: list[int] | None = None
    source: dict[str, Any] = field(default_factory=dict)


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success it replaces ``out_dir``."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def simulated_dataset(seed: int = 0, turbines: int = 3, hours: float = 1.0, test: bool = True) -> Dataset:
    """Training fleet (split 85/15 in time: train/val), a separate calibration fleet
    (normal operation) and a separate test fleet (anomalies at 12/h), each of
    ``turbines`` x ``hours`` with its own seeds -- so calibration and evaluation see
    turbines training never saw."""
    train, val = D.simulated(seed, turbines, hours, split=(0.85, 0.15), prefix="train", stride=TRAIN_STRIDE)
    (calib,) = D.simulated(seed + 1_000_003, turbines, hours, anomalies_per_hour=0.0, prefix="calib")
    held_out = None
    if test:
        (held_out,) = D.simulated(seed + 2_000_003, turbines, hours, anomalies_per_hour=12.0, prefix="test")
        held_out = held_out.evaluable
    return Dataset(list(mc.FEATURES), train.normal, val.normal, calib.normal, held_out,
                   source={"kind": "simulated", "seed": seed, "turbines": turbines, "hours": hours})


def csv_dataset(path: str | Path, features: Sequence[str], label: str | None = None, sep: str = ",") -> Dataset:
    """A CSV in time order: the first 70 % of rows train (last 15 % of those validate),
    the remaining 30 % calibrate (their normal windows) and, with a label column,
    are evaluated.  Windows touching labelled rows never train or calibrate."""
    table = read_csv(path, features, label, sep, min_rows=MIN_CSV_ROWS)
    n = len(table.x)
    labels = np.where(table.labels, "anomaly", D.NORMAL).astype(object) if table.labels is not None \
        else np.full(n, D.NORMAL, dtype=object)
    a, b = int(0.595 * n), int(0.7 * n)
    stride = max(1, min(mc.STRIDE, n // 5000))  # small files: use every window
    parts = [D.segment_windows(table.x[s:e], labels[s:e], stride=stride) for s, e in ((0, a), (a, b), (b, n))]
    if any(len(p.normal) < 5 for p in parts):
        raise DataError(f"{path}: too few normal rows to train, validate and calibrate "
                        f"({n} rows; each of 60/10/30 % needs 5 unlabelled windows of {mc.WINDOW})")
    circular = [i for i, f in enumerate(features) if f == "yaw"]
    return Dataset(list(features), parts[0].normal, parts[1].normal, parts[2].normal,
                   parts[2].evaluable if table.labels is not None else None, circular,
                   source={"kind": "csv", "file": Path(path).name, "rows": n, "label": label})


def fit_package(ds: Dataset, out_dir: str | Path, *, seed: int = 0, epochs: int = 40, version: str = "1.0.0",
                rate: float = mc.DEFAULT_FALSE_ALARM_RATE, evaluate: bool = True, progress: bool = True,
                log=print) -> dict[str, Any]:
    """Train, calibrate, evaluate and export ``ds`` into ``out_dir``; return the card."""
    t0 = time.perf_counter()
    stats = fit_statistics_windows(ds.train.raw, ds.circular)
    x_train, x_val, x_cal = (prepare(w.raw, stats) for w in (ds.train, ds.val, ds.calib))
    log(f"windows: train {len(x_train)}, val {len(x_val)}, calibration {len(x_cal)}"
        + (f", test {len(ds.test)}" if ds.test is not None else ""))
    model, history = tr.fit(x_train, x_val, seed=seed, epochs=epochs, progress=progress)
    errors_cal = mc.window_errors(x_cal, tr.reconstruct(model, x_cal))
    thresholds = th.calibrate(errors_cal, rate)
    metrics: dict[str, Any] = {
        "calibration_false_alarm_rate": float(th.alarms(errors_cal, thresholds).mean()),
        "target_false_alarm_rate": rate, "calibration_windows": int(len(x_cal)),
        "val_loss": float(min(history.val_loss)), "epochs": len(history.train_loss),
    }
    evaluation = None
    if evaluate and ds.test is not None and len(ds.test):
        x_test = prepare(ds.test.raw, stats)
        pred = th.alarms(mc.window_errors(x_test, tr.reconstruct(model, x_test)), thresholds)
        evaluation = ev.evaluate(pred, x_test, ds.test.labels, x_train, x_cal, rate, seed)
        log(ev.table(evaluation))
        for name, rep in evaluation["detectors"].items():
            metrics[name] = {k: rep["overall"][k] for k in ("precision", "recall", "f1", "false_alarm_rate")}
        metrics["per_kind_f1"] = {k: m["f1"] for k, m in evaluation["detectors"]["autoencoder"]["per_kind"].items()}
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / mc.MODEL_FILE
        check = np.concatenate([x_val[:254], ex.self_test_input(len(ds.features))])
        parity = ex.export_onnx(model, onnx_path, check)
        metrics["onnx_parity_max_abs_err"] = parity
        metrics["training_seconds"] = round(time.perf_counter() - t0, 1)
        card = ex.model_card(
            onnx_path=onnx_path, version=version, features=ds.features, statistics=stats, thresholds=thresholds,
            fingerprint=D.fingerprint(ds.train.raw, ds.val.raw), metrics=metrics,
            extra={"model": model.config(), "training": {**history.as_dict(), "seed": seed, "data": ds.source}},
        )
        (tmp / mc.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        if evaluation is not None:
            ev.write(evaluation, tmp / "evaluation.json")
        mc.load_card(tmp)  # what a consumer will do; fails here rather than there
    return card


def train_simulated(out_dir: str | Path, *, seed: int = 0, turbines: int | None = None, hours: float | None = None,
                    quick: bool = False, epochs: int | None = None, version: str = "1.0.0",
                    evaluate: bool = True, progress: bool = True, log=print) -> dict[str, Any]:
    """Train on a simulated fleet; write ``model.onnx``, ``model.json``, ``evaluation.json``."""
    d_turbines, d_hours, d_epochs = QUICK if quick else DEFAULT
    ds = simulated_dataset(seed, turbines or d_turbines, hours or d_hours, test=evaluate)
    return fit_package(ds, out_dir, seed=seed, epochs=epochs or d_epochs, version=version,
                       evaluate=evaluate, progress=progress, log=log)


def train_csv(path: str | Path, features: Sequence[str], out_dir: str | Path, *, label: str | None = None,
              sep: str = ",", seed: int = 0, epochs: int = 40, version: str = "1.0.0", evaluate: bool = True,
              progress: bool = True, log=print) -> dict[str, Any]:
    """Train on a numeric CSV (time order); see :func:`csv_dataset` for the splits."""
    ds = csv_dataset(path, features, label, sep)
    return fit_package(ds, out_dir, seed=seed, epochs=epochs, version=version, evaluate=evaluate,
                       progress=progress, log=log)
