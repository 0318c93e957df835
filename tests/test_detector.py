"""The detector's behaviour in one process: parity with the offline pipeline, bad input,
bounded queue, model swaps and window continuity across a restart.

The bus is an in-memory fake with the Bus interface; tests/test_detector_e2e.py
repeats the cross-process behaviours with real processes under the local nucleus.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from windfleet import model_contract as mc
from windfleet import payloads, topics
from windfleet.components.detector.model import session_options
from windfleet.components.detector.service import MODEL_COMPONENT, model_locator
from windfleet.components.detector.service import run as run_detector
from windfleet.preprocessing import prepare, raw_features, sliding_windows

from tests.detector_fixtures import (THING, FakeBus, build_model_package, drain, edit_card, make_detector, messages,
                                     simulate_stream)


@pytest.fixture(scope="module")
def model_v1(tmp_path_factory) -> Path:
    return build_model_package(tmp_path_factory.mktemp("m") / "v1", "1.0.0", seed=0)


@pytest.fixture(scope="module")
def model_v2(tmp_path_factory) -> Path:
    return build_model_package(tmp_path_factory.mktemp("m") / "v2", "2.0.0", seed=1)


def offline_errors(model_dir: Path, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """The training side's path: sliding windows -> prepare -> onnxruntime -> window_errors."""
    card = mc.load_card(model_dir)
    windows, ends = sliding_windows(raw_features(data))
    x = prepare(windows, card["statistics"])
    session = ort.InferenceSession(str(model_dir / mc.MODEL_FILE), sess_options=session_options())
    return ends, mc.window_errors(x, session.run([mc.OUTPUT_NAME], {mc.INPUT_NAME: x})[0])


def test_streaming_scores_match_the_offline_pipeline(model_v1, tmp_path):
    """Both readings forms at once (an old device and a new one during a rollout)."""
    det, bus = make_detector(model_v1, tmp_path, max_batch=37)  # batches that straddle turbines
    streams = {tid: simulate_stream(tid, 1200) for tid in det.turbines}
    forms = dict(zip(det.turbines, (1, payloads.BATCH_VERSION)))
    for batch in zip(*(messages(tid, streams[tid], batch=7, version=forms[tid])  # 7: not a STRIDE multiple
                       for tid in det.turbines)):
        for tid, raw in zip(det.turbines, batch):
            bus.deliver(topics.readings(tid), raw)
    drain(det)
    for tid in det.turbines:
        ends, expected = offline_errors(model_v1, streams[tid])
        got = sorted((s for s in bus.scores() if s["turbine_id"] == tid), key=lambda s: s["window_end_seq"])
        assert [s["window_end_seq"] for s in got] == ends.tolist()
        errors = np.array([[s["feature_errors"][f] for f in mc.FEATURES] for s in got])
        np.testing.assert_allclose(errors, expected, rtol=1e-5, atol=1e-7)
        for s in got:
            payloads.validate_score(s)
            assert s["model_version"] == "1.0.0"
            assert s["ts"] == pytest.approx(float(streams[tid]["ts"][s["window_end_seq"]]))
    c = det.snapshot()
    assert c["readings_received"] == 2 * 1200 and c["malformed_dropped"] == 0
    assert c["windows_scored"] == 2 * len(sliding_windows(np.zeros((1200, 6)))[1])
    # one score message per turbine per scoring batch, not one per window
    assert c["score_messages"] == len([t for t, _ in bus.published if t.endswith("/scores")]) < c["windows_scored"] / 2
    assert c["readings_scored"] == 2 * 1200  # every reading lies in some scored window (1200 = 100 + k*10)


def bad_payloads(tid: str, good_sample: dict) -> dict[str, list[bytes]]:
    def env(**o):
        return json.dumps({"schema_version": 1, "turbine_id": tid, "seq": 0, "samples": [good_sample], **o}).encode()
    def env2(**columns):  # the columnar form
        cols = {**{k: [v, v] for k, v in good_sample.items()}, **columns}
        return json.dumps({"schema_version": 2, "turbine_id": tid, "seq": 0,
                           "columns": {k: v for k, v in cols.items() if v is not None}}).encode()
    no_voltage = {k: v for k, v in good_sample.items() if k != "voltage"}
    return {
        "not_json": [b"\xff\x00 not json", b"{\"schema_version\": 1,"],
        "length_mismatch": [env2(rps=[1.0])],
        "too_large": [b"{" + b" " * (1024 * 1024) + b"}"],
        "schema_version": [env(schema_version=99), json.dumps({"turbine_id": tid}).encode()],
        "missing_field": [env(samples=[no_voltage]), json.dumps({"schema_version": 1, "turbine_id": tid, "seq": 0}).encode(),
                          env2(voltage=None)],
        "non_finite": [env().replace(b'"voltage":', b'"voltage": NaN, "x":'),
                       json.dumps({"schema_version": 1, "turbine_id": tid, "seq": 0,
                                   "samples": [{**good_sample, "rps": float("inf")}]}).encode(),
                       env2(rps=[123456.5, 1.0]).replace(b"123456.5", b"1e400")],
        "wrong_type": [env(seq="seven"), env(samples=[{**good_sample, "rps": "fast"}]), env(samples="many"),
                       env(seq=-1), env2(rps=[True, 1.0]), env2(rps=[None, 1.0]), env2(rps=[[1.0], 1.0])],
        "not_object": [b"[1, 2, 3]"],
        "turbine_mismatch": [env(turbine_id=f"{THING}-t01")],
    }


