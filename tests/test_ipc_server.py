"""The local nucleus' Greengrass IPC server against the REAL SDK client.

Every test starts a real :class:`~windfleet.nucleus.runtime.DeviceRuntime` (``run()`` on a
background thread, its root in ``tmp_path``) and talks to its Unix socket with
``awsiot.greengrasscoreipc.clientv2.GreengrassCoreIPCClientV2`` exactly as a component
(SVCUID) or greengrass-cli (token from ``<root>/cli_ipc_info/user-<uid>``) would.
Calls go through the ``*_async`` methods with a timeout, so a server that never answers
fails the test instead of hanging it.

References: the Greengrass developer guide pages named per test ("Use the AWS IoT Device
SDK to communicate with the Greengrass nucleus", "Publish/subscribe local messages",
"Publish/subscribe AWS IoT Core MQTT messages", "Interact with component configuration",
"Interact with component lifecycle", "IPC: Greengrass CLI", "Authorize components to
perform IPC operations") and the nucleus sources (aws-greengrass-nucleus
``PubSubIPCEventStreamAgent``, ``MqttProxyIPCAgent``, ``ConfigStoreIPCEventStreamAgent``,
``LifecycleIPCEventStreamAgent``, ``UpdateSystemPolicyService``, aws-greengrass-cli
``CLIEventStreamAgent``), summarised in ``/work/shared/greengrass-ipc.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import awsiot.greengrasscoreipc
import pytest
import yaml
from awsiot.eventstreamrpc import AccessDeniedError
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import (
    QOS,
    BinaryMessage,
    DeploymentStatus,
    FailedUpdateConditionCheckError,
    JsonMessage,
    LifecycleState,
    PublishMessage,
    ReportedLifecycleState,
    ResourceNotFoundError,
    ServiceError,
    UnauthorizedError,
)

from windfleet.nucleus import eventstream as es
from windfleet.nucleus.runtime import DeviceRuntime, Settings
from windfleet.nucleus.sources import DirectorySource
from tests.mqtt_fixtures import Subscriber, broker, wait_until  # noqa: F401  (broker is a fixture)
from tests.test_runtime_helpers import RuntimeThread

CALL_TIMEOUT = 10.0
TESTER = "com.example.Tester"
SLEEPER = "com.example.Sleeper"
ALL_PUBSUB = {"aws.greengrass.ipc.pubsub": {f"{TESTER}:pubsub:1": {
    "policyDescription": "everything", "operations": ["*"], "resources": ["*"]}}}

FAST = Settings(restart_backoff=0.2, stop_grace=3, shutdown_timeout=3, health_timeout=20, deployment_timeout=60,
                poll_interval=0.2)


def call(client: GreengrassCoreIPCClientV2, operation: str, **kwargs):
    """A non-streaming operation via its ``_async`` variant, bounded by CALL_TIMEOUT."""
    return getattr(client, f"{operation}_async")(**kwargs).result(CALL_TIMEOUT)


def subscribe(client: GreengrassCoreIPCClientV2, operation: str, **kwargs):
    """A streaming operation: (response, operation handle), bounded by CALL_TIMEOUT."""
    fut, op = getattr(client, f"{operation}_async")(**kwargs)
    return fut.result(CALL_TIMEOUT), op


def write_recipe(recipe_dir: Path, name: str, version: str, run: str = "exec sleep 600",
                 config: dict | None = None) -> Path:
    """A tiny artifact-less recipe (developer guide, "AWS IoT Greengrass component recipe reference")."""
    recipe_dir.mkdir(parents=True, exist_ok=True)
    recipe = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
              "ComponentPublisher": "tests",
              "ComponentConfiguration": {"DefaultConfiguration": config or {}},
              "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": run}}]}
    path = recipe_dir / f"{name}-{version}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class Nucleus:
    """A DeviceRuntime serving on a thread, plus the IPC clients a test opened (all closed at the end)."""

    def __init__(self, root: Path, thing: str = "ipc-test-core", **kwargs):
        self.root = root
        self.runtime = DeviceRuntime(thing, root, settings=FAST, **kwargs)
        self.recipes = root.parent / "recipes"
        self.artifacts = root.parent / "artifacts"
        self.recipes.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.clients: list[GreengrassCoreIPCClientV2] = []
        self.serving = RuntimeThread(self.runtime)
        info = root / "cli_ipc_info" / f"user-{os.getuid()}"
        wait_until(lambda: info.is_file() and self.runtime.ipc.path.exists(), 15, message="IPC server up")
        data = json.loads(info.read_text())
        self.cli_token, self.socket = data["cli_auth_token"], data["domain_socket_path"]
        self._cli: GreengrassCoreIPCClientV2 | None = None

    def client(self, token: str) -> GreengrassCoreIPCClientV2:
        c = GreengrassCoreIPCClientV2(client=awsiot.greengrasscoreipc.connect(ipc_socket=self.socket,
                                                                               authtoken=token, timeout=10))
        self.clients.append(c)
        return c

    def cli(self) -> GreengrassCoreIPCClientV2:
        if self._cli is None:
            self._cli = self.client(self.cli_token)
        return self._cli

    def principal(self, name: str, config: dict) -> str:
        """Give a (non-deployed) principal configuration and policies; returns its SVCUID."""
        rt = self.runtime
        with rt._lock:
            rt.configuration[name] = config
            rt.authorizer.set_component(name, config)
        return rt.ipc.issue_token(name)

    def deploy(self, components: dict[str, str], configuration: dict | None = None) -> str:
        """greengrass-cli ``deployment create --recipeDir --artifactDir --merge``; waits for SUCCEEDED."""
        cli = self.cli()
        resp = call(cli, "create_local_deployment", root_component_versions_to_add=components,
                    recipe_directory_path=str(self.recipes), artifacts_directory_path=str(self.artifacts),
                    component_to_configuration=configuration)
        dep_id = resp.deployment_id

        def done():
            st = call(cli, "get_local_deployment_status", deployment_id=dep_id).deployment.status
            assert st != DeploymentStatus.FAILED, "local deployment failed"
            return st == DeploymentStatus.SUCCEEDED
        wait_until(done, 30, interval=0.1, message=f"local deployment {dep_id} SUCCEEDED")
        return dep_id

    def component(self, name: str):
        with self.runtime._lock:
            return self.runtime.components.get(name)

    def pid(self, name: str) -> int | None:
        with self.runtime._lock:
            c = self.runtime.components.get(name)
            return c.proc.pid if c is not None and c.proc is not None else None

    def stop(self) -> None:
        for c in self.clients:
            try:
                c.close(executor_wait=False)
            except Exception:  # noqa: BLE001 - a dead connection is fine here
                pass
        self.serving.stop()


@pytest.fixture
def nucleus(tmp_path):
    n = Nucleus(tmp_path / "root")
    yield n
    n.stop()


def _collector():
    """(events list, on_stream_event callback)."""
    events: list = []
    return events, events.append


def _sleeper_config(extra_policies: dict | None = None) -> dict:
    return {"accessControl": {"aws.greengrass.ipc.pubsub": {f"{SLEEPER}:pubsub:1": {
        "policyDescription": "own topics", "operations": ["*"], "resources": ["sleeper/*"]}},
        **(extra_policies or {})}}


# ================================================================ local pub/sub
def test_pubsub_json_and_binary_round_trip(nucleus):
    """Developer guide "Publish/subscribe local messages": PublishToTopic/SubscribeToTopic with
    jsonMessage and binaryMessage; the event carries context.topic (PubSubIPCEventStreamAgent)."""
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB}))
    events, on_event = _collector()
    subscribe(c, "subscribe_to_topic", topic="demo/round", on_stream_event=on_event)
    call(c, "publish_to_topic", topic="demo/round",
         publish_message=PublishMessage(json_message=JsonMessage(message={"n": 1, "s": "é"})))
    call(c, "publish_to_topic", topic="demo/round",
         publish_message=PublishMessage(binary_message=BinaryMessage(message=b"\x00\xffbin")))
    wait_until(lambda: len(events) >= 2, 10, message="two pub/sub events")
    # the client runs callbacks on a thread pool: order is not guaranteed
    first = next(e for e in events if e.json_message is not None)
    second = next(e for e in events if e.binary_message is not None)
    assert first.json_message.message == {"n": 1, "s": "é"}
    assert first.json_message.context.topic == "demo/round"
    assert second.binary_message.message == b"\x00\xffbin"
    assert second.binary_message.context.topic == "demo/round"
    assert len(events) == 2


def test_unsubscribe_stops_delivery(nucleus):
    """Closing the stream (operation.close()) unsubscribes ("Publish/subscribe local messages":
    SubscribeToTopic "close the stream to unsubscribe"); a second subscription still gets it."""
    rt = nucleus.runtime
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB}))
    closed_events, on_closed = _collector()
    open_events, on_open = _collector()
    base = rt.ipc.subscriber_count("demo/unsub")
    _, op = subscribe(c, "subscribe_to_topic", topic="demo/unsub", on_stream_event=on_closed)
    subscribe(c, "subscribe_to_topic", topic="demo/unsub", on_stream_event=on_open)
    assert rt.ipc.subscriber_count("demo/unsub") == base + 2
    call(c, "publish_to_topic", topic="demo/unsub",
         publish_message=PublishMessage(json_message=JsonMessage(message={"i": 1})))
    wait_until(lambda: len(closed_events) == 1 and len(open_events) == 1, 10, message="both subscribers got #1")
    op.close().result(CALL_TIMEOUT)
    wait_until(lambda: rt.ipc.subscriber_count("demo/unsub") == base + 1, 10,
               message="server dropped the closed stream")
    call(c, "publish_to_topic", topic="demo/unsub",
         publish_message=PublishMessage(json_message=JsonMessage(message={"i": 2})))
    wait_until(lambda: len(open_events) == 2, 10, message="open subscriber got #2")
    time.sleep(0.3)
    assert [e.json_message.message["i"] for e in closed_events] == [1]


def test_pubsub_keeps_no_queue(nucleus):
    """PubSubIPCEventStreamAgent keeps no queue: a publish with no subscriber succeeds and is
    dropped; a later subscriber gets only what is published after it subscribed."""
    rt = nucleus.runtime
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB}))
    dropped_before = rt.ipc.counters.get("pubsub_no_subscriber", 0)
    resp = call(c, "publish_to_topic", topic="demo/noqueue",
                publish_message=PublishMessage(json_message=JsonMessage(message={"old": True})))
    assert resp is not None
    assert rt.ipc.counters.get("pubsub_no_subscriber", 0) == dropped_before + 1
    events, on_event = _collector()
    subscribe(c, "subscribe_to_topic", topic="demo/noqueue", on_stream_event=on_event)
    time.sleep(0.4)
    assert events == []
    call(c, "publish_to_topic", topic="demo/noqueue",
         publish_message=PublishMessage(json_message=JsonMessage(message={"old": False})))
    wait_until(lambda: events, 10, message="new message")
    time.sleep(0.2)
    assert [e.json_message.message for e in events] == [{"old": False}]


# ================================================================ connect / errors
def test_wrong_svcuid_is_access_denied(nucleus):
    """A CONNECT with an unknown authToken gets CONNECT_ACK without CONNECTION_ACCEPTED; the SDK
    raises AccessDeniedError (developer guide "Use the AWS IoT Device SDK to communicate with the
    Greengrass nucleus"; event-stream-rpc-server's connect handling)."""
    with pytest.raises(AccessDeniedError):
        client = awsiot.greengrasscoreipc.connect(ipc_socket=nucleus.socket, authtoken="NOT-A-VALID-SVCUID",
                                                  timeout=10)
        client.close()
    # the server still serves a good token afterwards
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB}))
    call(c, "publish_to_topic", topic="demo/after",
         publish_message=PublishMessage(json_message=JsonMessage(message=1)))


