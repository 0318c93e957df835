"""Telemetry ingest: the SQLite store (dedupe, gaps, retention, malformed input),
the MQTT service against a real Mosquitto, the AWS Lambda against moto's
CloudWatch Logs and IoT data plane (its acks; botocore's Stubber for failures),
and the CloudWatch dashboard body."""

from __future__ import annotations

import json
import re
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from windfleet import payloads, topics
from windfleet.cloud import ingest
from windfleet.cloud.ingest import IngestService, TelemetryStore, dashboard_body, lambda_handler
from windfleet.model_contract import FEATURES

from tests.lambda_fixtures import log_events, logs_client, published_acks  # noqa: F401 - fixture
from tests.mqtt_fixtures import wait_until

THR = {f: 1.0 for f in FEATURES}
NOW = time.time()


def score(turbine: str, ts: float, anomaly_features=(), version="1.0.0", seq=0) -> dict:
    errors = {f: (2.5 if f in anomaly_features else 0.4) for f in FEATURES}
    return {"type": "score", "body": payloads.score(turbine, ts, version, seq, errors, THR)}


def health(thing: str, ts: float, state="RUNNING", **extra) -> dict:
    return {"type": "health", "body": payloads.health(
        thing, "com.windfleet.AnomalyDetector", "1.0.0", state, ts, {"scored": 1}, **extra)}


def message(thing: str, seq: int, records=(), ts: float | None = None) -> bytes:
    return payloads.encode(payloads.telemetry(thing, seq, NOW + seq if ts is None else ts, list(records)))


@pytest.fixture
def store(tmp_path):
    with TelemetryStore(tmp_path / "telemetry.sqlite") as s:
        yield s


# ---------------------------------------------------------------- store
def test_duplicates_are_dropped_and_counted(store):
    raw = message("gw1", 0, [score("gw1-t00", NOW)])
    assert store.ingest(raw) == "stored"
    assert store.ingest(raw) == "duplicate"
    assert len(store.turbine_scores("gw1-t00")["ts"]) == 1
    assert store.loss()["gw1"] == {"received": 1, "expected": 1, "lost": 0, "duplicates": 1, "stale": 0,
                                   "first_seq": 0, "max_seq": 0}


def test_gaps_are_counted_per_device_and_late_arrivals_fill_them(store):
    for seq in (0, 1, 4, 5, 9):
        store.ingest(message("gw1", seq))
    for seq in (0, 1, 2):
        store.ingest(message("gw2", seq))
    assert store.gaps("gw1") == [(2, 3), (6, 8)]
    assert store.loss()["gw1"]["lost"] == 5
    assert store.loss()["gw2"]["lost"] == 0  # one device's loss is not another's

    assert store.ingest(message("gw1", 7)) == "stored"  # late, out of order
    assert store.gaps("gw1") == [(2, 3), (6, 6), (8, 8)]
    assert store.loss()["gw1"]["lost"] == 4
    for seq in (2, 3, 6, 8):
        store.ingest(message("gw1", seq))
    assert store.gaps("gw1") == [] and store.loss()["gw1"]["lost"] == 0


def test_an_earlier_sequence_than_the_first_seen_widens_the_window(store):
    store.ingest(message("gw1", 10))
    store.ingest(message("gw1", 7))  # the device's spool flushed after we first heard from it
    loss = store.loss()["gw1"]
    assert (loss["first_seq"], loss["max_seq"], loss["lost"]) == (7, 10, 2)


@pytest.mark.fault
@pytest.mark.parametrize("raw, kind", [
    (b"not json", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"schema_version": 99, "thing": "gw1", "seq": 0, "records": []}', "schema_version"),
    (b'{"schema_version": 1, "thing": "gw1", "seq": -1, "records": []}', "wrong_type"),
    (b'{"schema_version": 1, "thing": "gw1", "seq": 0}', "missing_field"),
    (b'{"schema_version": 1, "thing": "gw1", "seq": 0, "records": [], "ts": NaN}', "non_finite"),
    (b'{"schema_version": 1, "thing": "../etc", "seq": 0, "records": []}', "bad_thing"),
    (b"x" * (payloads.MAX_PAYLOAD_BYTES + 1), "too_large"),
])
def test_malformed_messages_are_counted_and_dropped(store, raw, kind):
    assert store.ingest(raw) == f"malformed:{kind}"
    assert store.counters()[f"malformed:{kind}"] == 1
    assert store.things() == []
    # and the store goes on working
    assert store.ingest(message("gw1", 0)) == "stored"


