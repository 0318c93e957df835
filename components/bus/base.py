"""The bus: the one interface edge code uses to talk to the world.

Components publish and subscribe local topics, publish to the cloud, read their
configuration and report their state through a :class:`Bus`; they never import
a transport.  The implementation is :class:`~windfleet.components.bus.ipc.IpcBus`
(Greengrass IPC, under the real nucleus and the local one); tests use fakes.

Threading: every handler (messages and configuration updates) runs on ONE
dispatcher thread per bus, in arrival order, so a component needs no locking
between its own handlers.  A handler that raises is logged (rate limited) and
the message is dropped; it never stops the bus.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
from typing import Any, Callable

from windfleet import jsonlog

Handler = Callable[[str, bytes], None]
ConfigHandler = Callable[[dict], None]

log = logging.getLogger("windfleet.bus")


class Bus(abc.ABC):
    """Publish/subscribe, cloud publish, configuration and state for one component."""

    thing_name: str
    component_name: str

    @abc.abstractmethod
    def publish(self, topic: str, payload: dict | bytes, qos: int = 0) -> None:
        """Publish on the local bus.  A dict is encoded with ``payloads.encode``."""

    @abc.abstractmethod
    def subscribe(self, topic: str, handler: Handler) -> None:
        """Call ``handler(topic, payload_bytes)`` for each message on ``topic`` (may hold MQTT wildcards)."""

    @abc.abstractmethod
    def publish_cloud(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Publish to the cloud (IoT Core).  True once the nucleus took it (in its spooler,
        not yet PUBACKed: on a real nucleus too); False when it refused it (spooler full,
        QoS 0 offline, not authorized).  Never raises."""

    def subscribe_cloud(self, topic: str, handler: Handler) -> None:
        """Call ``handler(topic, payload_bytes)`` for each IoT Core message on ``topic``."""
        raise NotImplementedError(f"{type(self).__name__} cannot subscribe to the cloud")

    @abc.abstractmethod
    def get_configuration(self, component: str | None = None) -> dict:
        """The merged configuration of this component, or of ``component`` (GetConfiguration
        allows reading another component's).  Raises when that component is not deployed."""

    @abc.abstractmethod
    def on_configuration_update(self, handler: ConfigHandler, component: str | None = None) -> None:
        """Call ``handler(new_config)`` whenever the configuration (of ``component``) changes."""

    def on_component_update(self, handler: Callable[[str, str], None]) -> None:
        """Call ``handler(kind, deployment_id)`` (kind ``pre`` or ``post``) for component-update
        events; a transport without them ignores the handler."""

    @abc.abstractmethod
    def update_state(self, state: str, **extra: Any) -> None:
        """Report ``"RUNNING"`` or ``"ERRORED"``; ``extra`` (e.g. ``reason``) goes into the health message."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop delivering, disconnect, join threads.  Idempotent."""

    def __enter__(self) -> "Bus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_bytes(payload: dict | bytes | str) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    from windfleet import payloads
    return payloads.encode(payload)


class Dispatcher:
    """One thread running callbacks in order from a bounded queue.

    ``submit`` blocks when the queue is full: that pushes back on the transport
    (TCP, then the broker's per-session queue) instead of dropping messages or
    growing without bound.
    """

    def __init__(self, name: str, maxsize: int = 10_000):
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._limited = jsonlog.RateLimited(log, interval=30.0)
        self.handler_errors = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bus-dispatch-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, after: Callable[[], Any] | None = None) -> bool:
        """Queue ``fn(*args)``; ``after()`` runs once it returned (e.g. the MQTT ack)."""
        while not self._closed.is_set():
            try:
                self._queue.put((fn, args, after), timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, after = item
            try:
                fn(*args)
            except Exception as exc:  # a bad handler must not stop the bus
                self.handler_errors += 1
                self._limited.warn(f"handler:{type(exc).__name__}", "bus handler raised; message dropped",
                                   error=repr(exc)[:300])
            if after is not None:
                try:
                    after()
                except Exception as exc:
                    self._limited.warn("ack", "bus ack failed", error=repr(exc)[:300])

    def close(self, timeout: float = 10.0) -> None:
        """Finish the callback in progress, discard the rest (unacked: the broker redelivers)."""
        if self._closed.is_set():
            return
        self._closed.set()
        # Drop what has not started: those messages were never acknowledged.
        with self._queue.mutex:
            self._queue.queue.clear()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