def test_resource_outside_access_control_is_unauthorized(nucleus):
    """"Authorize components to perform IPC operations": a topic no policy covers is
    UnauthorizedError for both PublishToTopic and SubscribeToTopic (AuthorizationHandler)."""
    policy = {"aws.greengrass.ipc.pubsub": {f"{TESTER}:pubsub:1": {
        "operations": ["aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"],
        "resources": ["allowed/*"]}}}
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": policy}))
    call(c, "publish_to_topic", topic="allowed/x",
         publish_message=PublishMessage(json_message=JsonMessage(message=1)))
    with pytest.raises(UnauthorizedError):
        call(c, "publish_to_topic", topic="secret/x",
             publish_message=PublishMessage(json_message=JsonMessage(message=1)))
    with pytest.raises(UnauthorizedError):
        subscribe(c, "subscribe_to_topic", topic="secret/x", on_stream_event=lambda e: None)
    # '+' is literal for pub/sub resources: a filter must appear in the policy as written
    with pytest.raises(UnauthorizedError):
        subscribe(c, "subscribe_to_topic", topic="secret/+", on_stream_event=lambda e: None)
    assert nucleus.runtime.ipc.counters.get("unauthorized", 0) >= 3


def test_unimplemented_operation_is_service_error(nucleus):
    """An operation this nucleus does not implement (GetSecretValue: the secret manager component
    is not deployed) answers ServiceError instead of leaving the call hanging."""
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB}))
    t0 = time.monotonic()
    with pytest.raises(ServiceError):
        call(c, "get_secret_value", secret_id="arn:aws:secretsmanager:us-east-1:1:secret:x")
    assert time.monotonic() - t0 < 5
    # the connection is still usable afterwards
    call(c, "publish_to_topic", topic="demo/x", publish_message=PublishMessage(json_message=JsonMessage(message=1)))


