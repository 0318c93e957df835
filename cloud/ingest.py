"""Telemetry ingest: the cloud side of ``windfleet/fleet/{thing}/telemetry``.

Two back ends, one record model:

* **local** — :class:`TelemetryStore` keeps scores, anomalies, drift, health and logs in
  SQLite (WAL) with retention, deduplicates messages by ``(thing, seq)`` and counts
  loss per device from sequence gaps (a late arrival fills its gap, so loss is a
  figure, not a guess).  :class:`IngestService` / :func:`run_ingest` feed it from
  the broker with paho (QoS 1, persistent session, acknowledged only after the
  batch is committed, so an ingest crash loses nothing).
* **AWS** — :func:`lambda_handler` sits behind the IoT rule
  ``SELECT *, topic(3) AS source_thing FROM 'windfleet/fleet/+/telemetry'`` and writes
  one structured JSON log event per record to CloudWatch Logs; :func:`dashboard_body`
  builds the CloudWatch dashboard whose Logs Insights widgets query exactly those fields.

Identity comes from the transport, never from the body.  The broker (Mosquitto's ACL, IoT
Core's policy) lets a device publish only on ``windfleet/fleet/{its thing}/telemetry``, so
the topic's thing (:func:`topics.thing_of`; ``topic(3)`` in the IoT rule) is who sent the
message.  The body's ``thing`` must equal it, every score's turbine must be one of its
turbines (:func:`topics.gateway_of`) and every health/log record's ``thing`` must be it;
otherwise the message (or the record) is dropped and counted per sending device:

* local store: counters ``spoofed`` / ``spoofed:<sender>`` (whole messages whose body
  claims another thing; nothing of them is stored, nothing acknowledged) and
  ``spoofed_records`` / ``spoofed_records:<sender>`` (records about another device's
  turbine or thing; the message's other records are kept); :meth:`TelemetryStore.spoofing`;
* Lambda: one ``{"level": "WARNING", "msg": "spoofed telemetry dropped", ...}`` line and
  ``{"dropped": "spoofed"}``; a foreign record becomes a ``record_type=spoofed`` event.

Acknowledgements go to the topic's thing only.

Byte limit: a message larger than :data:`MAX_MESSAGE_BYTES` (131,072 bytes, IoT Core's
128 KB payload limit, which the local broker enforces too) is refused before it is decoded
and counted as ``malformed:too_large`` (store counter; the service's ``stats["malformed"]``;
the Lambda's ``{"dropped": "too_large"}``).

    >>> store = TelemetryStore("/tmp/telemetry.sqlite")
    >>> store.ingest(payloads.encode(payloads.telemetry("gw-01", 0, time.time(), [])))
    'stored'
    >>> store.loss()["gw-01"]["lost"]
    0
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from windfleet import jsonlog, payloads, topics
from windfleet.model_contract import FEATURES, STRIDE

log = logging.getLogger("windfleet.ingest")

# Ids that reach SQL, URLs and log stream names are checked against these.
THING_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
TURBINE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}-t[0-9]{2,4}$")

# IoT Core's limit on a publish payload (128 KB); windfleet.nucleus.broker enforces the same.
MAX_MESSAGE_BYTES = 128 * 1024
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DEFAULT_MAX_SCORE_ROWS = 5_000_000

# Outcomes of TelemetryStore.ingest
STORED, DUPLICATE, STALE, SPOOFED = "stored", "duplicate", "stale", "spoofed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    thing TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL, received_at REAL NOT NULL,
    n_records INTEGER NOT NULL, PRIMARY KEY (thing, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at);
CREATE TABLE IF NOT EXISTS devices (
    thing TEXT PRIMARY KEY, first_seq INTEGER NOT NULL, max_seq INTEGER NOT NULL,
    received INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0,
    stale INTEGER NOT NULL DEFAULT 0, retained_from_seq INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, last_msg_ts REAL,
    model_version TEXT, model_version_ts REAL
);
CREATE TABLE IF NOT EXISTS scores (
    id INTEGER PRIMARY KEY, thing TEXT NOT NULL, turbine_id TEXT NOT NULL, ts REAL NOT NULL,
    model_version TEXT NOT NULL, window_end_seq INTEGER NOT NULL, score REAL,
    anomaly INTEGER NOT NULL,
    detail TEXT NOT NULL,  -- JSON [feature_errors, thresholds, anomalous_features]: one encode per row
    UNIQUE (turbine_id, window_end_seq, ts)
);
CREATE INDEX IF NOT EXISTS scores_turbine_ts ON scores (turbine_id, ts);
CREATE INDEX IF NOT EXISTS scores_ts ON scores (ts);
CREATE INDEX IF NOT EXISTS scores_anomalies ON scores (ts) WHERE anomaly = 1;
CREATE TABLE IF NOT EXISTS turbines (
    turbine_id TEXT PRIMARY KEY, thing TEXT NOT NULL, last_ts REAL NOT NULL,
    model_version TEXT, last_score REAL, last_anomaly INTEGER NOT NULL DEFAULT 0,
    n_scores INTEGER NOT NULL DEFAULT 0, n_anomalies INTEGER NOT NULL DEFAULT 0,
    last_anomaly_ts REAL
);
CREATE TABLE IF NOT EXISTS health (
    id INTEGER PRIMARY KEY, thing TEXT NOT NULL, component TEXT NOT NULL, version TEXT,
    state TEXT NOT NULL, ts REAL NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS health_ts ON health (ts);
CREATE TABLE IF NOT EXISTS components (
    thing TEXT NOT NULL, component TEXT NOT NULL, version TEXT, state TEXT NOT NULL,
    ts REAL NOT NULL, model_version TEXT, reason TEXT, counters TEXT,
    PRIMARY KEY (thing, component)
);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY, thing TEXT NOT NULL, component TEXT, level TEXT, message TEXT,
    ts REAL NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_ts ON logs (ts);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS drift (
    id INTEGER PRIMARY KEY, thing TEXT NOT NULL, turbine_id TEXT NOT NULL, model_version TEXT NOT NULL,
    ts REAL NOT NULL, samples INTEGER NOT NULL, method TEXT NOT NULL, n_drifted INTEGER NOT NULL,
    detail TEXT NOT NULL,  -- JSON [score, thresholds, drifted] (payloads.drift)
    UNIQUE (turbine_id, model_version, ts)
);
CREATE INDEX IF NOT EXISTS drift_turbine_ts ON drift (turbine_id, ts);
CREATE INDEX IF NOT EXISTS drift_ts ON drift (ts);
CREATE TABLE IF NOT EXISTS turbine_drift (  -- each turbine's newest drift record: what "drifted now" reads
    turbine_id TEXT PRIMARY KEY, thing TEXT NOT NULL, model_version TEXT NOT NULL, ts REAL NOT NULL,
    n_drifted INTEGER NOT NULL, detail TEXT NOT NULL
);
"""


def _now() -> float:
    return time.time()


class _Foreign(payloads.MalformedPayload):
    """A record about another device's turbine or thing (counted as spoofing too)."""


def _size(raw: Any) -> int:
    if isinstance(raw, str):
        return len(raw.encode("utf-8", "surrogatepass"))
    return len(raw)


