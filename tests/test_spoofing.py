"""No device speaks for another: gw1, with its own credentials on its own topic, claims to be gw2
(issue 12's attack, replayed on a real Mosquitto and on the Lambda path)."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from windfleet import payloads, topics
from windfleet.cloud import provision
from windfleet.cloud.ingest import IngestService, TelemetryStore, lambda_handler
from windfleet.model_contract import FEATURES
from tests.lambda_fixtures import log_events, logs_client, published_acks  # noqa: F401 - fixture
from tests.mqtt_fixtures import broker, wait_until  # noqa: F401  (broker is a fixture)

pytestmark = pytest.mark.timeout(90)

THR = {f: 1.0 for f in FEATURES}
NOW = time.time()
HUGE_SEQ = payloads.MAX_INT - 3  # the lost count: 9,007,199,254,740,988


def score(turbine: str, anomaly: bool = False, version: str = "1.0.0", seq: int = 0) -> dict:
    errors = {f: (2.5 if anomaly else 0.4) for f in FEATURES}
    return {"type": "score", "body": payloads.score(turbine, NOW, version, seq, errors, THR)}


def health(thing: str, state: str = "RUNNING", **extra) -> dict:
    return {"type": "health", "body": payloads.health(
        thing, "com.windfleet.AnomalyDetector", "1.0.0", state, NOW, {"scored": 1}, **extra)}


def telemetry(thing: str, seq: int, records) -> dict:
    return payloads.telemetry(thing, seq, NOW, list(records))


def attack_messages() -> list[dict]:
    """What gw1 sends on windfleet/fleet/gw1/telemetry, claiming to be gw2."""
    return [
        # gw2's next seq: a fake anomaly, a BROKEN detector on model "evil"
        telemetry("gw2", 2, [score("gw2-t00", anomaly=True, version="evil", seq=99),
                             health("gw2", "BROKEN", model_version="evil", reason="pwned")]),
        # a huge seq: gw2's lost count would jump to ~2**53
        telemetry("gw2", HUGE_SEQ, [score("gw2-t01", version="evil", seq=100)]),
    ]


def sneaky_message() -> dict:
    """gw1's honest envelope carrying records about gw2 (and its own good one)."""
    return telemetry("gw1", 2, [score("gw2-t00", anomaly=True, version="evil", seq=98),
                                health("gw2", "BROKEN", model_version="evil"),
                                {"type": "log", "body": payloads.log("gw2", "x", "ERROR", "fake", NOW)},
                                score("gw1-t00", seq=2)])