# ================================================================ load / robustness
def test_one_megabyte_payload_round_trip(nucleus):
    """Event-stream messages may be up to 24 MiB (aws-c-event-stream); a 1 MB binary message
    survives publish -> subscribe intact (base64 in the JSON body)."""
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB}))
    events, on_event = _collector()
    subscribe(c, "subscribe_to_topic", topic="demo/big", on_stream_event=on_event)
    payload = os.urandom(1_000_000)
    call(c, "publish_to_topic", topic="demo/big", publish_message=PublishMessage(
        binary_message=BinaryMessage(message=payload)))
    wait_until(lambda: events, 15, message="1 MB message")
    assert events[0].binary_message.message == payload


def test_fifty_concurrent_subscriptions_on_one_connection(nucleus):
    """Each operation is its own stream on one connection (event-stream RPC); 50 open
    subscription streams each receive the messages of their topic, and only those."""
    c = nucleus.client(nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB}))
    received: dict[int, list] = {i: [] for i in range(50)}
    futures = []
    for i in range(50):
        fut, _op = c.subscribe_to_topic_async(topic=f"demo/many/{i}", on_stream_event=received[i].append)
        futures.append(fut)
    for fut in futures:
        fut.result(CALL_TIMEOUT)
    both, on_both = _collector()
    subscribe(c, "subscribe_to_topic", topic="demo/many/#", on_stream_event=on_both)
    for i in range(50):
        call(c, "publish_to_topic", topic=f"demo/many/{i}",
             publish_message=PublishMessage(json_message=JsonMessage(message={"i": i})))
    wait_until(lambda: all(received.values()) and len(both) == 50, 15, message="all 50 streams received")
    time.sleep(0.2)
    for i, events in received.items():
        assert [e.json_message.message for e in events] == [{"i": i}]
    assert sorted(e.json_message.message["i"] for e in both) == list(range(50))


