"""Drift on the device: the PSI measure against known distributions, the card's reference and
its calibrated thresholds, the streaming monitor, and the detector publishing drift records.

The detector tests use a real trained model package (``model_dir``) whose card's ``drift``
object is rebuilt from a small simulated fleet, so which turbine is drifted is known."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from windfleet import drift as dr
from windfleet import model_contract as mc
from windfleet import payloads, topics
from windfleet.components.bus.base import Bus
from windfleet.components.detector import Detector, load_model
from windfleet.components.detector.drift import DriftTracker
from windfleet.preprocessing import YAW, raw_features
from windfleet.simulation import Turbine, turbine_seed

THING = "gw1"
FIELDS = payloads.SAMPLE_FIELDS + payloads.EXTRA_SAMPLE_FIELDS


def hist(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)


def one_feature_reference(train: list[np.ndarray], calib: list[np.ndarray], **kw) -> dict:
    """``dr.reference`` of one feature, each array one source's readings in time order."""
    def windows(sources):
        raw = np.concatenate([s.reshape(-1, 1, 1) for s in sources])
        return raw, np.concatenate([np.full(len(s), i) for i, s in enumerate(sources)]), \
            np.concatenate([np.arange(len(s)) for s in sources])
    (tr, ts, te), (cr, cs, ce) = windows(train), windows(calib)
    return dr.reference(tr, ts, cr, cs, train_ends=te, calib_ends=ce, features=["x"], **kw)


# ---------------------------------------------------------------- the measure
def test_psi_is_about_zero_for_the_same_distribution_and_large_for_a_shifted_one():
    rng = np.random.default_rng(0)
    edges = dr.bin_edges(rng.normal(size=100_000))
    q = dr.proportions(hist(rng.normal(size=100_000), edges))
    assert dr.psi(hist(rng.normal(size=600), edges), q) < 0.05
    assert dr.psi(hist(rng.normal(0.5, 1, size=600), edges), q) > 0.2  # half a standard deviation
    assert dr.psi(hist(rng.normal(3.0, 1, size=600), edges), q) > 3.0  # beyond the training range


def test_empty_bins_are_smoothed_so_the_score_stays_finite_and_bounded():
    q = dr.proportions(np.array([1000, 0, 0, 1000]))  # a reference bin training never filled
    assert (q > 0).all()
    window = np.array([0, 600, 0, 0])  # every reading where training had none
    score = dr.psi(window, q)
    assert math.isfinite(score) and score > 3.0
    assert score < dr.psi(window, dr.proportions(np.array([100_000, 0, 0, 100_000])))  # floor: pseudo-counts


def test_the_nearest_training_turbine_decides():
    rng = np.random.default_rng(1)
    edges = dr.bin_edges(np.concatenate([rng.normal(0, 1, 50_000), rng.normal(5, 1, 50_000)]))
    refs = np.stack([dr.proportions(hist(rng.normal(m, 1, 50_000), edges)) for m in (0, 5)])
    at_second = hist(rng.normal(5, 1, 600), edges)
    assert dr.psi(at_second, refs[0]) > 3.0  # far from the first turbine...
    assert dr.nearest_psi(at_second, refs) < 0.1  # ...but a regime training saw
    assert dr.nearest_psi(hist(rng.normal(10, 1, 600), edges), refs) > 3.0  # a regime nobody had


def test_a_circular_feature_is_compared_up_to_a_rotation():
    rng = np.random.default_rng(2)
    edges = dr.bin_edges(None, 10, circular=True)
    wrap = lambda a: np.remainder(a + math.pi, 2 * math.pi) - math.pi  # noqa: E731
    ref = dr.proportions(hist(wrap(rng.normal(0.3, 0.4, 50_000)), edges))[None]
    turned = hist(wrap(rng.normal(2.8, 0.4, 600)), edges)  # the wind came round: weather, not drift
    assert dr.nearest_psi(turned, ref, circular=True) < 0.2 < dr.nearest_psi(turned, ref)
    spread = hist(wrap(rng.uniform(-math.pi, math.pi, 600)), edges)  # a yaw sensor gone wild
    assert dr.nearest_psi(spread, ref, circular=True) > 1.0


