"""The LogForwarder as a real component under a real local nucleus: IoT Core crash and
restart, cloud link cut, kill -9, malformed input, SIGTERM.

The forwarder is the project's own build of com.windfleet.LogForwarder, deployed with
``greengrass-cli deployment create`` semantics on a :class:`~tests.ipc_fixtures.Nucleus`
(a DeviceRuntime on a thread) whose one MQTT connection goes to a Mosquitto standing in
for IoT Core.  The test stands in for the detector: a principal with the detector
recipe's own ``accessControl`` publishing numbered scores over Greengrass IPC.  Local
health is watched over IPC too; what reached the cloud is watched on Mosquitto with the
cloud account, confirming each message as the ingest does.

IoT Core goes away by SIGKILL (:meth:`~windfleet.nucleus.broker.Broker.kill`), as a crash
would: Mosquitto saves nothing, so what it held (the collector's queued messages, its
session) may be gone.  Nothing may be lost all the same: the forwarder's delivery is
``cloud_ack``, a message leaves its spool only once the cloud confirmed it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time

import pytest

from windfleet import payloads, topics
from windfleet.build import build
from tests.ipc_fixtures import Nucleus, recipe_access_control
from tests.mqtt_fixtures import TelemetryCollector, broker, score_payload, wait_until  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(120)]

THING = "gw1"
TURBINES = ["gw1-t00", "gw1-t01"]
FWD, DET = "com.windfleet.LogForwarder", "com.windfleet.AnomalyDetector"
CONFIG = {"turbines": len(TURBINES), "batch_records": 25, "batch_interval_s": 0.2, "health_interval_s": 0.5}


@pytest.fixture(scope="module")
def forwarder_build(tmp_path_factory):
    """``windfleet build`` of the forwarder alone: (build dir, version)."""
    out = tmp_path_factory.mktemp("fwd-build")
    return out, build(out, components=[FWD])[FWD]


@pytest.fixture
def gateway(tmp_path, broker, forwarder_build):  # noqa: F811
    """A nucleus connected to the IoT Core stand-in, a cloud-side collector, the detector's
    stand-in and a local health watcher.  ``gw.start(**config)`` deploys the forwarder."""
    credentials = broker.add_device(THING, TURBINES)
    collector = TelemetryCollector(broker)  # subscribed before anything is sent
    nucleus = None
    try:
        nucleus = Nucleus(THING, tmp_path / "device", broker=broker, credentials=credentials)
        build_dir, version = forwarder_build

        class Gateway:
            def start(self, **config) -> None:
                nucleus.deploy(build_dir, {FWD: version}, {FWD: {"MERGE": {**CONFIG, **config}}})
                wait_forwarder_ready(self)

        gw = Gateway()
        gw.nucleus, gw.collector, gw.broker = nucleus, collector, broker
        gw.spool = nucleus.root / "work" / FWD / "spool.sqlite"
        gw.detector = nucleus.publisher(DET, recipe_access_control(DET))
        gw.local = nucleus.watcher(topics.health(THING))
        yield gw
    finally:
        if nucleus is not None:
            nucleus.stop()
        collector.close()


def publish_scores(gw, numbers, pause: float = 0.0) -> None:
    """The detector's stand-in: score ``n`` of turbine ``n % 2`` for each number."""
    for n in numbers:
        tid = TURBINES[n % 2]
        gw.detector.publish(topics.scores(tid), payloads.encode(score_payload(tid, n)))
        if pause:
            time.sleep(pause)


def local_health(gw, since: float = 0.0, after_ts: float = 0.0) -> list[dict]:
    """The forwarder's health on local pub/sub: arrived at or after ``since`` (monotonic),
    published after ``after_ts`` (wall clock)."""
    out = []
    for _, data, at in gw.local.snapshot():
        body = json.loads(data)
        if body["component"] == FWD and at >= since and body["ts"] > after_ts:
            out.append(body)
    return out


def cloud_health(collector: TelemetryCollector) -> list[dict]:
    return [r["body"] for r in collector.records(THING, "health") if r["body"]["component"] == FWD]


def score_numbers(collector: TelemetryCollector) -> list[int]:
    return [r["body"]["window_end_seq"] for r in collector.records(THING, "score")]


def wait_forwarder_ready(gw, after_ts: float = 0.0) -> float:
    """Its health on local pub/sub: it runs and its subscriptions are in place (it subscribes
    before its first health).  Returns when that was seen (monotonic)."""
    wait_until(lambda: local_health(gw, after_ts=after_ts), 30, interval=0.01, message="the forwarder's health")
    return time.monotonic()


