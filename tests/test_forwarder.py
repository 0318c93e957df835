"""LogForwarder logic on an in-memory bus: batching, sequence numbers, spool policy, malformed input."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading

import pytest

from windfleet import payloads, topics
from windfleet.components.bus.base import Bus
from windfleet.components.forwarder import Forwarder, Spool
from tests.mqtt_fixtures import score_payload, wait_until

pytestmark = pytest.mark.timeout(60)


class MemoryBus(Bus):
    """Delivers synchronously; the cloud link is a switch."""

    def __init__(self, thing="gw1", config=None):
        self.thing_name, self.component_name = thing, "com.windfleet.LogForwarder"
        self.handlers: dict[str, list] = {}
        self.config = config or {}
        self.cloud_up = True
        self.cloud: list[bytes] = []
        self.local: list[tuple[str, bytes]] = []
        self.states: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.config_handlers = []
        self.cloud_handlers: dict[str, list] = {}
        self.acking = True   # the cloud side confirms what it stored (payloads.telemetry_ack)

    def publish(self, topic, payload, qos=0):
        data = payload if isinstance(payload, bytes) else payloads.encode(payload)
        self.local.append((topic, data))
        self.deliver(topic, data)

    def subscribe(self, topic, handler):
        self.handlers.setdefault(topic, []).append(handler)

    def deliver(self, topic, data):
        with self.lock:
            for handler in self.handlers.get(topic, []):
                handler(topic, data)

    def publish_cloud(self, topic, payload, qos=1):
        assert topic == topics.telemetry(self.thing_name) and qos == 1
        if not self.cloud_up:
            return False
        self.cloud.append(payload)
        if self.acking:
            body = payloads.decode(payload)
            ack = payloads.encode(payloads.telemetry_ack(body["thing"], body["seq"]))
            for handler in self.cloud_handlers.get(topics.telemetry_ack(self.thing_name), []):
                handler(topics.telemetry_ack(self.thing_name), ack)
        return True

    def subscribe_cloud(self, topic, handler):
        self.cloud_handlers.setdefault(topic, []).append(handler)

    def get_configuration(self, component=None):
        if component not in (None, self.component_name):
            raise LookupError(f"{component} is not deployed")  # only the forwarder is, here
        return dict(self.config)

    def on_configuration_update(self, handler, component=None):
        assert component in (None, self.component_name), "the forwarder follows only its own configuration"
        self.config_handlers.append(handler)

    def update_state(self, state, **extra):
        self.states.append((state, extra))
        self.publish(topics.health(self.thing_name), payloads.health(
            self.thing_name, self.component_name, "1.0.0", state, 0.0, extra.pop("counters", {}), **extra))

    def close(self):
        pass

    # helpers
    def telemetry(self):
        return [payloads.validate_telemetry(payloads.decode(p)) for p in self.cloud]

    def score_numbers(self):
        return [r["body"]["window_end_seq"] for m in self.telemetry() for r in m["records"] if r["type"] == "score"]


@pytest.fixture
def make(tmp_path):
    made = []

    def factory(bus=None, spool_path=None, max_records=10_000, max_bytes=10**8, **kw):
        bus = bus or MemoryBus(config={"turbines": 2})
        spool = Spool(spool_path or tmp_path / "spool.sqlite", max_records=max_records, max_bytes=max_bytes)
        kw.setdefault("batch_interval", 0.1)
        kw.setdefault("health_interval", 3600)
        fwd = Forwarder(bus, spool, **kw).start()
        made.append(fwd)
        return bus, fwd

    yield factory
    for fwd in made:
        fwd.stop()
        fwd.spool.close()


def _scores(bus, turbine, start, n):
    for i in range(start, start + n):
        bus.deliver(topics.scores(turbine), payloads.encode(score_payload(turbine, i)))


def test_batches_with_consecutive_sequence_numbers(make):
    bus, fwd = make(batch_records=100)
    assert set(bus.handlers) >= {topics.scores("gw1-t00"), topics.scores("gw1-t01"), topics.health("gw1"),
                                 topics.logs("gw1")}
    bus.cloud.clear()
    fwd.spool.close  # noqa: B018 (still open)
    _scores(bus, "gw1-t00", 0, 250)
    wait_until(lambda: len(bus.score_numbers()) == 250, 10, message="all scores sent")
    msgs = [m for m in bus.telemetry() if any(r["type"] == "score" for r in m["records"])]
    seqs = [m["seq"] for m in bus.telemetry()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "one more per message"
    assert bus.score_numbers() == list(range(250)), "in order, nothing lost"
    assert max(len(m["records"]) for m in msgs) == 100
    assert all(m["thing"] == "gw1" for m in msgs)
    assert fwd.health_counters()["sent"] >= 250 and fwd.spool.records == 0


def test_logs_and_health_are_forwarded(make):
    bus, fwd = make()
    bus.deliver(topics.logs("gw1"), payloads.encode(payloads.log("gw1", "com.windfleet.AnomalyDetector",
                                                                 "WARNING", "model swapped", 1.0)))
    bus.publish(topics.health("gw1"), payloads.health("gw1", "com.windfleet.AnomalyDetector", "1.0.0",
                                                      "RUNNING", 1.0, {"scored": 3}))
    wait_until(lambda: {r["type"] for m in bus.telemetry() for r in m["records"]} >= {"log", "health"}, 10)
    healths = [r["body"] for m in bus.telemetry() for r in m["records"] if r["type"] == "health"]
    assert any(h["component"] == "com.windfleet.AnomalyDetector" for h in healths)
    assert any(h["component"] == "com.windfleet.LogForwarder" for h in healths), "its own health too"


@pytest.mark.fault
def test_cloud_down_spools_then_delivers_in_order(make):
    bus, fwd = make(batch_records=20)
    bus.cloud_up = False
    _scores(bus, "gw1-t00", 0, 100)
    _scores(bus, "gw1-t01", 100, 50)
    wait_until(lambda: fwd.counters["cloud_failures"] >= 2, 10)
    assert fwd.spool.records >= 150 and fwd.health_counters()["spooled"] >= 150
    assert bus.score_numbers() == []
    bus.cloud_up = True
    wait_until(lambda: len(bus.score_numbers()) == 150, 20, message="delivery after the link came back")
    assert bus.score_numbers() == list(range(150))
    seqs = [m["seq"] for m in bus.telemetry()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert fwd.spool.records == 0


@pytest.mark.fault
def test_spool_full_drops_oldest_keeps_newest_and_counts(make, caplog):
    bus, fwd = make(batch_records=10, max_records=50)
    wait_until(lambda: bus.cloud, 10, message="its start-up health sent")
    bus.cloud_up = False
    with caplog.at_level(logging.WARNING):
        _scores(bus, "gw1-t00", 0, 10)  # one full batch: built and tried while the link is down
        wait_until(lambda: fwd.counters["cloud_failures"] >= 1, 10)
        _scores(bus, "gw1-t00", 10, 110)
    assert fwd.spool.records == 50
    # The one message built before the link was seen down (the oldest 10 records) is kept
    # whole, so spool drops never cause a sequence gap; the oldest waiting records go.
    assert fwd.spool.dropped_spool_full == 70
    assert fwd.health_counters()["dropped_spool_full"] == 70
    assert any("spool full" in r.getMessage() for r in caplog.records)
    bus.cloud_up = True
    wait_until(lambda: len(bus.score_numbers()) == 50, 20)
    delivered = bus.score_numbers()
    assert delivered == delivered[:10] + list(range(80, 120))
    assert delivered[:10] == list(range(10))
    seqs = [m["seq"] for m in bus.telemetry()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap from spool drops"


@pytest.mark.fault
def test_spool_bound_in_bytes(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_records=10**6, max_bytes=10_000)
    body = payloads.encode(score_payload("gw1-t00", 1))
    for _ in range(200):
        spool.add("score", body)
    assert spool.bytes <= 10_000 and spool.records == 10_000 // len(body)
    assert spool.dropped_spool_full == 200 - spool.records
    spool.close()


@pytest.mark.fault
def test_disk_full_drops_oldest_and_keeps_running(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_records=10**6, max_bytes=10**9)
    spool._db.execute("PRAGMA max_page_count=40")  # a tiny 'disk'
    body = payloads.encode(score_payload("gw1-t00", 1))
    for _ in range(2000):
        spool.add("score", body)
    assert 0 < spool.records < 2000
    assert spool.dropped_spool_full + spool.dropped_disk_full > 0
    assert spool.records + spool.dropped_spool_full + spool.dropped_disk_full == 2000
    spool.close()


@pytest.mark.fault
def test_low_disk_stops_the_spool_growing_and_counts_what_it_replaces(tmp_path, monkeypatch):
    """Under ``min_free_bytes`` free the spool stops growing: each new record replaces the
    oldest waiting one, counted in ``dropped_disk_full`` (persisted); the newest are kept."""
    from windfleet.components.forwarder import spool as spool_mod

    free = {"bytes": 10**9}

    class Stat:
        f_frsize = 1

        @property
        def f_bavail(self):
            return free["bytes"]

    monkeypatch.setattr(spool_mod.os, "statvfs", lambda path: Stat())
    spool = Spool(tmp_path / "s.sqlite", max_records=10**6, max_bytes=10**9, min_free_bytes=1000)
    bodies = [payloads.encode(score_payload("gw1-t00", i)) for i in range(300)]
    for body in bodies[:100]:
        assert spool.add("score", body) == 0
    free["bytes"] = 999  # the disk runs low
    for body in bodies[100:]:
        assert spool.add("score", body) == 1
    assert spool.records == 100 and spool.dropped_disk_full == 200 and spool.dropped_spool_full == 0
    message = spool.build("gw1", 1000, 10**9)
    numbers = [r["body"]["window_end_seq"] for r in payloads.decode(message.payload)["records"]]
    assert numbers == list(range(200, 300)), "the newest kept"
    spool.close()
    assert Spool(tmp_path / "s.sqlite").dropped_disk_full == 200


@pytest.mark.fault
@pytest.mark.parametrize("raw, kind", [
    (b"\xff\xfenot json", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"schema_version": 99, "turbine_id": "gw1-t00"}', "schema_version"),
    (b'{"schema_version": 1, "turbine_id": "gw1-t00"}', "missing_field"),
    (b'{"schema_version": 1, "turbine_id": "gw1-t00", "model_version": "1", "window_end_seq": 1, '
     b'"ts": NaN, "feature_errors": {"rps": 1}, "anomaly": false}', "non_finite"),
    (b'{"schema_version": 1, "turbine_id": "gw1-t00", "model_version": "1", "window_end_seq": "x", '
     b'"ts": 1, "feature_errors": {"rps": 1}, "anomaly": false}', "wrong_type"),
    (b"{" + b" " * (1024 * 1024) + b"}", "too_large"),
])
def test_malformed_scores_are_counted_per_kind_and_dropped(make, raw, kind):
    bus, fwd = make()
    bus.deliver(topics.scores("gw1-t00"), raw)
    _scores(bus, "gw1-t00", 0, 3)
    wait_until(lambda: len(bus.score_numbers()) == 3, 10, message="valid scores still forwarded")
    assert fwd.malformed_by_kind == {kind: 1}
    assert fwd.health_counters()["malformed_dropped"] == 1


@pytest.mark.fault
def test_wrong_turbine_in_body_and_bad_health_are_dropped(make, caplog):
    bus, fwd = make()
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            bus.deliver(topics.scores("gw1-t00"), payloads.encode(score_payload("gw1-t01", 1)))
        bus.deliver(topics.health("gw1"), b'{"schema_version": 1, "thing": "gw1"}')
    assert fwd.malformed_by_kind == {"turbine_mismatch": 5, "missing_field": 1}
    logged = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(logged) == 2, "logged once per kind (rate limited)"
    fwd.publish_health()
    health = payloads.decode(bus.local[-1][1])
    assert health["malformed_by_kind"] == {"turbine_mismatch": 5, "missing_field": 1}


@pytest.mark.fault
def test_sequence_survives_restart(make, tmp_path):
    path = tmp_path / "persist.sqlite"
    bus, fwd = make(spool_path=path, batch_records=5)
    _scores(bus, "gw1-t00", 0, 20)
    wait_until(lambda: len(bus.score_numbers()) == 20, 10)
    last = max(m["seq"] for m in bus.telemetry())
    bus.cloud_up = False
    _scores(bus, "gw1-t00", 20, 7)  # left in the spool at stop
    wait_until(lambda: fwd.counters["cloud_failures"] >= 1, 10)
    fwd.stop()
    fwd.spool.close()

    bus2 = MemoryBus(config={"turbines": 2})
    bus2, fwd2 = make(bus=bus2, spool_path=path, batch_records=5)
    _scores(bus2, "gw1-t00", 27, 3)
    wait_until(lambda: len(bus2.score_numbers()) == 10, 10)
    assert bus2.score_numbers() == list(range(20, 30)), "spooled records delivered first"
    seqs = [m["seq"] for m in bus2.telemetry()]
    assert seqs[0] == last + 1 and seqs == list(range(last + 1, last + 1 + len(seqs)))


def test_configuration_update_adds_turbines(make):
    bus, fwd = make()
    assert topics.scores("gw1-t02") not in bus.handlers
    bus.config_handlers[0]({"turbines": 3})
    assert topics.scores("gw1-t02") in bus.handlers
    bus.config_handlers[0]({"turbines": "lots"})  # ignored, logged
    assert len([t for t in bus.handlers if t.endswith("/scores")]) == 3


def test_spool_file_is_wal_sqlite(make, tmp_path):
    bus, fwd = make()
    db = sqlite3.connect(tmp_path / "spool.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_message_the_nucleus_took_stays_spooled_until_the_cloud_confirms_it(make):
    """delivery cloud_ack: PublishToIoTCore succeeding only means the nucleus' (in-memory)
    spooler has it; the record leaves the forwarder's spool when the cloud acknowledges it."""
    bus = MemoryBus(config={"turbines": 2})
    bus.acking = False
    bus, fwd = make(bus=bus, batch_records=10, ack_timeout=0.3)
    _scores(bus, "gw1-t00", 0, 10)
    wait_until(lambda: len(bus.cloud) >= 2, 5)           # sent, then sent again with the same seq
    seqs = [m["seq"] for m in bus.telemetry()]
    assert len(set(seqs)) == 1 and fwd.spool.records >= 10 and fwd.counters["ack_timeouts"] >= 1
    bus.acking = True
    wait_until(lambda: fwd.spool.records == 0, 5)
    assert bus.score_numbers()[-10:] == list(range(10))