@pytest.mark.fault
def test_a_bad_record_does_not_cost_its_neighbours(store):
    bad_score = {"type": "score", "body": {"turbine_id": "gw1-t00", "ts": NOW}}
    foreign = score("gw2-t00", NOW)  # gw1 may not report gw2's turbines
    raw = message("gw1", 0, [bad_score, foreign, score("gw1-t01", NOW), health("gw1", NOW)])
    assert store.ingest(raw) == "stored"
    counters = store.counters()
    assert counters["malformed_record:missing_field"] == 1
    assert counters["malformed_record:foreign_turbine"] == 1
    assert counters["records:score"] == 1 and counters["records:health"] == 1
    assert [t["turbine_id"] for t in store.fleet()["gateways"][0]["turbines"]] == ["gw1-t01"]


def test_fleet_overview_model_version_components_and_scores(store):
    store.ingest(message("gw1", 0, [score("gw1-t00", NOW, version="1.0.1"), score("gw1-t01", NOW, ["rps"], "1.0.1"),
                                    health("gw1", NOW, model_version="1.0.1")]))
    # the detector reports a newer model before its first score with it
    store.ingest(message("gw1", 1, [health("gw1", NOW + 5, model_version="1.0.2")]))
    # an older message arriving late does not roll the version back
    store.ingest(message("gw1", 2, [score("gw1-t00", NOW - 30, version="1.0.0")]))
    gw = store.fleet()["gateways"][0]
    assert gw["thing"] == "gw1" and gw["model_version"] == "1.0.2"
    assert gw["components"][0]["state"] == "RUNNING" and gw["components"][0]["model_version"] == "1.0.2"
    t00, t01 = gw["turbines"]
    assert t00["model_version"] == "1.0.1" and t00["n_scores"] == 2
    assert t01["anomaly"] is True and t01["n_anomalies"] == 1


def test_turbine_scores_columns_thresholds_and_anomaly_flags(store):
    records = [score("gw1-t00", NOW + i, ["voltage"] if i == 3 else (), seq=i * 10) for i in range(6)]
    store.ingest(message("gw1", 0, records))
    data = store.turbine_scores("gw1-t00")
    assert data["ts"] == sorted(data["ts"]) and len(data["ts"]) == 6
    assert data["features"] == list(FEATURES)
    assert data["thresholds"]["voltage"] == [1.0] * 6
    assert data["anomalous"]["voltage"] == [False, False, False, True, False, False]
    assert data["anomalous"]["rps"] == [False] * 6
    assert data["score"][3] == pytest.approx(2.5) and data["anomaly"][3] is True
    assert store.turbine_scores("gw1-t00", since=NOW + 3)["ts"] == [NOW + 4, NOW + 5]
    assert len(store.turbine_scores("gw1-t00", limit=2)["ts"]) == 2
    anomalies = store.anomalies()
    assert [(a["turbine_id"], a["anomalous_features"]) for a in anomalies] == [("gw1-t00", ["voltage"])]


def test_the_same_window_resent_in_another_message_is_stored_once(store):
    rec = score("gw1-t00", NOW)
    store.ingest(message("gw1", 0, [rec]))
    store.ingest(message("gw1", 1, [rec]))  # a forwarder that re-spooled after a crash
    assert len(store.turbine_scores("gw1-t00")["ts"]) == 1
    assert store.counters()["duplicate_records"] == 1


def test_retention_by_age_keeps_counters_and_marks_older_ids_stale(tmp_path):
    clock = [NOW]
    with TelemetryStore(tmp_path / "t.sqlite", max_age_s=3600, clock=lambda: clock[0]) as store:
        for seq in range(3):
            store.ingest(message("gw1", seq, [score("gw1-t00", NOW + seq)], ts=NOW + seq))
        clock[0] = NOW + 7200
        store.ingest(message("gw1", 5, [score("gw1-t00", clock[0])], ts=clock[0]))
        deleted = store.apply_retention()
        assert deleted["scores"] == 3 and deleted["messages"] == 3
        assert store.turbine_scores("gw1-t00")["ts"] == [clock[0]]
        loss = store.loss()["gw1"]
        assert (loss["received"], loss["lost"]) == (4, 2)  # counters survive retention
        # a copy of a forgotten message can no longer be told from a new one: refused as stale
        assert store.ingest(message("gw1", 1, [score("gw1-t00", NOW + 1)])) == "stale"
        assert store.turbine_scores("gw1-t00")["ts"] == [clock[0]]
        # but the gap above the retained window still fills
        assert store.ingest(message("gw1", 4)) == "stored"
        assert store.loss()["gw1"]["lost"] == 1


