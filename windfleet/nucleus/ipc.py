"""Greengrass IPC server of the local nucleus: event-stream RPC over a Unix socket.

The real ``awsiot.greengrasscoreipc.clientv2.GreengrassCoreIPCClientV2`` connects
to it exactly as to the Java nucleus (``../shared/greengrass-ipc.md`` and
``aws-iot-device-sdk-java-v2``'s ``event-stream-rpc-server``): a CONNECT with the
component's SVCUID, then one stream per operation.  Framing lives in
:mod:`.eventstream`; who may do what in :mod:`.authorization`; everything
stateful (configuration, lifecycle, deployments, the IoT Core connection) in the
``host`` passed in (:class:`~.runtime.DeviceRuntime`), so this module is only the
wire and the routing:

* local pub/sub is routed here, in memory.  Like the nucleus'
  ``PubSubIPCEventStreamAgent`` it keeps no queue: a message nobody subscribes to
  is dropped (the publish still succeeds), and a component that reconnects gets
  only what is published after it subscribed again;
* every request gets exactly one reply on its stream; an operation this server
  does not implement answers with ``ServiceError``, a request that cannot be
  decoded with ``InvalidArgumentsError``, so a client never hangs;
* a client that dies mid-stream just closes its connection: its streams go with it.

Byte limit: one event-stream frame is at most :data:`.eventstream.MAX_MESSAGE` (24 MiB, as
the nucleus).  A client that announces a larger frame has its connection closed as soon as the
12-byte prelude is read (the frame is never buffered); counted in ``counters["frame_too_large"]``
(every framing error, that one included, in ``counters["framing_errors"]``) and logged
(rate-limited WARNING ``IPC frame over the limit; closing connection``).

Threading: one thread per connection reads; writes to a connection are
serialised by its lock and time out after ``send_timeout``: a client that stops
reading that long loses its connection (counted) instead of stalling publishers.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from windfleet import jsonlog

from . import authorization as authz
from . import eventstream as es

log = logging.getLogger("windfleet.nucleus.ipc")

PREFIX = "aws.greengrass#"
CLI_CLIENT = "greengrass-cli"   # principal of connections made with the CLI token (cli_ipc_info)


class IpcError(Exception):
    """A modelled error answered to the client: ``kind`` is the shape name, e.g. ``ResourceNotFoundError``."""

    def __init__(self, kind: str, message: str, **fields: Any):
        super().__init__(message)
        self.kind, self.message, self.fields = kind, message, fields


class NucleusHost(Protocol):
    """What the IPC server asks of the nucleus (implemented by ``DeviceRuntime``)."""

    thing: str
    authorizer: authz.Authorizer

    def ipc_call(self, component: str, operation: str, request: dict, stream: "Stream | None") -> dict: ...


@dataclass(eq=False)
class Stream:
    """One open operation stream (a subscription)."""

    connection: "Connection"
    stream_id: int
    operation: str
    model: str                                   # event shape, e.g. aws.greengrass#SubscriptionResponseMessage
    topic: str | None = None
    on_close: list[Callable[[], None]] = field(default_factory=list)
    closed: bool = False

    def send(self, event: dict) -> bool:
        return self.connection.send(es.APPLICATION_MESSAGE, self.stream_id, event, model=self.model)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fn in self.on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001 - cleanup of one stream must not stop the others
                log.exception("stream cleanup failed")


class Connection:
    """One client connection: its principal, its open streams, a lock for writes."""

    def __init__(self, server: "IpcServer", sock: socket.socket):
        self.server, self.sock = server, sock
        self.component: str | None = None
        self.streams: dict[int, Stream] = {}
        self._write = threading.Lock()
        self.alive = True

    def send(self, message_type: int, stream_id: int, body: dict | bytes | None = None, *, model: str | None = None,
             flags: int = 0, content_type: str = "application/json") -> bool:
        headers: dict[str, Any] = {}
        if model is not None:
            headers["service-model-type"] = model
        if body is not None:
            headers[":content-type"] = content_type
        payload = body if isinstance(body, bytes) else (json.dumps(body, separators=(",", ":")).encode()
                                                       if body is not None else b"")
        frame = es.rpc_message(message_type, stream_id, payload, flags=flags, headers=headers)
        with self._write:
            if not self.alive:
                return False
            try:
                self.sock.sendall(frame)
                return True
            except socket.timeout:
                # Part of the frame may be out: the stream cannot be resynchronised, so the
                # connection goes (the client reconnects; pub/sub keeps no queue anyway).
                self.server.count("send_timeouts")
                self.server.limited.warn("send_timeout", "IPC client stopped reading; connection closed",
                                         component=self.component)
                self.alive = False
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return False
            except OSError:
                self.alive = False
                return False

    def error(self, stream_id: int, kind: str, message: str, **fields: Any) -> None:
        body = {"message": message, **fields, "_service": "aws.greengrass#GreengrassCoreIPC",
                "_message": message, "_errorCode": kind}
        self.send(es.APPLICATION_ERROR, stream_id, body, model=PREFIX + kind, flags=es.TERMINATE_STREAM)

    def close(self) -> None:
        with self._write:
            self.alive = False
        for stream in list(self.streams.values()):
            stream.close()
        self.streams.clear()
        try:
            self.sock.close()
        except OSError:
            pass


class IpcServer:
    """The IPC socket of one nucleus.

    :param path: the Unix socket (``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT``).
    :param host: the nucleus; answers every operation but local pub/sub.
    """

    def __init__(self, path: str | Path, host: NucleusHost, *, send_timeout: float = 10.0):
        self.path, self.host, self.send_timeout = Path(path), host, send_timeout
        self._tokens: dict[str, str] = {}              # SVCUID / CLI token -> principal
        self._subs: dict[str, list[Stream]] = {}       # topic filter -> streams
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.counters: dict[str, int] = {}
        self.limited = jsonlog.RateLimited(log, interval=30.0)

    # ------------------------------------------------------------ tokens
    def issue_token(self, principal: str) -> str:
        """A fresh secret for ``principal`` (a component's SVCUID); earlier ones stay valid until revoked."""
        token = base64.b32encode(os.urandom(20)).decode().rstrip("=")
        with self._lock:
            self._tokens[token] = principal
        return token

    def revoke(self, principal: str) -> None:
        with self._lock:
            self._tokens = {t: p for t, p in self._tokens.items() if p != principal}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ------------------------------------------------------------ socket
    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # as the nucleus: only its user reaches the socket
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="ipc-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.path.unlink()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while self._sock is not None:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            client.settimeout(None)
            conn = Connection(self, client)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="ipc-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        decoder = es.Decoder()
        try:
            while conn.alive:
                try:
                    data = conn.sock.recv(262144)
                except socket.timeout:  # the timeout is there to bound sends; an idle client is fine
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    messages = decoder.feed(data)
                except es.FrameTooLarge as exc:
                    self.count("framing_errors")
                    self.count("frame_too_large")
                    self.limited.warn("frame_too_large", "IPC frame over the limit; closing connection",
                                      component=conn.component, limit=es.MAX_MESSAGE, error=str(exc),
                                      count=self.counters["frame_too_large"])
                    conn.send(es.PROTOCOL_ERROR, 0)
                    return
                except es.FramingError as exc:
                    self.count("framing_errors")
                    self.limited.warn("framing", "IPC framing error; closing connection", error=str(exc))
                    conn.send(es.PROTOCOL_ERROR, 0)
                    return
                for message in messages:
                    if not self._handle(conn, message):
                        return
        finally:
            conn.close()
            with self._lock:
                self._connections.discard(conn)

    # ------------------------------------------------------------ RPC
    def _handle(self, conn: Connection, message: es.Message) -> bool:
        mtype, stream_id, flags = message.message_type, message.stream_id, message.flags
        if conn.component is None:
            return self._connect(conn, message)
        if mtype == es.PING:
            conn.send(es.PING_RESPONSE, 0)
            return True
        if mtype not in (es.APPLICATION_MESSAGE, es.APPLICATION_ERROR):
            return mtype != es.CONNECT  # a second CONNECT is a protocol error: close
        stream = conn.streams.get(stream_id)
        if stream is not None:
            if flags & es.TERMINATE_STREAM:  # the client closed the stream: unsubscribe
                conn.streams.pop(stream_id, None)
                stream.close()
            return True
        if flags & es.TERMINATE_STREAM and not message.header("operation"):
            return True  # closing a stream that already ended
        self._operation(conn, stream_id, message)
        return True

    def _connect(self, conn: Connection, message: es.Message) -> bool:
        if message.message_type != es.CONNECT:
            return False
        try:
            token = json.loads(message.payload or b"{}").get("authToken")
        except (ValueError, AttributeError):
            token = None
        with self._lock:
            principal = self._tokens.get(token) if isinstance(token, str) else None
        if principal is None:
            jsonlog.event(log, "IPC connection refused: unknown token", logging.WARNING)
            conn.send(es.CONNECT_ACK, 0, flags=0)
            # Let the client close first: closing now can surface as a socket error, not AccessDeniedError.
            conn.sock.settimeout(2.0)
            try:
                conn.sock.recv(1)
            except OSError:
                pass
            return False
        conn.component = principal
        conn.sock.settimeout(self.send_timeout)  # bounds sendall; _serve's recv loops on timeouts
        conn.send(es.CONNECT_ACK, 0, flags=es.CONNECTION_ACCEPTED)
        threading.current_thread().name = f"ipc-{principal}"
        return True

    def _operation(self, conn: Connection, stream_id: int, message: es.Message) -> None:
        operation = str(message.header("operation") or "")
        name = operation[len(PREFIX):] if operation.startswith(PREFIX) else operation
        try:
            request = json.loads(message.payload or b"{}")
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
        except ValueError as exc:
            conn.error(stream_id, "InvalidArgumentsError", f"cannot decode {name} request: {exc}")
            return
        streaming = name in STREAM_EVENTS
        stream = Stream(conn, stream_id, name, PREFIX + STREAM_EVENTS[name]) if streaming else None
        try:
            if name == "PublishToTopic":
                response = self._publish(conn.component, request)
            elif name == "SubscribeToTopic":
                response = self._subscribe(conn.component, request, stream)
            else:
                response = self.host.ipc_call(conn.component, name, request, stream)
        except IpcError as exc:
            if exc.kind == "UnauthorizedError":
                self.count("unauthorized")
            conn.error(stream_id, exc.kind, exc.message, **exc.fields)
            return
        except Exception as exc:  # noqa: BLE001 - an unmodelled failure; the nucleus answers like this
            jsonlog.event(log, "IPC operation failed", logging.ERROR, operation=name, component=conn.component,
                          error=repr(exc)[:300])
            conn.send(es.APPLICATION_ERROR, stream_id, b"InternalServerError", flags=es.TERMINATE_STREAM,
                      content_type="text/plain")
            return
        if stream is not None:
            conn.streams[stream_id] = stream
            conn.send(es.APPLICATION_MESSAGE, stream_id, response, model=f"{PREFIX}{name}Response")
        else:
            conn.send(es.APPLICATION_MESSAGE, stream_id, response, model=f"{PREFIX}{name}Response",
                      flags=es.TERMINATE_STREAM)

    # ------------------------------------------------------------ local pub/sub
    def authorize(self, component: str, service: str, operation: str, resource: str) -> None:
        """Raise UnauthorizedError, logging as the nucleus' AuthorizationHandler does."""
        if component == CLI_CLIENT:
            return
        denial = self.host.authorizer.check(component, service, PREFIX + operation, resource)
        if denial is None:
            return
        self.limited.warn(f"denied:{component}:{operation}", denial, component=component, resource=resource)
        # MqttProxyIPCAgent logs the reason and answers a fixed text; pub/sub answers the reason.
        raise IpcError("UnauthorizedError", authz.MQTTPROXY_UNAUTHORIZED_MESSAGE if service == authz.MQTTPROXY
                       else denial)

    def _publish(self, component: str, request: dict) -> dict:
        topic = request.get("topic")
        message = request.get("publishMessage") or {}
        if not isinstance(topic, str) or not isinstance(message, dict):
            raise IpcError("InvalidArgumentsError", "topic and publishMessage are required")
        self.authorize(component, authz.PUBSUB, "PublishToTopic", topic)  # before the topic check, as the nucleus
        problem = authz.check_publish_topic(topic)
        if problem:
            raise IpcError("InvalidArgumentsError", problem)
        if isinstance(message.get("binaryMessage"), dict):
            event = {"binaryMessage": {"message": message["binaryMessage"].get("message", ""),
                                       "context": {"topic": topic}}}
        elif isinstance(message.get("jsonMessage"), dict):
            event = {"jsonMessage": {"message": message["jsonMessage"].get("message"), "context": {"topic": topic}}}
        else:
            raise IpcError("InvalidArgumentsError", "publishMessage needs jsonMessage or binaryMessage")
        self.deliver(topic, event)
        return {}

    def deliver(self, topic: str, event: dict) -> int:
        """Send a pub/sub event to every matching subscription now; returns how many got it."""
        with self._lock:
            targets = [s for f, streams in self._subs.items() if authz.mqtt_topic_matches(f, topic) for s in streams]
        if not targets:
            self.count("pubsub_no_subscriber")
            return 0
        delivered = 0
        for stream in targets:
            if not stream.closed and stream.send(event):
                delivered += 1
        return delivered

    def _subscribe(self, component: str, request: dict, stream: Stream) -> dict:
        topic = request.get("topic")
        if not isinstance(topic, str) or not topic:
            raise IpcError("InvalidArgumentsError", "topic is required")
        self.authorize(component, authz.PUBSUB, "SubscribeToTopic", topic)
        stream.topic = topic
        with self._lock:
            self._subs.setdefault(topic, []).append(stream)

        def unsubscribe() -> None:
            with self._lock:
                streams = self._subs.get(topic, [])
                if stream in streams:
                    streams.remove(stream)
                if not streams:
                    self._subs.pop(topic, None)
        stream.on_close.append(unsubscribe)
        return {}

    def local_subscribe(self, topic: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        """The nucleus' own subscription (no socket): ``callback(topic, payload)``; returns unsubscribe."""
        stream = _LocalStream(callback)
        with self._lock:
            self._subs.setdefault(topic, []).append(stream)

        def unsubscribe() -> None:
            with self._lock:
                if stream in self._subs.get(topic, []):
                    self._subs[topic].remove(stream)
        return unsubscribe

    def subscriber_count(self, topic: str | None = None) -> int:
        """Open SubscribeToTopic streams (on ``topic``'s filter only, when given)."""
        with self._lock:
            return sum(len(s) for t, s in self._subs.items() if topic is None or t == topic)


class _LocalStream:
    closed = False

    def __init__(self, callback: Callable[[str, bytes], None]):
        self.callback = callback

    def send(self, event: dict) -> bool:
        msg = event.get("binaryMessage") or event.get("jsonMessage") or {}
        topic = (msg.get("context") or {}).get("topic", "")
        if "binaryMessage" in event:
            try:
                data = base64.b64decode(msg.get("message") or "")
            except (binascii.Error, ValueError):
                return False
        else:
            data = json.dumps(msg.get("message")).encode()
        try:
            self.callback(topic, data)
        except Exception:  # noqa: BLE001
            log.exception("nucleus subscriber failed")
        return True


# Streaming operations and the shape of the events each sends.
STREAM_EVENTS = {
    "SubscribeToTopic": "SubscriptionResponseMessage",
    "SubscribeToIoTCore": "IoTCoreMessage",
    "SubscribeToConfigurationUpdate": "ConfigurationUpdateEvents",
    "SubscribeToComponentUpdates": "ComponentUpdatePolicyEvents",
    "SubscribeToValidateConfigurationUpdates": "ValidateConfigurationUpdateEvents",
}