@pytest.mark.fault
def test_malformed_readings_are_counted_and_dropped_while_scoring_goes_on(model_v1, tmp_path):
    tid = f"{THING}-t00"
    det, bus = make_detector(model_v1, tmp_path, turbines=[tid])
    data = simulate_stream(tid, 600)
    good = messages(tid, data)
    sample = payloads.readings_samples(json.loads(good[0]))[0]
    bad = bad_payloads(tid, sample)
    flat = [(kind, raw) for kind, raws in bad.items() for raw in raws]
    for i, raw in enumerate(good):  # a bad message between every two good ones
        bus.deliver(topics.readings(tid), raw)
        kind, junk = flat[i % len(flat)]
        bus.deliver(topics.readings(tid), junk)
    drain(det)
    c = det.snapshot()
    assert c["messages_received"] == 2 * len(good)
    assert c["malformed_dropped"] == len(good)
    expected_kinds = {}
    for i in range(len(good)):
        kind = flat[i % len(flat)][0]
        expected_kinds[kind] = expected_kinds.get(kind, 0) + 1
    assert det.malformed == expected_kinds
    # every good reading was still scored, as if the junk had not been there
    ends, _ = offline_errors(model_v1, data)
    assert sorted(s["window_end_seq"] for s in bus.scores()) == ends.tolist()
    assert det.health()["malformed_by_kind"] == expected_kinds


@pytest.mark.fault
def test_unknown_turbines_and_foreign_topics_are_dropped(model_v1, tmp_path):
    det, bus = make_detector(model_v1, tmp_path, turbines=[f"{THING}-t00"])
    raw = messages(f"{THING}-t05", simulate_stream(f"{THING}-t05", 10))[0]
    det.handle(topics.readings(f"{THING}-t05"), raw)
    det.handle("some/other/topic", raw)
    det.handle(topics.readings(f"{THING}-t00"), 12345)  # not bytes at all
    assert det.malformed == {"unknown_turbine": 1, "bad_topic": 1, "wrong_type": 1}


@pytest.mark.fault
def test_queue_is_bounded_and_drops_are_counted(model_v1, tmp_path):
    tid = f"{THING}-t00"
    det, bus = make_detector(model_v1, tmp_path, turbines=[tid], queue_size=5, put_timeout=0.0)
    for raw in messages(tid, simulate_stream(tid, 400)):  # 31 windows, nobody scoring
        bus.deliver(topics.readings(tid), raw)
    c = det.snapshot()
    assert det._queue.qsize() == 5
    assert c["queue_dropped"] == 31 - 5
    drain(det)
    assert det.snapshot()["windows_scored"] == 5


