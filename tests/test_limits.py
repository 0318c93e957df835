"""Byte limits, each hit for real and counted: the broker's (Mosquitto ``message_size_limit`` /
``max_packet_size``), the IPC server's frame limit and the ingest's own message limit."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from windfleet import payloads, topics
from windfleet.cloud.ingest import MAX_MESSAGE_BYTES, TelemetryStore, lambda_handler
from windfleet.nucleus import eventstream as es
from windfleet.nucleus.broker import MAX_PACKET_SIZE, MESSAGE_SIZE_LIMIT
from windfleet.nucleus.ipc import IpcServer
from tests.lambda_fixtures import logs_client  # noqa: F401 - fixture
from tests.mqtt_fixtures import Subscriber, broker, wait_until  # noqa: F401  (broker is a fixture)

pytestmark = pytest.mark.timeout(90)


def test_the_limits_agree_with_iot_core():
    # IoT Core: a publish payload is at most 128 KB.  The stand-in broker and the ingest agree.
    assert MESSAGE_SIZE_LIMIT == MAX_MESSAGE_BYTES == 128 * 1024
    assert MAX_PACKET_SIZE > MESSAGE_SIZE_LIMIT
    assert es.MAX_MESSAGE == 24 * 1024 * 1024  # the nucleus' event-stream frame limit


# ---------------------------------------------------------------- broker
class _Publisher:
    """gw1's own MQTT 3.1.1 client, recording PUBACKs and disconnections."""

    def __init__(self, b, thing: str):
        self.pubacks: list[int] = []
        self.disconnects: list[str] = []
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{thing}-limits",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(*b.credentials(thing))
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.append(mid)
        self.client.on_disconnect = lambda c, u, f, rc, p: (self.connected.clear(),
                                                            self.disconnects.append(str(rc)))
        self.client.connect(b.host, b.port)
        self.client.loop_start()
        wait_until(self.connected.is_set, 10, message="publisher connected")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.fault
def test_broker_drops_a_payload_over_128k_and_disconnects_a_packet_over_max_packet_size(broker):
    conf = broker.conf_path.read_text()
    assert f"message_size_limit {MESSAGE_SIZE_LIMIT}" in conf and f"max_packet_size {MAX_PACKET_SIZE}" in conf
    broker.add_device("gw1", 1)
    topic = topics.telemetry("gw1")
    cloud = Subscriber(broker.host, broker.port, *broker.cloud_credentials(), topic)
    pub = _Publisher(broker, "gw1")
    try:
        # At the limit: delivered.
        pub.client.publish(topic, b"a" * MESSAGE_SIZE_LIMIT, qos=1).wait_for_publish(10)
        wait_until(lambda: len(cloud.snapshot()) == 1, 10, message="the 128 KiB message")
        # One byte over (MQTT 3.1.1, QoS 1): Mosquitto completes the flow (PUBACK; 3.1.1 has no
        # way to refuse), keeps the client connected, and forwards nothing.
        info = pub.client.publish(topic, b"b" * (MESSAGE_SIZE_LIMIT + 1), qos=1)
        info.wait_for_publish(10)
        assert info.mid in pub.pubacks and pub.connected.is_set() and pub.disconnects == []
        pub.client.publish(topic, b"control", qos=1).wait_for_publish(10)
        wait_until(lambda: cloud.snapshot()[-1][1] == b"control", 10, message="the control message")
        assert [len(p) for _, p in cloud.snapshot()] == [MESSAGE_SIZE_LIMIT, len(b"control")]
        wait_until(lambda: broker.limit_hits()["dropped_too_large"] == 1, 10, message="the drop in the log")

        # A packet over max_packet_size (1 MB here; the issue's was 20 MB): disconnected as soon as
        # its length is read, never buffered, never forwarded.
        pub.client.publish(topic, b"c" * 1_000_000, qos=1)
        wait_until(lambda: pub.disconnects, 10, message="the oversize publisher disconnected")
        pub.client.loop_stop()  # paho would re-send the QoS 1 message on reconnect: disconnected again
        wait_until(lambda: broker.limit_hits()["disconnected_oversize"] >= 1, 10, message="the disconnect logged")
        time.sleep(0.5)
        assert [len(p) for _, p in cloud.snapshot()] == [MESSAGE_SIZE_LIMIT, len(b"control")]
    finally:
        pub.close()
        cloud.close()