def test_thresholds_are_the_calibration_fleets_largest_score_times_the_margin():
    rng = np.random.default_rng(3)
    train = [rng.normal(0, 1, 20_000), rng.normal(6, 1, 20_000)]
    card = one_feature_reference(train, [rng.normal(0, 1, 6_000), rng.normal(6, 1, 6_000)], samples=600,
                                 margin=2.0)
    assert card["thresholds"]["x"] == dr.MIN_THRESHOLD  # turbines like the training ones: noise only
    assert len(card["edges"]["x"]) == dr.BINS - 1 and card["samples"] == 600
    assert len(card["references"]["x"]) == 2 * round(20_000 / (dr.SEGMENT * 600))  # one per 5 min stretch
    assert all(abs(sum(r) - 1) < 1e-6 and min(r) > 0 for r in card["references"]["x"])
    # a calibration turbine in a regime between the training ones raises the bar
    wider = one_feature_reference(train, [rng.normal(0, 1, 6_000), rng.normal(3, 1, 6_000)], samples=600,
                                  margin=2.0)
    assert wider["thresholds"]["x"] == pytest.approx(2.0 * wider["calibration"]["max_score"]["x"])
    assert wider["thresholds"]["x"] > card["thresholds"]["x"]


# ---------------------------------------------------------------- the streaming monitor
@pytest.fixture(scope="module")
def reference() -> dr.Reference:
    rng = np.random.default_rng(4)
    train, calib = [rng.normal(0, 1, 20_000)], [rng.normal(0, 1, 6_000)]
    return dr.Reference.from_card({"features": ["x"], "drift": one_feature_reference(train, calib, samples=600)})


def test_the_monitor_scores_like_the_batch_measure_and_forgets_what_left_its_window(reference):
    rng = np.random.default_rng(5)
    mon = dr.DriftMonitor(reference)
    for seq in range(0, 600, 20):
        mon.update(rng.normal(6, 1, (20, 1)), seq)  # drifted
    assert mon.ready and mon.drifted() == ["x"]
    normal = rng.normal(0, 1, (600, 1))
    for seq in range(600, 1200, 20):
        mon.update(normal[seq - 600: seq - 580], seq)
    assert mon.drifted() == []  # the drifted readings left the ring
    assert 600 - mon.block <= mon.samples <= 600
    last = normal[-mon.samples:, 0]
    assert mon.score()["x"] == pytest.approx(dr.nearest_psi(hist(last, reference.binner.edges[0]),
                                                            reference.references[0]))


def test_redelivered_readings_are_not_counted_twice(reference):
    rows = np.random.default_rng(6).normal(0, 1, (50, 1))
    mon = dr.DriftMonitor(reference)
    assert mon.update(rows[:30], 0) == 30
    assert mon.update(rows[20:50], 20) == 20  # a QoS1 redelivery overlapping the last message
    assert mon.update(rows[:10], 0) == 0
    assert mon.seen == 50


def test_a_card_without_drift_means_no_monitoring_and_a_bad_one_is_refused():
    assert dr.Reference.from_card({"features": ["x"]}) is None
    with pytest.raises(dr.DriftCardError):
        dr.Reference.from_card({"features": ["x"], "drift": {"method": "psi", "edges": {"x": [2, 1]}}})


