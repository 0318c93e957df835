"""The local Mosquitto broker: authentication, ACL, reload, persistence, foreground serve."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from windfleet import topics
from windfleet.nucleus.broker import AUTOSAVE_INTERVAL_S, Broker, free_port
from tests.mqtt_fixtures import REPO, Subscriber, broker, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def _connack(b: Broker, user: str | None, password: str | None) -> mqtt.ReasonCode:
    """Connect once (no retry) and return the broker's CONNACK reason code."""
    result: dict = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    if user is not None:
        client.username_pw_set(user, password)

    def on_connect(c, u, flags, rc, props):
        result["rc"] = rc
        done.set()

    client.on_connect = on_connect
    client.connect(b.host, b.port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return result["rc"]


def test_credentials_and_files(broker):
    user, password = broker.add_device("gw1", 2)
    assert (user, password) == broker.credentials("gw1")
    assert broker.add_device("gw1", 2) == (user, password), "password is stable"
    creds = json.loads((broker.data_dir / "credentials.json").read_text())
    assert creds["devices"]["gw1"]["turbines"] == ["gw1-t00", "gw1-t01"]
    assert (broker.data_dir / "credentials.json").stat().st_mode & 0o077 == 0
    passwd = (broker.data_dir / "passwd").read_text()
    assert password not in passwd and passwd.startswith(("gw1:", "windfleet-cloud:"))
    conf = broker.conf_path.read_text()
    for line in ("user root", "allow_anonymous false", "persistence true"):
        assert line in conf
    with pytest.raises(ValueError):
        broker.add_device("bad/thing", 1)
    with pytest.raises(KeyError):
        broker.credentials("nobody")


@pytest.mark.fault
def test_anonymous_and_wrong_password_refused(broker):
    user, password = broker.add_device("gw1", 1)
    assert not _connack(broker, user, password).is_failure
    assert _connack(broker, None, None).is_failure
    assert _connack(broker, user, password + "x").is_failure
    assert _connack(broker, "gw2", password).is_failure  # unknown user
    assert not _connack(broker, *broker.cloud_credentials()).is_failure


@pytest.mark.fault
def test_device_cannot_publish_under_another_thing(broker):
    ua, pa = broker.add_device("gwa", 1)
    ub, pb = broker.add_device("gwb", 1)
    cloud = Subscriber(broker.host, broker.port, *broker.cloud_credentials(), "#")
    rogue = Subscriber(broker.host, broker.port, ub, pb, topics.telemetry("gwb"), client_id="gwb-rogue")
    try:
        forged = topics.telemetry("gwa")
        rogue.client.publish(forged, b'{"forged": true}', qos=1).wait_for_publish(5)
        rogue.client.publish(topics.readings("gwa-t00"), b'{"forged": true}', qos=1).wait_for_publish(5)
        # A control message on gwb's own topic proves the path works (and orders after the forgeries).
        rogue.client.publish(topics.telemetry("gwb"), b'{"own": true}', qos=1).wait_for_publish(5)
        wait_until(lambda: any(t == topics.telemetry("gwb") for t, _ in cloud.snapshot()), 10,
                   message="gwb's own message")
        received = [t for t, _ in cloud.snapshot()]
        assert forged not in received
        assert topics.readings("gwa-t00") not in received
        log = wait_until(lambda: "Denied PUBLISH" in broker.log_path.read_text() and broker.log_path.read_text(),
                         10, message="denial in the broker log")
        denials = [line for line in log.splitlines() if "Denied PUBLISH" in line]
        assert any("gwb-rogue" in line and forged in line for line in denials), denials
    finally:
        cloud.close()
        rogue.close()


def test_read_acl_applies_to_wildcard_subscriptions(broker):
    """Mosquitto grants a wildcard subscription but filters each message by the read ACL."""
    ua, pa = broker.add_device("gwa", 1)
    ub, pb = broker.add_device("gwb", 1)
    spy = Subscriber(broker.host, broker.port, ua, pa, "windfleet/turbines/+/scores")
    other = Subscriber(broker.host, broker.port, ub, pb, topics.scores("gwb-t00"))
    own = Subscriber(broker.host, broker.port, ua, pa, topics.scores("gwa-t00"))
    try:
        other.client.publish(topics.scores("gwb-t00"), b"theirs", qos=1).wait_for_publish(5)
        own.client.publish(topics.scores("gwa-t00"), b"mine", qos=1).wait_for_publish(5)
        wait_until(lambda: len(other.snapshot()) == 1 and len(own.snapshot()) == 1, 10, message="deliveries")
        wait_until(lambda: spy.snapshot(), 10, message="spy's own turbine")
        time.sleep(0.3)
        assert spy.snapshot() == [(topics.scores("gwa-t00"), b"mine")]
    finally:
        for s in (spy, other, own):
            s.close()


def test_add_device_reloads_running_broker(broker):
    assert _connack(broker, "gw9", "secret9").is_failure
    broker.add_device("gw9", 1, password="secret9")
    wait_until(lambda: not _connack(broker, "gw9", "secret9").is_failure, 10, message="reload after SIGHUP")
    # Another process (here: a second handle) can add devices to the running broker.
    other = Broker.attach(broker.data_dir)
    assert other is not None and other.port == broker.port
    other.add_device("gw10", 1, password="secret10")
    wait_until(lambda: not _connack(broker, "gw10", "secret10").is_failure, 10, message="reload via attach")


@pytest.mark.fault
def test_persistent_session_survives_a_broker_crash(broker):
    ua, pa = broker.add_device("gwa", 1)
    topic = topics.scores("gwa-t00")
    sub = Subscriber(broker.host, broker.port, ua, pa, topic, client_id="gwa-persist", clean_session=False)
    sub.close()  # offline; the broker keeps its session and queues QoS1 messages
    pub = Subscriber(broker.host, broker.port, ua, pa, topics.health("gwa"))
    pub.client.publish(topic, b"while offline", qos=1).wait_for_publish(5)
    pub.close()
    # a crash, not an orderly stop: SIGKILL once the broker's autosave has run
    time.sleep(AUTOSAVE_INTERVAL_S + 1)
    broker.kill()
    broker.start()
    sub = Subscriber(broker.host, broker.port, ua, pa, topic, client_id="gwa-persist", clean_session=False)
    try:
        wait_until(lambda: (topic, b"while offline") in sub.snapshot(), 10, message="queued message after restart")
    finally:
        sub.close()


def test_start_failure_is_clear(tmp_path, broker):
    clash = Broker(tmp_path / "clash", port=broker.port)  # port taken
    with pytest.raises(Exception, match="did not start"):
        clash.start(timeout=3)


def test_serve_runs_in_foreground_until_sigint(tmp_path):
    port = free_port()
    code = ("import sys; from windfleet.nucleus.broker import serve; "
            f"serve({str(tmp_path / 'b')!r}, port={port})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        assert info["url"] == f"127.0.0.1:{port}"
        b = Broker.attach(tmp_path / "b")
        assert b is not None and not _connack(b, *b.cloud_credentials()).is_failure
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert Broker.attach(tmp_path / "b") is None, "mosquitto stopped with it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
