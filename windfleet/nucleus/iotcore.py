"""The nucleus' one MQTT connection to IoT Core (locally: Mosquitto with this device's account).

Components never connect to the cloud themselves: PublishToIoTCore and
SubscribeToIoTCore go through this connection, as the nucleus' ``MqttClient``
and ``Spool`` do (developer guide, "Publish/subscribe AWS IoT Core MQTT
messages" and the nucleus' ``mqtt.spooler`` options):

* a publish is accepted once it is in the spooler, not on PUBACK;
* the spooler is in memory (``max_bytes``, 2.5 MiB by default) and is lost when
  the nucleus stops;
* a full spooler first drops queued QoS 0 messages, then refuses the publish;
* QoS 0 while offline is refused unless ``keep_qos0_when_offline``;
* subscriptions are renewed on every reconnect;
* a dead link that still looks open (a partition: no FIN, no RST) is noticed by MQTT
  keepalive only: ``mqtt.keepAliveTimeoutMs`` (the nucleus' option; here 30 s unless
  configured).  paho sends a PINGREQ after one keepalive interval of silence and gives up
  one interval later without a PINGRESP, so a partition is noticed within about two
  intervals.  Changing it reconnects, as the nucleus does when its ``mqtt`` options change.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
from typing import Callable

import paho.mqtt.client as mqtt

from windfleet import jsonlog
from windfleet.hostport import parse_hostport

from .authorization import mqtt_topic_matches

log = logging.getLogger("windfleet.nucleus.iotcore")

DEFAULT_SPOOL_BYTES = 2_621_440  # nucleus default mqtt.spooler.maxSizeInBytes
DEFAULT_KEEPALIVE_S = 30  # without mqtt.keepAliveTimeoutMs (the Java nucleus' default is 60,000 ms)


class SpoolFull(Exception):
    """The spooler cannot take the message (the nucleus answers ServiceError)."""


class IotCoreConnection:
    """Spooled publishing and routed subscriptions over one paho client."""

    def __init__(self, thing: str, broker: str, user: str | None = None, password: str | None = None, *,
                 max_bytes: int = DEFAULT_SPOOL_BYTES, keep_qos0_when_offline: bool = False):
        self.thing, self.max_bytes, self.keep_qos0_when_offline = thing, max_bytes, keep_qos0_when_offline
        self._spool: collections.deque[tuple[str, bytes, int]] = collections.deque()
        self._spool_bytes = 0
        self._subs: dict[str, list[Callable[[str, bytes], None]]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._started = False
        self._reconfiguring = False
        self.keepalive = DEFAULT_KEEPALIVE_S  # seconds (paho's unit); see set_keepalive
        self.connected = False
        self.counters = collections.Counter()
        host, port = parse_hostport(broker)
        # Client id = thing name, as the nucleus connects to IoT Core.
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=thing, clean_session=True)
        if user:
            self._client.username_pw_set(user, password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_pre_connect = self._on_pre_connect
        self._client.reconnect_delay_set(0.2, 5)
        self._client.max_queued_messages_set(0)
        self._host, self._port = host, port
        self._sender = threading.Thread(target=self._send_loop, name=f"iotcore-{thing}", daemon=True)

    def start(self) -> None:
        with self._cond:
            self._started = True
        self._client.connect_async(self._host, self._port, keepalive=self.keepalive)
        self._client.loop_start()
        self._sender.start()

    def set_keepalive(self, seconds: int) -> None:
        """``mqtt.keepAliveTimeoutMs`` (in whole seconds, at least 1).  On a running connection
        the change takes a reconnect, as in the nucleus: the socket is shut down, paho's loop
        reconnects and :meth:`_on_pre_connect` puts the new value in the CONNECT."""
        seconds = max(1, int(seconds))
        with self._cond:
            if seconds == self.keepalive:
                return
            self.keepalive = seconds
            started = self._started and not self._closed
        sock = self._client.socket() if started else None
        if sock is None:  # not connected yet, or between connections: the next CONNECT carries it
            return
        with self._cond:
            self._reconfiguring = self.connected  # the disconnect that follows is ours, not a lost link
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        self._sender.join(5)

    # ------------------------------------------------------------ publish
    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Put a message in the spooler; :class:`SpoolFull` when it cannot go in."""
        size = len(payload) + len(topic)
        with self._cond:
            if qos == 0 and not self.connected and not self.keep_qos0_when_offline:
                self.counters["refused_qos0_offline"] += 1
                raise SpoolFull("QoS 0 message refused while offline (keepQos0WhenOffline is false)")
            if self._spool_bytes + size > self.max_bytes:
                kept = collections.deque(m for m in self._spool if m[2] > 0)
                dropped = len(self._spool) - len(kept)
                if dropped:
                    self.counters["dropped_qos0"] += dropped
                    self._spool = kept
                    self._spool_bytes = sum(len(p) + len(t) for t, p, _ in kept)
            if self._spool_bytes + size > self.max_bytes:
                self.counters["refused_spool_full"] += 1
                raise SpoolFull(f"spooler full ({self._spool_bytes} of {self.max_bytes} bytes)")
            self._spool.append((topic, payload, qos))
            self._spool_bytes += size
            self._cond.notify()

    def spooled(self) -> int:
        with self._cond:
            return len(self._spool)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._spool or not self.connected):
                    self._cond.wait(0.5)
                if self._closed:
                    return
                topic, payload, qos = self._spool[0]
            info = self._client.publish(topic, payload, qos=qos)
            if qos > 0:
                try:
                    info.wait_for_publish(5.0)
                except (RuntimeError, ValueError):  # not queued: the connection went away
                    pass
                if not info.is_published():
                    continue  # still first in the spooler: resent after reconnect
            with self._cond:
                if self._spool and self._spool[0][0] is topic and self._spool[0][1] is payload:
                    self._spool.popleft()
                    self._spool_bytes -= len(payload) + len(topic)
                self.counters["published"] += 1

    # ------------------------------------------------------------ subscribe
    def subscribe(self, topic_filter: str, qos: int, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        with self._cond:
            first = topic_filter not in self._subs
            self._subs.setdefault(topic_filter, []).append(callback)
        if first and self.connected:
            self._client.subscribe(topic_filter, qos=max(qos, 1))

        def unsubscribe() -> None:
            with self._cond:
                callbacks = self._subs.get(topic_filter, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                last = not callbacks and self._subs.pop(topic_filter, None) is not None
            if last and self.connected:
                self._client.unsubscribe(topic_filter)
        return unsubscribe

    # ------------------------------------------------------------ paho callbacks
    def _on_pre_connect(self, client, userdata) -> None:  # noqa: ARG002
        # Every (re)connect: paho's keepalive setter refuses while a reconnect is under way,
        # and no ping of the old connection can be pending on a new one.
        client._keepalive = self.keepalive

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ARG002
        if reason_code.is_failure:
            jsonlog.event(log, "IoT Core connection refused", logging.WARNING, thing=self.thing,
                          reason=str(reason_code))
            return
        with self._cond:
            self.connected = True
            filters = list(self._subs)
            self._cond.notify_all()
        for topic_filter in filters:
            client.subscribe(topic_filter, qos=1)
        jsonlog.event(log, "connected to IoT Core", thing=self.thing)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ARG002
        with self._cond:
            was, self.connected = self.connected, False
            reconfiguring, self._reconfiguring = self._reconfiguring, False
        if was and not self._closed:
            if reconfiguring:
                jsonlog.event(log, "reconnecting to IoT Core to apply mqtt options", thing=self.thing,
                              keepalive_s=self.keepalive)
            else:
                jsonlog.event(log, "IoT Core connection lost", logging.WARNING, thing=self.thing,
                              reason=str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ARG002
        with self._cond:
            targets = [cb for f, cbs in self._subs.items() if mqtt_topic_matches(f, msg.topic) for cb in cbs]
        for callback in targets:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:  # noqa: BLE001
                log.exception("IoT Core subscriber failed")