def test_retention_by_rows_keeps_the_newest_scores(tmp_path):
    with TelemetryStore(tmp_path / "t.sqlite", max_score_rows=10) as store:
        store.ingest(message("gw1", 0, [score("gw1-t00", NOW + i, seq=i) for i in range(25)]))
        store.apply_retention()
        ts = store.turbine_scores("gw1-t00")["ts"]
        assert ts == [NOW + i for i in range(15, 25)]


def test_store_is_shared_between_threads(store):
    errors: list[Exception] = []

    def writer(thing: str) -> None:
        try:
            for seq in range(50):
                store.ingest(message(thing, seq, [score(f"{thing}-t00", NOW + seq)]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(50):
                store.fleet()
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"gw{i}",)) for i in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {t: v["received"] for t, v in store.loss().items()} == {"gw0": 50, "gw1": 50, "gw2": 50}


# ---------------------------------------------------------------- service (real Mosquitto)
@pytest.fixture
def broker(tmp_path):
    from windfleet.nucleus.broker import Broker

    with Broker(tmp_path / "broker", port=0) as b:
        b.add_device("gw1", ["gw1-t00"])
        yield b


def _device_client(broker, thing: str) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"{thing}-test")
    client.username_pw_set(*broker.credentials(thing))
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


@pytest.mark.fault
@pytest.mark.slow
def test_service_stores_dedupes_and_drops_malformed_over_mqtt(broker, store):
    user, password = broker.cloud_credentials()
    with IngestService(store, broker.host, broker.port, user, password, client_id="ingest-test") as service:
        device = _device_client(broker, "gw1")
        acks: list[int] = []
        device.on_message = lambda c, u, m: acks.append(payloads.validate_telemetry_ack(payloads.decode(m.payload))["seq"])
        device.subscribe(topics.telemetry_ack("gw1"), qos=1)
        time.sleep(0.5)  # the subscription reaches the broker before anything is sent
        try:
            topic = topics.telemetry("gw1")
            for seq in (0, 1, 3, 1):
                device.publish(topic, message("gw1", seq, [score("gw1-t00", NOW + seq, seq=seq)]), qos=1).wait_for_publish()
            device.publish(topic, b"{broken", qos=1).wait_for_publish()
            wait_until(lambda: service.stats["received"] >= 5, message="5 received")
            assert service.stats["malformed"] == 1 and service.stats["duplicate"] == 1
            assert store.loss()["gw1"]["lost"] == 1
            device.publish(topic, message("gw1", 2), qos=1).wait_for_publish()
            wait_until(lambda: store.loss()["gw1"]["lost"] == 0, message="the gap filled")
            # each stored message, the repeat too, is confirmed to the device; the malformed one is not
            wait_until(lambda: sorted(acks) == [0, 1, 1, 2, 3], message="acknowledgements")
        finally:
            device.loop_stop()
            device.disconnect()
    assert store.counters()["malformed:not_json"] == 1


@pytest.mark.fault
@pytest.mark.slow
def test_service_misses_nothing_published_while_it_was_down(broker, store):
    """Persistent session + QoS1: the broker queues for the ingest's client id."""
    user, password = broker.cloud_credentials()
    with IngestService(store, broker.host, broker.port, user, password, client_id="ingest-persist"):
        pass  # first connection creates the session and its subscription
    device = _device_client(broker, "gw1")
    try:
        for seq in range(20):
            device.publish(topics.telemetry("gw1"), message("gw1", seq), qos=1).wait_for_publish()
    finally:
        device.loop_stop()
        device.disconnect()
    with IngestService(store, broker.host, broker.port, user, password, client_id="ingest-persist"):
        wait_until(lambda: store.loss().get("gw1", {}).get("received") == 20, message="20 received")
    assert store.loss()["gw1"]["lost"] == 0


# ---------------------------------------------------------------- AWS Lambda + CloudWatch dashboard
def representative_message() -> dict:
    """One message with every record kind the Lambda formats (anomalous and normal scores)."""
    log_record = {"type": "log", "body": payloads.log("gw1", "com.windfleet.LogForwarder", "WARNING",
                                                      "spool 80% full", NOW)}
    return payloads.telemetry("gw1", 7, NOW, [
        score("gw1-t00", NOW, seq=10), score("gw1-t01", NOW + 0.5, ["rps"], seq=20),
        health("gw1", NOW, model_version="1.0.3", reason="ok"), log_record,
    ])