def test_a_new_model_judges_the_turbines_window_against_its_own_reference_at_once():
    """After a rollout the records name the new model and compare the turbine's last window of
    readings with the new model's training data straight away (no minute of fresh readings
    first); a model without drift stops the records, one on other features starts over."""
    rng = np.random.default_rng(7)

    def card(mean: float, features=("x",)) -> dict:
        return {"features": list(features), "drift": one_feature_reference(
            [rng.normal(mean, 1, 12_000)], [rng.normal(mean, 1, 6_000)], samples=600)}

    v1, v2 = SimpleNamespace(card=card(0.0), version="1.0.0"), SimpleNamespace(card=card(4.0), version="2.0.0")
    tracker = DriftTracker(["t"])
    for seq in range(0, 600, 20):
        tracker.update(v1, "t", seq, rng.normal(0, 1, (20, 1)))
    assert [(t, r["model_version"], r["samples"], r["drifted"]) for t, r in tracker.records(v1)] == \
        [("t", "1.0.0", 600, [])]
    # v2 learnt a turbine reading 4 sigma higher: the same 600 readings are drifted against it
    assert [(t, r["model_version"], r["samples"], r["drifted"]) for t, r in tracker.records(v2)] == \
        [("t", "2.0.0", 600, ["x"])]
    assert tracker.records(v1)[0][1]["drifted"] == []  # and back (a rollback): the window carried over again
    other = SimpleNamespace(card={**card(0.0), "features": ["y"]}, version="3.0.0")
    assert tracker.records(other) == []  # other features: the window starts over
    old = SimpleNamespace(card={"features": ["x"]}, version="0.9.0")
    tracker.update(old, "t", 600, rng.normal(0, 1, (20, 1)))
    assert tracker.records(old) == [] and tracker.monitors == {}


def test_readings_inside_a_labelled_anomaly_episode_are_not_drift():
    """A fault the simulator (or an operator) labelled is not a change of the turbine's normal: its
    readings stay out of the window, so a fleet with frequent faults is not reported drifted."""
    rng = np.random.default_rng(3)
    card = {"features": ["x"], "drift": one_feature_reference([rng.normal(0, 1, 12_000)], [rng.normal(0, 1, 6_000)],
                                                                samples=600)}
    model = SimpleNamespace(card=card, version="1.0.0")
    labelled, unlabelled = DriftTracker(["t"]), DriftTracker(["t"])
    episodes = [(900, 1300)]  # samples 900..1299 read 8 sigma high: a fault (then 300 of recovery)
    for seq in range(0, 1600, 20):
        rows = rng.normal(8 if 900 <= seq < 1300 else 0, 1, (20, 1))
        labelled.update(model, "t", seq, rows, episodes)
        unlabelled.update(model, "t", seq, rows)
    (_, without), = labelled.records(model)
    (_, with_fault), = unlabelled.records(model)
    assert without["samples"] == 600 and without["drifted"] == []
    assert with_fault["drifted"] == ["x"], with_fault


# ---------------------------------------------------------------- the detector
class RecordingBus(Bus):
    """An in-memory bus: records publications; the test plays the broker."""

    def __init__(self):
        self.thing_name, self.component_name, self.version = THING, "test", "0.1.0"
        self.published: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    def publish(self, topic, payload, qos=0):
        body = payload if isinstance(payload, dict) else json.loads(payload)
        json.dumps(body, allow_nan=False)
        with self._lock:
            self.published.append((topic, body))

    def drift(self) -> list[dict]:
        with self._lock:
            return [payloads.validate_drift(b) for t, b in self.published if t.endswith("/drift")]

    def subscribe(self, topic, handler):
        pass

    def publish_cloud(self, topic, payload, qos=1):
        return False

    def get_configuration(self, component=None):
        return {}

    def on_configuration_update(self, handler, component=None):
        pass

    def update_state(self, state, **extra):
        pass

    def close(self):
        pass


TURBINES = [f"{THING}-t00", f"{THING}-t01"]
TRAIN_S, CALIB_S, LIVE_S = 480, 120, 60  # each turbine's first 8 minutes train, the next 2 calibrate


@pytest.fixture(scope="module")
def streams() -> dict[str, dict[str, np.ndarray]]:
    """11 minutes of each turbine: the first 10 make the drift reference, the last one goes live."""
    return {t: Turbine(t, turbine_seed(11, k), 20.0, [], 8.0, 1_700_000_000.0).step(20 * (TRAIN_S + CALIB_S + LIVE_S))
            for k, t in enumerate(TURBINES)}