DYING_CLIENT = r'''
import sys, time
import awsiot.greengrasscoreipc
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
c = GreengrassCoreIPCClientV2(client=awsiot.greengrasscoreipc.connect(ipc_socket=sys.argv[1], authtoken=sys.argv[2]))
c.subscribe_to_topic(topic=sys.argv[3], on_stream_event=lambda e: print("got", flush=True))
print("subscribed", flush=True)
time.sleep(120)
'''


def test_client_killed_mid_stream(nucleus, tmp_path):
    """A component that dies with open streams just closes its socket: the server drops its
    subscriptions and keeps serving everyone else ("a client that dies mid-stream")."""
    rt = nucleus.runtime
    token = nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB})
    base = rt.ipc.subscriber_count("demo/dying")  # the topic's own: another test's stream may still be closing
    script = tmp_path / "dying.py"
    script.write_text(DYING_CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), nucleus.socket, token, "demo/dying"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "subscribed", line
        assert rt.ipc.subscriber_count("demo/dying") == base + 1
        c = nucleus.client(token)
        call(c, "publish_to_topic", topic="demo/dying",
             publish_message=PublishMessage(json_message=JsonMessage(message={"to": "dying"})))
        assert proc.stdout.readline().strip() == "got"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    wait_until(lambda: rt.ipc.subscriber_count("demo/dying") == base, 10,
               message="dead client's subscription dropped")
    # publishing to the dead client's topic still succeeds; other clients are served
    call(c, "publish_to_topic", topic="demo/dying",
         publish_message=PublishMessage(json_message=JsonMessage(message={"to": "nobody"})))
    events, on_event = _collector()
    other = nucleus.client(token)
    subscribe(other, "subscribe_to_topic", topic="demo/alive", on_stream_event=on_event)
    call(c, "publish_to_topic", topic="demo/alive",
         publish_message=PublishMessage(json_message=JsonMessage(message={"to": "alive"})))
    wait_until(lambda: events, 10, message="live subscriber served after the crash")
    assert events[0].json_message.message == {"to": "alive"}


def _raw_read(sock: socket.socket, decoder: es.Decoder, until, deadline: float) -> tuple[list, bool]:
    """Read frames until ``until(messages)`` or EOF or ``deadline``; returns (messages, eof)."""
    messages: list = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
        try:
            data = sock.recv(1 << 20)
        except socket.timeout:
            if until(messages):
                return messages, False
            continue
        if not data:
            return messages, True
        messages += decoder.feed(data)  # a FramingError here is a torn stream: the test fails
        if until(messages):
            return messages, False
    return messages, False


