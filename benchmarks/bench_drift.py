"""Drift monitoring's cost on the detector's path, all measured in one run on the same data:

(a) ``detector``: the streaming path -- columnar readings messages through ``Detector.handle``
    and ``score_available`` (as ``bench_detector.py`` (a)), N turbines interleaved -- with a
    model whose card has no ``drift`` object: the baseline, in microseconds per reading;
(b) ``detector_with_drift``: (a) with the same model whose card carries one (every message's
    raw features also go into the turbine's monitor), interleaved with (a) runs;
(c) ``drift_update``: the handler's extra call alone (``DriftTracker.update`` on each
    message's raw features, the exact rows the handler computed), in microseconds per reading;
(d) ``drift_score``: one turbine's drift record (nearest-reference PSI of every feature +
    the payload), in microseconds, and what it adds per reading at the default 10 s interval
    and 20 Hz.

``drift_us_per_reading`` = (c) + (d) per reading; ``drift_cost_ratio`` = that / (a): the share
of the detector's per-reading cost that drift monitoring adds.  ``end_to_end_ratio`` = (b) /
(a) checks it (noisy on a shared machine: a difference of two timings).

``--sensitivity SEEDS`` (e.g. ``1,2,5-7``) also measures what the shipped settings (B, n,
margin) flag: per seed, the card's drift object from ``windfleet train --quick``'s fleets
(``training.pipeline.simulated_dataset``), then ``--demo-turbines`` undrifted 8 m/s turbines
streamed for 300 s (the worst score / threshold per feature, and how many drift records would
be flagged: must be 0), and one turbine drifting from t = 60 s: voltage offsets as steps and
ramps, and wind regimes (the simulator's ``Drift``) -- seconds from the drift's start to the
first flagged record (null: never within 70-100 s).

    .venv/bin/python benchmarks/bench_drift.py [--turbines 20] [--seconds 60] [--repeat 5]
    .venv/bin/python benchmarks/bench_drift.py --sensitivity 1,2,5-7 [--demo-turbines 45]

Writes benchmarks/results/drift.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from windfleet import drift as dr  # noqa: E402
from windfleet import model_contract as mc  # noqa: E402
from windfleet import payloads, topics  # noqa: E402
from windfleet.components.detector import Detector, load_model  # noqa: E402
from windfleet.components.detector.drift import DEFAULT_INTERVAL, DriftTracker  # noqa: E402
from windfleet.components.simulator.service import SimConfig  # noqa: E402
from windfleet.preprocessing import YAW, raw_features  # noqa: E402
from windfleet.simulation import Turbine, turbine_seed  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
FIELDS = payloads.SAMPLE_FIELDS + payloads.EXTRA_SAMPLE_FIELDS
BATCH = SimConfig().batch  # samples per readings message, as the simulator sends them
RATE = 20.0


class NullBus:
    """Accepts publishes and encodes them (the cost a real bus pays before the socket)."""

    thing_name, version = "bench", "0.0.0"

    def publish(self, topic, payload, qos=0):
        if isinstance(payload, dict):
            payloads.encode(payload)

    def subscribe(self, topic, handler):
        pass

    def update_state(self, state, **extra):
        pass

    def close(self):
        pass


def packages(tmp: Path) -> tuple[Path, Path]:
    """(without, with): an untrained Conv-AE of the contract's shape (it costs what a trained one
    does; built in a child process so torch stays out of this one), its card without and with a
    ``drift`` object made from a simulated 3 + 3 turbine fleet (10 minutes each)."""
    plain = tmp / "plain"
    code = ("import sys; sys.path.insert(0, %r); from tests.detector_fixtures import build_model_package; "
            "build_model_package(%r, '1.0.0', seed=0)" % (str(REPO), str(plain)))
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, cwd=REPO)
    fleets = []
    for prefix, seed in (("train", 21), ("calib", 22)):
        rows = [raw_features(Turbine(f"{prefix}-t{k:02d}", turbine_seed(seed, k), RATE, [], m).step(int(600 * RATE)))
                for k, m in enumerate((8.0, 2.5, 12.0))]
        fleets.append((np.concatenate(rows)[:, None, :], np.repeat(np.arange(3), [len(r) for r in rows]),
                       np.concatenate([np.arange(len(r)) for r in rows])))
    (tr, ts, te), (cr, cs, ce) = fleets
    drifted = tmp / "drift"
    shutil.copytree(plain, drifted)
    card = json.loads((drifted / mc.CARD_FILE).read_text())
    card["drift"] = dr.reference(tr, ts, cr, cs, train_ends=te, calib_ends=ce, features=mc.FEATURES, circular=[YAW])
    (drifted / mc.CARD_FILE).write_text(json.dumps(card))
    return plain, drifted


def messages(turbines: int, seconds: float) -> tuple[list[tuple[str, bytes]], list[tuple[str, int, np.ndarray]]]:
    """Readings messages in arrival order (every turbine's k-th batch, then the (k+1)-th), and
    each message's (turbine, seq, raw features) as the handler computes them."""
    per, rows = [], []
    for i in range(turbines):
        tid = topics.turbine_id("bench", i)
        data = Turbine(tid, turbine_seed(42, i), RATE, [], 8.0, 1.7e9).step(int(seconds * RATE))
        feats = raw_features(data)
        per.append([((topics.readings(tid), payloads.encode(payloads.readings_batch(
            tid, s, {f: data[f][s:s + BATCH] for f in FIELDS}))), (tid, s, feats[s:s + BATCH]))
            for s in range(0, len(feats), BATCH)])
    order = [m for k in range(len(per[0])) for m in (p[k] for p in per)]
    return [m for m, _ in order], [r for _, r in order]


def bench_detector(model_dir: Path, msgs: list[tuple[str, bytes]], turbines: int, readings: int) -> float:
    """(a)/(b): microseconds per reading through handle + scoring."""
    det = Detector(NullBus(), load_model(model_dir), [topics.turbine_id("bench", i) for i in range(turbines)],
                   tempfile.mkdtemp(), queue_size=1_000_000)
    t0 = time.perf_counter()
    for k, (topic, raw) in enumerate(msgs, 1):
        det.handle(topic, raw)
        if k % turbines == 0:  # one arrival round: score what is ready
            while det.score_available(timeout=0):
                pass
    while det.score_available(timeout=0):
        pass
    elapsed = time.perf_counter() - t0
    assert det.snapshot()["malformed_dropped"] == 0
    return 1e6 * elapsed / readings


def bench_update(model, rows: list[tuple[str, int, np.ndarray]], turbines: int, readings: int) -> float:
    """(c): microseconds per reading of the handler's drift call alone."""
    tracker = DriftTracker([topics.turbine_id("bench", i) for i in range(turbines)])
    update = tracker.update
    t0 = time.perf_counter()
    for tid, seq, r in rows:
        update(model, tid, seq, r)
    elapsed = time.perf_counter() - t0
    assert all(m.seen == readings // turbines for m in tracker.monitors.values())
    return 1e6 * elapsed / readings


def bench_score(model, rows: list[tuple[str, int, np.ndarray]], turbines: int, rounds: int = 50) -> float:
    """(d): microseconds per drift record (one turbine: score every feature + the payload)."""
    tracker = DriftTracker([topics.turbine_id("bench", i) for i in range(turbines)])
    for tid, seq, r in rows:
        tracker.update(model, tid, seq, r)
    t0 = time.perf_counter()
    records = sum(len(tracker.records(model)) for _ in range(rounds))
    return 1e6 * (time.perf_counter() - t0) / records


def sensitivity(seed: int, demo_turbines: int) -> dict:
    """The shipped drift settings on ``train --quick``'s fleets of ``seed`` (see the module docstring)."""
    from windfleet.simulation import Drift
    from windfleet.training.pipeline import QUICK, simulated_dataset

    ds = simulated_dataset(seed, QUICK[0], QUICK[1], test=False)
    card = dr.reference(ds.train.raw, ds.train.source, ds.calib.raw, ds.calib.source, features=mc.FEATURES,
                        circular=[YAW], train_ends=ds.train.ends, calib_ends=ds.calib.ends)
    ref = dr.Reference.from_card({"features": mc.FEATURES, "drift": card})
    thresholds = np.array([card["thresholds"][f] for f in mc.FEATURES])

    def stream(tid: str, turbine_seed_: int, seconds: int, drift=()) -> list[tuple[int, np.ndarray, list]]:
        turbine, monitor, out = Turbine(tid, turbine_seed_, RATE, [], 8.0, 0.0, list(drift)), dr.DriftMonitor(ref), []
        for k in range(seconds):  # one record per simulated second
            monitor.update(raw_features(turbine.step(int(RATE))), int(k * RATE))
            if monitor.ready:
                scores = monitor.score()
                out.append((k, np.array(list(scores.values())), monitor.drifted(scores)))
        return out

    worst, flagged = np.zeros(len(mc.FEATURES)), 0
    for i in range(demo_turbines):
        for _, scores, drifted in stream(f"gw-t{i:02d}", turbine_seed(1000 + seed, i), 300):
            worst, flagged = np.maximum(worst, scores), flagged + bool(drifted)
    start = 60

    def first_flag(drift: Drift, seconds: int = 130) -> int | None:
        return next((k - start for k, _, d in stream("x-t00", turbine_seed(99, seed), seconds, [drift])
                     if d and k >= start), None)

    at = int(start * RATE)
    return {
        "seed": seed, "references": len(card["reference_sources"]), "card_drift_bytes": len(json.dumps(card)),
        "thresholds": dict(zip(mc.FEATURES, np.round(thresholds, 3).tolist())),
        "calibration_max": {f: round(v, 3) for f, v in card["calibration"]["max_score"].items()},
        "undrifted_turbines": demo_turbines, "undrifted_seconds": 300,
        "undrifted_worst_over_threshold": dict(zip(mc.FEATURES, np.round(worst / thresholds, 3).tolist())),
        "undrifted_flagged_records": flagged,
        "seconds_to_flag": {
            **{f"voltage_step_{v}": first_flag(Drift("sensor_offset", at, 0, channel="voltage", offset=v))
               for v in (20, 30, 60, 100)},
            **{f"voltage_ramp_{v}_over_{r}s": first_flag(Drift("sensor_offset", at, int(r * RATE), channel="voltage",
                                                               offset=v), 160)
               for v, r in ((60, 10), (100, 30), (100, 60))},
            **{f"wind_regime_{w:g}_m_s": first_flag(Drift("wind_regime", at, 0, mean_wind=w))
               for w in (0.0, 2.0, 4.0, 12.0, 16.0, 20.0, 25.0, 30.0)},
        },
    }


def _seeds(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turbines", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0, help="simulated seconds per turbine (20 Hz)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved runs of (a) and (b); medians reported")
    ap.add_argument("--sensitivity", metavar="SEEDS", help="also measure what the settings flag, e.g. 1,2,5-7")
    ap.add_argument("--demo-turbines", type=int, default=15, help="undrifted turbines per seed (--sensitivity)")
    ap.add_argument("--out", default=str(RESULTS / "drift.json"))
    args = ap.parse_args(argv)
    if args.seconds * RATE < dr.SAMPLES:
        ap.error(f"--seconds must cover a drift window ({dr.SAMPLES / RATE:g} s)")

    tmp = Path(tempfile.mkdtemp(prefix="wf-bench-drift-"))
    try:
        plain, drifted = packages(tmp)
        msgs, rows = messages(args.turbines, args.seconds)
        readings = sum(len(r) for _, _, r in rows)
        model = load_model(drifted)
        a, b, c = [], [], []
        for _ in range(args.repeat):
            a.append(bench_detector(plain, msgs, args.turbines, readings))
            b.append(bench_detector(drifted, msgs, args.turbines, readings))
            c.append(bench_update(model, rows, args.turbines, readings))
        d = bench_score(model, rows, args.turbines)
        card_bytes = len(json.dumps(model.card["drift"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a_us, b_us, c_us = statistics.median(a), statistics.median(b), statistics.median(c)
    d_per_reading = d / (DEFAULT_INTERVAL * RATE)  # one record per turbine per interval
    drift_us = c_us + d_per_reading
    result = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "turbines": args.turbines, "readings": readings, "readings_per_message": BATCH, "repeat": args.repeat,
        "bins": dr.BINS, "samples": dr.SAMPLES, "blocks": dr.BLOCKS, "margin": dr.MARGIN,
        "min_threshold": dr.MIN_THRESHOLD, "segment": dr.SEGMENT * dr.SAMPLES,
        "detector_us_per_reading": round(a_us, 3),
        "detector_with_drift_us_per_reading": round(b_us, 3),
        "drift_update_us_per_reading": round(c_us, 4),
        "drift_update_us_per_message": round(c_us * BATCH, 3),
        "drift_score_us_per_record": round(d, 2),
        "drift_score_us_per_reading_at_default_interval": round(d_per_reading, 4),
        "drift_us_per_reading": round(drift_us, 4),
        "drift_cost_ratio": round(drift_us / a_us, 4),
        "end_to_end_ratio": round(b_us / a_us, 4),
        "runs": {"detector": [round(v, 3) for v in a], "detector_with_drift": [round(v, 3) for v in b],
                 "drift_update": [round(v, 4) for v in c]},
        "card_drift_bytes": card_bytes,
    }
    if args.sensitivity:
        result["sensitivity"] = [sensitivity(seed, args.demo_turbines) for seed in _seeds(args.sensitivity)]
        result["undrifted_flagged_records"] = sum(s["undrifted_flagged_records"] for s in result["sensitivity"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows_out = [
        ("(a) detector, no drift (us/reading)", result["detector_us_per_reading"]),
        ("(b) detector with drift (us/reading)", result["detector_with_drift_us_per_reading"]),
        ("(c) drift update (us/reading)", result["drift_update_us_per_reading"]),
        ("(d) drift record (us/turbine)", result["drift_score_us_per_record"]),
        ("drift_us_per_reading = c + d/200", result["drift_us_per_reading"]),
        ("drift_cost_ratio = that / a", result["drift_cost_ratio"]),
        ("end_to_end_ratio = b / a", result["end_to_end_ratio"]),
    ]
    for name, value in rows_out:
        print(f"{name:40s} {value:>10}")
    for s in result.get("sensitivity", []):
        print(f"seed {s['seed']}: undrifted flagged records {s['undrifted_flagged_records']}, worst/threshold "
              f"{max(s['undrifted_worst_over_threshold'].values()):.2f}; seconds to flag {s['seconds_to_flag']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
