"""The Greengrass IPC bus against a fake GreengrassCoreIPCClientV2, asserting on the SDK's
real model classes (they compare by value), as AWS's component templates test theirs."""

from __future__ import annotations

import json
import threading

import pytest
from awsiot.greengrasscoreipc.model import (
    QOS,
    BinaryMessage,
    ComponentUpdatePolicyEvents,
    ConfigurationUpdateEvent,
    ConfigurationUpdateEvents,
    GetConfigurationResponse,
    PostComponentUpdateEvent,
    PreComponentUpdateEvent,
    JsonMessage,
    MessageContext,
    PublishMessage,
    PublishToIoTCoreResponse,
    PublishToTopicResponse,
    ReportedLifecycleState,
    SubscribeToComponentUpdatesResponse,
    SubscribeToConfigurationUpdateResponse,
    SubscribeToTopicResponse,
    SubscriptionResponseMessage,
    UpdateStateResponse,
)

from windfleet import payloads, topics
from windfleet.components.bus import NotUnderNucleus, connect
from windfleet.components.bus.ipc import IpcBus
from tests.mqtt_fixtures import wait_until


class FakeOperation:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class FakeIPCClientV2:
    """The ClientV2 methods the bus uses, recording calls; streams are driven by the test."""

    def __init__(self, config: dict | None = None, fail_iot_core: bool = False,
                 others: dict[str, dict] | None = None):
        self.published: list[tuple[str, PublishMessage]] = []
        self.iot_core: list[dict] = []
        self.states: list[str] = []
        self.streams: dict[str, object] = {}
        self.config_streams: list = []
        self.config_stream_components: list = []
        self.config_reads: list = []
        self.update_streams: list = []
        self.deferrals: list = []
        self.operations: list[FakeOperation] = []
        self.config = config or {}
        self.others = dict(others or {})  # other components' configuration, by name
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
        self.config_reads.append(component_name)
        if component_name is None:
            return GetConfigurationResponse(component_name="com.windfleet.LogForwarder", value=dict(self.config))
        if component_name not in self.others:
            raise KeyError(f"{component_name} is not deployed")  # the SDK raises ResourceNotFoundError
        return GetConfigurationResponse(component_name=component_name, value=dict(self.others[component_name]))

    def subscribe_to_configuration_update(self, *, component_name=None, key_path=None, stream_handler=None,
                                          on_stream_event=None, on_stream_error=None, on_stream_closed=None):
        self.config_streams.append(on_stream_event)
        self.config_stream_components.append(component_name)
        op = FakeOperation()
        self.operations.append(op)
        return SubscribeToConfigurationUpdateResponse(), op

    def subscribe_to_component_updates(self, *, stream_handler=None, on_stream_event=None, on_stream_error=None,
                                       on_stream_closed=None):
        self.update_streams.append(on_stream_event)
        op = FakeOperation()
        self.operations.append(op)
        return SubscribeToComponentUpdatesResponse(), op

    def update_state(self, *, state=None):
        self.states.append(state)
        return UpdateStateResponse()

    def defer_component_update_async(self, *, deployment_id=None, message=None, recheck_after_ms=None):
        self.deferrals.append((deployment_id, recheck_after_ms))
        return Future()

    def close(self):
        self.closed = True


class Future:
    """The concurrent.futures.Future subset IpcBus uses, resolved at once."""

    def __init__(self, exc: Exception | None = None):
        self._exc = exc

    def exception(self):
        return self._exc

    def add_done_callback(self, fn):
        fn(self)


class AsyncFakeIPCClientV2(FakeIPCClientV2):
    """A client with ``publish_to_topic_async`` (as ClientV2 has): the bus pipelines publishes."""

    def __init__(self, fail_publish: bool = False, **kw):
        super().__init__(**kw)
        self.fail_publish = fail_publish
        self.sync_publishes = 0

    def publish_to_topic(self, **kw):
        self.sync_publishes += 1
        return super().publish_to_topic(**kw)

    def publish_to_topic_async(self, *, topic=None, publish_message=None):
        if self.fail_publish:
            return Future(RuntimeError("UnauthorizedError"))
        self.published.append((topic, publish_message))
        return Future()


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


def test_publish_pipelines_through_the_async_call_and_counts_failures():
    client = AsyncFakeIPCClientV2()
    bus = IpcBus("com.windfleet.TurbineSimulator", client, thing="gw1", version="1.0.0")
    try:
        bus.publish(topics.readings("gw1-t00"), b"r1")
        assert client.published == [(topics.readings("gw1-t00"),
                                     PublishMessage(binary_message=BinaryMessage(message=b"r1")))]
        assert client.sync_publishes == 0 and bus.publish_errors == 0
        client.fail_publish = True
        bus.publish(topics.readings("gw1-t00"), b"r2")  # refused: counted, not raised
        assert bus.publish_errors == 1 and len(client.published) == 1
    finally:
        bus.close()


def test_configuration_of_another_component_and_its_updates():
    client = FakeIPCClientV2(config={"turbines": 3}, others={"com.windfleet.AnomalyModel": {"OnnxSha256": "aa"}})
    bus = IpcBus("com.windfleet.AnomalyDetector", client, thing="gw1", version="1.0.0")
    try:
        assert bus.get_configuration("com.windfleet.AnomalyModel") == {"OnnxSha256": "aa"}
        assert bus.get_configuration() == {"turbines": 3}
        assert client.config_reads == ["com.windfleet.AnomalyModel", None]
        with pytest.raises(KeyError):
            bus.get_configuration("com.windfleet.NotDeployed")
        updates = []
        bus.on_configuration_update(updates.append, component="com.windfleet.AnomalyModel")
        assert client.config_stream_components == ["com.windfleet.AnomalyModel"]
        client.others["com.windfleet.AnomalyModel"] = {"OnnxSha256": "bb"}
        client.config_streams[0](ConfigurationUpdateEvents(configuration_update_event=ConfigurationUpdateEvent(
            component_name="com.windfleet.AnomalyModel", key_path=["OnnxSha256"])))
        wait_until(lambda: updates, 5)
        # the handler gets the whole configuration of the component it follows, read again
        assert updates == [{"OnnxSha256": "bb"}]
    finally:
        bus.close()