def test_slow_subscriber_never_sees_a_torn_frame(nucleus):
    """A subscriber that stops reading for ``send_timeout`` loses its connection (counted)
    instead of stalling publishers.  A send that timed out part-way through a frame cannot be
    resumed (event-stream framing, aws-c-event-stream), so nothing may be written after it:
    the client sees the frames before, then end of stream, never a valid-looking frame
    spliced onto half of one.  Other clients keep being served."""
    rt = nucleus.runtime
    rt.ipc.send_timeout = 0.3  # applied to connections accepted from now on
    token = nucleus.principal(TESTER, {"accessControl": ALL_PUBSUB})
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(nucleus.socket)
    try:
        decoder = es.Decoder()
        raw.sendall(es.rpc_message(es.CONNECT, 0, json.dumps({"authToken": token}).encode(),
                                   headers={":version": "0.1.0"}))
        msgs, _ = _raw_read(raw, decoder, lambda m: any(x.message_type == es.CONNECT_ACK for x in m),
                            time.monotonic() + 5)
        assert msgs and msgs[0].flags & es.CONNECTION_ACCEPTED
        raw.sendall(es.rpc_message(es.APPLICATION_MESSAGE, 1, json.dumps({"topic": "demo/slow"}).encode(), headers={
            "operation": "aws.greengrass#SubscribeToTopic", "service-model-type": "aws.greengrass#SubscribeToTopicRequest",
            ":content-type": "application/json"}))
        msgs, _ = _raw_read(raw, decoder, lambda m: any(x.stream_id == 1 for x in m), time.monotonic() + 5)
        assert msgs[0].header("service-model-type") == "aws.greengrass#SubscribeToTopicResponse"

        pub = nucleus.client(token)
        big = os.urandom(256 * 1024)
        for _ in range(12):  # the raw reader does not read: its socket buffer fills, a send times out
            call(pub, "publish_to_topic", topic="demo/slow", publish_message=PublishMessage(
                binary_message=BinaryMessage(message=big)))
            if rt.ipc.counters.get("send_timeouts", 0):
                break
        assert rt.ipc.counters.get("send_timeouts", 0) >= 1, "the slow subscriber never timed out"
        # more publishes after the timeout: none of them may reach the torn connection
        call(pub, "publish_to_topic", topic="demo/slow", publish_message=PublishMessage(
            json_message=JsonMessage(message={"marker": True})))

        msgs, eof = _raw_read(raw, decoder, lambda m: False, time.monotonic() + 3)
        assert eof, "the server kept a connection whose last frame it could not finish"
        assert not any(b'"marker"' in m.payload for m in msgs), "a frame was written after a torn one"
        assert all(m.payload == big for m in msgs if m.stream_id == 1), "a delivered frame was corrupt"

        # the publisher (another connection) is unaffected
        listener = nucleus.client(token)
        got = []
        listener.subscribe_to_topic(topic="demo/after", on_stream_event=got.append)
        call(pub, "publish_to_topic", topic="demo/after", publish_message=PublishMessage(
            json_message=JsonMessage(message={"ok": 1})))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got and got[0].json_message.message == {"ok": 1}
    finally:
        raw.close()


# ================================================================ configuration
def test_get_configuration(nucleus):
    """Developer guide "Interact with component configuration" / ConfigStoreIPCEventStreamAgent:
    own configuration, another component's, a leaf key path answers {leaf: value}, and an
    unknown component or key is ResourceNotFoundError."""
    c = nucleus.client(nucleus.principal(TESTER, {"greeting": "hi", "nested": {"a": 1, "b": [1, 2]}}))
    nucleus.principal("com.example.Other", {"color": "blue"})
    own = call(c, "get_configuration")
    assert own.component_name == TESTER
    assert own.value == {"greeting": "hi", "nested": {"a": 1, "b": [1, 2]}}
    other = call(c, "get_configuration", component_name="com.example.Other")
    assert other.component_name == "com.example.Other" and other.value == {"color": "blue"}
    sub = call(c, "get_configuration", key_path=["nested"])
    assert sub.value == {"a": 1, "b": [1, 2]}
    leaf = call(c, "get_configuration", key_path=["nested", "a"])
    assert leaf.value == {"a": 1}
    with pytest.raises(ResourceNotFoundError):
        call(c, "get_configuration", component_name="com.example.DoesNotExist")
    with pytest.raises(ResourceNotFoundError):
        call(c, "get_configuration", key_path=["nested", "missing"])


def test_update_configuration_and_stale_timestamp(nucleus):
    """UpdateConfiguration merges valueToMerge at keyPath; a timestamp older than the key's
    last modification is FailedUpdateConditionCheckError (ConfigStoreIPCEventStreamAgent)."""
    c = nucleus.client(nucleus.principal(TESTER, {"nested": {"a": 1}}))
    now = datetime.datetime.now(datetime.timezone.utc)
    call(c, "update_configuration", key_path=["nested"], value_to_merge={"b": 2}, timestamp=now)
    assert call(c, "get_configuration", key_path=["nested"]).value == {"a": 1, "b": 2}
    call(c, "update_configuration", key_path=["nested"], value_to_merge={"a": 5},
         timestamp=now + datetime.timedelta(seconds=1))
    assert call(c, "get_configuration", key_path=["nested"]).value == {"a": 5, "b": 2}
    with pytest.raises(FailedUpdateConditionCheckError):
        call(c, "update_configuration", key_path=["nested"], value_to_merge={"c": 3},
             timestamp=now - datetime.timedelta(hours=1))
    assert "c" not in call(c, "get_configuration", key_path=["nested"]).value


def test_subscribe_to_configuration_update(nucleus):
    """SubscribeToConfigurationUpdate streams a ConfigurationUpdateEvent (componentName, keyPath)
    after an UpdateConfiguration of a watched key ("Interact with component configuration")."""
    token = nucleus.principal(TESTER, {"nested": {"a": 1}, "other": 0})
    watcher, writer = nucleus.client(token), nucleus.client(token)
    events, on_event = _collector()
    subscribe(watcher, "subscribe_to_configuration_update", key_path=["nested"], on_stream_event=on_event)
    call(writer, "update_configuration", key_path=["nested"], value_to_merge={"a": 2},
         timestamp=datetime.datetime.now(datetime.timezone.utc))
    wait_until(lambda: events, 10, message="configuration update event")
    event = events[0].configuration_update_event
    assert event.component_name == TESTER
    assert event.key_path[:1] == ["nested"]
    assert call(watcher, "get_configuration", key_path=["nested", "a"]).value == {"a": 2}


