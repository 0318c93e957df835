"""The detector as a real process on real Mosquitto: bad input, a model swap by restart
without losing a window, and a bad new model that must not replace the good one.

The test publishes readings itself (as the simulator would, with the gateway's
credentials) so it knows every seq, and watches scores and health with the cloud
account.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from windfleet import model_contract as mc
from windfleet import payloads, topics
from windfleet.preprocessing import raw_features, sliding_windows

from tests.mqtt_fixtures import Process, Subscriber, broker, device_env, processes, wait_until  # noqa: F401
from tests.test_detector import messages, simulate_stream
from tests.test_detector_model import build_model_package, edit_card

pytestmark = pytest.mark.slow

THING = "gwe"
TIDS = [topics.turbine_id(THING, i) for i in range(2)]
N = 1000  # samples per turbine: 91 windows each


class Publisher:
    """The gateway's own account publishing readings at QoS1 (as the simulator does)."""

    def __init__(self, broker):
        user, password = broker.credentials(THING)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(user, password)
        self.client.max_inflight_messages_set(1000)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, tid: str, raw: bytes) -> None:
        self.client.publish(topics.readings(tid), raw, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def bench(broker, processes, tmp_path):
    broker.add_device(THING, TIDS)
    user, password = broker.cloud_credentials()
    watcher = Subscriber(broker.host, broker.port, user, password, "windfleet/#")
    pub = Publisher(broker)
    models = tmp_path / "models"
    env = device_env(broker, THING)

    def start(model_dir: Path, name: str) -> Process:
        proc = Process(["-m", "windfleet.components.detector.main", "--model-dir", str(model_dir),
                        "--work-dir", str(tmp_path / "work"), "--turbines", str(len(TIDS)),
                        "--health-interval", "0.5"], env, tmp_path / f"{name}.log")
        processes.append(proc)
        return proc

    def health() -> list[dict]:
        return [json.loads(p) for t, p in watcher.snapshot()
                if t == topics.health(THING) and json.loads(p)["component"] == "com.windfleet.AnomalyDetector"]

    def scores() -> list[dict]:
        return [payloads.validate_score(json.loads(p)) for t, p in watcher.snapshot() if t.endswith("/scores")]

    def wait_state(state: str, after: int = 0, **fields) -> dict:
        def match():
            for h in health()[after:]:
                if h["state"] == state and all(h.get(k) == v for k, v in fields.items()):
                    return h
            return None
        return wait_until(match, 60, message=f"health {state} {fields}")

    ns = type("Bench", (), {})()
    ns.start, ns.health, ns.scores, ns.wait_state, ns.pub, ns.models, ns.tmp = (
        start, health, scores, wait_state, pub, models, tmp_path)
    yield ns
    pub.close()
    watcher.close()


def expected_ends() -> list[int]:
    data = simulate_stream(TIDS[0], N)
    return sliding_windows(raw_features(data))[1].tolist()


@pytest.mark.fault
def test_malformed_readings_over_mosquitto_are_counted_while_scoring_goes_on(bench):
    v1 = build_model_package(bench.models / "v1", "1.0.0")
    bench.start(v1, "det")
    bench.wait_state("RUNNING", model_version="1.0.0")
    tid = TIDS[0]
    good = messages(tid, simulate_stream(tid, N))
    sample = json.loads(good[0])["samples"][0]
    junk = [
        b"\x00\xffnot json",
        b"{" + b" " * (1024 * 1024) + b"}",  # 1 MB
        json.dumps({"schema_version": 99, "turbine_id": tid, "seq": 0, "samples": [sample]}).encode(),
        json.dumps({"schema_version": 1, "turbine_id": tid, "seq": 0}).encode(),
        json.dumps({"schema_version": 1, "turbine_id": tid, "seq": 0, "samples": [{**sample, "rps": "x"}]}).encode(),
        json.dumps({"schema_version": 1, "turbine_id": tid, "seq": 0, "samples": [sample]}).encode().replace(
            b'"voltage": ', b'"voltage": NaN, "v": '),
    ]
    for i, raw in enumerate(good):
        bench.pub.send(tid, raw)
        if i % 10 == 0:
            bench.pub.send(tid, junk[(i // 10) % len(junk)])
    wait_until(lambda: len([s for s in bench.scores() if s["turbine_id"] == tid]) >= len(expected_ends()), 60,
               message="every window scored")
    assert sorted(s["window_end_seq"] for s in bench.scores()) == expected_ends()
    h = wait_until(lambda: next((h for h in reversed(bench.health())
                                 if h["counters"].get("malformed_dropped") == 10), None), 30,
                   message="health with the drop count")
    assert h["malformed_by_kind"] == {"not_json": 2, "too_large": 2, "schema_version": 2, "missing_field": 2,
                                      "wrong_type": 1, "non_finite": 1}
    assert h["counters"]["readings_received"] == N and h["state"] == "RUNNING"


def test_restart_with_a_new_model_loses_no_reading(bench):
    """SIGTERM mid-stream, readings keep coming while the detector is down, restart with
    v2: the scores of both runs cover every window of every turbine exactly once."""
    v1 = build_model_package(bench.models / "v1", "1.0.0")
    v2 = build_model_package(bench.models / "v2", "2.0.0", seed=1)
    first = bench.start(v1, "det1")
    bench.wait_state("RUNNING", model_version="1.0.0")
    streams = {tid: messages(tid, simulate_stream(tid, N)) for tid in TIDS}
    n_msgs = len(streams[TIDS[0]])
    for k in range(n_msgs // 2):
        for tid in TIDS:
            bench.pub.send(tid, streams[tid][k])
    assert first.terminate() == 0  # windows still in flight are saved to the work dir
    saved = json.loads((bench.tmp / "work" / "detector_state.json").read_text())
    assert set(saved["windowers"]) == set(TIDS)
    for k in range(n_msgs // 2, 3 * n_msgs // 4):  # the detector is down: the broker keeps them
        for tid in TIDS:
            bench.pub.send(tid, streams[tid][k])
    mark = len(bench.health())
    bench.start(v2, "det2")
    bench.wait_state("RUNNING", after=mark, model_version="2.0.0")
    for k in range(3 * n_msgs // 4, n_msgs):
        for tid in TIDS:
            bench.pub.send(tid, streams[tid][k])
    ends = expected_ends()
    wait_until(lambda: len(bench.scores()) >= len(TIDS) * len(ends), 60, message="all windows scored")
    for tid in TIDS:
        got = sorted(s["window_end_seq"] for s in bench.scores() if s["turbine_id"] == tid)
        assert got == ends, f"{tid}: windows missing or repeated"
    versions = {s["model_version"] for s in bench.scores()}
    assert versions == {"1.0.0", "2.0.0"}
    h = wait_until(lambda: next((h for h in reversed(bench.health()[mark:])
                                 if h["counters"].get("readings_received") == len(TIDS) * N // 2), None), 30,
                   message="second run counted the second half")
    assert h["counters"]["queue_dropped"] == 0


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["corrupt_artifact", "digest_mismatch"])
def test_a_bad_new_model_keeps_the_old_one_scoring(bench, damage):
    v1 = build_model_package(bench.models / "v1", "1.0.0")
    bad = build_model_package(bench.models / "bad", "2.0.0", seed=1)
    if damage == "corrupt_artifact":
        raw = bytearray((bad / mc.MODEL_FILE).read_bytes())
        raw[100:200] = b"\x00" * 100
        (bad / mc.MODEL_FILE).write_bytes(bytes(raw))
    else:
        edit_card(bad, onnx_sha256="ab" * 32)
    first = bench.start(v1, "det1")
    bench.wait_state("RUNNING", model_version="1.0.0")
    assert first.terminate() == 0
    mark = len(bench.health())
    second = bench.start(bad, "det2")
    h = bench.wait_state("ERRORED", after=mark, failed_model_version="2.0.0")
    assert "sha256" in h["reason"] and h["model_version"] == "1.0.0"
    tid = TIDS[1]
    for raw in messages(tid, simulate_stream(tid, 300)):
        bench.pub.send(tid, raw)
    wait_until(lambda: len(bench.scores()) >= 21, 60, message="scores from the last good model")
    assert {s["model_version"] for s in bench.scores()} == {"1.0.0"}
    assert second.proc.poll() is None  # still running, still scoring
    logs = [line for line in second.log_lines() if line.get("msg", "").startswith("model rejected")]
    assert logs and logs[0]["failed_model_version"] == "2.0.0"