def test_a_restart_before_the_cloud_confirmed_loses_nothing(make, tmp_path):
    """The outage-with-a-restart case: the nucleus took the message (and then lost its
    in-memory spooler with the device); the next start sends it again, same seq."""
    path = tmp_path / "restart.sqlite"
    bus = MemoryBus(config={"turbines": 1})
    bus.acking = False
    bus, fwd = make(bus=bus, spool_path=path, batch_records=5, ack_timeout=30)
    _scores(bus, "gw1-t00", 0, 5)
    wait_until(lambda: bus.cloud, 5)
    taken = bus.telemetry()[0]["seq"]
    fwd.stop()
    fwd.spool.close()
    bus2 = MemoryBus(config={"turbines": 1})               # the device came back; the cloud acks again
    bus2, fwd2 = make(bus=bus2, spool_path=path, batch_records=5)
    wait_until(lambda: fwd2.spool.records == 0, 10)
    again = bus2.telemetry()
    assert again[0]["seq"] == taken
    assert [r["body"]["window_end_seq"] for m in again for r in m["records"] if r["type"] == "score"] == list(range(5))


def test_a_nucleus_refusing_the_ack_subscription_costs_no_data_and_no_restart(make):
    """A nucleus configured to run offline refuses SubscribeToIoTCore (aws-greengrass-nucleus
    MqttClient.subscribe: "Device is not configured to connect to AWS"): the forwarder keeps
    running and spooling, and subscribes once the nucleus accepts (asked again every health tick)."""
    class Refusing(MemoryBus):
        refusals = 2

        def subscribe_cloud(self, topic, handler):
            if self.refusals:
                self.refusals -= 1
                raise RuntimeError("ServiceError: Device is not configured to connect to AWS")
            super().subscribe_cloud(topic, handler)

    bus, fwd = make(bus=Refusing(config={"turbines": 1}), batch_records=5, ack_timeout=0.2, health_interval=0.1)
    _scores(bus, "gw1-t00", 0, 5)
    assert fwd.counters["ack_subscribe_failures"] >= 1  # started all the same
    wait_until(lambda: fwd.spool.records == 0, 10)  # acks flow once the subscription is accepted
    assert bus.score_numbers()[-5:] == list(range(5)) and bus.refusals == 0
    assert fwd.health_counters()["ack_subscribe_failures"] == 2