def test_hot_swap_scores_with_the_new_model_between_batches(model_v1, model_v2, tmp_path):
    tid = f"{THING}-t00"
    det, bus = make_detector(model_v1, tmp_path, turbines=[tid])
    data = simulate_stream(tid, 600)
    msgs = messages(tid, data)
    for raw in msgs[:30]:
        bus.deliver(topics.readings(tid), raw)
    drain(det)
    assert det.swap(model_v2) is True
    for raw in msgs[30:]:
        bus.deliver(topics.readings(tid), raw)
    drain(det)
    versions = [(s["window_end_seq"], s["model_version"]) for s in bus.scores()]
    assert {v for e, v in versions if e < 300} == {"1.0.0"} and {v for e, v in versions if e >= 300} == {"2.0.0"}
    assert bus.states[-1][0] == "RUNNING" and bus.states[-1][1]["model_version"] == "2.0.0"
    assert (tmp_path / "work" / "last_good" / "model.json").is_file()
    assert json.loads((tmp_path / "work" / "last_good" / "model.json").read_text())["version"] == "2.0.0"


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["corrupt", "digest", "card"])
def test_a_bad_new_model_is_refused_and_the_old_one_keeps_scoring(model_v1, tmp_path, damage):
    tid = f"{THING}-t00"
    det, bus = make_detector(model_v1, tmp_path, turbines=[tid])
    bad = build_model_package(tmp_path / "bad", "3.0.0", seed=0)
    if damage == "corrupt":
        (bad / mc.MODEL_FILE).write_bytes((bad / mc.MODEL_FILE).read_bytes()[:1000])
    elif damage == "digest":
        edit_card(bad, onnx_sha256="0" * 64)
    else:
        edit_card(bad, features=["roll", "pitch", "yaw", "rps", "wind_speed_rps", "voltage"])
    assert det.swap(bad) is False
    # Refused, not failed: the detector stays RUNNING (ERRORED would make the nucleus restart
    # it) and says why; the model component's Install check is what fails a deployment.
    state, extra = bus.states[-1]
    assert state == "RUNNING" and extra["failed_model_version"] == "3.0.0" and extra["reason"]
    assert extra["model_version"] == "1.0.0"
    assert det.snapshot()["model_load_failures"] == 1
    for raw in messages(tid, simulate_stream(tid, 200)):
        bus.deliver(topics.readings(tid), raw)
    drain(det)
    assert bus.scores() and {s["model_version"] for s in bus.scores()} == {"1.0.0"}
    health = det.health()
    assert health["state"] == "RUNNING" and health["failed_model_version"] == "3.0.0" and health["reason"]
    # a good model afterwards clears the reason
    assert det.swap(model_v1) is True
    state, extra = bus.states[-1]
    assert state == "RUNNING" and "reason" not in extra and "failed_model_version" not in extra
    assert "reason" not in det.health()


def test_configuration_update_naming_a_new_model_dir_swaps(model_v1, model_v2, tmp_path):
    det, bus = make_detector(model_v1, tmp_path)
    det.on_configuration_update({"model_dir": str(model_v2)})
    from tests.mqtt_fixtures import wait_until
    wait_until(lambda: det.model_version == "2.0.0", 30, message="swap to 2.0.0")


def test_shutdown_and_restart_lose_no_window(model_v1, model_v2, tmp_path):
    """Stop mid-stream (windows still queued), restart with another model: the scores
    of both runs together are exactly the offline windows, none missing, none twice."""
    tid = f"{THING}-t00"
    data = simulate_stream(tid, 800)
    msgs = messages(tid, data, batch=10)
    det, bus = make_detector(model_v1, tmp_path, turbines=[tid])
    for raw in msgs[:20]:
        bus.deliver(topics.readings(tid), raw)
    det.score_available(timeout=0)  # some scored...
    for raw in msgs[20:43]:
        bus.deliver(topics.readings(tid), raw)  # ...some still queued at shutdown
    det.shutdown()
    assert bus.closed
    det2, bus2 = make_detector(model_v2, tmp_path, turbines=[tid])
    assert det2.restore_state() == 1
    for raw in msgs[43:]:
        bus2.deliver(topics.readings(tid), raw)
    drain(det2)
    first = [s["window_end_seq"] for s in bus.scores()]
    second = [s["window_end_seq"] for s in bus2.scores()]
    ends, _ = offline_errors(model_v1, data)
    assert sorted(first + second) == ends.tolist()
    assert {s["model_version"] for s in bus2.scores()} == {"2.0.0"}
    assert det.snapshot()["readings_scored"] + det2.snapshot()["readings_scored"] == 800


@pytest.mark.fault
def test_run_with_a_bad_model_dir_falls_back_to_the_last_good_one(model_v1, tmp_path):
    work = tmp_path / "work"
    stop = threading.Event()
    stop.set()  # start, report, stop at once
    assert run_detector(FakeBus(config={"turbines": 1}), model_v1, work, stop) == 0
    bad = build_model_package(tmp_path / "bad", "4.0.0")
    edit_card(bad, onnx_sha256="1" * 64)
    bus = FakeBus(config={"turbines": 1})
    assert run_detector(bus, bad, work, stop) == 0
    state, extra = bus.states[-1]
    assert state == "RUNNING" and extra["failed_model_version"] == "4.0.0" and "sha256" in extra["reason"]
    assert extra["model_version"] == "1.0.0"
    # no last good model and a bad one: nothing to score with -> exit code 1, reported
    bus = FakeBus(config={"turbines": 1})
    assert run_detector(bus, bad, tmp_path / "fresh-work", stop) == 1
    assert bus.states[-1][0] == "ERRORED" and "sha256" in bus.states[-1][1]["reason"]


def _models_root(tmp_path: Path, *packages: Path) -> Path:
    """``{kernel:rootPath}/packages/artifacts/<model component>``: one dir per version."""
    root = tmp_path / "artifacts" / MODEL_COMPONENT
    for package in packages:
        version = json.loads((package / mc.CARD_FILE).read_text())["version"]  # no checks: bad ones too
        shutil.copytree(package, root / version)
    return root


