"""The forwarder's disk spool: SQLite in WAL mode, bounded, crash-safe.

Two tables:

- ``records``: accepted records, oldest first, not yet put in a telemetry message.
- ``outbox``: built telemetry messages with their sequence number, kept until the
  cloud acknowledged them.  A message gets its ``seq`` (and ``meta.next_seq`` is
  advanced) in the same transaction that moves its records out of ``records``,
  so after a crash the same message is resent with the same ``seq`` (a duplicate
  the cloud can drop) and sequence numbers never repeat or skip.

Every change is one transaction (``synchronous=NORMAL`` in WAL mode: a killed
process loses nothing committed; only a power cut can lose the last commits).

Bound and policy when full: the spool holds at most ``max_records`` records and
``max_bytes`` bytes of record bodies (outbox included).  Adding beyond that DROPS
THE OLDEST records waiting in ``records`` (newest data is kept: it describes the
turbines now), counting them in ``dropped_spool_full`` (persisted).  The message
being sent (the outbox) is never dropped, so spool drops never make sequence
gaps: a gap in ``seq`` at the cloud always means a transport loss.  If the disk
itself is full, the oldest 10% are dropped to make room; if that is not enough
the new record is dropped and counted in ``dropped_disk_full``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

from windfleet import payloads

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    n_records INTEGER NOT NULL,
    body_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Message(NamedTuple):
    seq: int
    payload: bytes
    n_records: int


class Spool:
    """A bounded, persistent FIFO of records and their telemetry messages.  Thread-safe."""

    def __init__(self, path: str | Path, max_records: int = 100_000, max_bytes: int = 64 * 1024 * 1024):
        if max_records < 1 or max_bytes < 1:
            raise ValueError("spool bounds must be positive")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_records, self.max_bytes = max_records, max_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records").fetchone()
        self.pending_records, self.pending_bytes = row
        row = self._db.execute("SELECT COALESCE(SUM(n_records), 0), COALESCE(SUM(body_bytes), 0) FROM outbox").fetchone()
        self.outbox_records, self.outbox_bytes = row
        self.dropped_disk_full = self._meta("dropped_disk_full")

    # ------------------------------------------------------------ meta
    def _meta(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                         (key, value))

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq", 1)

    @property
    def dropped_spool_full(self) -> int:
        with self._lock:
            return self._meta("dropped_spool_full")

    @property
    def records(self) -> int:
        """Records not yet acknowledged by the cloud (waiting + in the outbox)."""
        return self.pending_records + self.outbox_records

    @property
    def bytes(self) -> int:
        return self.pending_bytes + self.outbox_bytes

    # ------------------------------------------------------------ add
    def add(self, kind: str, body: bytes, received: float | None = None) -> int:
        """Append one record (committed when this returns); returns how many old records were dropped."""
        received = time.time() if received is None else received
        with self._lock:
            try:
                return self._add(kind, body, received)
            except sqlite3.OperationalError as exc:
                if "full" not in str(exc):
                    raise
                # Disk full: make room by dropping the oldest tenth, then try once more.
                self._drop_oldest(max(1, self.pending_records // 10), "dropped_spool_full")
                try:
                    return self._add(kind, body, received)
                except sqlite3.OperationalError as exc2:
                    if "full" not in str(exc2):
                        raise
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    self.dropped_disk_full += 1
                    self._db.execute("BEGIN")
                    self._set_meta("dropped_disk_full", self.dropped_disk_full)
                    self._db.execute("COMMIT")
                    return 0

    def _add(self, kind: str, body: bytes, received: float) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT INTO records(type, body, received) VALUES(?, ?, ?)", (kind, body, received))
            self.pending_records += 1
            self.pending_bytes += len(body)
            dropped = self._enforce_bounds()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._reload_counts()
            raise
        return dropped

    def _enforce_bounds(self) -> int:
        over_records = self.records - self.max_records
        over_bytes = self.bytes - self.max_bytes
        if over_records <= 0 and over_bytes <= 0:
            return 0
        # Oldest first; keep at least the newest record.
        ids, freed = [], 0
        cursor = self._db.execute("SELECT id, LENGTH(body) FROM records ORDER BY id LIMIT ?",
                                  (max(0, self.pending_records - 1),))
        for rid, size in cursor:
            if len(ids) >= over_records and freed >= over_bytes:
                break
            ids.append(rid)
            freed += size
        if not ids:
            return 0
        self._db.execute("DELETE FROM records WHERE id <= ?", (ids[-1],))
        self.pending_records -= len(ids)
        self.pending_bytes -= freed
        self._set_meta("dropped_spool_full", self._meta("dropped_spool_full") + len(ids))
        return len(ids)

    def _drop_oldest(self, n: int, counter: str) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        rows = self._db.execute("SELECT id FROM records ORDER BY id LIMIT ?", (n,)).fetchall()
        if rows:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM records WHERE id <= ?", (rows[-1][0],))
            self._set_meta(counter, self._meta(counter) + len(rows))
            self._db.execute("COMMIT")
        self._reload_counts()

    def _reload_counts(self) -> None:
        self.pending_records, self.pending_bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records").fetchone()
        self.outbox_records, self.outbox_bytes = self._db.execute(
            "SELECT COALESCE(SUM(n_records), 0), COALESCE(SUM(body_bytes), 0) FROM outbox").fetchone()

    # ------------------------------------------------------------ batches
    def oldest_age(self, now: float | None = None) -> float:
        """Seconds since the oldest waiting record arrived (0 when none)."""
        with self._lock:
            row = self._db.execute("SELECT received FROM records ORDER BY id LIMIT 1").fetchone()
        return 0.0 if row is None else max(0.0, (now or time.time()) - row[0])

    def head(self) -> Message | None:
        """The oldest unacknowledged message, if one was built."""
        with self._lock:
            row = self._db.execute("SELECT seq, payload, n_records FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return Message(row[0], bytes(row[1]), row[2]) if row else None

    def build(self, thing: str, max_records: int, max_bytes: int, ts: float | None = None) -> Message | None:
        """Move the oldest waiting records (at least one, then up to the limits) into a
        new telemetry message with the next ``seq``.  None when nothing waits."""
        with self._lock:
            rows = self._db.execute("SELECT id, type, body FROM records ORDER BY id LIMIT ?",
                                    (max_records,)).fetchall()
            if not rows:
                return None
            chosen, size = [], 0
            for row in rows:
                if chosen and size + len(row[2]) > max_bytes:
                    break
                chosen.append(row)
                size += len(row[2])
            records = [{"type": kind, "body": json.loads(body)} for _, kind, body in chosen]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq", 1)
                payload = payloads.encode(payloads.telemetry(thing, seq, time.time() if ts is None else ts, records))
                self._db.execute("INSERT INTO outbox(seq, payload, n_records, body_bytes) VALUES(?, ?, ?, ?)",
                                 (seq, payload, len(chosen), size))
                self._db.execute("DELETE FROM records WHERE id <= ?", (chosen[-1][0],))
                self._set_meta("next_seq", seq + 1)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._reload_counts()
                raise
            self.pending_records -= len(chosen)
            self.pending_bytes -= size
            self.outbox_records += len(chosen)
            self.outbox_bytes += size
            return Message(seq, payload, len(chosen))

    def ack(self, seq: int) -> None:
        """The cloud acknowledged message ``seq``: forget it."""
        with self._lock:
            row = self._db.execute("SELECT n_records, body_bytes FROM outbox WHERE seq=?", (seq,)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            self.outbox_records -= row[0]
            self.outbox_bytes -= row[1]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
