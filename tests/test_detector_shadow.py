"""Shadow scoring of a canary's candidate model (components/detector/shadow.py): both models
score the same windows, only the current model's scores are published, and the comparison
goes out in health as ``payloads.shadow_stats``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from windfleet import model_contract as mc
from windfleet import payloads, topics
from windfleet.cloud import canary, settings
from windfleet.components.detector.model import window_geometry
from windfleet.components.detector.service import CANDIDATE_COMPONENT, model_locator

from tests.detector_fixtures import THING, drain, make_detector, messages, simulate_stream
from tests.detector_fixtures import build_model_package

T0 = f"{THING}-t00"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_package(tmp_path_factory.mktemp("m") / "v1", "1.0.0", seed=0)


@pytest.fixture(scope="module")
def model_dir_factory(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mv")
    return lambda version: build_model_package(root / version, version, seed=0)


def scaled(src: Path, dst: Path, version: str, factor: float) -> Path:
    """``src`` with its thresholds multiplied by ``factor``: loads and self-tests like the original."""
    shutil.copytree(src, dst)
    card = json.loads((dst / mc.CARD_FILE).read_text())
    card["version"] = version
    card["thresholds"] = {f: v * factor for f, v in card["thresholds"].items()} \
        if isinstance(card["thresholds"], dict) else [v * factor for v in card["thresholds"]]
    (dst / mc.CARD_FILE).write_text(json.dumps(card))
    return dst


def feed(det, bus, n: int = 1500, labels: bool = False) -> None:
    data = simulate_stream(T0, n)
    if labels:
        bus.deliver(topics.labels(T0), payloads.encode(payloads.label(T0, "spike", 300, 500, 1.0)))
    for m in messages(T0, data, batch=100):
        det.handle(topics.readings(T0), m)
    drain(det)


def test_candidate_scores_in_shadow_and_only_current_publishes(model_dir, tmp_path):
    bad = scaled(model_dir, tmp_path / "bad", "9.9.9", 1e-3)  # alarms on everything
    det, bus = make_detector(model_dir, tmp_path, turbines=(T0,))
    assert det.shadow_candidate(bad).active
    feed(det, bus, labels=True)
    scores = bus.scores()
    assert scores and {s["model_version"] for s in scores} == {"1.0.0"}
    shadow = det.health()["shadow"]
    payloads.validate_shadow(shadow)
    assert shadow["candidate_version"] == "9.9.9" and shadow["current_version"] == "1.0.0"
    assert shadow["windows"] == len(scores)
    assert shadow["candidate"]["alarm_rate"] == 1.0 > shadow["current"]["alarm_rate"]
    # it flags every window: agreement is the share of windows the current model flags
    assert shadow["agreement"] == pytest.approx(shadow["current"]["alarm_rate"]) and shadow["errors"] == 0
    assert shadow["labelled_episodes"] == 1 and shadow["candidate_detected"] == 1
    # windows overlapping no labelled episode: every one is a false alarm of the candidate
    assert 0 < shadow["clean_windows"] < shadow["windows"]
    assert shadow["candidate"]["false_alarms"] == shadow["clean_windows"] > shadow["current"]["false_alarms"]
    assert shadow["candidate"]["score_p50"] > 100 * shadow["current"]["score_p50"]
    assert shadow["candidate"]["infer_ms_p99"] > 0 and shadow["current"]["infer_ms_p99"] > 0
    # the cloud's gates read it as a failed canary, with the measured reason
    config = {**settings.CANARY_DEFAULTS, "min_seconds": 0, "min_windows": 10}
    verdict = canary.evaluate({THING: shadow}, [THING], config, elapsed_s=1.0)
    assert verdict["verdict"] == "abort" and "alarm rate" in verdict["reason"]
    # withdrawn: no more shadow in health
    det.shadow_candidate(None)
    assert "shadow" not in det.health()


def test_episodes_labelled_before_the_candidate_arrived_count_from_its_first_batch(model_dir, tmp_path):
    """A turbine known to publish labels has clean windows (outside every labelled episode) from the
    shadow's first batch: the false-alarm gate does not wait for each turbine's next label."""
    det, bus = make_detector(model_dir, tmp_path, turbines=(T0,))
    bus.deliver(topics.labels(T0), payloads.encode(payloads.label(T0, "spike", 300, 500, 1.0)))
    assert det.shadow_candidate(model_dir).active  # after the label
    feed(det, bus)
    shadow = det.health()["shadow"]
    assert shadow["labelled_episodes"] == 1 and 0 < shadow["clean_windows"] < shadow["windows"]
    # the same model: the same false alarms
    assert shadow["candidate"]["false_alarms"] == shadow["current"]["false_alarms"]


def test_a_label_handled_after_its_readings_still_keeps_the_fault_out_of_the_clean_windows(model_dir, tmp_path):
    """On a busy device the label (published just before its readings) can be handled after them:
    windows are judged clean only once the stream is SETTLE_SAMPLES past them, so the count is
    the same as when the label came first."""
    from windfleet.components.detector.shadow import SETTLE_SAMPLES

    def clean_after(label_at: int) -> dict:
        det, bus = make_detector(model_dir, tmp_path / str(label_at), turbines=(T0,))
        assert det.shadow_candidate(model_dir).active
        bus.deliver(topics.labels(T0), payloads.encode(payloads.label(T0, "spike", 1000, 1100, 1.0)))  # labels flow
        for i, m in enumerate(messages(T0, simulate_stream(T0, 1500), batch=100)):
            if i == label_at:
                bus.deliver(topics.labels(T0), payloads.encode(payloads.label(T0, "spike", 300, 500, 1.0)))
            det.handle(topics.readings(T0), m)
            drain(det)
        return det.health()["shadow"]

    first, late = clean_after(3), clean_after(5)  # the label before / after samples 300..499 were scored
    assert SETTLE_SAMPLES >= 100 and first["clean_windows"] == late["clean_windows"] > 0


def test_the_recovery_after_an_episode_is_not_counted_as_clean(model_dir, tmp_path):
    """A turbine is not normal the moment its fault ends (an overspeeding rotor slows down, a
    yawed nacelle slews back): windows starting less than LABEL_RECOVERY_SAMPLES after a labelled
    episode are neither false alarms nor clean, so a model alarming on a recovering turbine is
    not charged for it by the canary's false-alarm gate (seen: a good model's "false-alarm rate"
    0.65 on a demo fleet with an episode every 20 s)."""
    from windfleet.components.detector.shadow import SETTLE_SAMPLES

    det, bus = make_detector(model_dir, tmp_path, turbines=(T0,))
    assert det.shadow_candidate(model_dir).active
    feed(det, bus, n=2000, labels=True)  # episode: samples 300..499
    ends = [s["window_end_seq"] for s in bus.scores()]
    window = window_geometry(mc.load_card(model_dir))[0]
    recovered = 500 + payloads.LABEL_RECOVERY_SAMPLES
    expected = sum(1 for e in ends if e <= max(ends) - SETTLE_SAMPLES and (e < 300 or e - window + 1 >= recovered))
    shadow = det.health()["shadow"]
    assert shadow["labelled_episodes"] == 1
    assert shadow["clean_windows"] == expected > 0
    # without the recovery allowance the windows just after the episode would count too
    assert expected < sum(1 for e in ends if e <= max(ends) - SETTLE_SAMPLES and (e < 300 or e - window + 1 >= 500))


def test_same_model_in_shadow_agrees(model_dir, model_dir_factory, tmp_path):
    det, bus = make_detector(model_dir, tmp_path, turbines=(T0,))
    det.shadow_candidate(model_dir_factory("1.0.1"))
    feed(det, bus)
    shadow = det.health()["shadow"]
    assert shadow["current"]["alarms"] == shadow["candidate"]["alarms"] and shadow["agreement"] == 1.0
    config = {**settings.CANARY_DEFAULTS, "min_seconds": 0, "min_windows": 10}
    assert canary.evaluate({THING: shadow}, [THING], config, elapsed_s=1.0)["verdict"] == "promote"


def test_rejected_candidate_is_reported_and_scoring_goes_on(model_dir, tmp_path):
    broken = scaled(model_dir, tmp_path / "broken", "6.6.6", 1.0)
    (broken / mc.MODEL_FILE).write_bytes(b"not onnx" * 100)  # sha256 no longer matches the card
    det, bus = make_detector(model_dir, tmp_path, turbines=(T0,))
    assert not det.shadow_candidate(broken).active
    feed(det, bus, n=500)
    assert bus.scores()
    shadow = det.health()["shadow"]
    assert shadow["errors"] == 1 and "rejected" in shadow["error"] and shadow["candidate_version"] == "6.6.6"
    # the cloud aborts at once, with the device's reason
    verdict = canary.evaluate({THING: shadow}, [THING], settings.CANARY_DEFAULTS, elapsed_s=1.0)
    assert verdict["verdict"] == "abort" and "candidate rejected: verification failed" in verdict["reason"]


def test_candidate_located_from_its_component_configuration(model_dir, tmp_path):
    root = tmp_path / "artifacts"
    bad = scaled(model_dir, root / CANDIDATE_COMPONENT / "1.0.5", "1.0.5", 0.5)
    det, bus = make_detector(model_dir, tmp_path, turbines=(T0,))
    det.follow_candidate(model_locator(bus, root / CANDIDATE_COMPONENT, CANDIDATE_COMPONENT))
    det._check_model()
    assert det.shadow is None  # not deployed
    card = mc.load_card(bad)
    bus.others[CANDIDATE_COMPONENT] = {"OnnxSha256": card["onnx_sha256"], "ModelVersion": "1.0.5"}
    det.check_model_soon()
    det._check_model()
    assert det.shadow is not None and det.shadow.candidate_version == "1.0.5"
    del bus.others[CANDIDATE_COMPONENT]  # promoted or aborted: the candidate is withdrawn
    det.check_model_soon()
    det._check_model()
    assert det.shadow is None
    assert CANDIDATE_COMPONENT == settings.CANARY_COMPONENT
