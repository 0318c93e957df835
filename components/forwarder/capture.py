"""Captured windows: a bounded on-disk spool and their upload to S3 in batches.

The detector publishes each window it keeps (``payloads.capture``) on
``topics.capture(thing)``; the forwarder validates it and appends it to the
:class:`CaptureSpool` (SQLite in WAL mode, like the telemetry :mod:`.spool`; the bus
acknowledges the message only after the commit).  The :class:`Uploader` thread turns the
oldest ``batch_windows`` (or whatever waited ``batch_interval`` seconds) into ONE gzip JSON
Lines object, one record per line, under the key::

    {prefix}{thing}/{YYYY}/{MM}/{DD}/{epoch_ms}-{n}.jsonl.gz     (n: this device's object number)

and sends it with ``put_object`` on a plain ``boto3.client("s3", endpoint_url=...)``:
credentials come from boto3's default chain only -- on a device the nucleus' token
exchange service (``AWS_CONTAINER_CREDENTIALS_FULL_URI``).

Guarantees:

* An object is built (its windows move into it, its key and bytes fixed) in the same
  transaction that takes its windows out, and is deleted only after S3 accepted it.  While
  S3 is unreachable the same object is retried with backoff (same key: a retry after an
  unseen success overwrites it with the same bytes, never duplicates), so a restart --
  SIGTERM or ``kill -9`` mid-write or mid-upload -- loses nothing that was acknowledged.
* Bounded on disk: windows and the object in flight hold at most ``max_bytes``.  Beyond
  that the OLDEST NORMAL (``sampled``) windows are dropped first, then the oldest flagged
  ones (an alarm is rarer and worth more to a retrain); every drop is counted
  (``dropped_normal``, ``dropped_flagged``, persisted).  The object in flight is never dropped.
"""

from __future__ import annotations

import gzip
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from windfleet import jsonlog, payloads

log = logging.getLogger("windfleet.forwarder.capture")