@pytest.fixture(scope="module")
def drift_model(model_dir, streams, tmp_path_factory) -> Path:
    """``model_dir`` whose card's drift reference comes from the turbines' first 10 minutes."""
    out = tmp_path_factory.mktemp("drift") / "model"
    shutil.copytree(model_dir, out)
    rows = [raw_features(data) for data in streams.values()]
    parts = []
    for a, b in ((0, TRAIN_S), (TRAIN_S, TRAIN_S + CALIB_S)):
        part = [r[20 * a:20 * b] for r in rows]
        parts.append((np.concatenate(part)[:, None, :], np.repeat(np.arange(len(part)), [len(p) for p in part]),
                      np.concatenate([np.arange(len(p)) for p in part])))
    (train, train_src, train_ends), (calib, calib_src, calib_ends) = parts
    card = json.loads((out / mc.CARD_FILE).read_text())
    card["drift"] = dr.reference(train, train_src, calib, calib_src, train_ends=train_ends, calib_ends=calib_ends,
                                 features=mc.FEATURES, circular=[YAW])
    (out / mc.CARD_FILE).write_text(json.dumps(card))
    return out


def live(data: dict[str, np.ndarray], voltage_offset: float = 0.0, from_s: int = 0) -> dict[str, np.ndarray]:
    """The last minute of a stream, its voltage reading ``voltage_offset`` more from ``from_s``."""
    out = {k: v[20 * (TRAIN_S + CALIB_S):].copy() for k, v in data.items() if isinstance(v, np.ndarray)}
    out["voltage"][20 * from_s:] += voltage_offset
    return out


def feed(det: Detector, tid: str, data: dict, batch: int = 20) -> None:
    for s in range(0, len(data["ts"]), batch):
        body = payloads.readings_batch(tid, s, {f: data[f][s:s + batch] for f in FIELDS})
        det.handle(topics.readings(tid), payloads.encode(body))


def serve_until(det: Detector, done, timeout: float = 20.0) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=det.serve, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(10)


def test_the_detector_flags_the_drifted_turbine_and_not_the_other(drift_model, streams, tmp_path):
    turbines = TURBINES
    bus = RecordingBus()
    det = Detector(bus, load_model(drift_model), turbines, tmp_path / "work", drift_interval=0.05)
    feed(det, turbines[0], live(streams[turbines[0]]))
    feed(det, turbines[1], live(streams[turbines[1]], voltage_offset=60.0, from_s=20))  # a sensor recalibrated
    serve_until(det, lambda: {r["turbine_id"] for r in bus.drift()} == set(turbines))
    latest = {r["turbine_id"]: r for r in bus.drift()}
    assert latest[turbines[0]]["drifted"] == [] and latest[turbines[1]]["drifted"] == ["voltage"]
    assert all(r["model_version"] == "1.0.0" and r["samples"] >= 540 for r in latest.values())
    assert latest[turbines[1]]["score"]["voltage"] > latest[turbines[1]]["thresholds"]["voltage"]
    counters = det.snapshot()
    assert counters["drift_records"] >= 2 and counters["drift_flags"] >= 1 and counters["malformed_dropped"] == 0


def test_a_model_without_drift_in_its_card_scores_as_before_and_publishes_no_drift(model_dir, streams, tmp_path):
    old = tmp_path / "old-model"
    shutil.copytree(model_dir, old)
    card = json.loads((old / mc.CARD_FILE).read_text())
    card.pop("drift", None)
    (old / mc.CARD_FILE).write_text(json.dumps(card))
    bus = RecordingBus()
    det = Detector(bus, load_model(old), [f"{THING}-t00"], tmp_path / "work", drift_interval=0.05)
    feed(det, f"{THING}-t00", live(streams[TURBINES[0]]))
    serve_until(det, lambda: det.snapshot()["windows_scored"] >= 111)
    assert det.snapshot()["windows_scored"] >= 111 and bus.drift() == []
    assert det.snapshot()["malformed_dropped"] == 0


def test_a_trained_card_carries_the_drift_reference(model_dir):
    card = mc.load_card(model_dir)
    drift = card["drift"]
    assert drift["method"] == "psi" and drift["samples"] == dr.SAMPLES and drift["circular"] == ["yaw"]
    assert set(drift["edges"]) == set(drift["references"]) == set(drift["thresholds"]) == set(mc.FEATURES)
    assert dr.Reference.from_card(card) is not None
