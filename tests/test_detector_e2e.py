"""The detector as a real component under a real local nucleus: bad input, a model swap
without a restart that loses no reading, and a bad new model that must not replace the
good one.

The project's own build of com.windfleet.AnomalyDetector and com.windfleet.AnomalyModel
is deployed on a :class:`~tests.ipc_fixtures.Nucleus` (a DeviceRuntime on a thread) with
``greengrass-cli deployment create`` semantics.  The test stands in for the simulator --
a principal with the simulator recipe's own ``accessControl`` publishing readings over
Greengrass IPC -- so it knows every seq, and watches scores and health over IPC too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from windfleet import model_contract as mc
from windfleet import payloads, topics
from windfleet.build import build
from windfleet.preprocessing import raw_features, sliding_windows

from tests.ipc_fixtures import Nucleus, recipe_access_control
from tests.mqtt_fixtures import wait_until
from tests.detector_fixtures import messages, simulate_stream
from tests.detector_fixtures import build_model_package, edit_card

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

THING = "gwe"
TIDS = [topics.turbine_id(THING, i) for i in range(2)]
N = 1000  # samples per turbine: 91 windows each
DET, MODEL, SIM = "com.windfleet.AnomalyDetector", "com.windfleet.AnomalyModel", "com.windfleet.TurbineSimulator"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """``windfleet build`` layouts: the detector with model 1.0.0, and model 2.0.0 alone."""
    root = tmp_path_factory.mktemp("builds")
    v1 = build(root / "v1", build_model_package(root / "model-v1", "1.0.0"), components=[DET, MODEL])
    v2 = build(root / "v2", build_model_package(root / "model-v2", "2.0.0", seed=1), components=[MODEL])
    assert v1 == {DET: "1.0.0", MODEL: "1.0.0"} and v2 == {MODEL: "2.0.0"}
    return {"v1": root / "v1", "v2": root / "v2", "root": root}


@pytest.fixture
def bench(tmp_path, builds):
    """The detector and model 1.0.0 deployed and RUNNING; the simulator's stand-in; a watcher
    of scores and health."""
    nucleus = Nucleus(THING, tmp_path / "device")
    try:
        nucleus.deploy(builds["v1"], {DET: "1.0.0", MODEL: "1.0.0"},
                       {DET: {"MERGE": {"turbines": len(TIDS), "health_interval_s": 0.5}}})
        ns = type("Bench", (), {})()
        ns.nucleus, ns.builds, ns.tmp = nucleus, builds, tmp_path
        ns.sim = nucleus.publisher(SIM, recipe_access_control(SIM))
        ns.watcher = nucleus.watcher(topics.health(THING), *(topics.scores(t) for t in TIDS))

        def health() -> list[dict]:
            return [h for h in ns.watcher.json(topics.health(THING)) if h["component"] == DET]

        def scores() -> list[dict]:  # the per-window records of the score batches
            return [payloads.validate_score(r) for t, p, _ in ns.watcher.snapshot() if t.endswith("/scores")
                    for r in payloads.score_records(payloads.validate_score_batch(json.loads(p)))]

        def wait_state(state: str, after: int = 0, **fields) -> dict:
            def match():
                for h in health()[after:]:
                    if h["state"] == state and all(h.get(k) == v for k, v in fields.items()):
                        return h
                return None
            return wait_until(match, 60, message=f"health {state} {fields}")

        def send(tid: str, raw: bytes) -> None:
            ns.sim.publish(topics.readings(tid), raw)

        ns.health, ns.scores, ns.wait_state, ns.send = health, scores, wait_state, send
        # Its first health comes after it subscribed: from here no reading is published to nobody.
        wait_state("RUNNING", model_version="1.0.0")
        ns.pid = nucleus.component(DET)["pid"]
        yield ns
    finally:
        nucleus.stop()


def expected_ends(n: int = N) -> list[int]:
    data = simulate_stream(TIDS[0], n)
    return sliding_windows(raw_features(data))[1].tolist()


def assert_not_restarted(bench) -> None:
    det = bench.nucleus.component(DET)
    assert det["pid"] == bench.pid and det["restarts"] == 0 and det["state"] == "RUNNING", det


@pytest.mark.fault
def test_malformed_readings_over_ipc_are_counted_while_scoring_goes_on(bench):
    tid = TIDS[0]
    good = messages(tid, simulate_stream(tid, N))
    sample = payloads.readings_samples(json.loads(good[0]))[0]
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
        bench.send(tid, raw)
        if i % 10 == 0:
            bench.send(tid, junk[(i // 10) % len(junk)])
    wait_until(lambda: len([s for s in bench.scores() if s["turbine_id"] == tid]) >= len(expected_ends()), 60,
               message="every window scored")
    assert sorted(s["window_end_seq"] for s in bench.scores()) == expected_ends()
    h = wait_until(lambda: next((h for h in reversed(bench.health())
                                 if h["counters"].get("malformed_dropped") == 10
                                 and h["counters"].get("readings_received") == N), None), 30,
                   message="health with the drop count")
    assert h["malformed_by_kind"] == {"not_json": 2, "too_large": 2, "schema_version": 2, "missing_field": 2,
                                      "wrong_type": 1, "non_finite": 1}
    assert h["state"] == "RUNNING"
    assert_not_restarted(bench)


N_SWAP = 2000  # samples per turbine: enough stream to span the model component's deployment


def test_a_model_swap_without_restart_loses_no_reading(bench):
    """The premise changed: the detector no longer restarts for a new model.  Local pub/sub
    keeps no queue (developer guide, "Publish/subscribe local messages"), so a restart would
    lose every reading published meanwhile; instead the detector reads the model component's
    configuration (developer guide, "Interact with component configuration": GetConfiguration
    of another component) and swaps in process.  A deployment of model 2.0.0 while readings
    flow: the same detector process scores every window of every turbine exactly once, first
    with 1.0.0, then with 2.0.0."""
    streams = {tid: messages(tid, simulate_stream(tid, N_SWAP)) for tid in TIDS}
    n_msgs = len(streams[TIDS[0]])

    def send(k: int) -> None:
        for tid in TIDS:
            bench.send(tid, streams[tid][k])

    def swapped() -> bool:
        return any(h.get("model_version") == "2.0.0" for h in bench.health())

    k = 0
    for k in range(n_msgs // 5):
        send(k)
    deployment = bench.nucleus.deploy(bench.builds["v2"], {MODEL: "2.0.0"}, {MODEL: {"RESET": [""]}}, wait=False)
    k += 1
    while k < n_msgs and not swapped():  # readings keep flowing while it installs and swaps
        send(k)
        k += 1
        time.sleep(0.1)
    assert swapped(), "the detector did not swap to 2.0.0 while the stream lasted"
    assert k < n_msgs - 10, "readings flowed on after the swap"
    swapped_at = k
    for k in range(k, n_msgs):
        send(k)
    assert bench.nucleus.wait_deployment(deployment) == "SUCCEEDED"
    ends = expected_ends(N_SWAP)
    wait_until(lambda: len(bench.scores()) >= len(TIDS) * len(ends), 60, message="all windows scored")
    for tid in TIDS:
        got = [s for s in bench.scores() if s["turbine_id"] == tid]
        assert sorted(s["window_end_seq"] for s in got) == ends, f"{tid}: windows missing or repeated"
        by_end = [s["model_version"] for s in sorted(got, key=lambda s: s["window_end_seq"])]
        first_v2 = by_end.index("2.0.0")
        assert 0 < first_v2 and set(by_end[:first_v2]) == {"1.0.0"} and set(by_end[first_v2:]) == {"2.0.0"}, \
            f"{tid}: 1.0.0 until the swap, 2.0.0 after"
    h = wait_until(lambda: next((h for h in reversed(bench.health())
                                 if h["counters"].get("readings_received") == len(TIDS) * N_SWAP), None), 30,
                   message="every reading counted")
    assert h["counters"]["model_swaps"] == 1 and h["counters"]["queue_dropped"] == 0
    assert h["counters"]["malformed_dropped"] == 0 and h["model_version"] == "2.0.0"
    assert_not_restarted(bench)
    assert bench.nucleus.component(MODEL)["version"] == "2.0.0"
    assert any(e.get("msg") == "model swapped" and e.get("model_version") == "2.0.0"
               for e in bench.nucleus.log(DET))
    print(f"model swap without restart: swapped after {swapped_at} of {n_msgs} messages per turbine, "
          f"{len(TIDS) * len(ends)} windows scored once each, 0 readings lost")


def _bad_model_build(builds: dict, damage: str) -> Path:
    """Model component 2.0.0 built from a good package, then damaged in the build output
    (``windfleet build`` refuses a package whose card does not match its ONNX file)."""
    out = builds["root"] / f"bad-{damage}"
    if not out.exists():
        build(out, build_model_package(builds["root"] / f"model-bad-{damage}", "2.0.0", seed=1), components=[MODEL])
        art = out / "artifacts" / MODEL / "2.0.0"
        if damage == "corrupt_artifact":
            raw = bytearray((art / mc.MODEL_FILE).read_bytes())
            raw[100:200] = b"\x00" * 100
            (art / mc.MODEL_FILE).write_bytes(bytes(raw))
        else:  # the card (and so the component's OnnxSha256) names other weights than it ships
            edit_card(art, onnx_sha256="ab" * 32)
            recipe_path = out / "recipes" / f"{MODEL}-2.0.0.yaml"
            recipe = yaml.safe_load(recipe_path.read_text())
            recipe["ComponentConfiguration"]["DefaultConfiguration"]["OnnxSha256"] = "ab" * 32
            recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["corrupt_artifact", "digest_mismatch"])
def test_a_bad_new_model_keeps_the_old_one_scoring(bench, damage):
    """The premise changed: a rejected model no longer makes the detector ERRORED (the nucleus
    would restart it, and after three errors mark it BROKEN -- developer guide, "Interact with
    component lifecycle").  The detector stays RUNNING with the last good model and reports
    the rejection in its health; the model component's own Install check fails, so the
    component goes BROKEN and the deployment FAILED."""
    mark = len(bench.health())
    deployment = bench.nucleus.deploy(_bad_model_build(bench.builds, damage), {MODEL: "2.0.0"},
                                      {MODEL: {"RESET": [""]}}, failure_handling="DO_NOTHING", wait=False)
    h = bench.wait_state("RUNNING", after=mark, failed_model_version="2.0.0")
    assert "sha256" in h["reason"] and h["model_version"] == "1.0.0"
    assert bench.nucleus.wait_deployment(deployment, 90) == "FAILED"
    assert f"{MODEL} is BROKEN" in (bench.nucleus.deployment_reason(deployment) or "")
    assert bench.nucleus.component(MODEL)["state"] == "BROKEN"
    tid = TIDS[1]
    for raw in messages(tid, simulate_stream(tid, 300)):
        bench.send(tid, raw)
    wait_until(lambda: len(bench.scores()) >= 21, 60, message="scores from the last good model")
    assert {s["model_version"] for s in bench.scores()} == {"1.0.0"}
    assert_not_restarted(bench)  # still running, still scoring
    logs = [e for e in bench.nucleus.log(DET) if e.get("msg", "").startswith("model rejected")]
    assert logs and logs[0]["failed_model_version"] == "2.0.0"
    later = [h for h in bench.health()[mark:] if h["counters"]["model_load_failures"]]
    assert later and all(h["state"] == "RUNNING" for h in bench.health()[mark:])
