"""The MQTT bus against a real Mosquitto: pub/sub, persistence, reconnect, cloud link, config."""

from __future__ import annotations

import json
import threading

import pytest

from windfleet import payloads, topics
from windfleet.components.bus import connect
from windfleet.components.bus.mqtt import MqttBus, parse_hostport
from tests.mqtt_fixtures import (  # noqa: F401
    Subscriber, broker, cloud_broker, device_env, wait_until, write_config,
)

pytestmark = pytest.mark.timeout(90)


class Inbox:
    def __init__(self):
        self.items: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.items.append((topic, payload))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p in self.items]


def _bus(broker, thing, component="com.windfleet.Test", **kw) -> MqttBus:
    user, password = broker.credentials(thing)
    return MqttBus(component, thing=thing, broker=broker.url, user=user, password=password, **kw)


@pytest.fixture
def buses():
    opened: list[MqttBus] = []
    yield opened
    for b in opened:
        b.close(timeout=1)


def test_parse_hostport():
    assert parse_hostport("10.0.0.1:1884") == ("10.0.0.1", 1884)
    assert parse_hostport("localhost") == ("localhost", 1883)


def test_pubsub_between_components(broker, buses):
    broker.add_device("gw1", 2)
    a = _bus(broker, "gw1", "com.windfleet.A"); buses.append(a)
    b = _bus(broker, "gw1", "com.windfleet.B"); buses.append(b)
    assert a.client_id == "gw1-com.windfleet.A" and a.thing_name == "gw1"
    inbox = Inbox()
    b.subscribe(topics.readings("gw1-t01"), inbox)
    wildcard = Inbox()
    b.subscribe("windfleet/devices/gw1/+", wildcard)
    wait_until(lambda: b.stats.get("received", 0) == 0 and b.connected, 5)
    a.publish(topics.readings("gw1-t01"), {"schema_version": 1, "n": 1}, qos=1)
    a.publish(topics.readings("gw1-t01"), b"raw bytes", qos=1)
    a.publish(topics.health("gw1"), b"h", qos=0)
    wait_until(lambda: len(inbox.items) == 2 and wildcard.items, 10, message="deliveries")
    assert json.loads(inbox.payloads()[0]) == {"schema_version": 1, "n": 1}
    assert inbox.payloads()[1] == b"raw bytes"
    assert wildcard.items == [(topics.health("gw1"), b"h")]


@pytest.mark.fault
def test_handler_errors_do_not_stop_the_bus(broker, buses):
    broker.add_device("gw1", 1)
    a = _bus(broker, "gw1", "com.windfleet.A"); buses.append(a)
    inbox = Inbox()

    def flaky(topic, payload):
        if payload == b"boom":
            raise RuntimeError("bad handler")
        inbox(topic, payload)

    a.subscribe(topics.scores("gw1-t00"), flaky)
    for p in (b"1", b"boom", b"2"):
        a.publish(topics.scores("gw1-t00"), p, qos=1)
    wait_until(lambda: inbox.payloads() == [b"1", b"2"], 10, message="messages around the failure")
    assert a._dispatcher.handler_errors == 1


@pytest.mark.fault
def test_persistent_session_delivers_what_arrived_while_offline(broker, buses):
    """A restarted component (same client id) gets the QoS1 messages it missed, even those
    the broker delivers before the component has called subscribe() again."""
    broker.add_device("gw1", 1)
    topic = topics.readings("gw1-t00")
    det = _bus(broker, "gw1", "com.windfleet.AnomalyDetector")
    det.subscribe(topic, Inbox())
    wait_until(lambda: det.connected, 5)
    det.close()
    sim = _bus(broker, "gw1", "com.windfleet.Sim"); buses.append(sim)
    for i in range(50):
        sim.publish(topic, {"schema_version": 1, "i": i}, qos=1)
    assert sim.flush(10)
    det = _bus(broker, "gw1", "com.windfleet.AnomalyDetector"); buses.append(det)
    wait_until(lambda: det.stats.get("received", 0) >= 50, 10, message="queued messages at connect")
    inbox = Inbox()
    det.subscribe(topic, inbox)  # after the messages arrived: they were held, not lost
    wait_until(lambda: len(inbox.items) == 50, 10, message="held messages handed over")
    assert [json.loads(p)["i"] for p in inbox.payloads()] == list(range(50))


@pytest.mark.fault
def test_reconnects_and_resubscribes_after_broker_restart(broker, buses):
    broker.add_device("gw1", 1)
    topic = topics.scores("gw1-t00")
    pub = _bus(broker, "gw1", "com.windfleet.Pub"); buses.append(pub)
    sub = _bus(broker, "gw1", "com.windfleet.Sub"); buses.append(sub)
    inbox = Inbox()
    sub.subscribe(topic, inbox)
    wait_until(lambda: sub.connected, 5)
    pub.publish(topic, {"schema_version": 1, "i": 0}, qos=1)
    wait_until(lambda: len(inbox.items) == 1, 10)
    broker.stop()
    wait_until(lambda: not pub.connected and not sub.connected, 10, message="disconnect seen")
    for i in range(1, 21):  # published while the broker is down: queued in memory
        pub.publish(topic, {"schema_version": 1, "i": i}, qos=1)
    broker.start()
    wait_until(lambda: len(inbox.items) >= 21, 30, message="delivery after reconnect")
    got = sorted({json.loads(p)["i"] for p in inbox.payloads()})
    assert got == list(range(21))
    assert pub.stats.get("publish_dropped", 0) == 0