def test_component_update_events_reach_the_handler(ipc):
    client, bus = ipc
    got = []
    bus.on_component_update(lambda kind, dep: got.append((kind, dep)))
    stream = client.update_streams[0]
    stream(ComponentUpdatePolicyEvents(pre_update_event=PreComponentUpdateEvent(deployment_id="d1",
                                                                                is_ggc_restarting=False)))
    stream(ComponentUpdatePolicyEvents(post_update_event=PostComponentUpdateEvent(deployment_id="d1")))
    wait_until(lambda: len(got) == 2, 5)
    assert got == [("pre", "d1"), ("post", "d1")]
    # the nucleus waits for every subscriber's answer (up to the policy timeout): 0 ms = go ahead
    wait_until(lambda: client.deferrals, 5)
    assert client.deferrals == [("d1", 0)]
    bus.close()
    assert all(op.closed for op in client.operations)


def test_a_pre_update_handler_can_defer(ipc):
    client, bus = ipc
    bus.on_component_update(lambda kind, dep: 5000 if kind == "pre" else None)
    client.update_streams[0](ComponentUpdatePolicyEvents(
        pre_update_event=PreComponentUpdateEvent(deployment_id="d2", is_ggc_restarting=False)))
    wait_until(lambda: client.deferrals, 5)
    assert client.deferrals == [("d2", 5000)]


def test_warnings_of_the_process_go_to_the_logs_topic_rate_limited():
    """The LogForwarder's input: components' WARNING+ records on topics.logs(thing)."""
    import logging

    from windfleet.components.bus.logs import BusLogHandler

    client = FakeIPCClientV2()
    bus = IpcBus("com.windfleet.AnomalyDetector", client, thing="gw7")
    handler = BusLogHandler(bus, per_minute=3)
    log = logging.getLogger("windfleet.detector.test")
    log.addHandler(handler)
    try:
        log.info("not forwarded")
        for i in range(5):
            log.warning("model rejected %d", i)
        logging.getLogger("windfleet.bus.ipc").addHandler(handler)
        logging.getLogger("windfleet.bus.ipc").warning("bus trouble")  # never forwarded: no loops
    finally:
        log.removeHandler(handler)
        logging.getLogger("windfleet.bus.ipc").removeHandler(handler)
    sent = [(t, payloads.decode(m.binary_message.message)) for t, m in client.published]
    assert [t for t, _ in sent] == [topics.logs("gw7")] * 3
    assert [b["message"] for _, b in sent] == ["model rejected 0", "model rejected 1", "model rejected 2"]
    assert all(b["level"] == "WARNING" and b["component"] == "com.windfleet.AnomalyDetector" for _, b in sent)
    assert handler.suppressed == 2
    bus.close()


def test_connect_picks_ipc_in_the_nucleus_environment(monkeypatch):
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "/tmp/ipc.socket")
    monkeypatch.setenv("SVCUID", "secret")
    monkeypatch.setenv("AWS_IOT_THING_NAME", "gw42")
    fake = FakeIPCClientV2()
    made = []

    def factory(**kwargs):
        made.append(kwargs)
        return fake

    import awsiot.greengrasscoreipc.clientv2 as clientv2
    monkeypatch.setattr(clientv2, "GreengrassCoreIPCClientV2", factory)
    bus = connect("com.windfleet.AnomalyDetector")
    try:
        assert isinstance(bus, IpcBus) and bus.client is fake and bus.thing_name == "gw42"
        # stream events on the connection's thread, in arrival order
        assert made == [{"executor": None}]
    finally:
        bus.close()


@pytest.mark.parametrize("missing", ["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "SVCUID"])
def test_connect_outside_a_nucleus_refuses(monkeypatch, missing):
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "/tmp/ipc.socket")
    monkeypatch.setenv("SVCUID", "secret")
    monkeypatch.delenv(missing)
    import awsiot.greengrasscoreipc.clientv2 as clientv2
    monkeypatch.setattr(clientv2, "GreengrassCoreIPCClientV2",
                        lambda **kw: pytest.fail("no client may be made outside a nucleus"))
    with pytest.raises(NotUnderNucleus, match=missing):
        connect("com.windfleet.AnomalyDetector")


def test_the_component_version_comes_from_the_recipes_artifacts_path():
    """Setenv WINDFLEET_ARTIFACTS_PATH: "{artifacts:path}" -> .../artifacts/<name>/<version>, on any
    nucleus, whatever version GDK wrote into the recipe; health messages carry it."""
    from windfleet.components.bus.ipc import own_version

    env = {"WINDFLEET_ARTIFACTS_PATH": "/greengrass/v2/packages/artifacts/com.windfleet.LogForwarder/1.4.2/"}
    assert own_version(env) == "1.4.2"
    assert own_version({}) == "0.0.0"
    bus = IpcBus("com.windfleet.LogForwarder", FakeIPCClientV2(), thing="gw1", version=own_version(env))
    bus.update_state("RUNNING", counters={})
    (topic, message), = [(t, m) for t, m in bus.client.published if t == topics.health("gw1")]
    assert payloads.decode(message.binary_message.message)["version"] == "1.4.2"
    bus.close()
