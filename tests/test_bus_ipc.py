"""The Greengrass IPC bus against a fake GreengrassCoreIPCClientV2, asserting on the SDK's
real model classes (they compare by value), as AWS's component templates test theirs."""

from __future__ import annotations

import json
import threading

import pytest
from awsiot.greengrasscoreipc.model import (
    QOS,
    BinaryMessage,
    ConfigurationUpdateEvent,
    ConfigurationUpdateEvents,
    GetConfigurationResponse,
    JsonMessage,
    MessageContext,
    PublishMessage,
    PublishToIoTCoreResponse,
    PublishToTopicResponse,
    ReportedLifecycleState,
    SubscribeToConfigurationUpdateResponse,
    SubscribeToTopicResponse,
    SubscriptionResponseMessage,
    UpdateStateResponse,
)

from windfleet import payloads, topics
from windfleet.components.bus import connect
from windfleet.components.bus.ipc import IpcBus
from tests.mqtt_fixtures import wait_until


class FakeOperation:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class FakeIPCClientV2:
    """The ClientV2 methods the bus uses, recording calls; streams are driven by the test."""

    def __init__(self, config: dict | None = None, fail_iot_core: bool = False):
        self.published: list[tuple[str, PublishMessage]] = []
        self.iot_core: list[dict] = []
        self.states: list[str] = []
        self.streams: dict[str, object] = {}
        self.config_streams: list = []
        self.operations: list[FakeOperation] = []
        self.config = config or {}
        self.fail_iot_core = fail_iot_core
        self.closed = False

    def publish_to_topic(self, *, topic=None, publish_message=None):
        self.published.append((topic, publish_message))
        return PublishToTopicResponse()

    def subscribe_to_topic(self, *, topic=None, receive_mode=None, stream_handler=None,
                           on_stream_event=None, on_stream_error=None, on_stream_closed=None):
        self.streams[topic] = on_stream_event
        op = FakeOperation()
        self.operations.append(op)
        return SubscribeToTopicResponse(), op

    def publish_to_iot_core(self, *, topic_name=None, qos=None, payload=None, **kw):
        if self.fail_iot_core:
            raise RuntimeError("UnauthorizedError")
        self.iot_core.append({"topic_name": topic_name, "qos": qos, "payload": payload})
        return PublishToIoTCoreResponse()

    def get_configuration(self, *, component_name=None, key_path=None):
        return GetConfigurationResponse(component_name="com.windfleet.X", value=dict(self.config))

    def subscribe_to_configuration_update(self, *, component_name=None, key_path=None, stream_handler=None,
                                          on_stream_event=None, on_stream_error=None, on_stream_closed=None):
        self.config_streams.append(on_stream_event)
        op = FakeOperation()
        self.operations.append(op)
        return SubscribeToConfigurationUpdateResponse(), op

    def update_state(self, *, state=None):
        self.states.append(state)
        return UpdateStateResponse()

    def close(self):
        self.closed = True


@pytest.fixture
def ipc():
    client = FakeIPCClientV2(config={"turbines": 3})
    bus = IpcBus("com.windfleet.LogForwarder", client, thing="gw1", version="1.0.0")
    yield client, bus
    bus.close()


def test_publish_uses_binary_messages(ipc):
    client, bus = ipc
    bus.publish(topics.scores("gw1-t00"), {"schema_version": 1, "a": 1})
    bus.publish(topics.scores("gw1-t00"), b"raw")
    assert client.published == [
        (topics.scores("gw1-t00"), PublishMessage(binary_message=BinaryMessage(message=b'{"schema_version":1,"a":1}'))),
        (topics.scores("gw1-t00"), PublishMessage(binary_message=BinaryMessage(message=b"raw"))),
    ]


def test_subscribe_delivers_binary_and_json_messages_in_order(ipc):
    client, bus = ipc
    got = []
    done = threading.Event()

    def handler(topic, payload):
        got.append((topic, payload))
        if len(got) == 2:
            done.set()

    bus.subscribe("windfleet/turbines/+/scores", handler)
    stream = client.streams["windfleet/turbines/+/scores"]
    stream(SubscriptionResponseMessage(binary_message=BinaryMessage(
        message=b"bin", context=MessageContext(topic=topics.scores("gw1-t01")))))
    stream(SubscriptionResponseMessage(json_message=JsonMessage(
        message={"k": 1}, context=MessageContext(topic=topics.scores("gw1-t02")))))
    assert done.wait(5)
    assert got[0] == (topics.scores("gw1-t01"), b"bin")
    assert got[1][0] == topics.scores("gw1-t02") and json.loads(got[1][1]) == {"k": 1}


def test_publish_cloud_qos1_and_failure(ipc):
    client, bus = ipc
    assert bus.publish_cloud(topics.telemetry("gw1"), b"batch") is True
    assert client.iot_core == [{"topic_name": topics.telemetry("gw1"), "qos": QOS.AT_LEAST_ONCE, "payload": b"batch"}]
    client.fail_iot_core = True
    assert bus.publish_cloud(topics.telemetry("gw1"), b"batch2") is False


def test_configuration_and_updates(ipc):
    client, bus = ipc
    assert bus.get_configuration() == {"turbines": 3}
    updates = []
    bus.on_configuration_update(updates.append)
    client.config = {"turbines": 5}
    client.config_streams[0](ConfigurationUpdateEvents(configuration_update_event=ConfigurationUpdateEvent(
        component_name="com.windfleet.LogForwarder", key_path=["turbines"])))
    wait_until(lambda: updates, 5)
    assert updates == [{"turbines": 5}]


def test_update_state_reports_lifecycle_and_health(ipc):
    client, bus = ipc
    bus.update_state("RUNNING")
    bus.update_state("ERRORED", reason="digest mismatch")
    assert client.states == [ReportedLifecycleState.RUNNING, ReportedLifecycleState.ERRORED]
    topic, message = client.published[-1]
    assert topic == topics.health("gw1")
    health = payloads.validate_health(payloads.decode(message.binary_message.message))
    assert health["state"] == "ERRORED" and health["reason"] == "digest mismatch"


def test_close_closes_streams_and_client(ipc):
    client, bus = ipc
    bus.subscribe("a/b", lambda t, p: None)
    bus.on_configuration_update(lambda c: None)
    bus.close()
    assert all(op.closed for op in client.operations) and client.closed


def test_connect_picks_ipc_in_the_nucleus_environment(monkeypatch):
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "/tmp/ipc.socket")
    monkeypatch.setenv("SVCUID", "secret")
    monkeypatch.setenv("AWS_IOT_THING_NAME", "gw42")
    fake = FakeIPCClientV2()
    import awsiot.greengrasscoreipc.clientv2 as clientv2
    monkeypatch.setattr(clientv2, "GreengrassCoreIPCClientV2", lambda: fake)
    bus = connect("com.windfleet.AnomalyDetector")
    try:
        assert isinstance(bus, IpcBus) and bus.client is fake and bus.thing_name == "gw42"
    finally:
        bus.close()