class _Device:
    def __init__(self, b, thing: str):
        self.acks: list[int] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{thing}-spoof-test",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(*b.credentials(thing))
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.telemetry_ack(thing), 1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = lambda c, u, m: self.acks.append(
            payloads.validate_telemetry_ack(payloads.decode(m.payload))["seq"])
        self.client.connect(b.host, b.port)
        self.client.loop_start()
        wait_until(subscribed.is_set, 10, message=f"{thing} subscribed to its acks")
        self.thing = thing

    def send(self, message: dict, topic_thing: str | None = None) -> None:
        self.client.publish(topics.telemetry(topic_thing or self.thing), payloads.encode(message),
                            qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.fault
def test_gw1_cannot_speak_for_gw2_through_the_broker_and_ingest(broker, tmp_path):
    broker.add_device("gw1", 2)
    broker.add_device("gw2", 2)
    store = TelemetryStore(tmp_path / "telemetry.sqlite")
    service = IngestService(store, broker.host, broker.port, *broker.cloud_credentials(),
                            client_id="ingest-spoof-test").start()
    gw1, gw2 = _Device(broker, "gw1"), _Device(broker, "gw2")
    try:
        gw2.send(telemetry("gw2", 1, [score("gw2-t00", seq=1), health("gw2", model_version="1.0.0")]))
        gw1.send(telemetry("gw1", 1, [score("gw1-t00", seq=1)]))
        wait_until(lambda: service.stats["stored"] == 2, 15, message="both devices' first message")
        before = store.loss()["gw2"]

        for forged in attack_messages():
            gw1.send(forged)  # gw1's credentials, gw1's topic: the broker lets it through
        gw1.send(sneaky_message())
        wait_until(lambda: service.stats["spoofed"] == 2 and service.stats["stored"] == 3, 15,
                   message="the attack reached the ingest")

        # gw2's real next message is not a "duplicate" of the forged seq 2
        gw2.send(telemetry("gw2", 2, [score("gw2-t00", seq=2)]))
        wait_until(lambda: service.stats["stored"] == 4, 15, message="gw2's real seq 2")
        assert service.stats["duplicate"] == 0

        # gw2's data is untouched: no fake anomaly, components as gw2 reported them, loss as before
        assert store.anomalies(thing="gw2") == [] and store.anomalies() == []
        series = store.turbine_scores("gw2-t00")
        assert series["anomaly"] == [False, False] and set(series["model_version"]) == {"1.0.0"}
        assert store.turbine_scores("gw2-t01")["known"] is False
        fleet = {g["thing"]: g for g in store.fleet()["gateways"]}
        assert [(c["state"], c["model_version"]) for c in fleet["gw2"]["components"]] == [("RUNNING", "1.0.0")]
        assert fleet["gw2"]["model_version"] == "1.0.0"
        after = store.loss()["gw2"]
        assert after == {**before, "received": 2, "expected": 2, "max_seq": 2}
        assert after["lost"] == before["lost"] == 0 and after["duplicates"] == 0
        assert [t["turbine_id"] for t in fleet["gw1"]["turbines"]] == ["gw1-t00"]
        assert store.logs() == []

        # counted per sending device
        counters = store.counters()
        assert counters["spoofed"] == 2 and counters["spoofed:gw1"] == 2
        assert counters["spoofed_records"] == 3 and counters["spoofed_records:gw1"] == 3
        assert store.spoofing() == {"gw1": {"messages": 2, "records": 3}}

        # acknowledgements go to the topic's thing only: gw2 heard of its own messages only
        wait_until(lambda: sorted(gw2.acks) == [1, 2] and sorted(gw1.acks) == [1, 2], 10, message="acks")
        time.sleep(0.5)
        assert sorted(gw2.acks) == [1, 2] and sorted(gw1.acks) == [1, 2]
    finally:
        gw1.close()
        gw2.close()
        service.stop()
        store.close()


def test_store_checks_turbines_by_gateway_not_by_prefix(tmp_path):
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        # "gw-t1-t00" is a turbine of gateway "gw-t1", not of "gw" (a prefix test would let it in)
        raw = payloads.encode(telemetry("gw", 1, [score("gw-t1-t00")]))
        assert store.ingest(raw, source_thing="gw") == "stored"
        assert store.counters()["spoofed_records:gw"] == 1
        assert store.ingest(payloads.encode(telemetry("gw", 2, [])), source_thing="bad/topic") == "malformed:bad_topic"


# ---------------------------------------------------------------- the Lambda path (moto)
def rule_event(message: dict, topic: str) -> dict:
    """What ``SELECT *, topic(3) AS source_thing`` hands the Lambda for ``message`` on ``topic``."""
    assert "topic(3) AS source_thing" in provision.TELEMETRY_RULE_SQL
    return {**message, "source_thing": topic.split("/")[2]}


@pytest.mark.fault
def test_lambda_takes_the_thing_from_the_topic(logs_client, capsys):
    group = "/wf/spoof"
    logs_client.create_log_group(logGroupName=group)
    gw1_topic = topics.telemetry("gw1")
    for forged in attack_messages():
        assert lambda_handler(rule_event(forged, gw1_topic), None, logs_client=logs_client,
                              log_group=group) == {"dropped": "spoofed"}
    warnings = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(w["msg"], w["source_thing"], w["claimed_thing"]) for w in warnings] == [
        ("spoofed telemetry dropped", "gw1", "gw2")] * 2
    assert log_events(logs_client, group) == [] and published_acks() == []

    result = lambda_handler(rule_event(sneaky_message(), gw1_topic), None, logs_client=logs_client, log_group=group)
    assert result == {"written": 5, "acked": True}
    events = log_events(logs_client, group)
    assert {e["@stream"] for e in events} == {"gw1"} and {e["thing"] for e in events} == {"gw1"}
    assert sorted(e["record_type"] for e in events) == ["message", "score", "spoofed", "spoofed", "spoofed"]
    assert [e["turbine_id"] for e in events if e["record_type"] == "score"] == ["gw1-t00"]
    assert published_acks() == [(topics.telemetry_ack("gw1"), payloads.telemetry_ack("gw1", 2))]

    # an event without the rule's source_thing (the old SELECT *) is not trusted
    assert lambda_handler(telemetry("gw2", 3, []), None, logs_client=logs_client,
                          log_group=group) == {"dropped": "no_source_thing"}