def rule_event(message: dict) -> dict:
    """What the IoT rule hands the Lambda for ``message`` published on its own thing's topic
    (``SELECT *, topic(3) AS source_thing``)."""
    return {**message, "source_thing": message["thing"]}


def test_lambda_writes_one_structured_event_per_record(logs_client):
    group = "/windfleet/test"
    logs_client.create_log_group(logGroupName=group)
    result = lambda_handler(rule_event(representative_message()), None, logs_client=logs_client, log_group=group)
    assert result == {"written": 5, "acked": True}
    events = log_events(logs_client, group)
    kinds = sorted(e["record_type"] for e in events)
    assert kinds == ["health", "log", "message", "score", "score"]
    assert {e["@stream"] for e in events} == {"gw1"}
    anomalous = next(e for e in events if e.get("turbine_id") == "gw1-t01")
    assert anomalous["anomaly"] == 1 and anomalous["anomalous_features"] == "rps"
    assert anomalous["error_rps"] == 2.5 and anomalous["threshold_rps"] == 1.0
    assert anomalous["score"] == pytest.approx(2.5) and anomalous["model_version"] == "1.0.0"
    assert anomalous["@ts"] == int((NOW + 0.5) * 1000)
    normal = next(e for e in events if e.get("turbine_id") == "gw1-t00")
    assert normal["anomaly"] == 0 and normal["anomalous_features"] == ""
    hl = next(e for e in events if e["record_type"] == "health")
    assert (hl["state"], hl["model_version"], hl["thing"]) == ("RUNNING", "1.0.3", "gw1")
    assert next(e for e in events if e["record_type"] == "message")["seq"] == 7


def test_lambda_creates_missing_group_and_stream_and_clamps_bad_clocks(logs_client):
    msg = payloads.telemetry("gw2", 0, 0.0, [score("gw2-t00", 10.0)])  # a device clock at 1970
    assert lambda_handler(rule_event(msg), None, logs_client=logs_client, log_group="/wf/new")["written"] == 2
    events = log_events(logs_client, "/wf/new")
    assert len(events) == 2 and all(abs(e["@ts"] / 1000 - time.time()) < 600 for e in events)


@pytest.mark.fault
@pytest.mark.parametrize("event", ["garbage", {"thing": "gw1", "source_thing": "gw1"},
                                   {"schema_version": 1, "thing": "gw1", "seq": 0, "source_thing": "gw1",
                                    "records": [{"type": "video"}]},
                                   # what the rule gave before it passed topic(3): not trusted
                                   {"schema_version": 1, "thing": "gw1", "seq": 0, "records": []}])
def test_lambda_drops_malformed_events_without_raising(logs_client, event):
    logs_client.create_log_group(logGroupName="/wf/x")
    result = lambda_handler(event, None, logs_client=logs_client, log_group="/wf/x")
    assert "dropped" in result
    assert logs_client.filter_log_events(logGroupName="/wf/x")["events"] == []
    assert published_acks() == []  # nothing stored, nothing acknowledged


def test_lambda_acknowledges_each_stored_message_a_repeat_too(logs_client):
    first, second = (payloads.telemetry("gw3", seq, NOW, [score("gw3-t00", NOW, seq=seq)]) for seq in (4, 5))
    for msg in (first, second, second):  # the device re-sent seq 5: it missed the first ack
        assert lambda_handler(rule_event(msg), None, logs_client=logs_client, log_group="/wf/acks")["acked"] is True
    assert published_acks() == [(topics.telemetry_ack("gw3"), payloads.telemetry_ack("gw3", seq)) for seq in (4, 5, 5)]
    assert topics.telemetry_ack("gw3") == "windfleet/fleet/gw3/ack"
    assert len(log_events(logs_client, "/wf/acks")) == 6  # stored before acknowledged


def _stubbed_iot_data():
    import boto3
    from botocore.stub import Stubber

    # the form of the account endpoint the provisioner passes (describe_endpoint iot:Data-ATS)
    client = boto3.client("iot-data", region_name="us-east-1",
                          endpoint_url="https://a1b2c3d4e5f6g7-ats.iot.us-east-1.amazonaws.com")
    return client, Stubber(client)