def test_delivery_nucleus_trusts_the_nucleus(make):
    bus = MemoryBus(config={"turbines": 1, "delivery": "nucleus"})
    bus.acking = False
    bus, fwd = make(bus=bus, batch_records=5)
    _scores(bus, "gw1-t00", 0, 5)
    wait_until(lambda: fwd.spool.records == 0 and len(bus.score_numbers()) == 5, 5)
    assert not bus.cloud_handlers  # nothing waits for the cloud's word



def test_a_score_batch_reaches_the_cloud_as_its_per_window_records(make):
    """The detector's one message per turbine per scoring batch: the cloud gets exactly the
    version-1 score records it always stored, in order; a bad batch is dropped whole."""
    bus, fwd = make(batch_records=100)
    features, thresholds = ["rps", "voltage"], [1.0, 2.0]
    ends = list(range(99, 99 + 10 * 30, 10))
    errors = [[0.01 * i, 0.5] for i in range(len(ends))]
    batch = payloads.score_batch("gw1-t01", "1.0.0", features, thresholds, ends, [1.7e9 + e / 20 for e in ends], errors)
    bus.deliver(topics.scores("gw1-t01"), payloads.encode(batch))
    bus.deliver(topics.scores("gw1-t01"), payloads.encode({**batch, "ts": [1.0]}))  # lengths disagree
    bus.deliver(topics.scores("gw1-t00"), payloads.encode(batch))  # another turbine's topic
    wait_until(lambda: len(bus.score_numbers()) == len(ends), 10, message="the batch's windows sent")
    records = [r["body"] for m in bus.telemetry() for r in m["records"] if r["type"] == "score"]
    assert records == payloads.score_records(batch)
    assert all(payloads.validate_score(r) and r["schema_version"] == 1 for r in records)
    assert fwd.malformed_by_kind == {"length_mismatch": 1, "turbine_mismatch": 1}
    assert fwd.health_counters()["received"] - fwd.health_counters()["malformed_dropped"] >= len(ends)