@pytest.mark.fault
def test_qos0_while_disconnected_is_counted(broker, buses):
    broker.add_device("gw1", 1)
    pub = _bus(broker, "gw1", "com.windfleet.Pub"); buses.append(pub)
    broker.stop()
    wait_until(lambda: not pub.connected, 10)
    pub.publish(topics.health("gw1"), b"x", qos=0)
    assert pub.stats["publish_dropped"] == 1


@pytest.mark.fault
def test_publish_cloud_reports_link_state(broker, cloud_broker, buses):
    broker.add_device("gw1", 1)
    cloud_broker.add_device("gw1", 0, password=broker.credentials("gw1")[1])
    bus = _bus(broker, "gw1", cloud_broker=cloud_broker.url); buses.append(bus)
    seen = Subscriber(cloud_broker.host, cloud_broker.port, *cloud_broker.cloud_credentials(), topics.ALL_TELEMETRY)
    try:
        assert bus.publish_cloud(topics.telemetry("gw1"), b"one") is True
        wait_until(lambda: seen.snapshot() == [(topics.telemetry("gw1"), b"one")], 10)
        cloud_broker.stop()
        wait_until(lambda: not bus.cloud_connected, 10, message="cloud link down")
        assert bus.publish_cloud(topics.telemetry("gw1"), b"two") is False
        assert bus.connected, "the local link is independent of the cloud link"
        cloud_broker.start()
        wait_until(lambda: bus.publish_cloud(topics.telemetry("gw1"), b"three"), 20, interval=0.2,
                   message="cloud link back")
    finally:
        seen.close()


def test_configuration_file_is_watched(broker, buses, tmp_path):
    broker.add_device("gw1", 1)
    cfg = tmp_path / "config.json"
    write_config(cfg, {"turbines": 2, "rate": 20})
    bus = _bus(broker, "gw1", config_file=cfg, config_poll_interval=0.05); buses.append(bus)
    assert bus.get_configuration() == {"turbines": 2, "rate": 20}
    updates: list[dict] = []
    bus.on_configuration_update(updates.append)
    write_config(cfg, {"turbines": 3, "rate": 20})
    wait_until(lambda: updates, 10, message="configuration update")
    assert updates[-1] == {"turbines": 3, "rate": 20} == bus.get_configuration()
    cfg.write_text("{not json")  # a broken file keeps the last good configuration
    write_config(cfg, {"turbines": 4})
    wait_until(lambda: updates[-1] == {"turbines": 4}, 10)
    updates[-1]["turbines"] = 99  # handlers get copies
    assert bus.get_configuration() == {"turbines": 4}


def test_update_state_publishes_health(broker, buses):
    broker.add_device("gw1", 1)
    watcher = Subscriber(broker.host, broker.port, *broker.cloud_credentials(), topics.health("gw1"))
    try:
        bus = _bus(broker, "gw1", "com.windfleet.AnomalyDetector", version="1.2.3"); buses.append(bus)
        bus.update_state("ERRORED", reason="model self-test failed", counters={"scored": 5})
        wait_until(watcher.snapshot, 10, message="health message")
        msg = payloads.validate_health(payloads.decode(watcher.snapshot()[0][1]))
        assert msg["state"] == "ERRORED" and msg["reason"] == "model self-test failed"
        assert msg["component"] == "com.windfleet.AnomalyDetector" and msg["version"] == "1.2.3"
        assert msg["counters"] == {"scored": 5}
    finally:
        watcher.close()


def test_connect_reads_the_runtime_environment(broker, monkeypatch, tmp_path):
    broker.add_device("gw7", 1)
    cfg = tmp_path / "c.json"
    write_config(cfg, {"turbines": 1})
    for key, value in device_env(broker, "gw7", config_file=cfg).items():
        if key.startswith("WINDFLEET_"):
            monkeypatch.setenv(key, value)
    bus = connect("com.windfleet.LogForwarder")
    try:
        assert isinstance(bus, MqttBus) and bus.thing_name == "gw7" and bus.connected
        assert bus.get_configuration() == {"turbines": 1}
    finally:
        bus.close()
    monkeypatch.delenv("WINDFLEET_THING")
    with pytest.raises(ValueError, match="WINDFLEET_THING"):
        connect("com.windfleet.LogForwarder")


@pytest.mark.fault
def test_wrong_password_keeps_retrying_without_crashing(broker):
    broker.add_device("gw1", 1)
    bus = MqttBus("com.windfleet.X", thing="gw1", broker=broker.url, user="gw1", password="wrong",
                  connect_timeout=0.5)
    try:
        assert not bus.connected
        broker.add_device("gw1", 1, password="wrong")  # fixed on the broker side
        wait_until(lambda: bus.connected, 20, message="connect after the password was fixed")
    finally:
        bus.close(timeout=1)


def test_unclaimed_session_messages_are_acked_and_counted(broker, buses):
    """Messages for a subscription the new configuration no longer has must not stall the session."""
    broker.add_device("gw1", 2)
    old = topics.scores("gw1-t01")
    det = _bus(broker, "gw1", "com.windfleet.Det")
    det.subscribe(old, Inbox())
    det.close()
    sim = _bus(broker, "gw1", "com.windfleet.Sim"); buses.append(sim)
    for i in range(3):
        sim.publish(old, b"stale", qos=1)
    assert sim.flush(10)
    det = _bus(broker, "gw1", "com.windfleet.Det", hold_seconds=0.3, config_poll_interval=0.05); buses.append(det)
    wait_until(lambda: det.stats.get("held_dropped") == 3, 10, message="held messages expired")
    inbox = Inbox()
    det.subscribe(topics.scores("gw1-t00"), inbox)
    sim.publish(topics.scores("gw1-t00"), b"fresh", qos=1)
    wait_until(lambda: inbox.payloads() == [b"fresh"], 10)