DEFAULT_PREFIX = payloads.CAPTURE_PREFIX
DEFAULT_BATCH_WINDOWS = 200
DEFAULT_BATCH_INTERVAL = 60.0
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT, flagged INTEGER NOT NULL, body BLOB NOT NULL, received REAL NOT NULL);
CREATE INDEX IF NOT EXISTS windows_normal ON windows (flagged, id);
CREATE TABLE IF NOT EXISTS objects (
    seq INTEGER PRIMARY KEY, key TEXT NOT NULL, data BLOB NOT NULL, n_windows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class CaptureObject(NamedTuple):
    seq: int
    key: str
    data: bytes
    n_windows: int


class CaptureSpool:
    """Bounded, persistent FIFO of captured windows and the object being uploaded.  Thread-safe."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 1:
            raise ValueError("capture spool bound must be positive")
        self.path, self.max_bytes = Path(path), max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses nothing committed
        self._db.executescript(_SCHEMA)
        self.windows, self.window_bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM windows").fetchone()
        self.object_bytes = self._db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM objects").fetchone()[0]

    # ------------------------------------------------------------ meta
    def meta(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def _add_meta(self, key: str, n: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=value+?",
                         (key, n, n))

    @property
    def bytes(self) -> int:
        return self.window_bytes + self.object_bytes

    @property
    def dropped(self) -> int:
        with self._lock:
            return self.meta("dropped_normal") + self.meta("dropped_flagged")

    def counters(self) -> dict[str, int]:
        """Persisted totals: ``dropped_normal``, ``dropped_flagged``, ``uploaded_windows``, ``uploaded_objects``."""
        with self._lock:
            return {k: self.meta(k) for k in ("dropped_normal", "dropped_flagged", "uploaded_windows",
                                              "uploaded_objects")}

    # ------------------------------------------------------------ add
    def add(self, body: bytes, flagged: bool, received: float | None = None) -> int:
        """Append one window (committed when this returns); returns how many windows were
        dropped to keep the bound (possibly this one, when it alone exceeds it)."""
        received = time.time() if received is None else received
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("INSERT INTO windows(flagged, body, received) VALUES(?, ?, ?)",
                                       (int(bool(flagged)), body, received))
                self.windows += 1
                self.window_bytes += len(body)
                dropped = self._enforce_bound(cur.lastrowid)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return dropped

    def _enforce_bound(self, newest: int) -> int:
        """In the open transaction: drop oldest normal windows, then oldest flagged, until the
        bound holds; the newest window goes last (only when it alone is too big)."""
        dropped = 0
        for flagged in (0, 1):
            while self.bytes > self.max_bytes:
                rows = self._db.execute("SELECT id, LENGTH(body) FROM windows WHERE flagged=? AND id<? ORDER BY id "
                                        "LIMIT 64", (flagged, newest)).fetchall()
                if not rows:
                    break
                ids, freed = [], 0
                for rid, size in rows:
                    if self.bytes - freed <= self.max_bytes:
                        break
                    ids.append(rid)
                    freed += size
                self._db.executemany("DELETE FROM windows WHERE id=?", [(i,) for i in ids])
                self.windows -= len(ids)
                self.window_bytes -= freed
                self._add_meta("dropped_flagged" if flagged else "dropped_normal", len(ids))
                dropped += len(ids)
        if self.bytes > self.max_bytes:
            flagged, size = self._db.execute("SELECT flagged, LENGTH(body) FROM windows WHERE id=?",
                                             (newest,)).fetchone()
            self._db.execute("DELETE FROM windows WHERE id=?", (newest,))
            self.windows -= 1
            self.window_bytes -= size
            self._add_meta("dropped_flagged" if flagged else "dropped_normal", 1)
            dropped += 1
        return dropped

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        # counts may be off after a failed transaction: take them from the file again
        self.windows, self.window_bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM windows").fetchone()

    # ------------------------------------------------------------ objects
    def oldest_age(self, now: float | None = None) -> float:
        with self._lock:
            row = self._db.execute("SELECT received FROM windows ORDER BY id LIMIT 1").fetchone()
        return 0.0 if row is None else max(0.0, (time.time() if now is None else now) - row[0])

    def head(self) -> CaptureObject | None:
        """The object built and not yet accepted by S3, if any."""
        with self._lock:
            row = self._db.execute("SELECT seq, key, data, n_windows FROM objects ORDER BY seq LIMIT 1").fetchone()
        return CaptureObject(row[0], row[1], bytes(row[2]), row[3]) if row else None

    def build(self, thing: str, prefix: str, max_windows: int, now: float | None = None) -> CaptureObject | None:
        """Move the oldest ``max_windows`` windows into one gzip JSON Lines object (None when
        nothing waits)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT id, body FROM windows ORDER BY id LIMIT ?", (max(1, max_windows),)).fetchall()
            if not rows:
                return None
            data = gzip.compress(b"".join(bytes(body).rstrip(b"\n") + b"\n" for _, body in rows), mtime=0)
            size = sum(len(body) for _, body in rows)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self.meta("next_object", 1)
                key = payloads.capture_key(prefix, thing, now, seq)
                self._db.executemany("DELETE FROM windows WHERE id=?", [(rid,) for rid, _ in rows])
                self._db.execute("INSERT INTO objects(seq, key, data, n_windows) VALUES(?, ?, ?, ?)",
                                 (seq, key, data, len(rows)))
                self._db.execute("INSERT INTO meta(key, value) VALUES('next_object', ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (seq + 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self.windows -= len(rows)
            self.window_bytes -= size
            self.object_bytes += len(data)
            return CaptureObject(seq, key, data, len(rows))

    def ack(self, obj: CaptureObject) -> None:
        """S3 accepted ``obj``: forget it and count it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                deleted = self._db.execute("DELETE FROM objects WHERE seq=?", (obj.seq,)).rowcount
                if deleted:
                    self._add_meta("uploaded_objects", 1)
                    self._add_meta("uploaded_windows", obj.n_windows)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            if deleted:
                self.object_bytes -= len(obj.data)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()


def s3_client(endpoint: str | None = None) -> Any:
    """A plain boto3 S3 client: credentials from the default chain only (on a device: the
    token exchange service), ``endpoint`` for a non-AWS S3 (the local backend's)."""
    import boto3  # noqa: PLC0415 - ~0.3 s; only when there is something to upload
    from botocore.config import Config

    # short timeouts and one attempt: the uploader itself retries, with backoff, forever
    return boto3.client("s3", endpoint_url=endpoint or None,
                        config=Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 1}))


class Uploader:
    """Uploads the spool's objects to ``bucket`` until :meth:`stop`.  ``client_factory()``
    makes the S3 client (on the uploader's thread, at the first upload)."""

    def __init__(self, spool: CaptureSpool, thing: str, bucket: str, *, prefix: str = DEFAULT_PREFIX,
                 batch_windows: int = DEFAULT_BATCH_WINDOWS, batch_interval: float = DEFAULT_BATCH_INTERVAL,
                 client_factory: Callable[[], Any] = s3_client, retry_max: float = 30.0, flush_timeout: float = 5.0):
        self.spool, self.thing, self.bucket, self.prefix = spool, thing, bucket, prefix
        self.batch_windows, self.batch_interval = max(1, batch_windows), batch_interval
        self.client_factory, self.retry_max, self.flush_timeout = client_factory, retry_max, flush_timeout
        self.upload_errors = 0
        self.last_error: str | None = None
        self._client = None
        self._stop = threading.Event()
        self.wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._limited = jsonlog.RateLimited(log, interval=60.0)

    def start(self) -> "Uploader":
        self._thread = threading.Thread(target=self._loop, name="forwarder-capture", daemon=True)
        self._thread.start()
        return self

    def due(self) -> bool:
        waiting = self.spool.windows
        return bool(waiting) and (waiting >= self.batch_windows or self._stop.is_set()
                                  or self.spool.oldest_age() >= self.batch_interval)

    def upload_once(self) -> bool:
        """Build (when due) and upload one object; True when S3 accepted one."""
        obj = self.spool.head()
        if obj is None:
            if not self.due():
                return False
            obj = self.spool.build(self.thing, self.prefix, self.batch_windows)
            if obj is None:
                return False
        if self._client is None:
            self._client = self.client_factory()
        self._client.put_object(Bucket=self.bucket, Key=obj.key, Body=obj.data, ContentType="application/gzip")
        self.spool.ack(obj)
        jsonlog.event(log, "captured windows uploaded", key=obj.key, windows=obj.n_windows, bytes=len(obj.data))
        return True

    def _loop(self) -> None:
        retry = 0.5
        deadline = None
        while True:
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + self.flush_timeout
                if time.monotonic() > deadline or (self.spool.head() is None and not self.spool.windows):
                    return
            try:
                if self.upload_once():
                    retry = 0.5
                    continue
            except Exception as exc:  # noqa: BLE001 - S3 down, no credentials yet, ...: keep it, retry
                self.upload_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                self._limited.warn("capture_upload", "capture upload failed; retrying", error=self.last_error,
                                   bucket=self.bucket, retry_s=retry)
                if self._stop.is_set() or self._stop.wait(retry):
                    return  # kept on disk for the next start
                retry = min(retry * 2, self.retry_max)
                continue
            if self._stop.is_set():
                return
            self.wake.wait(min(1.0, self.batch_interval))
            self.wake.clear()

    def stop(self) -> None:
        """Try what is due for up to ``flush_timeout`` s; the rest waits on disk for the next start."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(self.flush_timeout + 25.0)  # + one put_object's timeouts