# ---------------------------------------------------------------- IPC server
def _prelude(total: int, headers_len: int = 0) -> bytes:
    head = struct.pack(">II", total, headers_len)
    return head + struct.pack(">I", zlib.crc32(head))


def _read_until_eof(sock: socket.socket, timeout: float = 10.0) -> tuple[list, bool]:
    decoder, messages = es.Decoder(), []
    sock.settimeout(timeout)
    while True:
        try:
            data = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            return messages, False
        if not data:
            return messages, True
        messages += decoder.feed(data)


@pytest.mark.fault
def test_ipc_frame_over_the_limit_closes_the_connection_and_is_counted(tmp_path):
    server = IpcServer(tmp_path / "ipc.socket", SimpleNamespace(thing="gw1", authorizer=None))
    server.start()
    try:
        token = server.issue_token("com.example.Greedy")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(server.path))
        sock.sendall(es.rpc_message(es.CONNECT, 0, json.dumps({"authToken": token}).encode()))
        decoder = es.Decoder()
        sock.settimeout(10)
        acks = []
        while not acks:
            acks = decoder.feed(sock.recv(65536))
        assert acks[0].message_type == es.CONNECT_ACK and acks[0].flags & es.CONNECTION_ACCEPTED

        # A frame announcing one byte more than the nucleus' 24 MiB: refused from its prelude.
        sock.sendall(_prelude(es.MAX_MESSAGE + 1) + b"\0" * 4096)
        messages, eof = _read_until_eof(sock)
        assert eof, "the server closes the connection"
        assert [m.message_type for m in messages] == [es.PROTOCOL_ERROR]
        sock.close()
        assert server.counters["frame_too_large"] == 1
        assert server.counters["framing_errors"] == 1

        # A frame at the limit is not a limit hit (only its prelude is sent: nothing is refused).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(server.path))
        sock.sendall(es.rpc_message(es.CONNECT, 0, json.dumps({"authToken": token}).encode()))
        sock.sendall(_prelude(es.MAX_MESSAGE))
        time.sleep(0.3)
        sock.close()
        assert server.counters["frame_too_large"] == 1
    finally:
        server.close()


# ---------------------------------------------------------------- ingest
def _message_of_size(thing: str, seq: int, size: int) -> bytes:
    """A valid telemetry message of exactly ``size`` bytes (padded in a log record)."""
    now = round(time.time(), 3)  # one timestamp, so the padding arithmetic holds

    def build(pad: int) -> bytes:
        record = {"type": "log", "body": payloads.log(thing, "com.example.C", "WARNING", "x" * pad, now)}
        return payloads.encode(payloads.telemetry(thing, seq, now, [record]))
    pad = size - len(build(0))
    raw = build(pad)
    assert len(raw) == size
    return raw


@pytest.mark.fault
def test_ingest_refuses_a_message_over_its_limit_before_decoding(tmp_path, monkeypatch):
    at_limit = _message_of_size("gw1", 1, MAX_MESSAGE_BYTES)
    over = _message_of_size("gw1", 2, MAX_MESSAGE_BYTES + 1)
    assert len(over) < payloads.MAX_PAYLOAD_BYTES  # the ingest's own limit, not the parser's
    decoded = []
    real_decode = payloads.decode
    monkeypatch.setattr(payloads, "decode", lambda raw: decoded.append(len(raw)) or real_decode(raw))
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        assert store.ingest(at_limit, source_thing="gw1") == "stored"
        assert store.ingest(over, source_thing="gw1") == "malformed:too_large"
        assert store.ingest(b"{" * 20_000_000, source_thing="gw1") == "malformed:too_large"
        assert decoded == [MAX_MESSAGE_BYTES], "an oversized message is never parsed"
        assert store.counters()["malformed:too_large"] == 2
        assert store.loss()["gw1"] == {**store.loss()["gw1"], "received": 1, "max_seq": 1}


@pytest.mark.fault
def test_lambda_refuses_a_message_over_the_limit(logs_client, capsys):
    logs_client.create_log_group(logGroupName="/wf/limits")
    over = json.loads(_message_of_size("gw1", 3, MAX_MESSAGE_BYTES + 100))
    result = lambda_handler({**over, "source_thing": "gw1"}, None, logs_client=logs_client, log_group="/wf/limits")
    assert result == {"dropped": "too_large"}
    assert logs_client.filter_log_events(logGroupName="/wf/limits")["events"] == []
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["kind"] == "too_large" and line["source_thing"] == "gw1"