# ================================================================ lifecycle
def test_update_state_errored_restarts_component(nucleus):
    """Developer guide "Interact with component lifecycle" / Lifecycle.reportState:
    UpdateState(ERRORED) from RUNNING makes the nucleus restart the component."""
    write_recipe(nucleus.recipes, SLEEPER, "1.0.0", config=_sleeper_config())
    nucleus.deploy({SLEEPER: "1.0.0"})
    rt = nucleus.runtime
    wait_until(lambda: nucleus.pid(SLEEPER), 10, message="sleeper running")
    old_pid = nucleus.pid(SLEEPER)
    restarts = rt.status()["components"][SLEEPER]["restarts"]
    c = nucleus.client(rt.svcuids[SLEEPER])
    call(c, "update_state", state=ReportedLifecycleState.ERRORED)
    wait_until(lambda: rt.status()["components"][SLEEPER]["restarts"] == restarts + 1, 10,
               message="restart counted")
    wait_until(lambda: nucleus.component(SLEEPER).state == "RUNNING" and nucleus.pid(SLEEPER) not in (None, old_pid),
               10, message="new process running")
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    # a RUNNING report is accepted and does not restart it
    call(c, "update_state", state=ReportedLifecycleState.RUNNING)
    time.sleep(0.4)
    assert rt.status()["components"][SLEEPER]["restarts"] == restarts + 1


# ================================================================ CLI operations
def test_cli_component_operations(nucleus):
    """IPC: Greengrass CLI (aws-greengrass-cli CLIEventStreamAgent) with the CLI token:
    GetComponentDetails, ListComponents, RestartComponent, StopComponent."""
    write_recipe(nucleus.recipes, SLEEPER, "1.0.0", config=_sleeper_config())
    nucleus.deploy({SLEEPER: "1.0.0"})
    cli = nucleus.cli()
    wait_until(lambda: nucleus.pid(SLEEPER), 10, message="sleeper running")
    details = call(cli, "get_component_details", component_name=SLEEPER).component_details
    assert details.component_name == SLEEPER and details.version == "1.0.0"
    assert details.state == LifecycleState.RUNNING
    assert "accessControl" in details.configuration
    listed = {d.component_name: d for d in call(cli, "list_components").components}
    assert SLEEPER in listed and listed[SLEEPER].version == "1.0.0"
    with pytest.raises(ResourceNotFoundError):
        call(cli, "get_component_details", component_name="com.example.Nope")

    old_pid = nucleus.pid(SLEEPER)
    assert call(cli, "restart_component", component_name=SLEEPER).restart_status == "SUCCEEDED"
    wait_until(lambda: nucleus.pid(SLEEPER) not in (None, old_pid), 10, message="restarted process")

    assert call(cli, "stop_component", component_name=SLEEPER).stop_status == "SUCCEEDED"
    wait_until(lambda: nucleus.component(SLEEPER).state == "FINISHED", 10, message="component stopped")
    assert nucleus.pid(SLEEPER) is None
    assert call(cli, "get_component_details", component_name=SLEEPER).component_details.state == \
        LifecycleState.FINISHED


def test_cli_operations_need_cli_policy(nucleus):
    """"Authorize components to perform IPC operations" (aws.greengrass.Cli): a component
    without a policy for the CLI service gets UnauthorizedError for the CLI operations."""
    write_recipe(nucleus.recipes, SLEEPER, "1.0.0", config=_sleeper_config())
    nucleus.deploy({SLEEPER: "1.0.0"})
    c = nucleus.client(nucleus.runtime.svcuids[SLEEPER])
    with pytest.raises(UnauthorizedError):
        call(c, "get_component_details", component_name=SLEEPER)
    with pytest.raises(UnauthorizedError):
        call(c, "list_components")
    with pytest.raises(UnauthorizedError):
        call(c, "restart_component", component_name=SLEEPER)
    with pytest.raises(UnauthorizedError):
        call(c, "stop_component", component_name=SLEEPER)
    with pytest.raises(UnauthorizedError):
        call(c, "list_local_deployments")
    assert nucleus.component(SLEEPER).state == "RUNNING"
    # with an aws.greengrass.Cli policy the same principal may list
    cli_policy = {"aws.greengrass.Cli": {f"{TESTER}:cli:1": {
        "operations": ["aws.greengrass#ListComponents"], "resources": ["*"]}}}
    t = nucleus.client(nucleus.principal(TESTER, {"accessControl": cli_policy}))
    assert SLEEPER in [d.component_name for d in call(t, "list_components").components]
    with pytest.raises(UnauthorizedError):
        call(t, "stop_component", component_name=SLEEPER)