@dataclass
class _Batch:
    """Counter increments of one transaction, flushed together (one UPDATE per name)."""

    counts: dict[str, int] = field(default_factory=dict)
    # per turbine: [thing, last_ts, version, score, anomaly, n_scores, n_anomalies, last_anomaly_ts]
    turbines: dict[str, list] = field(default_factory=dict)
    versions: dict[str, tuple[float, str]] = field(default_factory=dict)  # thing -> newest (ts, version)

    def version(self, thing: str, version: str, ts: float) -> None:
        if thing not in self.versions or ts >= self.versions[thing][0]:
            self.versions[thing] = (ts, version)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def merge(self, other: "_Batch") -> None:
        """Fold ``other`` (one message's changes) into this batch."""
        for name, n in other.counts.items():
            self.add(name, n)
        for turbine, o in other.turbines.items():
            t = self.turbines.get(turbine)
            if t is None:
                self.turbines[turbine] = list(o)
                continue
            if o[1] >= t[1]:
                t[1:5] = o[1:5]
            t[5] += o[5]
            t[6] += o[6]
            if o[7] is not None:
                t[7] = o[7] if t[7] is None else max(t[7], o[7])
        for thing, (ts, version) in other.versions.items():
            self.version(thing, version, ts)


def _finite_or(value: Any, default: Any) -> Any:
    """``value`` as a finite float, else ``default`` (a missing, non-numeric, 1e400 or
    too-large-int timestamp must neither raise nor reach a REAL column as inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    try:
        number = float(value)
    except OverflowError:
        return default
    return number if math.isfinite(number) else default


class TelemetryStore:
    """SQLite store of fleet telemetry; safe to share between threads.

    Writes are serialised by a lock; every thread reads through its own
    connection, so the dashboard's reads never wait for an ingest transaction
    (WAL).  ``max_age_s`` bounds records by their timestamp and messages by
    arrival; ``max_score_rows`` bounds the largest table by count.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_score_rows: int = DEFAULT_MAX_SCORE_ROWS,
        clock: Callable[[], float] = _now,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_age_s, self.max_score_rows, self.clock = max_age_s, max_score_rows, clock
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._warn = jsonlog.RateLimited(log)
        with self._lock:
            self._conn().executescript(_SCHEMA)

    # ------------------------------------------------------------ plumbing
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode (only a power cut can
            # lose the last transactions) and is several times faster than FULL.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            self._all.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._all:
            try:
                conn.close()
            except sqlite3.ProgrammingError:  # closed from its own thread already
                pass
        self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> "TelemetryStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ writes
    def ingest(self, raw: bytes | str, received_at: float | None = None, *,
               source_thing: str | None = None) -> str:
        """Store one telemetry message; returns ``stored``, ``duplicate``, ``stale``,
        ``spoofed`` or ``malformed:<kind>`` (counted, nothing stored).

        ``source_thing`` is the thing of the topic the message arrived on (who sent it);
        the service always passes it.  ``None`` trusts the body's ``thing`` (a caller that
        has authenticated the message otherwise, e.g. a test)."""
        return self.ingest_many([raw], received_at, sources=[source_thing])[0]

    def ingest_many(self, raws: Iterable[bytes | str], received_at: float | None = None, *,
                    sources: Iterable[str | None] | None = None) -> list[str]:
        """Store many messages in ONE transaction (what the service does per batch);
        ``sources``: each message's ``source_thing`` (see :meth:`ingest`)."""
        received_at = self.clock() if received_at is None else received_at
        raws = list(raws)
        sources = [None] * len(raws) if sources is None else list(sources)
        if len(sources) != len(raws):
            raise ValueError("one source per message")
        batch = _Batch()
        outcomes: list[str] = []
        with self._lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for raw, source in zip(raws, sources):
                    outcomes.append(self._ingest_guarded(conn, raw, received_at, batch, source))
                    batch.add("messages_in")
                self._flush_summaries(conn, batch)
                self._flush_counters(conn, batch)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return outcomes

    def _ingest_guarded(self, conn: sqlite3.Connection, raw: bytes | str, now: float, batch: _Batch,
                        source: str | None = None) -> str:
        """One message in its own savepoint: whatever one message does wrong that the
        validators did not foresee, it costs that message only (counted as
        ``malformed:invalid``), never the batch it came in: a batch that raised would be
        redelivered whole and fail again, for ever."""
        conn.execute("SAVEPOINT message")
        local = _Batch()
        try:
            outcome = self._ingest_one(conn, raw, now, local, source)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError,
                UnicodeError) as exc:
            conn.execute("ROLLBACK TO SAVEPOINT message")
            conn.execute("RELEASE SAVEPOINT message")
            batch.add("malformed:invalid")
            self._warn.warn("invalid", "telemetry message raised; dropped and counted",
                            error=f"{type(exc).__name__}: {exc}"[:200])
            return "malformed:invalid"
        conn.execute("RELEASE SAVEPOINT message")
        batch.merge(local)
        return outcome

    def _ingest_one(self, conn: sqlite3.Connection, raw: bytes | str, now: float, batch: _Batch,
                    source: str | None = None) -> str:
        try:
            # Size first: a 20 MB message costs a len(), not a parse.
            if _size(raw) > MAX_MESSAGE_BYTES:
                raise payloads.MalformedPayload("too_large", f"{_size(raw)} bytes > {MAX_MESSAGE_BYTES}")
            if source is not None and not THING_RE.match(source):
                raise payloads.MalformedPayload("bad_topic", source[:40])
            msg = payloads.validate_telemetry(payloads.decode(raw))
            thing, seq = msg["thing"], msg["seq"]
            if not THING_RE.match(thing):
                raise payloads.MalformedPayload("bad_thing", thing[:40])
            ts = _finite_or(msg.get("ts"), None)
        except payloads.MalformedPayload as exc:
            batch.add(f"malformed:{exc.kind}")
            return f"malformed:{exc.kind}"
        if source is not None and thing != source:
            # gw1 (its own credentials, its own topic) speaking for gw2: nothing of it is stored.
            batch.add("spoofed")
            batch.add(f"spoofed:{source}")
            self._warn.warn(f"spoofed:{source}", "telemetry claiming another thing dropped",
                            source_thing=source, claimed_thing=thing[:40], seq=seq)
            return SPOOFED

        device = conn.execute(
            "SELECT first_seq, max_seq, retained_from_seq FROM devices WHERE thing=?", (thing,)
        ).fetchone()
        if device is not None and seq < device["retained_from_seq"]:
            # Older than what retention kept: we cannot tell a duplicate from a very late
            # message any more, so drop it and say so.
            conn.execute("UPDATE devices SET stale=stale+1, last_seen=? WHERE thing=?", (now, thing))
            batch.add("stale")
            return STALE
        cur = conn.execute(
            "INSERT OR IGNORE INTO messages (thing, seq, ts, received_at, n_records) VALUES (?,?,?,?,?)",
            (thing, seq, ts, now, len(msg["records"])),
        )
        if cur.rowcount == 0:
            conn.execute("UPDATE devices SET duplicates=duplicates+1, last_seen=? WHERE thing=?", (now, thing))
            batch.add("duplicates")
            return DUPLICATE
        if device is None:
            conn.execute(
                "INSERT INTO devices (thing, first_seq, max_seq, received, retained_from_seq, first_seen,"
                " last_seen, last_msg_ts) VALUES (?,?,?,1,0,?,?,?)",
                (thing, seq, seq, now, now, ts),
            )
        else:
            conn.execute(
                "UPDATE devices SET first_seq=MIN(first_seq, ?), max_seq=MAX(max_seq, ?),"
                " received=received+1, last_seen=?, last_msg_ts=MAX(COALESCE(last_msg_ts, 0), COALESCE(?, 0))"
                " WHERE thing=?",
                (seq, seq, now, ts, thing),
            )
        for record in msg["records"]:
            try:
                kind = record["type"]
                if kind == "score":
                    self._score(conn, thing, record["body"], batch)
                elif kind == "health":
                    self._health(conn, thing, record["body"], batch)
                elif kind == "drift":
                    self._drift(conn, thing, record["body"], batch)
                else:
                    self._log(conn, thing, record["body"], ts or now)
                batch.add(f"records:{kind}")
            except payloads.MalformedPayload as exc:
                # One bad record does not cost its neighbours.
                batch.add(f"malformed_record:{exc.kind}")
                if isinstance(exc, _Foreign):
                    batch.add("spoofed_records")
                    batch.add(f"spoofed_records:{thing}")
                    self._warn.warn(f"spoofed_records:{thing}", "record about another device dropped",
                                    source_thing=thing, reason=exc.kind, claimed=exc.detail)
        return STORED

    def _score(self, conn: sqlite3.Connection, thing: str, body: dict, batch: _Batch) -> None:
        payloads.validate_score(body)
        turbine = body["turbine_id"]
        if not TURBINE_RE.match(turbine) or topics.gateway_of(turbine) != thing:
            raise _Foreign("foreign_turbine", turbine[:40])
        errors = body["feature_errors"]
        thresholds = body.get("thresholds") or {}  # validate_score: a dict of finite numbers
        score = _finite_or(body.get("score"), None)
        if score is None:
            ratios = [errors[f] / thresholds[f] for f in errors if thresholds.get(f)]
            score = max(ratios) if ratios else None
        if score is not None:
            score = min(float(score), sys.float_info.max)  # 1e308 / 1e-308 is inf
        anomalous = body.get("anomalous_features")
        anomalous = [a for a in anomalous if isinstance(a, str)] if isinstance(anomalous, list) else []
        ts, version, anomaly = float(body["ts"]), body["model_version"], bool(body["anomaly"])
        cur = conn.execute(
            "INSERT OR IGNORE INTO scores (thing, turbine_id, ts, model_version, window_end_seq, score,"
            " anomaly, detail) VALUES (?,?,?,?,?,?,?,?)",
            (thing, turbine, ts, version, body["window_end_seq"], score, int(anomaly),
             json.dumps([errors, thresholds, anomalous], separators=(",", ":"))),
        )
        if cur.rowcount == 0:  # the same window re-sent inside another message
            batch.add("duplicate_records")
            return
        # The per-turbine summary is folded in memory and written once per batch.
        a = int(anomaly)
        t = batch.turbines.get(turbine)
        if t is None:
            batch.turbines[turbine] = [thing, ts, version, score, a, 1, a, ts if a else None]
        else:
            if ts >= t[1]:
                t[1:5] = [ts, version, score, a]
            t[5] += 1
            t[6] += a
            if a:
                t[7] = ts if t[7] is None else max(t[7], ts)
        batch.version(thing, version, ts)

    @staticmethod
    def _flush_summaries(conn: sqlite3.Connection, batch: _Batch) -> None:
        conn.executemany(
            """INSERT INTO turbines (turbine_id, thing, last_ts, model_version, last_score, last_anomaly,
                   n_scores, n_anomalies, last_anomaly_ts)
               VALUES (:t, :thing, :ts, :v, :s, :a, :n, :na, :lat)
               ON CONFLICT (turbine_id) DO UPDATE SET
                   model_version = CASE WHEN :ts >= last_ts THEN :v ELSE model_version END,
                   last_score = CASE WHEN :ts >= last_ts THEN :s ELSE last_score END,
                   last_anomaly = CASE WHEN :ts >= last_ts THEN :a ELSE last_anomaly END,
                   last_ts = MAX(last_ts, :ts),
                   n_scores = n_scores + :n, n_anomalies = n_anomalies + :na,
                   last_anomaly_ts = CASE WHEN :lat IS NOT NULL THEN MAX(COALESCE(last_anomaly_ts, 0), :lat)
                                     ELSE last_anomaly_ts END""",
            [{"t": k, "thing": v[0], "ts": v[1], "v": v[2], "s": v[3], "a": v[4], "n": v[5], "na": v[6],
              "lat": v[7]} for k, v in batch.turbines.items()],
        )
        for thing, (ts, version) in batch.versions.items():
            TelemetryStore._model_version(conn, thing, version, ts)

    @staticmethod
    def _model_version(conn: sqlite3.Connection, thing: str, version: str, ts: float) -> None:
        conn.execute(
            "UPDATE devices SET model_version=?, model_version_ts=? WHERE thing=?"
            " AND (model_version_ts IS NULL OR model_version_ts <= ?)",
            (version, ts, thing, ts),
        )

    def _health(self, conn: sqlite3.Connection, thing: str, body: dict, batch: _Batch) -> None:
        payloads.validate_health(body)
        if body["thing"] != thing:
            raise _Foreign("foreign_thing", body["thing"][:40])
        ts = _finite_or(body.get("ts"), None)
        ts = self.clock() if ts is None else ts
        model_version = body.get("model_version") if isinstance(body.get("model_version"), str) else None
        reason = body.get("reason") if isinstance(body.get("reason"), str) else None
        conn.execute(
            "INSERT INTO health (thing, component, version, state, ts, body) VALUES (?,?,?,?,?,?)",
            (thing, body["component"], body["version"], body["state"], ts, json.dumps(body)),
        )
        conn.execute(
            """INSERT INTO components (thing, component, version, state, ts, model_version, reason, counters)
               VALUES (?,?,?,?,?,?,?,?)
               ON CONFLICT (thing, component) DO UPDATE SET version=excluded.version,
                   state=excluded.state, ts=excluded.ts,
                   model_version=COALESCE(excluded.model_version, model_version),
                   reason=excluded.reason, counters=excluded.counters
               WHERE excluded.ts >= components.ts""",
            (thing, body["component"], body["version"], body["state"], ts, model_version, reason,
             json.dumps(body["counters"])),
        )
        if model_version:
            batch.version(thing, model_version, ts)

    @staticmethod
    def _drift(conn: sqlite3.Connection, thing: str, body: dict, batch: _Batch) -> None:
        payloads.validate_drift(body)
        turbine = body["turbine_id"]
        if not TURBINE_RE.match(turbine) or topics.gateway_of(turbine) != thing:
            raise _Foreign("foreign_turbine", turbine[:40])
        ts, version = float(body["ts"]), body["model_version"]
        detail = json.dumps([body["score"], body["thresholds"], body["drifted"]], separators=(",", ":"))
        n_drifted = len(set(body["drifted"]))
        cur = conn.execute(
            "INSERT OR IGNORE INTO drift (thing, turbine_id, model_version, ts, samples, method, n_drifted, detail)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (thing, turbine, version, ts, body["samples"], body["method"], n_drifted, detail),
        )
        if cur.rowcount == 0:  # the same record re-sent inside another message
            batch.add("duplicate_records")
            return
        conn.execute(
            """INSERT INTO turbine_drift (turbine_id, thing, model_version, ts, n_drifted, detail)
               VALUES (?,?,?,?,?,?)
               ON CONFLICT (turbine_id) DO UPDATE SET thing=excluded.thing, model_version=excluded.model_version,
                   ts=excluded.ts, n_drifted=excluded.n_drifted, detail=excluded.detail
               WHERE excluded.ts >= turbine_drift.ts""",
            (turbine, thing, version, ts, n_drifted, detail),
        )

    @staticmethod
    def _log(conn: sqlite3.Connection, thing: str, body: dict, default_ts: float) -> None:
        if "thing" in body and body["thing"] != thing:
            claimed = body["thing"]
            raise _Foreign("foreign_thing", claimed[:40] if isinstance(claimed, str) else type(claimed).__name__)
        ts = _finite_or(body.get("ts"), default_ts)
        str_or_none = lambda v: v if isinstance(v, str) else None  # noqa: E731
        conn.execute(
            "INSERT INTO logs (thing, component, level, message, ts, body) VALUES (?,?,?,?,?,?)",
            (thing, str_or_none(body.get("component")), str_or_none(body.get("level")),
             str_or_none(body.get("message")), ts, json.dumps(body)),
        )

    @staticmethod
    def _flush_counters(conn: sqlite3.Connection, batch: _Batch) -> None:
        conn.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            list(batch.counts.items()),
        )

    def count(self, name: str, n: int = 1) -> None:
        """Add to a named counter (e.g. the service's own ``malformed`` drops)."""
        with self._lock:
            self._flush_counters(self._conn(), _Batch({name: n}))

    # ------------------------------------------------------------ retention
    def apply_retention(self, now: float | None = None) -> dict[str, int]:
        """Delete what is older than ``max_age_s`` and scores beyond ``max_score_rows``.

        Per-device counters (received, lost, duplicates) survive retention; the
        message ids kept for dedupe move ``retained_from_seq`` forward.
        """
        now = self.clock() if now is None else now
        cutoff = now - self.max_age_s
        deleted: dict[str, int] = {}
        with self._lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for table in ("scores", "health", "logs", "drift"):
                    deleted[table] = conn.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,)).rowcount
                conn.execute("DELETE FROM turbine_drift WHERE ts < ?", (cutoff,))
                deleted["messages"] = self._drop_messages(conn, "received_at < ?", cutoff)
                excess = conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0] - self.max_score_rows
                if excess > 0:
                    deleted["scores"] += conn.execute(
                        "DELETE FROM scores WHERE id IN (SELECT id FROM scores ORDER BY ts LIMIT ?)", (excess,)
                    ).rowcount
                    # keep no message ids older than the oldest score left, so the two agree
                    oldest = conn.execute("SELECT MIN(ts) FROM scores").fetchone()[0]
                    if oldest is not None:
                        deleted["messages"] += self._drop_messages(conn, "ts < ?", oldest)
                conn.execute(
                    "DELETE FROM turbines WHERE last_ts < ? AND turbine_id NOT IN (SELECT DISTINCT turbine_id FROM scores)",
                    (cutoff,),
                )
                self._flush_counters(conn, _Batch({f"retention_deleted:{k}": v for k, v in deleted.items() if v}))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return deleted

    @staticmethod
    def _drop_messages(conn: sqlite3.Connection, where: str, arg: float) -> int:
        # Dedupe forgets these ids, so anything at or below them arriving later is "stale".
        conn.execute(
            f"""UPDATE devices SET retained_from_seq = MAX(retained_from_seq,
                    (SELECT MAX(seq) + 1 FROM messages m WHERE m.thing = devices.thing AND {where}))
                WHERE EXISTS (SELECT 1 FROM messages m WHERE m.thing = devices.thing AND {where})""",
            (arg, arg),
        )
        return conn.execute(f"DELETE FROM messages WHERE {where}", (arg,)).rowcount

    # ------------------------------------------------------------ reads
    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self._conn().execute("SELECT name, value FROM counters ORDER BY name")}

    def spoofing(self) -> dict[str, dict[str, int]]:
        """Per sending device: ``messages`` dropped because the body claimed another thing,
        ``records`` dropped because they were about another device's turbine or thing."""
        out: dict[str, dict[str, int]] = {}
        for name, value in self.counters().items():
            kind, _, thing = name.partition(":")
            if kind in ("spoofed", "spoofed_records") and thing:
                entry = out.setdefault(thing, {"messages": 0, "records": 0})
                entry["messages" if kind == "spoofed" else "records"] += value
        return out

    def loss(self, thing: str | None = None) -> dict[str, dict[str, int]]:
        """Per device: ``received``, ``expected`` (``max_seq - first_seq + 1``), ``lost``,
        ``duplicates``, ``stale``, ``first_seq``, ``max_seq``."""
        sql = "SELECT * FROM devices" + (" WHERE thing=?" if thing else "") + " ORDER BY thing"
        out = {}
        for r in self._conn().execute(sql, (thing,) if thing else ()):
            expected = r["max_seq"] - r["first_seq"] + 1
            out[r["thing"]] = {
                "received": r["received"], "expected": expected, "lost": expected - r["received"],
                "duplicates": r["duplicates"], "stale": r["stale"],
                "first_seq": r["first_seq"], "max_seq": r["max_seq"],
            }
        return out

    def gaps(self, thing: str, limit: int = 100) -> list[tuple[int, int]]:
        """Missing sequence ranges ``(first, last)`` (inclusive) among retained messages."""
        rows = self._conn().execute(
            """SELECT seq + 1 AS a, nxt - 1 AS b FROM (
                   SELECT seq, LEAD(seq) OVER (ORDER BY seq) AS nxt FROM messages WHERE thing = ?)
               WHERE nxt > seq + 1 ORDER BY seq LIMIT ?""",
            (thing, limit),
        ).fetchall()
        return [(r["a"], r["b"]) for r in rows]

    def things(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT thing FROM devices ORDER BY thing")]

    def fleet(self) -> dict[str, Any]:
        """Fleet overview: per gateway its last contact, model version, components, loss
        and turbines; per turbine its last score and the features drifted now (``drifted``)."""
        conn = self._conn()
        now = self.clock()
        components: dict[str, list[dict]] = {}
        for r in conn.execute("SELECT * FROM components ORDER BY thing, component"):
            components.setdefault(r["thing"], []).append({
                "component": r["component"], "version": r["version"], "state": r["state"], "ts": r["ts"],
                "model_version": r["model_version"], "reason": r["reason"],
                "counters": json.loads(r["counters"] or "{}"),
            })
        turbines: dict[str, list[dict]] = {}
        for r in conn.execute("SELECT t.*, CASE WHEN d.n_drifted > 0 THEN json_extract(d.detail, '$[2]') END"
                              " AS drifted FROM turbines t LEFT JOIN turbine_drift d USING (turbine_id)"
                              " ORDER BY t.turbine_id"):
            turbines.setdefault(r["thing"], []).append({
                "turbine_id": r["turbine_id"], "thing": r["thing"], "last_ts": r["last_ts"],
                "model_version": r["model_version"], "last_score": r["last_score"],
                "anomaly": bool(r["last_anomaly"]), "n_scores": r["n_scores"], "n_anomalies": r["n_anomalies"],
                "last_anomaly_ts": r["last_anomaly_ts"],
                "drifted": json.loads(r["drifted"]) if r["drifted"] else [],  # features drifted now
            })
        loss = self.loss()
        gateways = []
        for r in conn.execute("SELECT * FROM devices ORDER BY thing"):
            thing = r["thing"]
            gateways.append({
                "thing": thing, "last_seen": r["last_seen"], "last_seen_age_s": round(now - r["last_seen"], 3),
                "model_version": r["model_version"], "components": components.get(thing, []),
                "turbines": turbines.get(thing, []), "telemetry": loss.get(thing, {}),
            })
        return {"generated_at": now, "gateways": gateways, "counters": self.counters()}

    def turbine_scores(self, turbine_id: str, since: float | None = None, limit: int = 2000) -> dict[str, Any]:
        """Columnar score series of one turbine (oldest first, the newest ``limit``),
        ready for a chart: ``ts``, ``score``, ``anomaly``, and per feature its
        ``errors``, ``thresholds`` and ``anomalous`` flags."""
        conn = self._conn()
        rows = conn.execute(
            "SELECT ts, score, anomaly, model_version, detail FROM scores WHERE turbine_id=? AND ts > ? ORDER BY ts DESC LIMIT ?",
            (turbine_id, -1.0 if since is None else since, limit),
        ).fetchall()[::-1]
        meta = conn.execute("SELECT * FROM turbines WHERE turbine_id=?", (turbine_id,)).fetchone()
        parsed = [json.loads(r["detail"]) for r in rows]
        features = [f for f in FEATURES if any(f in e for e, _, _ in parsed)]
        features += sorted({f for e, _, _ in parsed for f in e} - set(features))
        return {
            "turbine_id": turbine_id,
            "thing": meta["thing"] if meta else None,
            "known": meta is not None,
            "features": features,
            "ts": [r["ts"] for r in rows],
            "score": [r["score"] for r in rows],
            "anomaly": [bool(r["anomaly"]) for r in rows],
            "model_version": [r["model_version"] for r in rows],
            "errors": {f: [e.get(f) for e, _, _ in parsed] for f in features},
            "thresholds": {f: [t.get(f) for _, t, _ in parsed] for f in features},
            "anomalous": {f: [f in a for _, _, a in parsed] for f in features},
        }

    def _newest(self, query: str, since: float | None, thing: str | None, limit: int, *params: Any) -> sqlite3.Cursor:
        """``query`` (a SELECT with a WHERE, its ``params``) narrowed to rows after ``since`` (and
        of ``thing``), newest first, at most ``limit``."""
        sql, args = f"{query} AND ts > ?", [*params, -1.0 if since is None else since]
        if thing:
            sql += " AND thing = ?"
            args.append(thing)
        return self._conn().execute(sql + " ORDER BY ts DESC LIMIT ?", [*args, limit])

    def anomalies(self, since: float | None = None, limit: int = 200, thing: str | None = None) -> list[dict]:
        """Anomalous windows, newest first."""
        out = []
        for r in self._newest("SELECT thing, turbine_id, ts, model_version, score, detail FROM scores "
                              "WHERE anomaly = 1", since, thing, limit):
            errors, thresholds, anomalous = json.loads(r["detail"])
            out.append({"thing": r["thing"], "turbine_id": r["turbine_id"], "ts": r["ts"],
                        "model_version": r["model_version"], "score": r["score"], "anomalous_features": anomalous,
                        "feature_errors": errors, "thresholds": thresholds})
        return out

    def logs(self, since: float | None = None, limit: int = 200) -> list[dict]:
        return [
            {"thing": r["thing"], "component": r["component"], "level": r["level"], "message": r["message"],
             "ts": r["ts"]}
            for r in self._conn().execute(
                "SELECT * FROM logs WHERE ts > ? ORDER BY ts DESC LIMIT ?", (-1.0 if since is None else since, limit))
        ]

    # ------------------------------------------------------------ drift (payloads.drift records)
    def drift_series(self, turbine_id: str, since: float | None = None, limit: int = 2000) -> dict[str, Any]:
        """Columnar drift series of one turbine (oldest first, the newest ``limit``), ready for a
        chart: ``ts``, ``model_version``, ``samples``, and per feature its ``score``, ``thresholds``
        and ``drifted`` flags (None where a record lacks the feature)."""
        rows = self._newest("SELECT ts, model_version, samples, detail FROM drift WHERE turbine_id = ?",
                            since, None, limit, turbine_id).fetchall()[::-1]
        latest = self._conn().execute("SELECT thing FROM turbine_drift WHERE turbine_id = ?", (turbine_id,)).fetchone()
        parsed = [json.loads(r["detail"]) for r in rows]
        features = [f for f in FEATURES if any(f in score for score, _, _ in parsed)]
        features += sorted({f for score, _, _ in parsed for f in score} - set(features))
        return {
            "turbine_id": turbine_id, "thing": latest["thing"] if latest else None, "known": latest is not None,
            "features": features, "ts": [r["ts"] for r in rows],
            "model_version": [r["model_version"] for r in rows], "samples": [r["samples"] for r in rows],
            "score": {f: [score.get(f) for score, _, _ in parsed] for f in features},
            "thresholds": {f: [limits.get(f) for _, limits, _ in parsed] for f in features},
            "drifted": {f: [f in drifted for _, _, drifted in parsed] for f in features},
        }

    def latest_drift(self, thing: str | None = None) -> list[dict]:
        """Each turbine's newest drift record (by turbine id): ``turbine_id``, ``thing``,
        ``model_version``, ``ts``, ``score``, ``thresholds``, ``drifted`` (features over their
        threshold; non-empty = drifted now)."""
        sql = "SELECT * FROM turbine_drift" + (" WHERE thing = ?" if thing else "") + " ORDER BY turbine_id"
        out = []
        for r in self._conn().execute(sql, (thing,) if thing else ()):
            score, thresholds, drifted = json.loads(r["detail"])
            out.append({"turbine_id": r["turbine_id"], "thing": r["thing"], "model_version": r["model_version"],
                        "ts": r["ts"], "score": score, "thresholds": thresholds, "drifted": drifted})
        return out

    def drift_flagged_turbines(self, model_version: str | None = None) -> list[str]:
        """Turbines drifted now (their newest drift record names a feature over its threshold),
        sorted; of the turbines running ``model_version`` only, when given."""
        sql = "SELECT turbine_id FROM turbine_drift WHERE n_drifted > 0"
        args: tuple = ()
        if model_version is not None:
            sql, args = sql + " AND model_version = ?", (model_version,)
        return [r[0] for r in self._conn().execute(sql + " ORDER BY turbine_id", args)]

    def drift_by_model(self) -> dict[str, dict]:
        """Per model version, from each turbine's newest drift record: ``turbines`` reporting
        with it, ``drifted_turbines``, per feature how many turbines are over its threshold
        (``features``), and ``retrain_suggested`` (any of its turbines drifted now)."""
        out: dict[str, dict] = {}
        for item in self.latest_drift():
            entry = out.setdefault(item["model_version"], {"model_version": item["model_version"], "turbines": 0,
                                                           "drifted_turbines": [], "features": {},
                                                           "retrain_suggested": False, "last_ts": item["ts"]})
            entry["turbines"] += 1
            entry["last_ts"] = max(entry["last_ts"], item["ts"])
            if item["drifted"]:
                entry["drifted_turbines"].append(item["turbine_id"])
                entry["retrain_suggested"] = True
                for f in dict.fromkeys(item["drifted"]):
                    entry["features"][f] = entry["features"].get(f, 0) + 1
        return out

    # ------------------------------------------------------------ canary (cloud/canary.py reads these)
    def shadow_series(self, since: float | None = None, candidate_version: str | None = None,
                      thing: str | None = None, limit: int = 5000) -> list[dict]:
        """Health reports that carry canary shadow statistics (``payloads.shadow_stats``), oldest
        first: ``[{"thing", "ts", "shadow"}]``; malformed ``shadow`` objects are skipped."""
        out = []
        for r in self._newest("SELECT thing, ts, json_extract(body, '$.shadow') AS shadow FROM health "
                              "WHERE json_type(body, '$.shadow') = 'object'", since, thing, limit):
            try:
                shadow = payloads.validate_shadow(json.loads(r["shadow"]))
            except (payloads.MalformedPayload, ValueError):
                continue
            if candidate_version is None or shadow["candidate_version"] == candidate_version:
                out.append({"thing": r["thing"], "ts": r["ts"], "shadow": shadow})
        return out[::-1]

    def latest_shadow(self, since: float | None = None, candidate_version: str | None = None) -> dict[str, dict]:
        """Per gateway its newest shadow statistics: ``{thing: {"ts", "shadow"}}``."""
        return {r["thing"]: r for r in self.shadow_series(since, candidate_version)}


# ====================================================================== service
class IngestService:
    """Subscribe to every device's telemetry and store it.

    paho's network thread only queues messages (bounded: a full queue pushes back
    on the broker through TCP); a writer thread commits them in batches and
    acknowledges each QoS 1 message only after its batch is committed, so a crash
    between receipt and commit makes the broker redeliver (and dedupe drops any
    message seen twice).  Use as a context manager or ``start()``/``stop()``.
    """

    def __init__(
        self,
        store: TelemetryStore,
        host: str = "127.0.0.1",
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        *,
        client_id: str = "windfleet-ingest",
        batch_max: int = 500,
        queue_max: int = 20_000,
        retention_interval_s: float = 60.0,
    ):
        import paho.mqtt.client as mqtt  # imported here so the Lambda never needs paho

        self.store, self.batch_max, self.retention_interval_s = store, batch_max, retention_interval_s
        self.connected = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_max)
        self._stop = threading.Event()
        self._closing = False
        self._retry: list = []  # a batch the store refused, written again before anything new
        self._writer: threading.Thread | None = None
        self._warn = jsonlog.RateLimited(log)
        self.stats = {"received": 0, "stored": 0, "duplicate": 0, "stale": 0, "malformed": 0, "spoofed": 0}
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,  # persistent session: the broker queues while we are away
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(0.2, 5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._host, self._port = host, port

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            jsonlog.event(log, "broker refused connection", logging.ERROR, reason=str(reason_code))
            return
        client.subscribe(topics.ALL_TELEMETRY, qos=1)
        self.connected.set()
        jsonlog.event(log, "connected", host=self._host, port=self._port,
                      session_present=bool(getattr(flags, "session_present", False)))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()
        if not self._closing:
            jsonlog.event(log, "disconnected; reconnecting", logging.WARNING, reason=str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:
        try:
            source = topics.thing_of(msg.topic)  # who sent it: the ACL let only them publish there
        except ValueError:
            source = ""  # not a telemetry topic: counted as malformed:bad_topic
        self._queue.put((msg.payload, msg.mid, msg.qos, source))

    def _write_loop(self) -> None:
        last_retention = time.monotonic()
        while not self._stop.is_set() or not self._queue.empty():
            try:
                last_retention = self._write_once(last_retention)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one bad batch
                self._warn.warn("writer_error", "ingest writer error", error=f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def _write_once(self, last_retention: float) -> float:
        items, self._retry = self._retry, []
        if not items:
            try:
                items = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                pass
        while items and len(items) < self.batch_max:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if items:
            try:
                outcomes = self.store.ingest_many([p for p, _, _, _ in items], sources=[s for *_, s in items])
            except sqlite3.Error as exc:
                # Not acknowledged: the broker redelivers them when the session resumes.
                self._warn.warn("store_error", "store write failed; retrying (messages unacknowledged)",
                                error=str(exc), n=len(items))
                if self._stop.is_set():  # shutting down: unacknowledged, so the broker redelivers
                    self._queue = queue.Queue()
                    return last_retention
                self._retry = items
                time.sleep(1.0)
                return last_retention
            for (payload, mid, qos, source), outcome in zip(items, outcomes):
                if qos > 0:
                    self._client.ack(mid, qos)
                key = outcome.split(":", 1)[0]
                if key not in ("malformed", SPOOFED):
                    self._confirm(payload, source)
                self.stats[key] = self.stats.get(key, 0) + 1
                if key == "malformed":
                    self._warn.warn(outcome, "malformed telemetry dropped", bytes=len(payload))
            self.stats["received"] += len(items)
        if time.monotonic() - last_retention >= self.retention_interval_s:
            last_retention = time.monotonic()
            deleted = self.store.apply_retention()
            if any(deleted.values()):
                jsonlog.event(log, "retention", **deleted)
        return last_retention

    def _confirm(self, payload: bytes, source: str) -> None:
        """Tell the device its message is stored (a repeat too): only then does its forwarder
        delete it (``delivery: cloud_ack``).  Only the sender (the topic's thing) is told."""
        try:
            body = payloads.decode(payload)
            ack = payloads.telemetry_ack(source, body["seq"])
        except (payloads.MalformedPayload, KeyError, TypeError):
            return
        self._client.publish(topics.telemetry_ack(source), payloads.encode(ack), qos=1)

    def start(self, wait_connected: float | None = 10.0) -> "IngestService":
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if wait_connected and not self.connected.wait(wait_connected):
            self.stop()
            raise ConnectionError(f"ingest: no connection to broker {self._host}:{self._port}")
        return self

    def stop(self) -> None:
        # Stop the network first (no new messages), then drain what is queued.
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self._stop.set()
        if self._writer:
            self._writer.join(timeout=30)

    def __enter__(self) -> "IngestService":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_ingest(
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    store_path: str | Path,
    *,
    stop: threading.Event | None = None,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_score_rows: int = DEFAULT_MAX_SCORE_ROWS,
) -> dict[str, int]:
    """Run the ingest service until ``stop`` is set (or KeyboardInterrupt); returns its stats."""
    stop = stop or threading.Event()
    store = TelemetryStore(store_path, max_age_s=max_age_s, max_score_rows=max_score_rows)
    service = IngestService(store, host, port, username, password)
    try:
        service.start(wait_connected=None)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        store.close()
    return service.stats


# ====================================================================== AWS
LOG_GROUP_ENV = "WINDFLEET_LOG_GROUP"
DEFAULT_LOG_GROUP = "/windfleet/telemetry"
# The account's IoT data endpoint (``describe_endpoint(endpointType="iot:Data-ATS")``, looked up by
# the provisioner): where the Lambda publishes its acknowledgements.
IOT_DATA_ENDPOINT_ENV = "WINDFLEET_IOT_DATA_ENDPOINT"
_STREAM_BAD = re.compile(r"[:*]")
# CloudWatch rejects events older than 14 days or more than 2 hours ahead.
_MAX_PAST_MS, _MAX_FUTURE_MS = 14 * 24 * 3600 * 1000 - 60_000, 2 * 3600 * 1000 - 60_000
_MAX_BATCH_EVENTS, _MAX_BATCH_BYTES = 10_000, 1_000_000

_logs_client = None
_iot_data_client = None


def _default_logs_client():
    global _logs_client
    if _logs_client is None:  # created once per Lambda container, reused across invocations
        import boto3

        _logs_client = boto3.client("logs")
    return _logs_client


def _default_iot_data_client():
    global _iot_data_client
    if _iot_data_client is None:  # created on the first ack, reused across invocations
        import boto3

        endpoint = os.environ.get(IOT_DATA_ENDPOINT_ENV)
        # Without the provisioned endpoint, botocore's regional default (data-ats.iot.<region>).
        _iot_data_client = (boto3.client("iot-data", endpoint_url="https://" + endpoint) if endpoint
                            else boto3.client("iot-data"))
    return _iot_data_client


def log_events(message: dict) -> list[dict]:
    """The structured events :func:`lambda_handler` writes for one validated telemetry
    message: one ``record_type=message`` event (seq bookkeeping) and one per record.

    Fields are flat so Logs Insights discovers them without parsing: ``thing``, ``seq``,
    ``record_type``, and per score ``turbine_id``, ``model_version``, ``anomaly`` (0/1),
    ``score``, ``error_<feature>``, ``threshold_<feature>``, ``anomalous_features``,
    ``readings`` (new samples the window covers); per drift ``turbine_id``, ``model_version``,
    ``method``, ``samples``, ``n_drifted``, ``drifted`` (comma-separated features over their
    threshold), ``drift_<feature>``, ``drift_threshold_<feature>``; per health ``component``,
    ``version``, ``state``, ``model_version``, ``reason``; per log ``component``,
    ``level``, ``message``.
    """
    thing, seq = message["thing"], message["seq"]
    msg_ts = _finite_or(message.get("ts"), None)
    msg_ts = time.time() if msg_ts is None else msg_ts
    events = [{"ts": msg_ts, "body": {
        "record_type": "message", "thing": thing, "seq": seq, "n_records": len(message["records"]),
    }}]
    for record in message["records"]:
        body, kind = record["body"], record["type"]
        try:
            if kind == "score":
                payloads.validate_score(body)
                if not TURBINE_RE.match(body["turbine_id"]) or topics.gateway_of(body["turbine_id"]) != thing:
                    raise _Foreign("foreign_turbine", body["turbine_id"][:40])
                errors = body["feature_errors"]
                thresholds = body.get("thresholds") if isinstance(body.get("thresholds"), dict) else {}
                anomalous = body.get("anomalous_features")
                anomalous = anomalous if isinstance(anomalous, list) else []
                event = {
                    "record_type": "score", "thing": thing, "seq": seq, "turbine_id": body["turbine_id"],
                    "model_version": body["model_version"], "window_end_seq": body["window_end_seq"],
                    "anomaly": int(bool(body["anomaly"])), "score": body.get("score"),
                    "anomalous_features": ",".join(a for a in anomalous if isinstance(a, str)),
                    "readings": STRIDE,
                }
                for feature in FEATURES:
                    event[f"error_{feature}"] = errors.get(feature)
                    event[f"threshold_{feature}"] = thresholds.get(feature)
            elif kind == "drift":
                payloads.validate_drift(body)
                if not TURBINE_RE.match(body["turbine_id"]) or topics.gateway_of(body["turbine_id"]) != thing:
                    raise _Foreign("foreign_turbine", body["turbine_id"][:40])
                event = {
                    "record_type": "drift", "thing": thing, "seq": seq, "turbine_id": body["turbine_id"],
                    "model_version": body["model_version"], "method": body["method"], "samples": body["samples"],
                    "n_drifted": len(set(body["drifted"])), "drifted": ",".join(body["drifted"]),
                }
                for feature in FEATURES:
                    event[f"drift_{feature}"] = body["score"].get(feature)
                    event[f"drift_threshold_{feature}"] = body["thresholds"].get(feature)
            elif kind == "health":
                payloads.validate_health(body)
                if body["thing"] != thing:
                    raise _Foreign("foreign_thing", body["thing"][:40])
                event = {
                    "record_type": "health", "thing": thing, "seq": seq, "component": body["component"],
                    "version": body["version"], "state": body["state"],
                    "model_version": body.get("model_version") or "", "reason": body.get("reason") or "",
                    "counters": body["counters"],
                }
            else:
                if "thing" in body and body["thing"] != thing:
                    raise _Foreign("foreign_thing", str(body["thing"])[:40])
                event = {
                    "record_type": "log", "thing": thing, "seq": seq, "component": body.get("component"),
                    "level": body.get("level"), "message": body.get("message"),
                }
        except _Foreign as exc:  # about another device's turbine or thing: not written as data
            event = {"record_type": "spoofed", "thing": thing, "seq": seq, "kind": exc.kind, "claimed": exc.detail}
        except payloads.MalformedPayload as exc:
            event = {"record_type": "malformed", "thing": thing, "seq": seq, "kind": exc.kind}
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            # Unforeseen by the validators: still one record, never a Lambda error (IoT would retry
            # the whole message for ever).
            event = {"record_type": "malformed", "thing": thing, "seq": seq, "kind": "invalid",
                     "error": f"{type(exc).__name__}: {exc}"[:200]}
        events.append({"ts": _finite_or(body.get("ts"), msg_ts), "body": event})  # 1e400 parses as inf
    return events


def _put(logs, group: str, stream: str, events: list[dict]) -> None:
    try:
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=events)
    except logs.exceptions.ResourceNotFoundException:
        # First message of a device (or first run): create what is missing, idempotently.
        try:
            logs.create_log_group(logGroupName=group)
        except logs.exceptions.ResourceAlreadyExistsException:
            pass
        try:
            logs.create_log_stream(logGroupName=group, logStreamName=stream)
        except logs.exceptions.ResourceAlreadyExistsException:
            pass
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=events)


def _acknowledge(iot_data_client: Any, thing: str, seq: int) -> bool:
    """Publish the device's :func:`payloads.telemetry_ack` (QoS 1); its forwarder deletes the
    message from its spool only then.  A failure is logged (one line), never raised: IoT would
    retry the rule and write the message again; the device re-sends it and gets its ack then."""
    try:
        client = iot_data_client or _default_iot_data_client()
        client.publish(topic=topics.telemetry_ack(thing), qos=1,
                       payload=payloads.encode(payloads.telemetry_ack(thing, seq)))
        return True
    except Exception as exc:  # noqa: BLE001 - any failure (client, network, service) is one log line
        print(json.dumps({"level": "WARNING", "msg": "telemetry ack not published", "thing": thing,
                          "seq": seq, "error": f"{type(exc).__name__}: {exc}"[:200]}))
        return False


def _put_shadow_metrics(cloudwatch: Any, message: dict) -> int:
    """Canary shadow statistics of the message's health records -> CloudWatch metrics, which the
    scheduled canary evaluation reads back (:mod:`windfleet.cloud.canary`).  A failure is one log
    line: the logs are written and the next report carries the same cumulative figures."""
    from . import settings  # noqa: PLC0415 - only messages with shadow statistics need these
    from .canary import shadow_metric_data  # noqa: PLC0415

    data = []
    for record in message["records"]:
        body = record.get("body") if isinstance(record, dict) else None
        if record.get("type") == "health" and isinstance(body, dict) and "shadow" in body \
                and body.get("thing") == message["thing"]:
            try:
                data += shadow_metric_data(message["thing"], payloads.validate_shadow(body["shadow"]),
                                           _finite_or(body.get("ts"), None))
            except payloads.MalformedPayload:
                continue
    if not data:
        return 0
    try:
        client = cloudwatch or _default_cloudwatch_client()
        for i in range(0, len(data), 500):  # PutMetricData takes at most 1000 metrics per call
            client.put_metric_data(Namespace=settings.CANARY_METRIC_NAMESPACE, MetricData=data[i:i + 500])
    except Exception as exc:  # noqa: BLE001 - never fail the message for a metric
        print(json.dumps({"level": "WARNING", "msg": "canary metrics not put", "thing": message["thing"],
                          "error": f"{type(exc).__name__}: {exc}"[:200]}))
        return 0
    return len(data)


_cloudwatch_client = None


def _default_cloudwatch_client():
    global _cloudwatch_client
    if _cloudwatch_client is None:
        import boto3

        _cloudwatch_client = boto3.client("cloudwatch")
    return _cloudwatch_client


def lambda_handler(event: dict, context: Any, *, logs_client: Any = None, log_group: str | None = None,
                   iot_data_client: Any = None, cloudwatch_client: Any = None) -> dict:
    """IoT rule action: one telemetry message -> structured CloudWatch Logs events, then an
    acknowledgement to the device on ``windfleet/fleet/{thing}/ack``.

    ``event`` is the telemetry payload plus ``source_thing``, the topic's thing (the rule
    is ``SELECT *, topic(3) AS source_thing``): that is who sent it, and the body's
    ``thing`` must equal it (else ``{"dropped": "spoofed"}``); an event without it is
    dropped (``no_source_thing``: a rule that does not say who published is not trusted).
    A malformed message (over :data:`MAX_MESSAGE_BYTES`: ``too_large``) is logged (one
    line) and dropped without raising, so IoT does not retry it forever (and gets no
    ack).  Every stored message is acknowledged, to ``source_thing`` only, a repeated
    ``seq`` too (the device did not get the first ack).  Health records carrying canary
    ``shadow`` statistics are also put to CloudWatch metrics (:func:`_put_shadow_metrics`).
    Returns ``{"written": n, "acked": bool}`` (plus ``"metrics": n`` when any were put) or
    ``{"dropped": kind}``.
    """
    logs = logs_client or _default_logs_client()
    group = log_group or os.environ.get(LOG_GROUP_ENV, DEFAULT_LOG_GROUP)
    source = event.get("source_thing") if isinstance(event, dict) else None
    try:
        if isinstance(event, dict):
            event = {k: v for k, v in event.items() if k != "source_thing"}
        raw = event if isinstance(event, (bytes, str)) else json.dumps(event, allow_nan=False)
        if _size(raw) > MAX_MESSAGE_BYTES:
            raise payloads.MalformedPayload("too_large", f"{_size(raw)} bytes > {MAX_MESSAGE_BYTES}")
        if not isinstance(source, str) or not THING_RE.match(source):
            raise payloads.MalformedPayload("no_source_thing", str(source)[:40])
        message = payloads.validate_telemetry(payloads.decode(raw))
        if not THING_RE.match(message["thing"]):
            raise payloads.MalformedPayload("bad_thing", message["thing"][:40])
    except (payloads.MalformedPayload, ValueError, TypeError) as exc:
        kind = getattr(exc, "kind", "not_json")
        print(json.dumps({"level": "WARNING", "msg": "malformed telemetry dropped", "kind": kind,
                          "source_thing": source if isinstance(source, str) else None}))
        return {"dropped": kind}
    if message["thing"] != source:
        print(json.dumps({"level": "WARNING", "msg": "spoofed telemetry dropped", "source_thing": source,
                          "claimed_thing": message["thing"][:40], "seq": message["seq"]}))
        return {"dropped": SPOOFED}
    now_ms = int(time.time() * 1000)
    events = []
    for item in log_events(message):
        ts_ms = int(item["ts"] * 1000)
        if not now_ms - _MAX_PAST_MS <= ts_ms <= now_ms + _MAX_FUTURE_MS:
            ts_ms = now_ms  # a device clock far off must not get the whole batch rejected
        events.append({"timestamp": ts_ms, "message": json.dumps(item["body"], separators=(",", ":"), default=str)})
    events.sort(key=lambda e: e["timestamp"])  # PutLogEvents requires chronological order
    stream = _STREAM_BAD.sub("_", message["thing"])
    batch: list[dict] = []
    size = 0
    for ev in events:
        ev_size = len(ev["message"].encode()) + 26  # AWS counts 26 bytes of overhead per event
        if batch and (len(batch) >= _MAX_BATCH_EVENTS or size + ev_size > _MAX_BATCH_BYTES):
            _put(logs, group, stream, batch)
            batch, size = [], 0
        batch.append(ev)
        size += ev_size
    if batch:
        _put(logs, group, stream, batch)
    metrics = _put_shadow_metrics(cloudwatch_client, message)
    acked = _acknowledge(iot_data_client, source, message["seq"])  # == message["thing"]
    return {"written": len(events), "acked": acked, **({"metrics": metrics} if metrics else {})}


def dashboard_queries(log_group: str) -> list[tuple[str, str, str]]:
    """``(title, view, Logs Insights query)`` of each dashboard widget."""
    src = f"SOURCE '{log_group}'"
    errs = ", ".join(f"max(error_{f}) as {f}, max(threshold_{f}) as {f}_threshold" for f in FEATURES)
    drift = ", ".join(f"max(drift_{f}) as {f}, max(drift_threshold_{f}) as {f}_threshold" for f in FEATURES)
    return [
        ("Anomalies per turbine", "bar",
         f"{src} | filter record_type = 'score' and anomaly = 1"
         " | stats count(*) as anomalies by turbine_id | sort anomalies desc | limit 50"),
        ("Anomalous windows over time", "timeSeries",
         f"{src} | filter record_type = 'score' and anomaly = 1 | stats count(*) as anomalies by bin(1m)"),
        ("Feature errors against thresholds (all turbines, max per minute)", "timeSeries",
         f"{src} | filter record_type = 'score' | stats {errs} by bin(1m)"),
        ("Score (max error/threshold; > 1 is an anomaly) per turbine", "table",
         f"{src} | filter record_type = 'score'"
         " | stats max(score) as max_score, avg(score) as mean_score, latest(model_version) as model_version"
         " by turbine_id | sort max_score desc | limit 50"),
        ("Model version per device", "table",
         f"{src} | filter record_type = 'score'"
         " | stats latest(model_version) as model_version, max(@timestamp) as last_score by thing"
         " | sort thing asc"),
        ("Readings per second", "timeSeries",
         # arithmetic is allowed in `fields`, so spread each window's new samples over the minute
         f"{src} | filter record_type = 'score' | fields readings / 60 as per_s"
         " | stats sum(per_s) as readings_per_s by bin(1m)"),
        ("Deployment status: component version and state per device", "table",
         f"{src} | filter record_type = 'health'"
         " | stats latest(state) as state, latest(version) as version, latest(model_version) as model,"
         " latest(reason) as reason, max(@timestamp) as reported by thing, component | sort thing asc"),
        ("Telemetry sequence per device (loss = last - first + 1 - received)", "table",
         f"{src} | filter record_type = 'message'"
         " | stats min(seq) as first, max(seq) as last, count_distinct(seq) as received by thing"),
        ("Input drift per feature against thresholds (all turbines, max per minute)", "timeSeries",
         f"{src} | filter record_type = 'drift' | stats {drift} by bin(1m)"),
        ("Drift now per turbine (drifted_features > 0: retrain suggested for its model_version)", "table",
         f"{src} | filter record_type = 'drift'"
         " | stats latest(n_drifted) as drifted_features, latest(drifted) as features,"
         " latest(model_version) as model_version, max(@timestamp) as reported by turbine_id"
         " | sort drifted_features desc | limit 100"),
        ("Drifted turbines per model version (in the dashboard's time range)", "bar",
         f"{src} | filter record_type = 'drift' and n_drifted > 0"
         " | stats count_distinct(turbine_id) as drifted_turbines by model_version"),
        ("Warnings and errors from devices", "table",
         f"{src} | filter record_type = 'log' | fields @timestamp, thing, component, level, message"
         " | sort @timestamp desc | limit 50"),
    ]


def dashboard_body(log_group: str = DEFAULT_LOG_GROUP, region: str = "us-east-1") -> dict:
    """The CloudWatch dashboard body (``put_dashboard(DashboardBody=json.dumps(...))``):
    Logs Insights widgets over the fields :func:`lambda_handler` writes."""
    widgets = []
    for i, (title, view, query) in enumerate(dashboard_queries(log_group)):
        widgets.append({
            "type": "log",
            "x": (i % 2) * 12, "y": (i // 2) * 6, "width": 12, "height": 6,
            "properties": {"query": query, "region": region, "title": title, "view": view, "stacked": False},
        })
    return {"start": "-PT3H", "periodOverride": "auto", "widgets": widgets}


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin CLI
    """``python -m windfleet.cloud.ingest HOST:PORT STORE`` with credentials from the env."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("broker", help="HOST:PORT")
    parser.add_argument("store")
    args = parser.parse_args(argv)
    jsonlog.setup("windfleet.ingest")
    from windfleet.hostport import parse_hostport  # not at module level: the Lambda zip does not carry it

    host, port = parse_hostport(args.broker)
    run_ingest(host, port, os.environ.get("WINDFLEET_BROKER_USER"),
               os.environ.get("WINDFLEET_BROKER_PASSWORD"), args.store)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
