"""The bus over MQTT (paho-mqtt 2.x) to the local Mosquitto, for the local runtime and tests.

Delivery guarantees, and why:

- **Persistent session**: MQTT 3.1.1, ``clean_session=False``, a stable client id
  ``{thing}-{component}`` and QoS1 subscriptions, so the broker queues messages
  while the component restarts (a model swap, a crash) and nothing is missed.
- **Ack after handling**: incoming QoS1 messages are acknowledged only after the
  handler returned (paho ``manual_ack``).  A component killed mid-handler gets the
  message again; whatever a handler stored before the ack is never lost.  The
  broker's in-flight limit then also bounds how much is queued in this process.
- **Early messages are held**: messages that the broker delivers from the session
  before the component called :meth:`subscribe` (they arrive right at connect) are
  held, bounded, and handed over by :meth:`subscribe`, unacknowledged until then.
- **Reconnect**: automatic with exponential backoff (0.2 s .. 5 s); subscriptions are
  renewed on every connect.  QoS1 publishes made while disconnected are queued in
  memory up to ``max_queued`` and sent on reconnect; beyond that, and for QoS0 while
  disconnected, they are dropped and counted in ``stats["publish_dropped"]``.
- **Cloud link**: a second connection to ``WINDFLEET_CLOUD_BROKER`` (IoT Core's stand-in).
  :meth:`publish_cloud` returns True only after the PUBACK, False at once when the
  link is down: the caller (the forwarder) keeps the data until then.
- **Configuration**: ``WINDFLEET_CONFIG_FILE`` (JSON) is polled; the runtime replaces
  it atomically, and every change is handed to the ``on_configuration_update`` handlers.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from windfleet import jsonlog, payloads, topics

from .base import Bus, ConfigHandler, Dispatcher, Handler, to_bytes

log = logging.getLogger("windfleet.bus.mqtt")


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    # MQTTMessageInfo.is_published() raises for a message queued while disconnected
    # (its rc stays NO_CONN even after paho sent it on reconnect): read the flag itself.
    return bool(getattr(info, "_published", False))


def parse_hostport(value: str, default_port: int = 1883) -> tuple[str, int]:
    """``"host:port"`` / ``"host"`` / ``":port"`` -> (host, port)."""
    host, _, port = value.strip().rpartition(":") if ":" in value else (value.strip(), "", "")
    return (host or "127.0.0.1"), int(port or default_port)


class _Connection:
    """One paho client with reconnect, state tracking and rate-limited logging."""

    def __init__(self, name: str, client_id: str, host: str, port: int, user: str | None,
                 password: str | None, *, clean_session: bool, manual_ack: bool,
                 max_inflight: int, max_queued: int, keepalive: int = 30):
        self.name, self.host, self.port = name, host, port
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=mqtt.MQTTv311, manual_ack=manual_ack,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(max_queued)
        self.connected = threading.Event()
        self.generation = 0  # bumped on every successful connect; acks never cross connections
        self.connects = 0
        self.closing = False
        self.on_connected: list = []
        self._limited = jsonlog.RateLimited(log, interval=30.0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.keepalive = keepalive

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()  # its thread retries the first connect too

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._limited.warn(f"{self.name}:refused", "broker refused the connection",
                               link=self.name, broker=f"{self.host}:{self.port}", reason=str(reason_code))
            return
        self.generation += 1
        self.connects += 1
        if self.connects > 1:
            jsonlog.event(log, "reconnected", link=self.name, broker=f"{self.host}:{self.port}",
                          session_present=bool(flags.session_present))
        for fn in self.on_connected:
            fn()
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self.closing:
            return
        self._limited.warn(f"{self.name}:disconnected", "disconnected from broker; reconnecting",
                           link=self.name, broker=f"{self.host}:{self.port}", reason=str(reason_code))

    def stop(self) -> None:
        self.closing = True
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()


class MqttBus(Bus):
    """:class:`Bus` over MQTT.  Prefer :func:`windfleet.components.bus.connect`, which reads the env.

    :param component_name: e.g. ``com.windfleet.LogForwarder`` (part of the client id).
    :param thing: this gateway's thing name.
    :param broker: local broker ``host:port``; ``user``/``password``: this device's account.
    :param cloud_broker: ``host:port`` of the cloud side (defaults to ``broker``), with
        ``cloud_user``/``cloud_password`` (default: the device account).
    :param config_file: JSON file with the component's configuration (watched).
    :param config: initial configuration when there is no file.
    """

    def __init__(self, component_name: str, *, thing: str, broker: str = "127.0.0.1:1883",
                 user: str | None = None, password: str | None = None,
                 cloud_broker: str | None = None, cloud_user: str | None = None,
                 cloud_password: str | None = None, config_file: str | os.PathLike | None = None,
                 config: dict | None = None, client_id: str | None = None, version: str | None = None,
                 max_inflight: int = 100, max_queued: int = 10_000, max_held: int = 10_000,
                 hold_seconds: float = 30.0,
                 config_poll_interval: float = 0.5, cloud_ack_timeout: float = 10.0,
                 connect_timeout: float = 10.0):
        self.component_name = component_name
        self.thing_name = thing
        self.version = version or os.environ.get("WINDFLEET_COMPONENT_VERSION", "0.0.0")
        self.client_id = client_id or f"{thing}-{component_name}"
        self.stats: dict[str, int] = collections.Counter()
        self._lock = threading.RLock()
        self._handlers: dict[str, list[Handler]] = {}
        self._held: collections.deque = collections.deque()
        self._suback_waiters: dict[int, threading.Event] = {}
        self._max_held = max_held
        self._hold_seconds = hold_seconds
        self._unacked_out: collections.deque = collections.deque()
        self._limited = jsonlog.RateLimited(log, interval=30.0)
        self._closed = False
        self._dispatcher = Dispatcher(self.client_id)

        self._broker = parse_hostport(broker)
        self._local = _Connection("local", self.client_id, *self._broker, user, password,
                                  clean_session=False, manual_ack=True,
                                  max_inflight=max_inflight, max_queued=max_queued)
        self._local.on_connected.append(self._resubscribe)
        self._local.client.on_message = self._on_message
        self._local.client.on_subscribe = self._on_subscribe

        self._cloud_args = (parse_hostport(cloud_broker) if cloud_broker else self._broker,
                            cloud_user if cloud_user is not None else user,
                            cloud_password if cloud_password is not None else password)
        self._cloud: _Connection | None = None
        self._cloud_ack_timeout = cloud_ack_timeout
        self._connect_timeout = connect_timeout

        # Configuration
        self._config_file = Path(config_file) if config_file else None
        self._config: dict = copy.deepcopy(config) if config else {}
        self._config_key: tuple | None = None
        self._config_handlers: list[ConfigHandler] = []
        self._config_poll = config_poll_interval
        self._stop = threading.Event()
        if self._config_file is not None:
            self._reload_config(initial=True)
        self._watcher = threading.Thread(target=self._housekeeping, daemon=True,
                                         name=f"bus-housekeeping-{self.client_id}")
        self._watcher.start()

        self._local.start()
        if not self._local.connected.wait(connect_timeout):
            jsonlog.event(log, "broker not reachable yet; retrying in the background", logging.WARNING,
                          broker=broker, client_id=self.client_id)

    # ------------------------------------------------------------ local pub/sub
    def publish(self, topic: str, payload: dict | bytes, qos: int = 0) -> None:
        if self._closed:
            raise RuntimeError("bus is closed")
        info = self._local.client.publish(topic, to_bytes(payload), qos)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
            # QoS>0 while disconnected: paho keeps it and sends it on reconnect.
            self.stats["published"] += 1
            if qos > 0:
                with self._lock:
                    self._unacked_out.append(info)
                    while self._unacked_out and _acked(self._unacked_out[0]):
                        self._unacked_out.popleft()
            return
        self.stats["publish_dropped"] += 1
        self._limited.warn(f"publish:{info.rc}", "publish dropped", topic=topic, qos=qos,
                           reason=mqtt.error_string(info.rc))

    def subscribe(self, topic: str, handler: Handler) -> None:
        with self._lock:
            first = topic not in self._handlers
            self._handlers.setdefault(topic, []).append(handler)
            # Hand over messages the session delivered before this subscribe call.
            held, self._held = self._held, collections.deque()
            for msg, generation in held:
                if mqtt.topic_matches_sub(topic, msg.topic):
                    self._dispatch(msg, generation, [handler])
                else:
                    self._held.append((msg, generation))
        if first:
            # Harmless when disconnected (NO_CONN): _resubscribe runs on every connect.
            # When connected, wait for the SUBACK so that whatever is published after
            # subscribe() returns reaches the handler.
            done = threading.Event()
            with self._lock:
                rc, mid = self._local.client.subscribe(topic, qos=1)
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    self._suback_waiters[mid] = done
            if rc == mqtt.MQTT_ERR_SUCCESS and not done.wait(self._connect_timeout):
                jsonlog.event(log, "no SUBACK yet; the subscription is renewed on reconnect", logging.WARNING,
                              topic=topic)
            with self._lock:
                self._suback_waiters.pop(mid, None)

    def _resubscribe(self) -> None:
        # Runs in paho's thread on every (re)connect: the broker may have lost the session.
        with self._lock:
            filters = list(self._handlers)
        if filters:
            self._local.client.subscribe([(f, 1) for f in filters])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            waiter = self._suback_waiters.get(mid)
        if waiter is not None:
            waiter.set()
        for rc in reason_codes:
            if rc.is_failure:
                self.stats["subscribe_refused"] += 1
                self._limited.warn("subscribe_refused", "broker refused a subscription", reason=str(rc))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.stats["received"] += 1
        generation = self._local.generation
        with self._lock:
            handlers = [h for f, hs in self._handlers.items() if mqtt.topic_matches_sub(f, msg.topic) for h in hs]
            if not handlers:
                if len(self._held) >= self._max_held:
                    old, old_gen = self._held.popleft()
                    self._ack(old, old_gen)
                    self.stats["held_dropped"] += 1
                msg.timestamp = time.monotonic()
                self._held.append((msg, generation))
                return
        self._dispatch(msg, generation, handlers)

    def _dispatch(self, msg: mqtt.MQTTMessage, generation: int, handlers: list[Handler]) -> None:
        topic, payload = msg.topic, msg.payload

        def call() -> None:
            for handler in handlers:
                handler(topic, payload)

        self._dispatcher.submit(call, after=lambda: self._ack(msg, generation))

    def _ack(self, msg: mqtt.MQTTMessage, generation: int) -> None:
        # An ack for a message of an earlier connection could acknowledge a different
        # message with the same id; the broker redelivers the old one instead.
        if msg.qos > 0 and generation == self._local.generation and self._local.connected.is_set():
            self._local.client.ack(msg.mid, msg.qos)

    # ------------------------------------------------------------ cloud
    def _cloud_conn(self) -> _Connection:
        with self._lock:
            if self._cloud is None:
                (host, port), user, password = self._cloud_args
                self._cloud = _Connection("cloud", f"{self.client_id}-cloud", host, port, user, password,
                                          clean_session=True, manual_ack=False, max_inflight=20, max_queued=100)
                self._cloud.start()
                self._cloud.connected.wait(self._connect_timeout)
            return self._cloud

    @property
    def cloud_connected(self) -> bool:
        return self._cloud is not None and self._cloud.connected.is_set()

    def publish_cloud(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        if self._closed:
            return False
        conn = self._cloud_conn()
        if not conn.connected.is_set():
            return False
        info = conn.client.publish(topic, to_bytes(payload), qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        if qos == 0:
            return True
        deadline = time.monotonic() + self._cloud_ack_timeout
        while not _acked(info):
            # Give up early when the link drops: the caller keeps the data and retries.
            if not conn.connected.is_set() or time.monotonic() > deadline or self._closed:
                return False
            info.wait_for_publish(0.1)  # rc is SUCCESS here, so this cannot raise
        return True

    # ------------------------------------------------------------ configuration
    def get_configuration(self) -> dict:
        with self._lock:
            return copy.deepcopy(self._config)

    def on_configuration_update(self, handler: ConfigHandler) -> None:
        with self._lock:
            self._config_handlers.append(handler)

    def _reload_config(self, initial: bool = False) -> None:
        try:
            st = self._config_file.stat()
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._config_key:
            return
        try:
            new = json.loads(self._config_file.read_text())
            if not isinstance(new, dict):
                raise ValueError("configuration is not a JSON object")
        except (OSError, ValueError) as exc:
            self._limited.warn("config", "cannot read configuration file; keeping the last one",
                               path=str(self._config_file), error=str(exc)[:200])
            return
        self._config_key = key
        with self._lock:
            changed, self._config = new != self._config, new
            handlers = list(self._config_handlers)
        if changed and not initial:
            jsonlog.event(log, "configuration updated", path=str(self._config_file))
            for handler in handlers:
                self._dispatcher.submit(handler, copy.deepcopy(new))

    def _housekeeping(self) -> None:
        while not self._stop.wait(self._config_poll):
            if self._config_file is not None:
                self._reload_config()
            self._expire_held()

    def _expire_held(self) -> None:
        # A held message nobody subscribes to (e.g. a turbine removed from the configuration)
        # must not stay unacknowledged forever: it would use up the broker's in-flight
        # window for this session and stall delivery.
        cutoff = time.monotonic() - self._hold_seconds
        expired = 0
        with self._lock:
            while self._held and self._held[0][0].timestamp < cutoff:
                msg, generation = self._held.popleft()
                self._ack(msg, generation)
                expired += 1
        if expired:
            self.stats["held_dropped"] += expired
            self._limited.warn("held_expired", "dropped messages no handler subscribed to", count=expired)

    # ------------------------------------------------------------ state
    def update_state(self, state: str, **extra: Any) -> None:
        counters = extra.pop("counters", {})
        msg = payloads.health(self.thing_name, self.component_name, self.version, state, time.time(),
                              counters, **extra)
        self.publish(topics.health(self.thing_name), msg, qos=1)

    # ------------------------------------------------------------ lifecycle
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every QoS1 publish so far was acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                while self._unacked_out and _acked(self._unacked_out[0]):
                    self._unacked_out.popleft()
                if not self._unacked_out:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        if not self.flush(timeout):
            jsonlog.event(log, "closing with unacknowledged publishes", logging.WARNING,
                          pending=len(self._unacked_out))
        self._closed = True
        self._stop.set()
        self._dispatcher.close()
        self._local.stop()
        if self._cloud is not None:
            self._cloud.stop()

    @property
    def connected(self) -> bool:
        return self._local.connected.is_set()