def _model_config(package: Path) -> dict:
    card = json.loads((package / mc.CARD_FILE).read_text())
    return {"OnnxSha256": card["onnx_sha256"], "ModelVersion": card["version"]}


def test_model_locator_follows_the_model_components_configuration(model_v1, model_v2, tmp_path):
    root = _models_root(tmp_path, model_v1, model_v2)
    # the same weights shipped again under another version: the configured version decides
    shutil.copytree(model_v1, root / "1.0.1")
    edit_card(root / "1.0.1", version="1.0.1")
    bus = FakeBus()
    locate = model_locator(bus, root)
    with pytest.raises(LookupError):
        locate()  # the model component is not deployed
    bus.others[MODEL_COMPONENT] = {}
    assert locate() is None  # deployed, no OnnxSha256 yet
    bus.others[MODEL_COMPONENT] = _model_config(model_v2)
    assert locate() == root / "2.0.0"
    bus.others[MODEL_COMPONENT] = _model_config(model_v1)
    assert locate() == root / "1.0.0"
    bus.others[MODEL_COMPONENT] = {**_model_config(model_v1), "ModelVersion": "1.0.1"}
    assert locate() == root / "1.0.1"
    bus.others[MODEL_COMPONENT] = {"OnnxSha256": "f" * 64, "ModelVersion": "9.0.0"}
    assert locate() is None  # not on the device (yet)


@pytest.mark.timeout(60)
def test_run_follows_the_model_component_and_keeps_running_on_a_bad_one(model_v1, model_v2, tmp_path):
    from tests.mqtt_fixtures import wait_until

    bad = build_model_package(tmp_path / "bad", "3.0.0", seed=0)
    edit_card(bad, onnx_sha256="2" * 64)  # the card's digest no longer matches model.onnx
    root = _models_root(tmp_path, model_v1, model_v2, bad)
    bus = FakeBus(config={"turbines": 1}, others={MODEL_COMPONENT: _model_config(model_v1)})
    stop = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: result.append(run_detector(bus, None, tmp_path / "work", stop,
                                                                        models_root=root)), daemon=True)
    thread.start()
    try:
        wait_until(lambda: bus.states and bus.states[-1][1].get("model_version") == "1.0.0", 20, message="v1")
        assert bus.states[-1][0] == "RUNNING"
        assert len(bus.update_handlers) == 1  # component-update events trigger a look at the model
        # A deployment changes the model component's configuration; the post-update event
        # makes the detector look at once (not after MODEL_CHECK_INTERVAL).
        bus.others[MODEL_COMPONENT] = _model_config(model_v2)
        for handler in bus.update_handlers:
            handler("post", "deployment-2")
        wait_until(lambda: bus.states[-1][1].get("model_version") == "2.0.0", 20, message="v2 swapped in")
        assert bus.states[-1][0] == "RUNNING"
        # A model that fails its checks: refused, v2 keeps scoring, still RUNNING, with a reason.
        bus.others[MODEL_COMPONENT] = _model_config(bad)
        for handler in bus.update_handlers:
            handler("post", "deployment-3")
        wait_until(lambda: bus.states[-1][1].get("failed_model_version") == "3.0.0", 20, message="v3 refused")
        state, extra = bus.states[-1]
        assert state == "RUNNING" and extra["model_version"] == "2.0.0" and extra["reason"]
        tid = f"{THING}-t00"
        for raw in messages(tid, simulate_stream(tid, 200)):
            bus.deliver(topics.readings(tid), raw)
        wait_until(lambda: bus.scores(), 20, message="scores")
        assert {s["model_version"] for s in bus.scores()} == {"2.0.0"}
    finally:
        stop.set()
        thread.join(30)
    assert result == [0]
    assert json.loads((tmp_path / "work" / "last_good" / "model.json").read_text())["version"] == "2.0.0"


def test_a_trained_package_scores_like_the_training_side(model_dir, tmp_path):
    """The training helper's real package (tests/conftest.py) through the streaming
    detector gives the window scores training.score gives offline on the same rows."""
    from windfleet.training.score import score_rows

    tid = f"{THING}-t00"
    det, bus = make_detector(model_dir, tmp_path, turbines=[tid])
    data = simulate_stream(tid, 700)
    for raw in messages(tid, data, batch=10):
        bus.deliver(topics.readings(tid), raw)
    drain(det)
    _, offline = score_rows(model_dir, raw_features(data))
    got = {s["window_end_seq"]: s["score"] for s in bus.scores()}
    ends = sliding_windows(raw_features(data))[1]
    assert sorted(got) == ends.tolist()
    np.testing.assert_allclose([got[e] for e in ends], offline[ends], rtol=1e-5)
    assert {s["model_version"] for s in bus.scores()} == {mc.load_card(model_dir)["version"]}