def spooled_numbers(path) -> set[int]:
    """Score numbers in the forwarder's SQLite spool (waiting records and the unacknowledged outbox)."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        out = {json.loads(body)["window_end_seq"] for (body,) in
               db.execute("SELECT body FROM records WHERE type = 'score'")}
        for (payload,) in db.execute("SELECT payload FROM outbox"):
            out |= {r["body"]["window_end_seq"] for r in json.loads(payload)["records"] if r["type"] == "score"}
        return out
    finally:
        db.close()


def test_iot_core_restart_mid_stream_loses_no_telemetry(gateway, caplog):
    """The device's one MQTT connection is the nucleus' (developer guide, "Publish/subscribe
    AWS IoT Core MQTT messages"): when IoT Core crashes mid-stream (SIGKILL) and comes back
    the nucleus reconnects and resends from its spooler, the forwarder resends what the cloud
    never confirmed, and nothing is lost."""
    gw = gateway
    caplog.set_level(logging.INFO, logger="windfleet.nucleus.iotcore")
    gw.start()
    total = 600
    sender = threading.Thread(target=publish_scores, args=(gw, range(total), 0.003))
    sender.start()
    wait_until(lambda: len(score_numbers(gw.collector)) >= 100, 30, message="stream flowing")
    gw.broker.kill()  # SIGKILL, as a crash: every connection drops and nothing is saved
    gw.broker.start()
    sender.join(60)
    wait_until(lambda: len(set(score_numbers(gw.collector))) == total, 60, message="every score delivered")
    assert gw.collector.gaps(THING) == [], "no sequence gap"
    assert sorted(set(score_numbers(gw.collector))) == list(range(total))
    assert any(r.getMessage() == "IoT Core connection lost" for r in caplog.records), "the link really dropped"
    assert gw.nucleus.runtime.iot.connected
    # PublishToIoTCore succeeds once the message is in the nucleus' spooler: the outage never
    # reached the forwarder, which kept its process and saw no failed publish.
    wait_until(lambda: local_health(gw) and local_health(gw)[-1]["counters"]["received"] >= total, 30,
               message="the forwarder's counters")
    counters = local_health(gw)[-1]["counters"]
    assert counters["cloud_failures"] == 0 and counters["malformed_dropped"] == 0
    assert gw.nucleus.component(FWD)["restarts"] == 0


def test_cloud_link_down_spools_then_delivers_in_order(gateway):
    """While IoT Core is unreachable the nucleus' spooler takes telemetry until it is full
    (in memory, ``mqtt.spooler.maxSizeInBytes``; developer guide "Greengrass nucleus"
    component configuration); then PublishToIoTCore fails and the forwarder keeps the rest
    in its SQLite spool.  When the link is back everything arrives, in order."""
    gw = gateway
    gw.start()
    publish_scores(gw, range(0, 50))
    wait_until(lambda: len(score_numbers(gw.collector)) == 50, 30)
    # A small spooler, so that a few hundred scores overflow it.  The nucleus option
    # mqtt.spooler.maxSizeInBytes is not applied by the local runtime, hence the attribute.
    gw.nucleus.runtime.iot.max_bytes = 16 * 1024
    gw.broker.kill()  # IoT Core unreachable (SIGKILL: nothing saved)
    since = time.monotonic()
    publish_scores(gw, range(50, 250))

    def forwarder_spooled() -> bool:
        h = local_health(gw, since)
        return bool(h) and h[-1]["counters"]["spooled"] >= 100 and h[-1]["counters"]["cloud_failures"] > 0

    wait_until(forwarder_spooled, 30, message="the forwarder spools once the nucleus' spooler is full")
    iot = gw.nucleus.runtime.iot
    assert iot.spooled() > 0 and iot.counters["refused_spool_full"] > 0
    assert len(score_numbers(gw.collector)) == 50, "nothing reached the cloud while it was down"
    gw.broker.start()
    wait_until(lambda: len(set(score_numbers(gw.collector))) == 250, 60, message="both spools delivered")
    unique = gw.collector.unique(THING)
    numbers = [r["body"]["window_end_seq"] for m in unique for r in m["records"] if r["type"] == "score"]
    assert numbers == list(range(250)), "delivered in sequence order"
    arrival = list(dict.fromkeys(m["seq"] for m in gw.collector.telemetry(THING)))
    assert arrival == sorted(arrival), "the nucleus' spooler first, then the forwarder's, each in order"
    assert gw.collector.gaps(THING) == []
    wait_until(lambda: local_health(gw)[-1]["counters"]["spooled"] < 25, 30, message="the forwarder's spool drained")
    counters = local_health(gw)[-1]["counters"]
    assert counters["dropped_spool_full"] == 0 and counters["dropped_disk_full"] == 0


def test_kill9_mid_stream_then_restart_continues_seq_and_loses_only_what_nobody_received(gateway):
    """kill -9 of the forwarder mid-stream; the nucleus restarts it.  Its SQLite spool
    survives, so every score it had received reaches the cloud and the telemetry sequence
    continues without a gap.  Local pub/sub keeps no queue (developer guide,
    "Publish/subscribe local messages"): scores published while no forwarder subscribed are
    lost -- only those, and every score published after it is back is delivered."""
    gw = gateway
    gw.start()
    started: list[float] = []  # started[n]: when the publish of score n began (monotonic)
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            tid = TURBINES[n % 2]
            started.append(time.monotonic())
            gw.detector.publish(topics.scores(tid), payloads.encode(score_payload(tid, n)))
            n += 1
            time.sleep(0.004)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        wait_until(lambda: len(score_numbers(gw.collector)) >= 150, 30, message="stream flowing")
        t_kill = time.time()
        pid = gw.nucleus.kill9(FWD)
        seq_before = max(gw.collector.seqs(THING))
        # what the killed forwarder had taken: delivered, or committed to its spool
        received = spooled_numbers(gw.spool) | set(score_numbers(gw.collector))
        new_pid = gw.nucleus.wait_restarted(FWD, pid)
        t_ready = wait_forwarder_ready(gw, after_ts=t_kill)
        wait_until(lambda: started[-1] > t_ready + 1.0, 30, message="scores published after the restart")
    finally:
        stop.set()
        sender.join(60)
    total = len(started)
    after_ready = {n for n in range(total) if started[n] >= t_ready}
    assert len(after_ready) >= 100
    expected = received | after_ready
    wait_until(lambda: expected <= set(score_numbers(gw.collector)), 60, message="every received score delivered")
    delivered = set(score_numbers(gw.collector))
    lost = set(range(total)) - delivered
    assert lost, "scores published while no forwarder was subscribed are dropped by the nucleus"
    assert min(lost) > max(received), f"lost a score the forwarder had received: {sorted(lost)[:10]}"
    assert max(started[n] for n in lost) < t_ready, "lost a score published after the forwarder was back"
    assert new_pid != pid and gw.nucleus.component(FWD)["restarts"] == 1
    seqs = gw.collector.seqs(THING)
    assert max(seqs) > seq_before and gw.collector.gaps(THING) == [], "the sequence continues without a gap"
    # A resent message repeats its seq with identical records.
    by_seq: dict[int, list] = {}
    for m in gw.collector.telemetry(THING):
        assert by_seq.setdefault(m["seq"], m["records"]) == m["records"]
    print(f"kill -9 of the forwarder: {len(received)} scores it had received, all delivered; {len(lost)} "
          f"published while it was down, lost; {len(after_ready)} published after the restart, all delivered")


def test_malformed_input_counted_and_sigterm_flushes(gateway):
    gw = gateway
    gw.start(batch_interval_s=30)  # only the flush on SIGTERM will send the tail
    bad = [b"not json", b'{"schema_version": 1}', b'{"schema_version": 7}', b"{" + b" " * 300_000 + b"}"]
    for raw in bad:
        gw.detector.publish(topics.scores(TURBINES[0]), raw)
    publish_scores(gw, range(10))
    wait_until(lambda: local_health(gw)[-1]["counters"]["malformed_dropped"] == 4, 10,
               message="the drops counted in the forwarder's health")
    assert score_numbers(gw.collector) == [], "nothing sent before the batch interval"
    # greengrass-cli component stop: the nucleus sends SIGTERM to the component's processes.
    assert gw.nucleus.cli().stop_component_async(component_name=FWD).result(30).stop_status == "SUCCEEDED"
    wait_until(lambda: gw.nucleus.component(FWD).get("state") == "FINISHED", 60, message="the forwarder stopped")
    wait_until(lambda: len(score_numbers(gw.collector)) == 10, 30, message="flushed on SIGTERM")
    assert sorted(score_numbers(gw.collector)) == list(range(10))
    last = cloud_health(gw.collector)[-1]
    assert last["counters"]["malformed_dropped"] == 4
    assert last["malformed_by_kind"] == {"not_json": 1, "missing_field": 1, "schema_version": 1, "too_large": 1}
    final = local_health(gw)[-1]  # published after the flush, before it closed its IPC connection
    assert final["counters"]["malformed_dropped"] == 4 and final["counters"]["sent"] >= 10
    lines = gw.nucleus.log(FWD)
    assert any(line.get("msg") == "forwarder stopped" for line in lines)
    assert sum(1 for line in lines if line.get("msg") == "malformed message dropped") == 4
