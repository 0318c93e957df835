"""Drift records (``payloads.drift``) in the cloud: the local store keeps the series per turbine
and feature, each turbine's newest record, and per model version whether a retrain is
suggested; malformed or foreign records are counted and dropped; the Lambda writes them as
structured events (moto's CloudWatch Logs) that the CloudWatch dashboard's drift widgets read."""

from __future__ import annotations

import time

import pytest

from windfleet import payloads
from windfleet.cloud.ingest import TelemetryStore, lambda_handler

from tests.lambda_fixtures import log_events, logs_client  # noqa: F401 - fixture

NOW = time.time()
LIMITS = {"voltage": 0.2, "rps": 0.2, "wind_speed_rps": 0.25}


def drift(turbine: str, ts: float, version: str = "1.0.0", **score: float) -> dict:
    values = {f: score.get(f, 0.02) for f in LIMITS}
    return {"type": "drift", "body": payloads.drift(turbine, version, ts, 2000, values, LIMITS)}


def message(thing: str, seq: int, *records: dict) -> bytes:
    return payloads.encode(payloads.telemetry(thing, seq, NOW + seq, list(records)))


@pytest.fixture
def store(tmp_path):
    with TelemetryStore(tmp_path / "telemetry.sqlite") as s:
        yield s


def test_drift_series_latest_per_turbine_and_retrain_suggested_per_model_version(store):
    store.ingest(message("gw1", 0, drift("gw1-t00", NOW, voltage=0.05), drift("gw1-t01", NOW)))
    store.ingest(message("gw1", 1, drift("gw1-t00", NOW + 10, voltage=0.6), drift("gw1-t01", NOW + 10)))
    store.ingest(message("gw2", 0, drift("gw2-t00", NOW + 5, "2.0.0", rps=0.3, voltage=0.9)))
    series = store.drift_series("gw1-t00")
    assert series["known"] and series["thing"] == "gw1"
    assert series["features"] == ["wind_speed_rps", "rps", "voltage"]  # the model contract's order
    assert series["ts"] == [NOW, NOW + 10] and series["model_version"] == ["1.0.0", "1.0.0"]
    assert series["score"]["voltage"] == [0.05, 0.6] and series["thresholds"]["voltage"] == [0.2, 0.2]
    assert series["drifted"]["voltage"] == [False, True] and series["drifted"]["rps"] == [False, False]
    assert store.drift_series("gw1-t00", since=NOW, limit=5)["ts"] == [NOW + 10]
    assert not store.drift_series("gw9-t00")["known"]

    latest = {d["turbine_id"]: d for d in store.latest_drift()}
    assert latest["gw1-t00"]["drifted"] == ["voltage"] and latest["gw1-t01"]["drifted"] == []
    assert [d["turbine_id"] for d in store.latest_drift("gw2")] == ["gw2-t00"]
    assert store.drift_flagged_turbines() == ["gw1-t00", "gw2-t00"]
    assert store.drift_flagged_turbines("2.0.0") == ["gw2-t00"]
    by_model = store.drift_by_model()
    assert by_model["1.0.0"]["retrain_suggested"] and by_model["1.0.0"]["drifted_turbines"] == ["gw1-t00"]
    assert by_model["1.0.0"]["turbines"] == 2 and by_model["1.0.0"]["features"] == {"voltage": 1}
    assert by_model["2.0.0"]["features"] == {"rps": 1, "voltage": 1}
    assert store.counters()["records:drift"] == 5

    # the turbine moves to a model that learned its inputs: its newest record is clean, the flag clears
    store.ingest(message("gw1", 2, drift("gw1-t00", NOW + 20, "3.0.0", voltage=0.03)))
    # a late record from before does not bring the old state back
    store.ingest(message("gw1", 3, drift("gw1-t00", NOW + 15, voltage=0.7)))
    assert store.drift_flagged_turbines() == ["gw2-t00"]
    assert not store.drift_by_model()["3.0.0"]["retrain_suggested"]
    assert not store.drift_by_model()["1.0.0"]["retrain_suggested"]  # none of its turbines is drifted now
    assert len(store.drift_series("gw1-t00")["ts"]) == 4
    fleet = {t["turbine_id"]: t for g in store.fleet()["gateways"] for t in g["turbines"]}
    assert fleet == {}  # turbines appear in the fleet with their scores; drift alone adds none


