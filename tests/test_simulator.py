"""com.windfleet.TurbineSimulator: determinism, the anomaly schedule, pacing-free mode,
and the real process publishing over Greengrass IPC under the local nucleus."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from windfleet import payloads, topics
from windfleet.components.simulator import run
from windfleet.components.simulator.service import SimConfig
from windfleet.simulation import KINDS

from tests.detector_fixtures import FakeBus


def collect(thing="gw1", **config) -> tuple[FakeBus, dict]:
    bus = FakeBus(thing, config={"realtime": False, "start_ts": 1_700_000_000.0, **config})
    assert run(bus) == 0
    return bus, {}


def readings_of(bus: FakeBus, tid: str) -> list[dict]:
    """Readings messages of ``tid``, each with its samples as ``"samples"`` whatever its form."""
    return [{**b, "samples": payloads.readings_samples(b)} for t, b in bus.published if t == topics.readings(tid)]


def test_same_configuration_and_thing_repeat_exactly():
    a, _ = collect(turbines=2, duration_s=20, seed=5, anomalies_per_hour=60)
    b, _ = collect(turbines=2, duration_s=20, seed=5, anomalies_per_hour=60)
    data = [(t, m) for t, m in a.published if "/turbines/" in t]
    assert data and data == [(t, m) for t, m in b.published if "/turbines/" in t]
    other, _ = collect("gw2", turbines=2, duration_s=20, seed=5)
    assert readings_of(other, "gw2-t00")[0]["samples"] != readings_of(a, "gw1-t00")[0]["samples"]
    reseeded, _ = collect(turbines=2, duration_s=20, seed=6)
    assert readings_of(reseeded, "gw1-t00")[0]["samples"] != readings_of(a, "gw1-t00")[0]["samples"]


def test_pacing_free_run_publishes_every_sample_once_in_order():
    bus, _ = collect(turbines=3, duration_s=30, rate=20, batch=10)
    for i in range(3):
        msgs = readings_of(bus, topics.turbine_id("gw1", i))
        assert [m["seq"] for m in msgs] == list(range(0, 600, 10))
        for m in msgs:
            assert m["schema_version"] == payloads.BATCH_VERSION and set(m["columns"]) >= set(payloads.SAMPLE_FIELDS)
            payloads.validate_readings(m)
            assert len(m["samples"]) == 10 and m["turbine_id"] == topics.turbine_id("gw1", i)
        ts = np.array([s["ts"] for m in msgs for s in m["samples"]])
        np.testing.assert_allclose(np.diff(ts), 0.05, atol=1e-6)
    health = [b for t, b in bus.published if t == topics.health("gw1")]
    assert health[-1]["counters"]["readings_published"] == 3 * 600
    assert health[-1]["counters"]["messages_published"] == 3 * 60
    assert bus.states[0][0] == "RUNNING"


def test_older_per_sample_form_on_request_carries_the_same_samples():
    old, _ = collect(turbines=1, duration_s=5, seed=2, readings_version=1)
    new, _ = collect(turbines=1, duration_s=5, seed=2)
    raw = [b for t, b in old.published if t == topics.readings("gw1-t00")]
    assert raw and all(m["schema_version"] == 1 and payloads.validate_readings(m) for m in raw)
    assert [m["samples"] for m in readings_of(old, "gw1-t00")] == [m["samples"] for m in readings_of(new, "gw1-t00")]


def test_streams_sit_in_the_sample_turbines_ranges():
    bus, _ = collect(turbines=1, duration_s=300)
    samples = [s for m in readings_of(bus, "gw1-t00") for s in m["samples"]]
    volts = np.array([s["voltage"] for s in samples])
    rps = np.array([s["rps"] for s in samples])
    assert 0 <= volts.min() and volts.max() <= 1023 and 5 < volts.mean() < 150
    assert 0.2 < rps.mean() < 4
    q = np.array([[s[k] for k in ("qw", "qx", "qy", "qz")] for s in samples])
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-9)


def test_explicit_anomalies_are_labelled_at_onset_and_change_the_data():
    schedule = [{"turbine": 1, "kind": "voltage_fault", "start_s": 10, "duration_s": 5, "severity": 1.0},
                {"turbine": "gw1-t00", "kind": "stuck_sensor", "start_s": 3, "duration_s": 2, "channel": "rps"}]
    bus, _ = collect(turbines=2, duration_s=20, anomalies=schedule)
    normal, _ = collect(turbines=2, duration_s=20)
    labels = [(t, b) for t, b in bus.published if t.endswith("/labels")]
    assert [(t, b["kind"], b["start_seq"], b["end_seq"]) for t, b in labels] == [
        (topics.labels("gw1-t00"), "stuck_sensor", 60, 100), (topics.labels("gw1-t01"), "voltage_fault", 200, 300)]
    # the label goes out before the readings that contain its first sample
    order = [t for t, _ in bus.published]
    first_fault = next(i for i, (t, b) in enumerate(bus.published)
                       if t == topics.readings("gw1-t01") and b["seq"] == 200)
    assert order.index(topics.labels("gw1-t01")) < first_fault
    stuck = [s["rps"] for m in readings_of(bus, "gw1-t00") for s in m["samples"]][60:100]
    assert len(set(stuck)) == 1
    faulty = [s["voltage"] for m in readings_of(bus, "gw1-t01") for s in m["samples"]]
    clean = [s["voltage"] for m in readings_of(normal, "gw1-t01") for s in m["samples"]]
    assert faulty[:200] == clean[:200] and faulty[200:300] != clean[200:300]


def test_random_anomalies_follow_the_rate():
    bus, _ = collect(turbines=4, duration_s=1800, anomalies_per_hour=20, batch=50)
    labels = [b for t, b in bus.published if t.endswith("/labels")]
    assert 10 <= len(labels) <= 60  # ~ 4 turbines * 0.5 h * 20/h, spaced by min durations
    assert {b["kind"] for b in labels} <= set(KINDS)
    for b in labels:
        payloads.validate_label(b)


@pytest.mark.parametrize("bad", [
    {"anomalies": [{"turbine": 7, "kind": "overspeed", "start_s": 1, "duration_s": 1}]},
    {"anomalies": [{"turbine": 0, "kind": "gremlins", "start_s": 1, "duration_s": 1}]},
    {"turbines": 0},
    {"rate": "fast"},
])
def test_bad_configuration_is_reported_not_crashed(bad):
    bus = FakeBus(config={"realtime": False, "duration_s": 1, **bad})
    assert run(bus) == 2
    assert bus.states[-1][0] == "ERRORED" and bus.states[-1][1]["reason"]


def test_realtime_mode_stops_on_request():
    bus = FakeBus(config={"turbines": 1, "realtime": True})
    stop = threading.Event()
    t = threading.Thread(target=run, args=(bus, stop))
    t.start()
    from tests.mqtt_fixtures import wait_until
    wait_until(lambda: len(readings_of(bus, "gw1-t00")) >= 3, 20, message="paced readings")
    stop.set()
    t.join(10)
    assert not t.is_alive() and bus.closed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_simulator_process_publishes_over_ipc_under_the_nucleus(tmp_path):
    """`python -m windfleet.components.simulator.main` as a component of the local nucleus,
    with the accessControl of the real recipe: every readings message reaches local pub/sub."""
    import yaml

    from tests.mqtt_fixtures import REPO, wait_until
    from tests.test_runtime_helpers import FAST, RuntimeThread, deployment, make_component, state_of
    from windfleet.nucleus.runtime import DeviceRuntime
    from windfleet.nucleus.sources import DirectorySource

    name = "com.windfleet.TurbineSimulator"
    recipe = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    acl = recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, name, "1.0.0", run=None, config={"accessControl": acl}, lifecycle={"Run": (
        "exec python3 -m windfleet.components.simulator.main --turbines 2 --max-rate --duration 30 --seed 1")})
    rt = DeviceRuntime("gw7", root, DirectorySource(build / "recipes", build / "artifacts", {name: "1.0.0"}),
                       settings=FAST)
    got: list[tuple[str, bytes]] = []
    rt.ipc.local_subscribe("windfleet/#", lambda topic, data: got.append((topic, data)))  # before it starts
    t = RuntimeThread(rt)
    try:
        wait_until(lambda: state_of(root, name) == "FINISHED" and deployment(root).get("status") == "SUCCEEDED",
                   60, message="simulator ran to the end")
        assert rt.components[name].restarts == 0 and "reason" not in rt.components[name].status()
        per = SimConfig().batch  # the default samples per message
        assert sum(t.endswith("/readings") for t, _ in got) == 2 * 600 // per  # 30 s * 20 Hz, 2 turbines
        seqs = sorted(json.loads(p)["seq"] for t, p in got if t == topics.readings("gw7-t01"))
        assert seqs == list(range(0, 600, per))
        assert {t for t, _ in got} <= {topics.readings("gw7-t00"), topics.readings("gw7-t01"),
                                       topics.labels("gw7-t00"), topics.labels("gw7-t01"),
                                       topics.health("gw7"), topics.logs("gw7")}
        health = [json.loads(p) for t, p in got if t == topics.health("gw7")]
        assert health[-1]["component"] == name and health[-1]["counters"]["readings_published"] == 1200
        assert rt.ipc.counters.get("unauthorized", 0) == 0  # the recipe's accessControl covers what it does
    finally:
        t.stop()