def test_local_deployment_status_and_list(nucleus):
    """greengrass-cli ``deployment create`` / ``status`` / ``list``: CreateLocalDeployment,
    GetLocalDeploymentStatus (reaches SUCCEEDED), ListLocalDeployments."""
    write_recipe(nucleus.recipes, SLEEPER, "1.0.0", config=_sleeper_config())
    cli = nucleus.cli()
    resp = call(cli, "create_local_deployment", root_component_versions_to_add={SLEEPER: "1.0.0"},
                recipe_directory_path=str(nucleus.recipes), artifacts_directory_path=str(nucleus.artifacts),
                component_to_configuration={SLEEPER: {"MERGE": {"color": "red"}}})
    dep_id = resp.deployment_id
    seen = set()

    def status():
        st = call(cli, "get_local_deployment_status", deployment_id=dep_id).deployment
        assert st.deployment_id == dep_id
        seen.add(st.status)
        return st.status == DeploymentStatus.SUCCEEDED
    wait_until(status, 30, interval=0.05, message="SUCCEEDED")
    assert seen <= {DeploymentStatus.QUEUED, DeploymentStatus.IN_PROGRESS, DeploymentStatus.SUCCEEDED}
    assert nucleus.component(SLEEPER).state == "RUNNING"
    assert nucleus.runtime.configuration[SLEEPER]["color"] == "red"
    listed = call(cli, "list_local_deployments").local_deployments
    assert [(d.deployment_id, d.status) for d in listed] == [(dep_id, DeploymentStatus.SUCCEEDED)]
    assert listed[0].created_on
    with pytest.raises(ResourceNotFoundError):
        call(cli, "get_local_deployment_status", deployment_id="00000000-0000-0000-0000-000000000000")


# ================================================================ component updates
def test_component_update_notify_and_defer(nucleus):
    """SubscribeToComponentUpdates + DeferComponentUpdate (developer guide "Interact with
    component lifecycle", UpdateSystemPolicyService): a cloud deployment with
    componentUpdatePolicy NOTIFY_COMPONENTS sends a preUpdateEvent; a defer with
    recheckAfterMs=1000 makes the nucleus ask again; after the update a postUpdateEvent."""
    write_recipe(nucleus.recipes, SLEEPER, "1.0.0", config=_sleeper_config())
    write_recipe(nucleus.recipes, SLEEPER, "1.0.1", config=_sleeper_config())
    nucleus.deploy({SLEEPER: "1.0.0"})
    rt = nucleus.runtime
    c = nucleus.client(rt.svcuids[SLEEPER])
    events: queue.Queue = queue.Queue()
    subscribe(c, "subscribe_to_component_updates", on_stream_event=events.put)

    source = DirectorySource(nucleus.recipes, nucleus.artifacts, {SLEEPER: "1.0.1"})
    deployment = source.deployment()
    deployment["deploymentId"] = "cloud-notify-1"
    deployment["deploymentPolicies"] = {"failureHandlingPolicy": "DO_NOTHING", "componentUpdatePolicy": {
        "action": "NOTIFY_COMPONENTS", "timeoutInSeconds": 5}}
    result: dict = {}
    applier = threading.Thread(target=lambda: result.update(status=rt.apply(deployment, source=source)),
                               daemon=True)
    t0 = time.monotonic()
    applier.start()

    first = events.get(timeout=10)
    assert first.pre_update_event is not None and first.pre_update_event.deployment_id == "cloud-notify-1"
    call(c, "defer_component_update", deployment_id="cloud-notify-1", message="busy", recheck_after_ms=1000)
    second = events.get(timeout=10)
    t_second = time.monotonic() - t0
    assert second.pre_update_event is not None and second.pre_update_event.deployment_id == "cloud-notify-1"
    assert t_second >= 0.9, "re-notified before recheckAfterMs elapsed"
    assert nucleus.component(SLEEPER).version == "1.0.0", "updated while the component deferred"
    call(c, "defer_component_update", deployment_id="cloud-notify-1", recheck_after_ms=0)  # acknowledge
    third = events.get(timeout=20)
    assert third.post_update_event is not None and third.post_update_event.deployment_id == "cloud-notify-1"
    applier.join(20)
    assert result.get("status") == "SUCCEEDED"
    assert nucleus.component(SLEEPER).version == "1.0.1"
    assert time.monotonic() - t0 < 5, "the acknowledgement did not end the wait"
    assert events.empty()