def test_the_fleet_shows_what_each_scored_turbine_has_drifted_in(store):
    score = {"type": "score", "body": payloads.score("gw1-t00", NOW, "1.0.0", 99, {f: 0.1 for f in LIMITS}, LIMITS)}
    store.ingest(message("gw1", 0, score, drift("gw1-t00", NOW, voltage=0.9, rps=0.5)))
    (turbine,) = store.fleet()["gateways"][0]["turbines"]
    assert turbine["drifted"] == ["voltage", "rps"]  # as the device listed them


@pytest.mark.parametrize("body, kind", [
    ({"score": {}}, "malformed_record:wrong_type"),
    ({"thresholds": {"voltage": 0.2}}, "malformed_record:wrong_type"),  # not the same features as score
    ({"score": {"voltage": -1.0, "rps": 0.0, "wind_speed_rps": 0.0}}, "malformed_record:out_of_range"),
    ({"drifted": ["torque"]}, "malformed_record:wrong_type"),
    ({"method": "vibes"}, "malformed_record:wrong_type"),
    ({"ts": "yesterday"}, "malformed_record:wrong_type"),
    ({"turbine_id": "gw2-t00"}, "malformed_record:foreign_turbine"),
])
def test_a_malformed_or_foreign_drift_record_is_counted_and_dropped_alone(store, body, kind):
    bad = drift("gw1-t01", NOW, voltage=0.9)
    bad["body"].update(body)
    assert store.ingest(message("gw1", 0, bad, drift("gw1-t00", NOW, voltage=0.9)), source_thing="gw1") == "stored"
    counters = store.counters()
    assert counters[kind] == 1 and counters["records:drift"] == 1
    assert [d["turbine_id"] for d in store.latest_drift()] == ["gw1-t00"]  # its neighbour is kept
    if kind.endswith("foreign_turbine"):
        assert store.spoofing() == {"gw1": {"messages": 0, "records": 1}}


def test_a_resent_drift_record_is_stored_once_and_retention_ages_drift_out(tmp_path):
    clock = [NOW]
    with TelemetryStore(tmp_path / "t.sqlite", max_age_s=100, clock=lambda: clock[0]) as store:
        record = drift("gw1-t00", NOW - 50, voltage=0.9)
        store.ingest(message("gw1", 0, record))
        store.ingest(message("gw1", 1, record))  # the forwarder re-sent it inside another message
        assert store.counters()["duplicate_records"] == 1 and len(store.drift_series("gw1-t00")["ts"]) == 1
        clock[0] = NOW + 100
        assert store.apply_retention()["drift"] == 1
        assert store.drift_series("gw1-t00")["ts"] == [] and store.drift_flagged_turbines() == []


def test_lambda_writes_drift_events_the_dashboard_widgets_read(logs_client):
    from windfleet.cloud.ingest import dashboard_queries

    group = "/wf/drift"
    bad = drift("gw1-t01", NOW, voltage=0.9)
    bad["body"]["score"] = {"voltage": 0.9}  # thresholds name more features than the scores
    msg = payloads.telemetry("gw1", 3, NOW, [drift("gw1-t00", NOW + 0.5, voltage=0.6), bad,
                                             drift("gw2-t00", NOW)])
    result = lambda_handler({**msg, "source_thing": "gw1"}, None, logs_client=logs_client, log_group=group)
    assert result == {"written": 4, "acked": True}
    events = {e["record_type"]: e for e in log_events(logs_client, group)}
    d = events["drift"]
    assert (d["turbine_id"], d["model_version"], d["method"], d["samples"]) == ("gw1-t00", "1.0.0", "psi", 2000)
    assert d["n_drifted"] == 1 and d["drifted"] == "voltage"
    assert d["drift_voltage"] == 0.6 and d["drift_threshold_voltage"] == 0.2 and d["drift_roll"] is None
    assert events["malformed"]["kind"] == "wrong_type"
    assert events["spoofed"]["claimed"] == "gw2-t00"
    titles = [title for title, _, query in dashboard_queries(group) if "'drift'" in query]
    assert len(titles) == 3 and any("retrain suggested" in t for t in titles)
