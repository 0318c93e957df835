"""Reusable MQTT test helpers: a real Mosquitto per test and a telemetry collector.

Use from any test module::

    from tests.mqtt_fixtures import broker, cloud_broker, TelemetryCollector, wait_until  # noqa: F401

``broker``/``cloud_broker`` are pytest fixtures (importing them into a test module
registers them there).  Every process started here is stopped by a finalizer, also
when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
import pytest

from windfleet import payloads, topics
from windfleet.nucleus.broker import Broker, free_port

REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
               message: str = "condition") -> object:
    """Poll ``predicate`` until truthy (returned) or fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def broker(tmp_path) -> Broker:
    """A running Mosquitto (verbose log, free port) in ``tmp_path/broker``."""
    b = Broker(tmp_path / "broker", port=free_port(), verbose=True)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def cloud_broker(tmp_path) -> Broker:
    """A second Mosquitto standing in for IoT Core, so a test can cut the cloud link."""
    b = Broker(tmp_path / "cloud", port=free_port(), verbose=True)
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A plain paho client collecting (topic, payload bytes) — the test's own eyes."""

    def __init__(self, host: str, port: int, user: str, password: str, topic_filter: str = "#",
                 client_id: str | None = None, clean_session: bool = True):
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(0.2, 2)
        self.filter = topic_filter
        self.client.on_connect = lambda c, u, f, rc, p: (not rc.is_failure) and c.subscribe(self.filter, 1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, 15, message=f"subscription to {topic_filter}")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class TelemetryCollector(Subscriber):
    """Cloud-side subscriber of ``windfleet/fleet/+/telemetry`` (persistent session, so a
    broker restart loses nothing), with helpers to check sequence numbers and records."""

    def __init__(self, broker: Broker, topic_filter: str = topics.ALL_TELEMETRY, acking: bool = True):
        user, password = broker.cloud_credentials()
        self.acking = acking  # confirm each message to its forwarder, as the ingest does
        super().__init__(broker.host, broker.port, user, password, topic_filter,
                         client_id=f"collector-{uuid.uuid4().hex[:8]}", clean_session=False)

    def _on_message(self, client, userdata, msg) -> None:
        super()._on_message(client, userdata, msg)
        if self.acking and msg.topic.endswith("/telemetry"):
            from windfleet.nucleus.fleet import confirm
            confirm(client, msg.payload)

    def telemetry(self, thing: str | None = None) -> list[dict]:
        out = []
        for topic, raw in self.snapshot():
            msg = payloads.validate_telemetry(payloads.decode(raw))
            if thing is None or msg["thing"] == thing:
                out.append(msg)
        return out

    def seqs(self, thing: str) -> list[int]:
        return [m["seq"] for m in self.telemetry(thing)]

    def unique(self, thing: str) -> list[dict]:
        """Messages deduplicated by seq (a resend after a crash repeats a seq), in seq order."""
        by_seq = {}
        for m in self.telemetry(thing):
            by_seq.setdefault(m["seq"], m)
        return [by_seq[s] for s in sorted(by_seq)]

    def records(self, thing: str, kind: str | None = None) -> list[dict]:
        return [r for m in self.unique(thing) for r in m["records"] if kind is None or r["type"] == kind]

    def gaps(self, thing: str) -> list[int]:
        seqs = sorted({m["seq"] for m in self.telemetry(thing)})
        return [s for s in range(1, (seqs[-1] if seqs else 0) + 1) if s not in set(seqs)]


def score_payload(turbine: str, n: int) -> dict:
    """A valid score whose ``window_end_seq`` numbers it, so tests can check order and loss."""
    return payloads.score(turbine, time.time(), "1.0.0", n, {"rps": 0.1, "voltage": 0.2},
                          {"rps": 1.0, "voltage": 1.0})


def device_env(broker: Broker, thing: str, cloud: Broker | None = None,
               config_file: Path | None = None) -> dict[str, str]:
    """The environment the local runtime gives a component of ``thing``."""
    user, password = broker.credentials(thing)
    env = dict(os.environ)
    env.update(WINDFLEET_THING=thing, WINDFLEET_BROKER=broker.url, WINDFLEET_BROKER_USER=user,
               WINDFLEET_BROKER_PASSWORD=password, PYTHONUNBUFFERED="1")
    env.pop("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", None)
    env.pop("SVCUID", None)
    if cloud is not None:
        env["WINDFLEET_CLOUD_BROKER"] = cloud.url
    if config_file is not None:
        env["WINDFLEET_CONFIG_FILE"] = str(config_file)
    return env


def write_config(path: Path, config: dict) -> None:
    """Replace a component's configuration file atomically, as the runtime does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)


class Process:
    """A component as a real child process, with its stdout in a log file; always cleaned up."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._fh = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._fh.close()

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        return lines


@pytest.fixture
def processes():
    """Collects :class:`Process` objects; all are killed at teardown."""
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.kill9()