def test_lambda_publishes_the_ack_with_qos_1_on_the_account_endpoint(logs_client):
    client, stub = _stubbed_iot_data()
    stub.add_response("publish", {}, expected_params={
        "topic": "windfleet/fleet/gw1/ack", "qos": 1, "payload": payloads.encode(payloads.telemetry_ack("gw1", 7))})
    with stub:
        result = lambda_handler(rule_event(representative_message()), None, logs_client=logs_client, log_group="/wf/s",
                                iot_data_client=client)
    stub.assert_no_pending_responses()
    assert result == {"written": 5, "acked": True}


@pytest.mark.fault
def test_a_failed_ack_is_logged_not_raised(logs_client, capsys):
    client, stub = _stubbed_iot_data()
    stub.add_client_error("publish", "ThrottlingException", "Rate exceeded", 429)
    with stub:
        result = lambda_handler(rule_event(representative_message()), None, logs_client=logs_client, log_group="/wf/f",
                                iot_data_client=client)
    assert result == {"written": 5, "acked": False}  # stored; the device re-sends and is acked then
    assert len(log_events(logs_client, "/wf/f")) == 5
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["level"], x["msg"], x["thing"], x["seq"]) for x in lines] == [
        ("WARNING", "telemetry ack not published", "gw1", 7)]
    assert "ThrottlingException" in lines[0]["error"]


@pytest.mark.fault
def test_no_ack_when_the_logs_write_fails(logs_client):
    from botocore.stub import Stubber

    stub = Stubber(logs_client)
    stub.add_client_error("put_log_events", "ServiceUnavailableException", "down", 503)
    with stub, pytest.raises(Exception, match="ServiceUnavailable"):  # IoT retries the rule
        lambda_handler(rule_event(representative_message()), None, logs_client=logs_client, log_group="/wf/down")
    assert published_acks() == []


_QUERY_WORDS = {
    "source", "filter", "stats", "by", "sort", "limit", "fields", "as", "and", "or", "not", "desc", "asc",
    "count", "sum", "max", "min", "avg", "latest", "count_distinct", "bin", "in", "like", "display", "parse",
}


def query_fields(query: str) -> set[str]:
    """Field names a Logs Insights query reads (identifiers minus keywords, functions and aliases)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", " ", query)
    aliases = set(re.findall(r"\bas\s+([A-Za-z_][\w]*)", text))
    words = set(re.findall(r"(?<![\w@.])[A-Za-z_@][\w.@]*", text))
    return {w for w in words if w.lower() not in _QUERY_WORDS and w not in aliases and not w.startswith("@")}


def test_dashboard_widgets_query_only_fields_the_lambda_writes(logs_client):
    logs_client.create_log_group(logGroupName="/wf/fields")
    lambda_handler(rule_event(representative_message()), None, logs_client=logs_client, log_group="/wf/fields")
    drift = payloads.drift("gw1-t00", "1.0.0", NOW, 2000, {f: 0.3 for f in FEATURES}, {f: 0.2 for f in FEATURES})
    lambda_handler(rule_event(payloads.telemetry("gw1", 8, NOW, [{"type": "drift", "body": drift}])), None,
                   logs_client=logs_client, log_group="/wf/fields")
    written = set().union(*(e.keys() for e in log_events(logs_client, "/wf/fields")))

    body = json.loads(json.dumps(dashboard_body("/wf/fields", "eu-west-1")))  # valid JSON both ways
    titles = [w["properties"]["title"] for w in body["widgets"]]
    for wanted in ("Anomalies per turbine", "Feature errors against thresholds", "Model version per device",
                   "Readings per second", "Deployment status"):
        assert any(t.startswith(wanted) for t in titles), wanted
    for widget in body["widgets"]:
        props = widget["properties"]
        assert widget["type"] == "log" and props["region"] == "eu-west-1"
        assert props["query"].startswith("SOURCE '/wf/fields' |")
        used = query_fields(props["query"])
        assert used, props["title"]
        assert used <= written, f"{props['title']}: fields not written by the Lambda: {used - written}"
        assert 0 <= widget["x"] <= 12 and widget["width"] + widget["x"] <= 24


def test_query_field_parser_catches_an_unknown_field():
    assert query_fields("SOURCE 'g' | filter record_type = 'score' | stats max(bogus) as b by bin(1m)") == {
        "record_type", "bogus"}


def test_lambda_and_dashboard_names_stay_importable_for_provisioning():
    from windfleet.cloud.ingest import dashboard_body as db, lambda_handler as lh

    assert callable(db) and callable(lh) and ingest.DEFAULT_LOG_GROUP.startswith("/")
