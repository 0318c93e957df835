"""A network partition between a device and IoT Core: a black hole, not a disconnect.

A TCP proxy on 127.0.0.1 sits between the device's nucleus (a :class:`~tests.ipc_fixtures.Nucleus`,
i.e. a DeviceRuntime, whose one MQTT connection goes to ``--broker <proxy>``) and the IoT Core
stand-in (a Mosquitto :class:`~windfleet.nucleus.broker.Broker`).  When the partition starts the
proxy stops forwarding in both directions and closes nothing: no FIN, no RST, every byte
silently dropped, so only MQTT keepalive can notice.  Connections opened during the partition
are accepted and black-holed too (the CONNECT never reaches the broker).

The nucleus runs with ``aws.greengrass.Nucleus`` configuration ``mqtt.keepAliveTimeoutMs``
= 2,000 (deployed like any nucleus option), the real LogForwarder under it and the test as the
detector's stand-in.  The forwarder's delivery is ``cloud_ack``: telemetry leaves its spool only
when the cloud confirms it (the collector confirms each message, as the ingest does), so what
the black hole swallowed is sent again.  The test asserts nothing is lost and prints the time
to detect the partition, measured to the nucleus' ``IoT Core connection lost`` log line.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from windfleet import payloads, topics
from windfleet.build import build
from windfleet.nucleus.broker import free_port
from windfleet.nucleus.deployments import NUCLEUS
from tests.ipc_fixtures import Nucleus, recipe_access_control
from tests.mqtt_fixtures import TelemetryCollector, broker, score_payload, wait_until  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(120)]

THING = "gw1"
TURBINES = ["gw1-t00", "gw1-t01"]
FWD, DET = "com.windfleet.LogForwarder", "com.windfleet.AnomalyDetector"
KEEPALIVE_MS = 2000
PARTITION_S = 8.0


class BlackHoleProxy:
    """A TCP proxy (one thread per connection) that can black-hole every connection: while
    :attr:`partitioned`, whatever either side sends is read and dropped, and nothing is closed.
    A connection that lived through a partition, or was opened during one, stays a black hole
    (its peers have given up on it by then); connections opened after :meth:`heal` forward."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.partitioned = threading.Event()
        self.closed_by_proxy_during_partition = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    def partition(self) -> None:
        self.partitioned.set()

    def heal(self) -> None:
        self.partitioned.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            upstream = None
            if not self.partitioned.is_set():
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                except OSError:  # the broker is down: refuse, as it would
                    client.close()
                    continue
            with self._lock:
                self._sockets += [s for s in (client, upstream) if s is not None]
            t = threading.Thread(target=self._pump, args=(client, upstream), name="proxy-pump", daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, client: socket.socket, upstream: socket.socket | None) -> None:
        peer = {client: upstream, upstream: client} if upstream is not None else {client: None}
        open_ = list(peer)
        dead = upstream is None
        while open_ and not self._stop.is_set():
            readable, _, _ = select.select(open_, [], [], 0.2)
            dead = dead or self.partitioned.is_set()
            for s in readable:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:  # this side closed
                    open_.remove(s)
                    if not dead:  # an ordinary proxy: pass the close on
                        self._close_pair(client, upstream)
                        return
                    continue  # black hole: the other side never hears of it
                if not dead:
                    try:
                        peer[s].sendall(data)
                    except OSError:
                        self._close_pair(client, upstream)
                        return
                # dead: dropped on the floor

    def _close_pair(self, *socks: socket.socket | None) -> None:
        if self.partitioned.is_set():
            self.closed_by_proxy_during_partition += 1
        for s in socks:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(5)
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass


