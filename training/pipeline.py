"""The training pipeline: data -> statistics -> autoencoder -> thresholds -> evaluation
-> ONNX + model card, written atomically.

One pipeline, three data sources:

- :func:`train_simulated` -- a simulated fleet (the edge's features, ``FEATURES``);
- :func:`train_csv` -- any numeric CSV in time order; the card's features are the
  CSV's columns (such models serve offline benchmarks; the edge uses ``FEATURES``);
- :func:`train_from_capture` -- the windows devices captured (:mod:`.capture`), mixed
  with a simulated fleet or a CSV; the card's ``lineage`` names the parent and captures.

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

from windfleet import drift as dr
from windfleet import model_contract as mc
from windfleet import preprocessing as pp
from windfleet.preprocessing import DataError, fit_statistics_windows, prepare

from . import data as D
from . import evaluate as ev
from . import export as ex
from . import thresholds as th
from . import train as tr
from .capture import Captures, iso, read_captures
from .csv import read as read_csv

# (training turbines, hours, max epochs); calibration and test fleets are as large.
QUICK = (3, 1.0, 12)
DEFAULT = (6, 2.0, 40)
TRAIN_STRIDE = 20  # training windows overlap 80 %; stride 10 would only repeat them
# Site mean winds (m/s) of the training and calibration fleets, turbine k getting
# ENVELOPE[k % 3]: idling below cut-in, partial load and rated power all appear in
# every run.  Fleets at the natural 8 m/s alone leave a held-out turbine that spends
# its hour in low wind with windows no model or threshold has seen (seed 1: FAR 6.8 %).
ENVELOPE = (8.0, 2.5, 12.0)
MAX_HELD_OUT_FAR = 0.01  # training fails rather than write a model above this on held-out data
MIN_CSV_ROWS = 150
CSV_MIN_WINDOW = 8
class TargetNotMet(DataError):
    """The trained model misses its false-alarm target on held-out data (no model is written)."""


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
    window: int = mc.WINDOW
    stride: int = mc.STRIDE
    lineage: dict[str, Any] | None = None  # the card's "lineage" (a model retrained from captures)


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
    turbines training never saw.  Training and calibration turbines span the
    operating envelope (:data:`ENVELOPE`); the test fleet is the natural 8 m/s fleet."""
    train, val = D.simulated(seed, turbines, hours, split=(0.85, 0.15), prefix="train", stride=TRAIN_STRIDE,
                             mean_wind=ENVELOPE)
    (calib,) = D.simulated(seed + 1_000_003, turbines, hours, anomalies_per_hour=0.0, prefix="calib",
                           mean_wind=ENVELOPE)
    held_out = None
    if test:
        (held_out,) = D.simulated(seed + 2_000_003, turbines, hours, anomalies_per_hour=12.0, prefix="test")
        held_out = held_out.evaluable
    return Dataset(list(mc.FEATURES), train.normal, val.normal, calib.normal, held_out,
                   source={"kind": "simulated", "seed": seed, "turbines": turbines, "hours": hours})


