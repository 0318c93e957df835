"""com.windfleet.LogForwarder: scores, anomalies, health and logs of one gateway to the cloud.

Flow: the bus hands each message on ``windfleet/turbines/{t}/scores`` (this gateway's
turbines), ``windfleet/devices/{thing}/health`` and ``.../logs`` to :meth:`Forwarder.handle`,
which validates it and appends it to the SQLite :class:`~.spool.Spool` (the bus
acknowledges the message only after that commit).  A score batch (``payloads.score_batch``,
the detector's one message per turbine per scoring batch) is validated as a whole and
spooled as its windows' version-1 score records (``payloads.score_records``, one
transaction): the cloud receives and stores per-window records either way.  A sender thread batches the oldest
records into ``payloads.telemetry`` messages with a per-device ``seq`` that increases by
one per message and survives restarts, and publishes them with ``bus.publish_cloud``
(QoS1) to ``topics.telemetry(thing)``.  While the cloud link is down everything waits in
the spool and is delivered in order afterwards.

Delivery (configuration ``delivery``):

* ``cloud_ack`` (default): a message leaves the spool only when the cloud side says it
  stored it (``payloads.telemetry_ack`` on ``topics.telemetry_ack(thing)``, through the
  nucleus' SubscribeToIoTCore).  The nucleus answers PublishToIoTCore as soon as its
  spooler -- in memory by default, lost on a device restart -- took the message
  (developer guide, "Publish/subscribe AWS IoT Core MQTT messages"), so only this makes
  an outage with a restart in the middle lose nothing on a stock nucleus.  A message
  not acknowledged within ``ack_timeout_s`` is sent again with the same ``seq``; the
  cloud stores each ``seq`` once and acknowledges repeats.
* ``nucleus``: a message leaves the spool once the nucleus took it (for a cloud side
  that does not acknowledge; a device restart during an outage loses the nucleus'
  spooler).

Spool policy when full (see :mod:`.spool`): DROP OLDEST waiting records, keep the
newest; every dropped record is counted in ``dropped_spool_full`` (health counters)
and logged (rate limited).  When its disk runs low (under ``min_free_bytes``) or is
full, the spool stops growing and drops the oldest the same way, counted in
``dropped_disk_full``; a spool write that fails otherwise is counted in
``dropped_spool_error``, and the sender retries while the disk refuses it.

Malformed input is counted per kind (``payloads.MalformedPayload.kind``), logged once
per kind per minute, and dropped; it never stops the component.

Drift (``payloads.drift`` on ``topics.drift(turbine)``, from the detector) is validated and
spooled as telemetry record type ``drift``, like scores.

Captured windows (``payloads.capture`` on ``topics.capture(thing)``) do not go to IoT Core:
they wait in a separate bounded :class:`~.capture.CaptureSpool` and are uploaded to S3 in
batches, one gzip JSON Lines object each, with credentials from the token exchange service
(see :mod:`.capture`; configuration ``capture_bucket``, ``capture_prefix``,
``capture_endpoint``, ``capture_batch_windows``, ``capture_batch_interval_s``,
``capture_max_bytes``).

Health: the forwarder's own health (counters ``received``, ``sent``, ``spooled``,
``dropped_spool_full``, ``malformed_dropped``, ...) is published every
``health_interval`` seconds on ``topics.health(thing)``, and therefore forwarded too.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from windfleet import jsonlog, payloads, topics

from . import capture
from .spool import Spool

COMPONENT = "com.windfleet.LogForwarder"
DEFAULT_CAPTURE_BUCKET = "windfleet-artifacts"  # cloud.settings.BUCKET's default (device code has no cloud package)
MAX_RECORD_BYTES = 64 * 1024  # a single record must fit a 128 KB IoT Core message

log = logging.getLogger("windfleet.forwarder")


def _validate_log(obj: dict) -> dict:
    for field in ("component", "level", "message"):
        if not isinstance(obj.get(field), str):
            raise payloads.MalformedPayload("missing_field" if field not in obj else "wrong_type", field)
    return obj


def _turbine_ids(thing: str, turbines: Any) -> list[str]:
    """Configuration ``turbines``: a count (ids from topics.turbine_id) or a list of ids."""
    if turbines is None:
        return []
    if isinstance(turbines, bool):
        raise ValueError(f"turbines must be a count or a list, not {turbines!r}")
    if isinstance(turbines, (int, float, str)) and str(turbines).strip().isdigit():
        return [topics.turbine_id(thing, i) for i in range(int(turbines))]
    if isinstance(turbines, (list, tuple)):
        return [str(t) for t in turbines]
    raise ValueError(f"turbines must be a count or a list, not {turbines!r}")


class Forwarder:
    """The forwarder's logic, on any :class:`~windfleet.components.bus.Bus` and :class:`Spool`."""

    def __init__(self, bus, spool: Spool, *, turbines: Any = None, batch_records: int = 100,
                 batch_bytes: int = 96 * 1024, batch_interval: float = 1.0, health_interval: float = 10.0,
                 retry_max: float = 5.0, flush_timeout: float = 5.0, delivery: str | None = None,
                 ack_timeout: float | None = None, capture_spool: capture.CaptureSpool | None = None,
                 s3_client_factory: Any = None):
        self.bus, self.spool = bus, spool
        self.thing = bus.thing_name
        self.batch_records, self.batch_bytes = max(1, batch_records), batch_bytes
        self.batch_interval, self.health_interval = batch_interval, health_interval
        self.retry_max, self.flush_timeout = retry_max, flush_timeout
        # one GetConfiguration for whatever the caller did not pass
        config = bus.get_configuration() if None in (turbines, delivery, ack_timeout) or capture_spool else {}
        if turbines is None:
            turbines = config.get("turbines")
        self._turbines = _turbine_ids(self.thing, turbines)
        self._subscribed: set[str] = set()
        self.counters: collections.Counter = collections.Counter()
        self.malformed_by_kind: collections.Counter = collections.Counter()
        self._limited = jsonlog.RateLimited(log, interval=60.0)
        self._stop = threading.Event()
        self._flushing = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_acked_seq = 0
        self._dropped_logged = spool.dropped_spool_full
        self.delivery = delivery or str(config.get("delivery", "cloud_ack"))
        if self.delivery not in ("cloud_ack", "nucleus"):
            raise ValueError(f"delivery must be cloud_ack or nucleus, not {self.delivery!r}")
        self.ack_timeout = float(ack_timeout if ack_timeout is not None else config.get("ack_timeout_s", 10.0))
        self._acked: set[int] = set()
        self._ack_arrived = threading.Condition()
        self.capture_spool, self.uploader = capture_spool, None
        if capture_spool is not None:
            endpoint = str(config.get("capture_endpoint") or "") or None
            self.uploader = capture.Uploader(
                capture_spool, self.thing, str(config.get("capture_bucket") or DEFAULT_CAPTURE_BUCKET),
                prefix=str(config.get("capture_prefix", capture.DEFAULT_PREFIX)),
                batch_windows=int(config.get("capture_batch_windows", capture.DEFAULT_BATCH_WINDOWS)),
                batch_interval=float(config.get("capture_batch_interval_s", capture.DEFAULT_BATCH_INTERVAL)),
                client_factory=s3_client_factory or (lambda: capture.s3_client(endpoint)),
                flush_timeout=flush_timeout)

    # ------------------------------------------------------------ setup
    def start(self) -> "Forwarder":
        jsonlog.event(log, "forwarder starting", thing=self.thing, turbines=len(self._turbines),
                      spool=str(self.spool.path), spool_records=self.spool.records, next_seq=self.spool.next_seq,
                      max_records=self.spool.max_records, max_bytes=self.spool.max_bytes,
                      policy="drop oldest when full")
        self._acks_subscribed = self.delivery != "cloud_ack" or self._subscribe_acks()
        self.bus.subscribe(topics.health(self.thing), self.handle)
        self.bus.subscribe(topics.logs(self.thing), self.handle)
        if self.uploader is not None:
            self.bus.subscribe(topics.capture(self.thing), self.handle_capture)
            self.uploader.start()
        self._subscribe_turbines(self._turbines)
        self.bus.on_configuration_update(self._on_config)
        for target, name in ((self._send_loop, "sender"), (self._health_loop, "health")):
            thread = threading.Thread(target=target, name=f"forwarder-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.bus.update_state("RUNNING", counters=self.health_counters())
        return self

    def _subscribe_turbines(self, turbine_ids: list[str]) -> None:
        for tid in turbine_ids:
            if tid not in self._subscribed:
                self.bus.subscribe(topics.scores(tid), self.handle)
                self.bus.subscribe(topics.drift(tid), self.handle)
                self._subscribed.add(tid)

    def _on_config(self, config: dict) -> None:
        try:
            self._subscribe_turbines(_turbine_ids(self.thing, config.get("turbines")))
        except ValueError as exc:
            self._limited.warn("config", "ignoring bad turbines setting", error=str(exc))

    # ------------------------------------------------------------ receive
    def handle(self, topic: str, raw: bytes) -> None:
        """Bus handler: validate and spool one message.  Never raises for bad input."""
        self.counters["received"] += 1
        try:
            kind, bodies = self._validate(topic, raw)
        except payloads.MalformedPayload as exc:
            self.counters["malformed_dropped"] += 1
            self.malformed_by_kind[exc.kind] += 1
            self._limited.warn(f"malformed:{exc.kind}", "malformed message dropped", topic=topic,
                               reason=exc.kind, detail=exc.detail[:200], count=self.malformed_by_kind[exc.kind])
            return
        self.counters["received"] += len(bodies) - 1  # records, as the sender counts them
        try:
            dropped = self.spool.add_many(kind, bodies)
        except sqlite3.Error as exc:  # not a full disk (the spool handles that): e.g. a damaged file
            self.counters["dropped_spool_error"] += len(bodies)
            self._limited.warn("spool_error", "spool write failed: record dropped", error=repr(exc)[:200],
                               dropped_total=self.counters["dropped_spool_error"])
            return
        if dropped:
            self._limited.warn("spool_full", "spool full: dropped oldest records", dropped=dropped,
                               dropped_total=self.spool.dropped_spool_full, max_records=self.spool.max_records,
                               max_bytes=self.spool.max_bytes)
        if self.spool.pending_records >= self.batch_records:
            self._wake.set()

    def handle_capture(self, topic: str, raw: bytes) -> None:
        """Bus handler for captured windows: validate and append to the capture spool.  Never raises."""
        self.counters["capture_received"] += 1
        try:
            if len(raw) > payloads.MAX_PAYLOAD_BYTES:
                raise payloads.MalformedPayload("too_large", f"{len(raw)} bytes > {payloads.MAX_PAYLOAD_BYTES}")
            obj = payloads.validate_capture(payloads.decode(raw))
            if obj["thing"] != self.thing:
                raise payloads.MalformedPayload("thing_mismatch", f"{obj['thing']} on {topic}")
            dropped = self.capture_spool.add(payloads.encode(obj), obj["reason"] == "flagged")
        except payloads.MalformedPayload as exc:
            self.counters["malformed_dropped"] += 1
            self.malformed_by_kind[f"capture:{exc.kind}"] += 1
            self._limited.warn(f"malformed:capture:{exc.kind}", "malformed capture dropped", detail=exc.detail[:200])
            return
        except sqlite3.Error as exc:
            self.counters["capture_spool_errors"] += 1
            self._limited.warn("capture_spool_error", "capture spool write failed: window dropped",
                               error=repr(exc)[:200])
            return
        self.counters["captured"] += 1
        if dropped:
            self._limited.warn("capture_full", "capture spool full: dropped oldest windows (normal first)",
                               dropped=dropped, max_bytes=self.capture_spool.max_bytes)
        if self.capture_spool.windows >= self.uploader.batch_windows:
            self.uploader.wake.set()

    def _validate(self, topic: str, raw: bytes) -> tuple[str, list[bytes]]:
        """``(record type, [record bodies])`` of a message; MalformedPayload when unusable."""
        scores = topic.endswith("/scores")
        if len(raw) > (payloads.MAX_PAYLOAD_BYTES if scores else MAX_RECORD_BYTES):  # a batch holds many records
            raise payloads.MalformedPayload("too_large", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
        obj = payloads.decode(raw, payloads.BATCH_VERSIONS if scores else (payloads.SCHEMA_VERSION,))
        parts = topic.split("/")
        if scores and obj["schema_version"] == payloads.BATCH_VERSION:
            payloads.validate_score_batch(obj)
            if obj["turbine_id"] != topics.turbine_of(topic):
                raise payloads.MalformedPayload("turbine_mismatch", f"{obj['turbine_id']} on {topic}")
            bodies = [payloads.encode(r) for r in payloads.score_records(obj)]
            if max(map(len, bodies)) > MAX_RECORD_BYTES:
                raise payloads.MalformedPayload("too_large", f"a score record > {MAX_RECORD_BYTES} bytes")
            return "score", bodies
        if len(raw) > MAX_RECORD_BYTES:
            raise payloads.MalformedPayload("too_large", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
        if scores:
            payloads.validate_score(obj)
            if obj["turbine_id"] != topics.turbine_of(topic):
                raise payloads.MalformedPayload("turbine_mismatch", f"{obj['turbine_id']} on {topic}")
            kind = "score"
        elif topic.endswith("/drift") and topic.startswith(f"{topics.PREFIX}/turbines/"):
            payloads.validate_drift(obj)
            if obj["turbine_id"] != topics.turbine_of(topic):
                raise payloads.MalformedPayload("turbine_mismatch", f"{obj['turbine_id']} on {topic}")
            kind = "drift"
        elif topic == topics.health(self.thing):
            payloads.validate_health(obj)
            kind = "health"
        elif topic == topics.logs(self.thing):
            getattr(payloads, "validate_log", _validate_log)(obj)
            kind = "log"
        else:  # not a topic we subscribed: a broker or configuration mistake
            raise payloads.MalformedPayload("unexpected_topic", "/".join(parts[:4]))
        # Store the bytes received (already proven to be finite JSON) for the batch.
        return kind, [bytes(raw)]

    def on_ack(self, topic: str, raw: bytes) -> None:
        """The cloud stored telemetry message ``seq``: the sender may delete it."""
        try:
            ack = payloads.validate_telemetry_ack(payloads.decode(raw))
        except payloads.MalformedPayload as exc:
            self.malformed_by_kind[f"ack:{exc.kind}"] += 1
            return
        if ack["thing"] != self.thing:
            return
        with self._ack_arrived:
            self._acked.add(ack["seq"])
            self._ack_arrived.notify_all()

    def _wait_for_ack(self, seq: int) -> bool:
        """True once the cloud acknowledged ``seq`` within ``ack_timeout``."""
        deadline = time.monotonic() + (min(self.ack_timeout, self.flush_timeout) if self._stop.is_set()
                                       else self.ack_timeout)
        with self._ack_arrived:
            while seq not in self._acked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ack_arrived.wait(min(left, 0.5))
            self._acked = {s for s in self._acked if s > seq}
            return True

    # ------------------------------------------------------------ send
    def _send_loop(self) -> None:
        retry = 0.2
        while True:
            try:
                if self._send_step():
                    return
            except sqlite3.Error as exc:
                # A full disk (after the spool's own relief) or a damaged spool: nothing is lost
                # (an unacknowledged message stays in the outbox), so wait and try again.
                self.counters["spool_errors"] += 1
                self._limited.warn("spool_error", "spool unavailable; retrying", error=repr(exc)[:200])
                if self._stop.wait(retry):
                    return
                retry = min(retry * 2, self.retry_max)

    def _send_step(self) -> bool:
        """Send until the spool is empty and nothing is due; True when the loop should end."""
        retry = 0.2
        deadline = None
        while True:
            if self._stop.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self.flush_timeout
                if time.monotonic() > deadline or (self.spool.records == 0):
                    return True
            message = self.spool.head()
            if message is None:
                due = (self.spool.pending_records >= self.batch_records
                       or self._stop.is_set()
                       or (self.spool.pending_records and self.spool.oldest_age() >= self.batch_interval))
                if not due:
                    self._wake.wait(min(0.1, self.batch_interval))
                    self._wake.clear()
                    continue
                message = self.spool.build(self.thing, self.batch_records, self.batch_bytes)
                if message is None:
                    continue
            try:
                ok = self.bus.publish_cloud(topics.telemetry(self.thing), message.payload, qos=1)
            except Exception as exc:  # a transport error is "not delivered": keep it and retry
                ok = False
                self._limited.warn("publish_cloud", "cloud publish raised", error=repr(exc)[:200])
            if ok and self.delivery == "cloud_ack" and not self._wait_for_ack(message.seq):
                # taken by the nucleus but not confirmed stored: send the same seq again
                self.counters["ack_timeouts"] += 1
                self._limited.warn("ack_timeout", "no cloud acknowledgement; sending again", seq=message.seq,
                                   timeout_s=self.ack_timeout)
                if self._stop.is_set():
                    return True  # kept in the spool for the next start
                continue
            if ok:
                self.spool.ack(message.seq)
                self.last_acked_seq = message.seq
                self.counters["sent"] += message.n_records
                self.counters["messages_sent"] += 1
                retry = 0.2
            else:
                self.counters["cloud_failures"] += 1
                self._limited.warn("cloud_down", "cloud link down: spooling", spooled=self.spool.records,
                                   next_seq=message.seq)
                if self._stop.is_set() or self._stop.wait(retry):
                    return True  # stopping with the link down: the spool keeps it for the next start
                retry = min(retry * 2, self.retry_max)

    # ------------------------------------------------------------ health
    def health_counters(self) -> dict[str, int]:
        counters = {k: 0 for k in ("received", "sent", "messages_sent", "malformed_dropped", "cloud_failures",
                                   "spool_errors", "dropped_spool_error", "ack_timeouts")}
        counters.update(self.counters)
        counters.update(
            spooled=self.spool.records,
            spool_bytes=self.spool.bytes,
            dropped_spool_full=self.spool.dropped_spool_full,
            dropped_disk_full=self.spool.dropped_disk_full,
            spool_disk_errors=self.spool.disk_errors,
            last_seq=self.last_acked_seq,
        )
        if self.uploader is not None:
            totals = self.capture_spool.counters()
            counters.update(
                captured=self.counters["captured"],
                capture_spooled=self.capture_spool.windows,
                capture_spool_bytes=self.capture_spool.bytes,
                capture_uploaded_windows=totals["uploaded_windows"],
                capture_uploaded_objects=totals["uploaded_objects"],
                capture_dropped=totals["dropped_normal"] + totals["dropped_flagged"],
                capture_dropped_flagged=totals["dropped_flagged"],
                capture_upload_errors=self.uploader.upload_errors,
            )
        return counters

    def publish_health(self) -> None:
        self.bus.update_state("RUNNING", counters=self.health_counters(),
                              malformed_by_kind=dict(self.malformed_by_kind))

    def _subscribe_acks(self) -> bool:
        """Subscribe to the cloud's telemetry acks; False (logged) when the nucleus refuses.
        A nucleus configured to run offline refuses every SubscribeToIoTCore ("Device is not
        configured to connect to AWS", MqttClient.subscribe); the forwarder then keeps
        spooling, nothing is acknowledged so nothing leaves the spool, and the health loop
        asks again (rather than exiting and being restarted into the same refusal)."""
        try:
            self.bus.subscribe_cloud(topics.telemetry_ack(self.thing), self.on_ack)
            return True
        except Exception as exc:  # noqa: BLE001 - the SDK raises ServiceError and friends
            # only once it happened: health stays the size it was (telemetry batches near a small
            # nucleus spooler's limit, test_forwarder_process, must still fit it)
            self.counters["ack_subscribe_failures"] = self.counters.get("ack_subscribe_failures", 0) + 1
            self._limited.warn("ack_subscribe", "cannot subscribe to the cloud's acks; spooling meanwhile",
                               error=repr(exc)[:200])
            return False

    def _health_loop(self) -> None:
        while not self._stop.wait(self.health_interval):
            if not self._acks_subscribed:
                self._acks_subscribed = self._subscribe_acks()
            try:
                self.publish_health()
            except Exception as exc:
                self._limited.warn("health", "cannot publish health", error=repr(exc)[:200])

    # ------------------------------------------------------------ stop
    def stop(self) -> None:
        """Stop: try to deliver what is spooled for up to ``flush_timeout`` s, then return.
        What is left stays in the spool for the next start.  The caller then closes the bus
        and the spool (in that order)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self.uploader is not None:
            self.uploader.stop()
        for thread in self._threads:
            # + the longest a single publish_cloud may wait for its ack
            thread.join(self.flush_timeout + 15.0)
        jsonlog.event(log, "forwarder stopped", **self.health_counters())


def run(bus, spool_path: str | Path, *, stop_event: threading.Event | None = None,
        max_records: int = 100_000, max_bytes: int = 64 * 1024 * 1024, min_free_bytes: int | None = None,
        **options: Any) -> Forwarder:
    """Run the forwarder on ``bus`` until ``stop_event`` is set; then stop, close the bus and the spool.

    ``spool_path`` is the SQLite file (a directory gets ``spool.sqlite`` inside); the capture
    spool is ``capture.sqlite`` beside it, bounded by configuration ``capture_max_bytes``.
    ``options`` go to :class:`Forwarder` (``batch_records``, ``batch_interval``, ...).
    """
    path = Path(spool_path)
    if path.is_dir() or str(spool_path).endswith("/"):
        path = path / "spool.sqlite"
    spool = Spool(path, max_records=max_records, max_bytes=max_bytes,
                  **({} if min_free_bytes is None else {"min_free_bytes": min_free_bytes}))
    capture_bytes = int(bus.get_configuration().get("capture_max_bytes", capture.DEFAULT_MAX_BYTES))
    capture_spool = capture.CaptureSpool(path.with_name("capture.sqlite"), max_bytes=capture_bytes)
    forwarder = Forwarder(bus, spool, capture_spool=capture_spool, **options)
    stop_event = stop_event or threading.Event()
    try:
        forwarder.start()
        stop_event.wait()
    finally:
        forwarder.stop()
        try:
            forwarder.publish_health()
        except Exception:
            pass
        bus.close()  # stop handlers before the spool closes
        spool.close()
        capture_spool.close()
    return forwarder