class LogTimes(logging.Handler):
    """(wall time, message, record) of every log record of a logger."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.append(record)

    def first(self, message: str, after: float) -> logging.LogRecord | None:
        with self._lock:
            return next((r for r in self.records if r.getMessage() == message and r.created >= after), None)


@pytest.fixture(scope="module")
def forwarder_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("fwd-build")
    return out, build(out, components=[FWD])[FWD]


def score_numbers(collector: TelemetryCollector) -> list[int]:
    return [r["body"]["window_end_seq"] for r in collector.records(THING, "score")]


def test_partition_is_noticed_by_keepalive_and_loses_nothing(tmp_path, broker, forwarder_build):  # noqa: F811
    iot_log = logging.getLogger("windfleet.nucleus.iotcore")
    times = LogTimes()
    iot_log.addHandler(times)
    level, iot_log.level = iot_log.level, logging.INFO
    credentials = broker.add_device(THING, TURBINES)
    collector = TelemetryCollector(broker)  # confirms every telemetry message (cloud_ack)
    proxy = BlackHoleProxy(broker.host, broker.port)
    nucleus = None
    stop = threading.Event()
    sent: list[int] = []
    sender = None
    try:
        nucleus = Nucleus(THING, tmp_path / "device", broker=SimpleNamespace(url=proxy.url), credentials=credentials)
        iot = nucleus.runtime.iot
        build_dir, version = forwarder_build
        nucleus.deploy(build_dir, {FWD: version}, {
            FWD: {"MERGE": {"turbines": len(TURBINES), "batch_records": 25, "batch_interval_s": 0.2,
                            "health_interval_s": 0.5}},
            NUCLEUS: {"MERGE": {"mqtt": {"keepAliveTimeoutMs": KEEPALIVE_MS}}}})
        # The option took a reconnect; the new CONNECT carries the short keepalive.
        wait_until(lambda: iot.connected and iot._client.keepalive == KEEPALIVE_MS // 1000, 20,
                   message="reconnected with the configured keepalive")
        local = nucleus.watcher(topics.health(THING))
        wait_until(lambda: any(b"LogForwarder" in m[1] for m in local.snapshot()), 30, message="the forwarder's health")
        detector = nucleus.publisher(DET, recipe_access_control(DET))

        def stream() -> None:
            n = 0
            while not stop.is_set():
                tid = TURBINES[n % 2]
                detector.publish(topics.scores(tid), payloads.encode(score_payload(tid, n)))
                sent.append(n)
                n += 1
                time.sleep(0.01)

        sender = threading.Thread(target=stream, name="detector-stand-in")
        sender.start()
        wait_until(lambda: len(score_numbers(collector)) >= 100, 30, message="stream flowing to the cloud")

        t_cut = time.time()
        proxy.partition()
        lost_line = wait_until(lambda: times.first("IoT Core connection lost", t_cut), 4 * KEEPALIVE_MS / 1000 + 10,
                               interval=0.01, message="the nucleus to notice the partition")
        detect_s = lost_line.created - t_cut
        delivered_at_detection = len(set(score_numbers(collector)))
        time.sleep(max(0.0, t_cut + PARTITION_S - time.time()))
        assert not iot.connected, "no connection can be made through the partition"
        proxy.heal()
        t_heal = time.time()
        wait_until(lambda: iot.connected, 30, interval=0.01, message="the nucleus to reconnect after the partition")
        reconnect_s = time.time() - t_heal
        wait_until(lambda: len(sent) > 0 and len(score_numbers(collector)) > delivered_at_detection + 50, 30,
                   message="the stream flowing again")
        stop.set()
        sender.join(30)
        total = len(sent)
        wait_until(lambda: set(score_numbers(collector)) >= set(range(total)), 60, interval=0.2,
                   message="every score delivered after the partition")
    finally:
        stop.set()
        if sender is not None:
            sender.join(30)
        if nucleus is not None:
            nucleus.stop()
        proxy.close()
        collector.close()
        iot_log.removeHandler(times)
        iot_log.level = level

    assert sent == list(range(total))
    assert sorted(set(score_numbers(collector))) == list(range(total)), "nothing lost"
    assert collector.gaps(THING) == [], "no telemetry sequence gap"
    assert proxy.closed_by_proxy_during_partition == 0, "the proxy closed nothing: only keepalive could tell"
    reason = (getattr(lost_line, "fields", None) or {}).get("reason", "")
    assert "keep" in reason.lower(), f"noticed by keepalive, not by a closed socket: {reason!r}"
    # paho pings after one keepalive interval of silence and gives up one interval later (its
    # loop checks once a second; the margin is for a loaded machine)
    assert KEEPALIVE_MS / 1000 * 0.9 <= detect_s <= 2 * KEEPALIVE_MS / 1000 + 3, detect_s
    print(f"partition (black hole, {PARTITION_S:.0f} s) with mqtt.keepAliveTimeoutMs={KEEPALIVE_MS}: "
          f"time to detect {detect_s:.2f} s (nucleus log 'IoT Core connection lost', reason {reason!r}); "
          f"reconnected {reconnect_s:.2f} s after the partition healed; {total} scores sent, all delivered, "
          f"no sequence gap")
