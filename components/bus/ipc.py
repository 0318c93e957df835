"""The bus over Greengrass IPC (``awsiot.greengrasscoreipc.clientv2``).

The client is passed in (``GreengrassCoreIPCClientV2(executor=None)`` under a
nucleus, a fake in tests).  Local messages travel as ``BinaryMessage`` (the bytes
of ``payloads.encode``); a ``JsonMessage`` from another publisher is re-encoded.

Local publishes are pipelined: :meth:`IpcBus.publish` sends and returns without
waiting for the nucleus' reply (about 0.5 ms a round trip); a failed publish is
counted in ``publish_errors`` and logged.  Pub/sub keeps no queue on the nucleus
(developer guide, "Publish/subscribe local messages"): what is published while a
subscriber restarts is lost, so components that must not lose messages stay up
(the detector swaps models in process).

Cloud messages go through ``publish_to_iot_core`` at QoS1 and wait for the reply:
the nucleus answers once the message is in its spooler (not on PUBACK), and
refuses it with ServiceError when the spooler is full.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from awsiot.greengrasscoreipc.model import (
    QOS,
    BinaryMessage,
    IoTCoreMessage,
    PublishMessage,
    ReportedLifecycleState,
    SubscriptionResponseMessage,
)

from windfleet import jsonlog, payloads, topics

from .base import Bus, ConfigHandler, Dispatcher, Handler, to_bytes

log = logging.getLogger("windfleet.bus.ipc")

_STATES = {"RUNNING": ReportedLifecycleState.RUNNING, "ERRORED": ReportedLifecycleState.ERRORED}


class IpcBus(Bus):
    """:class:`Bus` over a ``GreengrassCoreIPCClientV2``-shaped ``client``."""

    close_timeout = 5.0  # seconds close() waits for pipelined publishes

    def __init__(self, component_name: str, client: Any, thing: str | None = None, version: str | None = None):
        self.component_name = component_name
        self.client = client
        self.thing_name = thing or os.environ.get("AWS_IOT_THING_NAME", "unknown-thing")
        self.version = version or own_version()
        self._dispatcher = Dispatcher(component_name)
        self._limited = jsonlog.RateLimited(log, interval=30.0)
        self._operations: list = []
        self._lock = threading.Lock()
        self._closed = False
        self.publish_errors = 0
        self._on_close: list = []
        self._in_flight = 0
        self._drained = threading.Condition()

    # ------------------------------------------------------------ local pub/sub
    def publish(self, topic: str, payload: dict | bytes, qos: int = 0) -> None:
        # Local pub/sub has no QoS: the nucleus delivers in memory.
        message = PublishMessage(binary_message=BinaryMessage(message=to_bytes(payload)))
        publish_async = getattr(self.client, "publish_to_topic_async", None)
        if publish_async is None:
            self.client.publish_to_topic(topic=topic, publish_message=message)
            return
        with self._drained:
            self._in_flight += 1
        publish_async(topic=topic, publish_message=message).add_done_callback(
            lambda future, topic=topic: self._published(future, topic))

    def _published(self, future: Any, topic: str) -> None:
        with self._drained:
            self._in_flight -= 1
            if not self._in_flight:
                self._drained.notify_all()
        exc = future.exception()
        if exc is not None:
            self.publish_errors += 1
            self._limited.warn(f"publish:{type(exc).__name__}", "publish_to_topic failed", topic=topic,
                               error=repr(exc)[:200])

    def subscribe(self, topic: str, handler: Handler) -> None:
        def on_event(event: SubscriptionResponseMessage) -> None:
            if event.binary_message is not None:
                msg_topic = _topic_of(event.binary_message, topic)
                data = bytes(event.binary_message.message or b"")
            elif event.json_message is not None:
                msg_topic = _topic_of(event.json_message, topic)
                data = json.dumps(event.json_message.message).encode()
            else:
                return
            self._dispatcher.submit(handler, msg_topic, data)

        def on_error(error: Exception) -> bool:
            self._limited.warn("stream_error", "IPC subscription stream error", topic=topic, error=repr(error)[:200])
            return False  # keep the stream open

        _, operation = self.client.subscribe_to_topic(topic=topic, on_stream_event=on_event,
                                                      on_stream_error=on_error)
        with self._lock:
            self._operations.append(operation)

    # ------------------------------------------------------------ cloud
    def publish_cloud(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        try:
            self.client.publish_to_iot_core(
                topic_name=topic, qos=QOS.AT_LEAST_ONCE if qos else QOS.AT_MOST_ONCE, payload=to_bytes(payload))
        except Exception as exc:  # the SDK raises on a dropped/failed request: caller keeps the data
            self._limited.warn("publish_cloud", "publish_to_iot_core failed", topic=topic, error=repr(exc)[:200])
            return False
        return True

    def subscribe_cloud(self, topic: str, handler: Handler) -> None:
        def on_event(event: IoTCoreMessage) -> None:
            message = event.message
            if message is not None:
                self._dispatcher.submit(handler, message.topic_name or topic, bytes(message.payload or b""))

        def on_error(error: Exception) -> bool:
            self._limited.warn("iot_stream_error", "IoT Core subscription stream error", topic=topic,
                               error=repr(error)[:200])
            return False

        _, operation = self.client.subscribe_to_iot_core(topic_name=topic, qos=QOS.AT_LEAST_ONCE,
                                                         on_stream_event=on_event, on_stream_error=on_error)
        with self._lock:
            self._operations.append(operation)

    # ------------------------------------------------------------ configuration
    def get_configuration(self, component: str | None = None) -> dict:
        response = (self.client.get_configuration(component_name=component) if component
                    else self.client.get_configuration())
        return dict(response.value or {})

    def on_configuration_update(self, handler: ConfigHandler, component: str | None = None) -> None:
        def on_event(event) -> None:
            # The event names only the changed key path: read the whole configuration again.
            self._dispatcher.submit(lambda: handler(self.get_configuration(component)))

        kwargs = {"component_name": component} if component else {}
        _, operation = self.client.subscribe_to_configuration_update(on_stream_event=on_event, **kwargs)
        with self._lock:
            self._operations.append(operation)

    def on_component_update(self, handler) -> None:
        """``handler(kind, deployment_id)``; for ``pre`` it may return milliseconds to defer.

        Every PreComponentUpdateEvent is answered with DeferComponentUpdate (0 ms: go ahead):
        the nucleus waits for every subscriber's answer up to the policy timeout (60 s by
        default), so a silent subscriber would hold each deployment that long
        (LifecycleIPCEventStreamAgent / UpdateSystemPolicyService)."""
        def pre(deployment_id: str) -> None:
            try:
                defer_ms = int(handler("pre", deployment_id) or 0)
            except Exception as exc:  # noqa: BLE001 - still answer the nucleus
                self._limited.warn("component_update", "update handler raised", error=repr(exc)[:200])
                defer_ms = 0
            self.client.defer_component_update_async(
                deployment_id=deployment_id, recheck_after_ms=max(0, defer_ms),
                message="deferred by the component" if defer_ms > 0 else "ready")

        def on_event(event) -> None:
            if event.pre_update_event is not None:
                self._dispatcher.submit(pre, event.pre_update_event.deployment_id)
            elif event.post_update_event is not None:
                self._dispatcher.submit(handler, "post", event.post_update_event.deployment_id)

        _, operation = self.client.subscribe_to_component_updates(on_stream_event=on_event)
        with self._lock:
            self._operations.append(operation)

    # ------------------------------------------------------------ state
    def update_state(self, state: str, **extra: Any) -> None:
        if state in _STATES:
            self.client.update_state(state=_STATES[state])
        counters = extra.pop("counters", {})
        self.publish(topics.health(self.thing_name),
                     payloads.health(self.thing_name, self.component_name, self.version, state, time.time(),
                                     counters, **extra))

    def on_close(self, fn) -> None:
        """Call ``fn()`` first thing in :meth:`close` (e.g. to detach a log handler)."""
        self._on_close.append(fn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fn in self._on_close:
            fn()
        # Publishes still on the wire would fail once the connection closes: let them land.
        with self._drained:
            self._drained.wait_for(lambda: not self._in_flight, timeout=self.close_timeout)
        with self._lock:
            operations, self._operations = self._operations, []
        for operation in operations:
            try:
                operation.close()
            except Exception:  # already closed by the nucleus
                pass
        self._dispatcher.close()
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


def own_version(env: Any = os.environ) -> str:
    """This component's version: the recipe's Setenv ``WINDFLEET_ARTIFACTS_PATH`` is
    ``{artifacts:path}``, ``.../packages/artifacts/<name>/<version>`` on every nucleus
    (recipe reference, "Recipe variables")."""
    path = env.get("WINDFLEET_ARTIFACTS_PATH")
    if path:
        return os.path.basename(os.path.normpath(path))
    return env.get("WINDFLEET_COMPONENT_VERSION", "0.0.0")


def _topic_of(message: Any, default: str) -> str:
    context = getattr(message, "context", None)
    return getattr(context, "topic", None) or default