def csv_window(rows: int) -> int:
    """Default window for a CSV of ``rows`` rows: about ``rows / 15`` samples (so the
    10 % validation part still holds a few windows), at most ``WINDOW``, rounded down
    to a near-square grid (h x h or h x (h+1): 20 = 4 x 5 for 300 rows)."""
    target = max(CSV_MIN_WINDOW, min(mc.WINDOW, rows // 15))
    nice = [h * w for h in range(2, 11) for w in (h, h + 1) if CSV_MIN_WINDOW <= h * w <= mc.WINDOW]
    return max([v for v in nice if v <= target], default=CSV_MIN_WINDOW)


def csv_dataset(path: str | Path, features: Sequence[str], label: str | None = None, sep: str = ",",
                window: int | None = None, stride: int | None = None) -> Dataset:
    """A CSV in time order: the normal windows of the first 70 % of rows train (the
    last 15 % of them validate), the normal windows of the remaining 30 % calibrate
    and, with a label column, all of its windows are evaluated.  Windows touching
    labelled rows never train or calibrate.

    ``window`` (default :func:`csv_window` of the row count) and ``stride`` (default
    ``window // 10``, at least 1) are the model's: the card records them."""
    table = read_csv(path, features, label, sep, min_rows=MIN_CSV_ROWS)
    n = len(table.x)
    window = window or csv_window(n)
    stride = stride or max(1, window // 10)
    if not 2 <= window <= n // 4:
        raise DataError(f"--window {window}: must be 2..{n // 4} for {n} rows")
    if not 1 <= stride <= window:
        raise DataError(f"--stride {stride}: must be 1..{window} (the window)")
    labels = np.where(table.labels, "anomaly", D.NORMAL).astype(object) if table.labels is not None \
        else np.full(n, D.NORMAL, dtype=object)
    b = int(0.7 * n)
    step = max(1, min(stride, n // 5000))  # small files: use every window
    first, last = (D.segment_windows(table.x[s:e], labels[s:e], stride=step, window=window) for s, e in ((0, b), (b, n)))
    normal = first.normal
    k = int(0.85 * len(normal))
    train, val = normal.subset(np.arange(len(normal)) < k), normal.subset(np.arange(len(normal)) >= k)
    if min(len(train), len(val), len(last.normal)) < 5:
        raise DataError(f"{path}: too few normal rows to train, validate and calibrate ({n} rows; the first 70 % "
                        f"and the last 30 % each need 6 unlabelled windows of {window}: try a smaller --window)")
    circular = [i for i, f in enumerate(features) if f == "yaw"]
    return Dataset(list(features), train, val, last.normal,
                   last.evaluable if table.labels is not None else None, circular,
                   source={"kind": "csv", "file": Path(path).name, "rows": n, "label": label},
                   window=window, stride=stride)


def fit_package(ds: Dataset, out_dir: str | Path, *, seed: int = 0, epochs: int = 40, version: str = "1.0.0",
                rate: float = mc.DEFAULT_FALSE_ALARM_RATE, evaluate: bool = True, progress: bool = True,
                max_far: float = MAX_HELD_OUT_FAR, log=print) -> dict[str, Any]:
    """Train, calibrate, evaluate and export ``ds`` into ``out_dir``; return the card.

    Raises :class:`TargetNotMet` (and writes nothing) when the held-out false-alarm
    rate exceeds ``max_far``: such a model would alarm all day on a device."""
    t0 = time.perf_counter()
    shape = mc.grid_shape(ds.window)
    stats = fit_statistics_windows(ds.train.raw, ds.circular)
    x_train, x_val, x_cal = (prepare(w.raw, stats, shape) for w in (ds.train, ds.val, ds.calib))
    log(f"windows of {ds.window} (stride {ds.stride}, grid {shape[0]}x{shape[1]}): train {len(x_train)}, "
        f"val {len(x_val)}, calibration {len(x_cal)}" + (f", test {len(ds.test)}" if ds.test is not None else ""))
    if not all(np.isfinite(v).all() for v in (x_train, x_val, x_cal)):
        raise DataError("training data has values too large to standardise")
    circular = stats.get("circular", [pp.YAW] if len(ds.features) == len(mc.FEATURES) else [])
    model, history = tr.fit(x_train, x_val, seed=seed, epochs=epochs, progress=progress, free=circular, check=x_cal)
    regimes = {ds.features[int(f)]: fit for f, fit in tr.calibrate_regimes(model, x_cal).items()}
    errors_cal = mc.window_errors(x_cal, tr.reconstruct(model, x_cal))
    thresholds = th.floor_levels(th.calibrate(errors_cal, rate), model.predicted.numpy())
    metrics: dict[str, Any] = {
        "calibration_false_alarm_rate": float(th.alarms(errors_cal, thresholds).mean()),
        "target_false_alarm_rate": rate, "max_held_out_false_alarm_rate": max_far,
        "calibration_windows": int(len(x_cal)),
        "val_loss": float(min(history.val_loss)), "epochs": len(history.train_loss),
    }
    evaluation = None
    if evaluate and ds.test is not None and len(ds.test):
        x_test = prepare(ds.test.raw, stats, shape)
        pred = th.alarms(mc.window_errors(x_test, tr.reconstruct(model, x_test)), thresholds)
        evaluation = ev.evaluate(pred, x_test, ds.test.labels, x_train, x_cal, rate, seed)
        log(ev.table(evaluation))
        for name, rep in evaluation["detectors"].items():
            metrics[name] = {k: rep["overall"][k] for k in ("precision", "recall", "f1", "false_alarm_rate")}
        per_kind = evaluation["detectors"]["autoencoder"]["per_kind"]
        metrics["per_kind_f1"] = {k: m["f1"] for k, m in per_kind.items()}
        metrics["per_kind_recall"] = {k: m["recall"] for k, m in per_kind.items()}
        far = evaluation["detectors"]["autoencoder"]["overall"]["false_alarm_rate"]
        if far > max_far:
            raise TargetNotMet(f"held-out false-alarm rate {100 * far:.2f} % exceeds {100 * max_far:.2f} % "
                               f"(thresholds calibrated for {100 * rate:.2f} % on {len(x_cal)} windows); "
                               "no model written: train on more data (--turbines, --hours)")
    drift = drift_reference(ds, circular, log)
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / mc.MODEL_FILE
        check = np.concatenate([x_val[:254], ex.self_test_input(len(ds.features), shape)])
        parity = ex.export_onnx(model, onnx_path, check)
        metrics["onnx_parity_max_abs_err"] = parity
        metrics["training_seconds"] = round(time.perf_counter() - t0, 1)
        card = ex.model_card(
            onnx_path=onnx_path, version=version, features=ds.features, statistics=stats, thresholds=thresholds,
            fingerprint=D.fingerprint(ds.train.raw, ds.val.raw), metrics=metrics,
            extra={"model": {**model.config(), "regimes": regimes}, "training": {**history.as_dict(), "seed": seed, "data": ds.source},
                   **({"lineage": ds.lineage} if ds.lineage else {}), **({"drift": drift} if drift else {})},
            window=ds.window, stride=ds.stride, shape=shape,
        )
        (tmp / mc.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        if evaluation is not None:
            ev.write(evaluation, tmp / "evaluation.json")
        mc.load_card(tmp)  # what a consumer will do; fails here rather than there
    return card


def drift_reference(ds: Dataset, circular: Sequence[int], log=print) -> dict[str, Any] | None:
    """The card's ``drift`` object (:func:`windfleet.drift.reference`): references from each
    training source of ``ds.train``, thresholds from the calibration sources of ``ds.calib``;
    None (the card then has no drift monitoring) when they cannot make one."""
    try:
        return dr.reference(ds.train.raw, ds.train.source, ds.calib.raw, ds.calib.source, features=ds.features,
                            circular=circular, train_ends=ds.train.ends, calib_ends=ds.calib.ends)
    except ValueError as exc:
        log(f"no drift reference in the card: {exc}")
        return None


def train_simulated(out_dir: str | Path, *, seed: int = 0, turbines: int | None = None, hours: float | None = None,
                    quick: bool = False, epochs: int | None = None, version: str = "1.0.0",
                    evaluate: bool = True, progress: bool = True, max_far: float = MAX_HELD_OUT_FAR,
                    log=print) -> dict[str, Any]:
    """Train on a simulated fleet; write ``model.onnx``, ``model.json``, ``evaluation.json``."""
    d_turbines, d_hours, d_epochs = QUICK if quick else DEFAULT
    ds = simulated_dataset(seed, turbines or d_turbines, hours or d_hours, test=evaluate)
    return fit_package(ds, out_dir, seed=seed, epochs=epochs or d_epochs, version=version,
                       evaluate=evaluate, progress=progress, max_far=max_far, log=log)


def train_csv(path: str | Path, features: Sequence[str], out_dir: str | Path, *, label: str | None = None,
              sep: str = ",", seed: int = 0, epochs: int = 40, version: str = "1.0.0", evaluate: bool = True,
              progress: bool = True, window: int | None = None, stride: int | None = None,
              max_far: float = MAX_HELD_OUT_FAR, log=print) -> dict[str, Any]:
    """Train on a numeric CSV (time order); see :func:`csv_dataset` for the splits and window."""
    ds = csv_dataset(path, features, label, sep, window, stride)
    return fit_package(ds, out_dir, seed=seed, epochs=epochs, version=version, evaluate=evaluate,
                       progress=progress, max_far=max_far, log=log)


# -- retraining from captured windows (windfleet train --from-capture) -------------------
CAPTURE_SPLIT = (0.7, 0.15, 0.15)  # per captured turbine, in time: train, val, calibration
# Captured training windows are repeated to be at least CAPTURE_MIN_SHARE of a mixed training set
# (measured, quick fleet x 0.25 h, 4 epochs, a +60 ADC voltage offset learnt from 1,075 captures:
# the drifted turbine's alarm rate went 1.0 -> 0.53 at 0.2 and -> 0.21 at 0.5, held-out F1 0.94/0.96)...
CAPTURE_MIN_SHARE = 0.5
CAPTURE_MAX_REPEAT = 10  # ...but each at most this many times (a few windows must not dominate)
MIN_CAPTURE_ONLY = 5  # windows per stage when captures alone train (no --mix)
MIXES = ("simulated", "csv", "none")


def capture_dataset(captures: Captures, mix: Dataset | None = None, *, source: str = "", since: float | None = None,
                    log=print) -> Dataset:
    """Captured normal windows (:class:`training.capture.Captures`), optionally mixed
    with another dataset (``simulated_dataset``/``csv_dataset`` of the same features and
    window), which also supplies the labelled held-out test set.

    Each captured turbine is its own source (turbine index after the mix's), split in
    time into :data:`CAPTURE_SPLIT` train/val/calibration, so the card's drift references
    and the thresholds cover it.  In a mix, captured training windows are repeated up to
    :data:`CAPTURE_MIN_SHARE` of the training set (at most :data:`CAPTURE_MAX_REPEAT`
    times each): a few hundred captures next to tens of thousands of simulated windows
    would otherwise barely move the model."""
    window, features = captures.window, list(captures.features)
    if mix is not None:
        if list(mix.features) != features:
            raise DataError(f"captured features [{','.join(features)}] differ from the mixed data's "
                            f"[{','.join(mix.features)}]: use --mix none, or a CSV with those columns")
        if mix.window != window:
            raise DataError(f"captured windows hold {window} samples but the mixed data's model window is "
                            f"{mix.window}: captures train a model of their own window (use --mix none)")
    offset = 1 + max((int(w.source.max()) for w in (mix.train, mix.val, mix.calib) if len(w)), default=-1) \
        if mix is not None else 0
    parts: list[list[D.Windows]] = [[], [], []]
    for i, (turbine, raw) in enumerate(captures.turbines.items()):
        seqs = captures.seqs[turbine]
        cuts = np.round(np.cumsum((0.0,) + CAPTURE_SPLIT) * len(raw)).astype(int)
        for p in range(3):
            a, b = cuts[p], cuts[p + 1]
            parts[p].append(D.Windows(raw[a:b], np.full(b - a, D.NORMAL, dtype=object),
                                      np.full(b - a, offset + i, dtype=np.int64), seqs[a:b]))
    cap = [D.Windows.concat(p) if any(len(w) for w in p) else None for p in parts]
    if mix is None and any(w is None or len(w) < MIN_CAPTURE_ONLY for w in cap):
        raise DataError(f"{captures.windows} captured normal windows are too few to train, validate and calibrate "
                        f"without other data (each needs {MIN_CAPTURE_ONLY}): mix them (--mix simulated or --csv)")
    train = cap[0]
    if mix is not None and train is not None:
        repeat = int(np.clip(np.ceil(CAPTURE_MIN_SHARE * len(mix.train) / ((1 - CAPTURE_MIN_SHARE) * len(train))),
                             1, CAPTURE_MAX_REPEAT))
        if repeat > 1:
            log(f"capture: {len(train)} captured training windows repeated {repeat}x next to {len(mix.train)} others")
            train = train.subset(np.repeat(np.arange(len(train)), repeat))
    stages = [D.Windows.concat([w for w in (mix_w, cap_w) if w is not None and len(w)])
              for mix_w, cap_w in zip((mix.train, mix.val, mix.calib) if mix is not None else (None,) * 3,
                                      (train, cap[1], cap[2]))]
    mixed_with = None if mix is None else (mix.source.get("kind") if mix.source.get("kind") != "csv"
                                           else f"csv:{mix.source.get('file')}")
    lineage = {"parent": captures.parent, "captures": list(captures.objects), "capture_windows": captures.windows,
               "turbines": sorted(captures.turbines), "since": iso(since), "mixed_with": mixed_with}
    info = {"kind": "capture", "source": str(source), "windows": captures.windows,
            "turbines": len(captures.turbines), "report": captures.report.as_dict(),
            "mixed_with": mix.source if mix is not None else None}
    if mix is not None:
        return Dataset(features, *stages, mix.test, mix.circular, info, window=mix.window, stride=mix.stride,
                       lineage=lineage)
    circular = [i for i, f in enumerate(features) if f == "yaw"]
    return Dataset(features, *stages, None, None if features == list(mc.FEATURES) else circular, info,
                   window=window, stride=mc.STRIDE if window == mc.WINDOW else max(1, window // 10),
                   lineage=lineage)


def train_from_capture(source: str | Path, out_dir: str | Path, *, s3: Any = None, since: float | None = None,
                       turbines: Sequence[str] | None = None, include_flagged: bool = False,
                       mix: str = "simulated", csv_path: str | Path | None = None,
                       csv_features: Sequence[str] | None = None, label: str | None = None, sep: str = ",",
                       seed: int = 0, hours: float | None = None, quick: bool = False, epochs: int | None = None,
                       version: str = "1.0.0", evaluate: bool = True, progress: bool = True,
                       max_far: float = MAX_HELD_OUT_FAR, log=print) -> dict[str, Any]:
    """Train the next model from captured normal windows (``s3://bucket/prefix`` read
    through ``s3``, a boto3-shaped client, or a directory), mixed with a simulated fleet
    (``mix="simulated"``: the default fleet of :data:`QUICK`/:data:`DEFAULT`, ``hours``
    per turbine), a CSV (``mix="csv"``) or nothing (``"none"``: no held-out test, so no
    false-alarm gate).  The card's ``lineage`` names the parent model and the captures."""
    if mix not in MIXES:
        raise DataError(f"--mix {mix!r}: choose {', '.join(MIXES)}")
    if (mix == "csv") != (csv_path is not None):
        raise DataError("--mix csv and --csv go together")
    captures = read_captures(source, s3=s3, since=since, turbines=turbines, include_flagged=include_flagged, log=log)
    d_turbines, d_hours, d_epochs = QUICK if quick else DEFAULT
    other = None
    if mix == "simulated":
        if captures.features != list(mc.FEATURES):
            raise DataError(f"captured features [{','.join(captures.features)}] are not the simulated fleet's "
                            f"[{','.join(mc.FEATURES)}]: use --mix none or --csv")
        other = simulated_dataset(seed, d_turbines, hours or d_hours, test=evaluate)
    elif mix == "csv":
        names = list(csv_features or captures.features)
        other = csv_dataset(csv_path, names, label, sep, window=captures.window)
    ds = capture_dataset(captures, other, source=str(source), since=since, log=log)
    if ds.test is None and evaluate:
        log("no labelled held-out data (--mix none, or a CSV without --label): the false-alarm gate is not applied")
    return fit_package(ds, out_dir, seed=seed, epochs=epochs or d_epochs, version=version, evaluate=evaluate,
                       progress=progress, max_far=max_far, log=log)
