"""The LogForwarder as a real process between two real Mosquittos (the gateway's and the
cloud's): broker restart, cloud link cut, kill -9, malformed input, SIGTERM."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from windfleet import payloads, topics
from windfleet.components.bus.mqtt import MqttBus
from tests.mqtt_fixtures import (  # noqa: F401
    Process, Subscriber, TelemetryCollector, broker, cloud_broker, device_env, processes, score_payload,
    wait_until, write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(120)]

THING = "gw1"
TURBINES = ["gw1-t00", "gw1-t01"]


@pytest.fixture
def gateway(tmp_path, broker, cloud_broker, processes):
    """Device account on both brokers, a config file, a collector on the cloud side and a
    publisher standing in for the detector."""
    _, password = broker.add_device(THING, TURBINES)
    cloud_broker.add_device(THING, [], password=password)
    config = tmp_path / "forwarder-config.json"
    write_config(config, {"turbines": len(TURBINES)})
    collector = TelemetryCollector(cloud_broker)
    detector = MqttBus("com.windfleet.AnomalyDetector", thing=THING, broker=broker.url, user=THING,
                       password=password)

    class Gateway:
        spool = tmp_path / "work" / "spool.sqlite"

        def start_forwarder(self, *extra: str) -> Process:
            env = device_env(broker, THING, cloud=cloud_broker, config_file=config)
            args = ["-m", "windfleet.components.forwarder.main", "--spool", str(self.spool),
                    "--batch-records", "25", "--batch-interval", "0.2", "--health-interval", "0.5", *extra]
            proc = Process(args, env, tmp_path / f"forwarder-{len(processes)}.log")
            processes.append(proc)
            return proc

    gw = Gateway()
    gw.collector, gw.detector, gw.broker, gw.cloud = collector, detector, broker, cloud_broker
    yield gw
    detector.close(timeout=1)
    collector.close()


def _publish_scores(bus: MqttBus, numbers, pause: float = 0.0) -> None:
    for n in numbers:
        bus.publish(topics.scores(TURBINES[n % 2]), score_payload(TURBINES[n % 2], n), qos=1)
        if pause:
            time.sleep(pause)


def _forwarder_health(collector: TelemetryCollector) -> list[dict]:
    return [r["body"] for r in collector.records(THING, "health")
            if r["body"]["component"] == "com.windfleet.LogForwarder"]


def _score_numbers(collector: TelemetryCollector) -> list[int]:
    return [r["body"]["window_end_seq"] for r in collector.records(THING, "score")]


def _wait_forwarder_ready(gw) -> None:
    """Its health on the gateway's bus: it runs and its subscriptions are in place."""
    watcher = Subscriber(gw.broker.host, gw.broker.port, *gw.broker.cloud_credentials(), topics.health(THING))
    try:
        wait_until(watcher.snapshot, 30, message="forwarder's first health message")
    finally:
        watcher.close()


def test_broker_restart_mid_stream_loses_no_telemetry(gateway):
    gw = gateway
    fwd = gw.start_forwarder()
    _wait_forwarder_ready(gw)
    total = 600
    sender = threading.Thread(target=_publish_scores, args=(gw.detector, range(total), 0.003))
    sender.start()
    wait_until(lambda: len(_score_numbers(gw.collector)) >= 100, 30, message="stream flowing")
    gw.broker.restart()  # the gateway's broker: every local session reconnects
    sender.join(60)
    assert gw.detector.flush(30)
    wait_until(lambda: len(set(_score_numbers(gw.collector))) == total, 60, message="every score delivered")
    assert gw.collector.gaps(THING) == [], "no sequence gap"
    assert sorted(set(_score_numbers(gw.collector))) == list(range(total))
    assert fwd.terminate() == 0


def test_cloud_link_down_spools_then_delivers_in_order(gateway):
    gw = gateway
    fwd = gw.start_forwarder()
    _wait_forwarder_ready(gw)
    _publish_scores(gw.detector, range(0, 50))
    wait_until(lambda: len(_score_numbers(gw.collector)) == 50, 30)
    gw.cloud.stop()  # IoT Core unreachable
    local_health = Subscriber(gw.broker.host, gw.broker.port, *gw.broker.cloud_credentials(), topics.health(THING))
    try:
        _publish_scores(gw.detector, range(50, 250))

        def spooled() -> int:
            counts = [payloads.decode(p)["counters"]["spooled"] for _, p in local_health.snapshot()
                      if payloads.decode(p)["component"] == "com.windfleet.LogForwarder"]
            return counts[-1] if counts else 0

        wait_until(lambda: spooled() >= 200, 30, message="records spooled while the cloud is down")
    finally:
        local_health.close()
    gw.cloud.start()
    wait_until(lambda: len(set(_score_numbers(gw.collector))) == 250, 60, message="spool delivered")
    unique = gw.collector.unique(THING)
    numbers = [r["body"]["window_end_seq"] for m in unique for r in m["records"] if r["type"] == "score"]
    assert numbers == list(range(250)), "delivered in order"
    assert gw.collector.gaps(THING) == []
    assert fwd.terminate() == 0


def test_kill9_mid_stream_then_restart_continues_seq_and_loses_nothing(gateway):
    gw = gateway
    fwd = gw.start_forwarder()
    _wait_forwarder_ready(gw)
    total = 800
    sender = threading.Thread(target=_publish_scores, args=(gw.detector, range(total), 0.002))
    sender.start()
    wait_until(lambda: len(_score_numbers(gw.collector)) >= 150, 30, message="stream flowing")
    fwd.kill9()
    seq_before = max(gw.collector.seqs(THING))
    db = sqlite3.connect(gw.spool)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    fwd2 = gw.start_forwarder()
    sender.join(60)
    assert gw.detector.flush(30)
    wait_until(lambda: len(set(_score_numbers(gw.collector))) == total, 60, message="every score after restart")
    assert sorted(set(_score_numbers(gw.collector))) == list(range(total)), "duplicates allowed, loss not"
    seqs = gw.collector.seqs(THING)
    assert max(seqs) > seq_before and gw.collector.gaps(THING) == []
    # A resent message repeats its seq with identical records.
    by_seq: dict[int, list] = {}
    for m in gw.collector.telemetry(THING):
        assert by_seq.setdefault(m["seq"], m["records"]) == m["records"]
    assert fwd2.terminate() == 0


def test_malformed_input_counted_and_sigterm_flushes(gateway):
    gw = gateway
    fwd = gw.start_forwarder("--batch-interval", "30")  # only SIGTERM's flush will send the tail
    _wait_forwarder_ready(gw)
    bad = [b"not json", b'{"schema_version": 1}', b'{"schema_version": 7}', b"{" + b" " * 300_000 + b"}"]
    for raw in bad:
        gw.detector.publish(topics.scores(TURBINES[0]), raw, qos=1)
    _publish_scores(gw.detector, range(10))
    assert gw.detector.flush(10)
    time.sleep(1.0)  # health_interval 0.5 s: let the counters be reported
    assert fwd.terminate() == 0
    wait_until(lambda: len(_score_numbers(gw.collector)) == 10, 30, message="flushed on SIGTERM")
    last = _forwarder_health(gw.collector)[-1]
    assert last["counters"]["malformed_dropped"] == 4
    assert last["malformed_by_kind"] == {"not_json": 1, "missing_field": 1, "schema_version": 1, "too_large": 1}
    lines = fwd.log_lines()
    assert any(line.get("msg") == "forwarder stopped" for line in lines)
    assert sum(1 for line in lines if line.get("msg") == "malformed message dropped") == 4