def test_component_updates_reach_every_subscription(nucleus):
    """LifecycleIPCEventStreamAgent keeps a *set* of SubscribeToComponentUpdates listeners per
    component (componentUpdateListeners: add on subscribe, remove *this* stream on close) and
    sends the PreComponentUpdateEvent to each.  So with two subscriptions of one component,
    closing the first must leave the second subscribed and notified."""
    write_recipe(nucleus.recipes, SLEEPER, "1.0.0", config=_sleeper_config())
    write_recipe(nucleus.recipes, SLEEPER, "1.0.1", config=_sleeper_config())
    nucleus.deploy({SLEEPER: "1.0.0"})
    rt = nucleus.runtime
    first, second = nucleus.client(rt.svcuids[SLEEPER]), nucleus.client(rt.svcuids[SLEEPER])
    first_events: queue.Queue = queue.Queue()
    second_events: queue.Queue = queue.Queue()
    _, first_op = subscribe(first, "subscribe_to_component_updates", on_stream_event=first_events.put)
    subscribe(second, "subscribe_to_component_updates", on_stream_event=second_events.put)
    first_op.close().result(CALL_TIMEOUT)
    time.sleep(0.2)  # let the server process the close

    source = DirectorySource(nucleus.recipes, nucleus.artifacts, {SLEEPER: "1.0.1"})
    deployment = source.deployment()
    deployment["deploymentId"] = "cloud-notify-2"
    deployment["deploymentPolicies"] = {"failureHandlingPolicy": "DO_NOTHING", "componentUpdatePolicy": {
        "action": "NOTIFY_COMPONENTS", "timeoutInSeconds": 3}}
    result: dict = {}
    applier = threading.Thread(target=lambda: result.update(status=rt.apply(deployment, source=source)),
                               daemon=True)
    applier.start()
    try:
        try:
            event = second_events.get(timeout=4)
        except queue.Empty:
            pytest.fail("the remaining subscription got no preUpdateEvent: closing the other stream "
                        "unsubscribed the component entirely")
        assert event.pre_update_event is not None and event.pre_update_event.deployment_id == "cloud-notify-2"
        call(second, "defer_component_update", deployment_id="cloud-notify-2", recheck_after_ms=0)
        post = second_events.get(timeout=20)
        assert post.post_update_event is not None
        assert first_events.empty()
    finally:
        applier.join(30)
    assert result.get("status") == "SUCCEEDED"


# ================================================================ IoT Core
def test_publish_and_subscribe_iot_core(tmp_path, broker):  # noqa: F811 (fixture)
    """Developer guide "Publish/subscribe AWS IoT Core MQTT messages" (MqttProxyIPCAgent):
    PublishToIoTCore goes out over the nucleus' one MQTT connection (a raw paho subscriber with
    the cloud account receives it); SubscribeToIoTCore delivers what the cloud publishes;
    a topic outside the mqttproxy policy is UnauthorizedError."""
    thing = "ipc-iot-core"
    user, password = broker.add_device(thing, 1)
    n = Nucleus(tmp_path / "root", thing=thing, broker=broker.url, broker_user=user, broker_password=password)
    try:
        rt = n.runtime
        wait_until(lambda: rt.iot is not None and rt.iot.connected, 15, message="IoT Core connection")
        telemetry, commands = f"windfleet/fleet/{thing}/telemetry", f"windfleet/fleet/{thing}/commands"
        policy = {"aws.greengrass.ipc.mqttproxy": {f"{TESTER}:mqttproxy:1": {
            "operations": ["aws.greengrass#PublishToIoTCore", "aws.greengrass#SubscribeToIoTCore"],
            "resources": [f"windfleet/fleet/{thing}/+"]}}}
        c = n.client(n.principal(TESTER, {"accessControl": policy}))
        cloud_user, cloud_password = broker.cloud_credentials()
        cloud = Subscriber(broker.host, broker.port, cloud_user, cloud_password, f"windfleet/fleet/{thing}/#")
        try:
            call(c, "publish_to_iot_core", topic_name=telemetry, qos=QOS.AT_LEAST_ONCE, payload=b'{"seq": 1}')
            wait_until(lambda: (telemetry, b'{"seq": 1}') in cloud.snapshot(), 10, message="cloud got telemetry")

            events, on_event = _collector()
            subscribe(c, "subscribe_to_iot_core", topic_name=commands, qos=QOS.AT_LEAST_ONCE,
                      on_stream_event=on_event)

            def delivered():
                cloud.client.publish(commands, b"cmd", qos=1)
                time.sleep(0.2)
                return events
            wait_until(delivered, 10, interval=0, message="IoT Core message through SubscribeToIoTCore")
            assert events[0].message.topic_name == commands and events[0].message.payload == b"cmd"

            with pytest.raises(UnauthorizedError):
                call(c, "publish_to_iot_core", topic_name=f"windfleet/devices/{thing}/x", qos=QOS.AT_MOST_ONCE,
                     payload=b"x")
            with pytest.raises(UnauthorizedError):
                subscribe(c, "subscribe_to_iot_core", topic_name="windfleet/fleet/#", qos=QOS.AT_MOST_ONCE,
                          on_stream_event=lambda e: None)
        finally:
            cloud.close()
    finally:
        n.stop()
