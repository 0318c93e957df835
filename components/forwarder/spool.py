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
gaps: a gap in ``seq`` at the cloud always means a transport loss.

Disk full.  The spool leaves ``min_free_bytes`` free on its filesystem: below
that it stops growing, and each new record replaces the OLDEST waiting one
(counted in ``dropped_disk_full``), so SQLite always has room for its WAL and
checkpoints.  It also keeps ``reserve_bytes`` allocated in ``<spool>.reserve``.
Should the disk fill anyway (another writer; ENOSPC, SQLITE_FULL), the reserve is
released, the oldest 10% are dropped to make room (also ``dropped_disk_full``),
freed pages go back to the filesystem (incremental vacuum, WAL truncated) and the
reserve is taken again; if even that fails the new record is dropped and counted in
``dropped_disk_full``.  So the spool keeps accepting and sending on a disk that
another process filled to the last byte.  Nothing here raises for a full disk:
counters live in memory and are persisted with the next transaction that can be
written.  ``build``/``ack`` may still raise ``sqlite3.OperationalError`` while the
disk refuses even that; the sender retries.
"""

from __future__ import annotations

import errno
import json
import os
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


DROP_COUNTERS = ("dropped_spool_full", "dropped_disk_full")
MIN_FREE_BYTES = 2 * 1024 * 1024
RESERVE_BYTES = 1024 * 1024
_WAL_PAGES = 128          # auto-checkpoint often: the WAL stays small (about 512 KB) ...
_WAL_LIMIT = 1024 * 1024  # ... and is cut back to this after a checkpoint


def is_disk_error(exc: BaseException) -> bool:
    """SQLITE_FULL ("database or disk is full") or an I/O error writing (ENOSPC mid-write)."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("full" in text or "disk i/o" in text)


class Spool:
    """A bounded, persistent FIFO of records and their telemetry messages.  Thread-safe."""

    def __init__(self, path: str | Path, max_records: int = 100_000, max_bytes: int = 64 * 1024 * 1024,
                 min_free_bytes: int = MIN_FREE_BYTES, reserve_bytes: int | None = None):
        if reserve_bytes is None:
            reserve_bytes = min(RESERVE_BYTES, min_free_bytes // 2)
        if max_records < 1 or max_bytes < 1 or min_free_bytes < 0 or reserve_bytes < 0:
            raise ValueError("spool bounds must be positive")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_records, self.max_bytes, self.min_free_bytes = max_records, max_bytes, min_free_bytes
        self.reserve_bytes = reserve_bytes
        self._reserve = self.path.with_name(self.path.name + ".reserve")
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        # Before any table exists (a new file): lets a full disk get freed pages back.
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        self._db.executescript(_SCHEMA)
        self._page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records").fetchone()
        self.pending_records, self.pending_bytes = row
        row = self._db.execute("SELECT COALESCE(SUM(n_records), 0), COALESCE(SUM(body_bytes), 0) FROM outbox").fetchone()
        self.outbox_records, self.outbox_bytes = row
        # Drop counters in memory (a full disk cannot always persist them at once).
        self._dropped = {name: self._meta(name) for name in DROP_COUNTERS}
        self._unpersisted = False
        self.disk_errors = 0  # writes refused by a full disk (each then handled as above)
        self._reserve_held = False
        if self._reserve.exists():
            self._take_reserve()  # ours from the last run: keep it (it is not free space)
        else:
            self._maybe_take_reserve()

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
        return self._dropped["dropped_spool_full"]

    @property
    def dropped_disk_full(self) -> int:
        return self._dropped["dropped_disk_full"]

    def _count(self, name: str, n: int) -> None:
        """Add to a drop counter outside a transaction: persisted with the next one."""
        self._dropped[name] += n
        self._unpersisted = True

    def _persist_counters(self) -> None:
        for name, value in self._dropped.items():
            self._set_meta(name, value)
        self._unpersisted = False

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _low_on_disk(self) -> bool:
        if not self.min_free_bytes:
            return False
        free = self._free_bytes()
        if free is None:
            return False
        if self._reserve_missing:
            self._maybe_take_reserve(free)
        return free < self.min_free_bytes

    def _free_pages_for(self, size: int) -> bool:
        """The database file has room for ``size`` bytes in free pages, as acknowledged messages
        leave them (16 pages at least: the odd page that replacing records frees does not count)."""
        free_pages = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return free_pages >= 16 and free_pages * self._page_size >= 2 * size

    # ------------------------------------------------------------ the reserve
    @property
    def _reserve_missing(self) -> bool:
        return self.reserve_bytes > 0 and not self._reserve_held

    def _maybe_take_reserve(self, free: int | None = None) -> bool:
        """Take the reserve when there is room for it twice (else it would take the last bytes)."""
        free = self._free_bytes() if free is None else free
        if self._reserve_held or free is None or free < 2 * self.reserve_bytes:
            return self._reserve_held
        return self._take_reserve()

    def _take_reserve(self) -> bool:
        """Allocate ``reserve_bytes`` in ``<spool>.reserve`` (what a full disk will need to make room)."""
        self._reserve_held = False
        if not self.reserve_bytes:
            return False
        try:
            if self._reserve.stat().st_size >= self.reserve_bytes:
                self._reserve_held = True
                return True
        except FileNotFoundError:
            pass
        try:
            with open(self._reserve, "wb") as fh:
                try:
                    os.posix_fallocate(fh.fileno(), 0, self.reserve_bytes)
                except (AttributeError, OSError) as exc:
                    if getattr(exc, "errno", None) == errno.ENOSPC:
                        raise
                    fh.write(b"\0" * self.reserve_bytes)  # no fallocate on this filesystem
            self._reserve_held = True
        except OSError:
            try:
                self._reserve.unlink()
            except OSError:
                pass
        return self._reserve_held

    def _release_reserve(self) -> None:
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return
        self._reserve_held = False

    @property
    def records(self) -> int:
        """Records not yet acknowledged by the cloud (waiting + in the outbox)."""
        return self.pending_records + self.outbox_records

    @property
    def bytes(self) -> int:
        return self.pending_bytes + self.outbox_bytes

    # ------------------------------------------------------------ add
    def add(self, kind: str, body: bytes, received: float | None = None) -> int:
        """Append one record (committed when this returns); returns how many old records were
        dropped for it.  Never raises for a full disk (see the module docstring)."""
        return self.add_many(kind, [body], received)

    def add_many(self, kind: str, bodies: list[bytes], received: float | None = None) -> int:
        """Append records in one transaction (a score batch's windows: one commit, not one
        per window); as :meth:`add` otherwise."""
        if not bodies:
            return 0
        received = time.time() if received is None else received
        size = sum(len(b) for b in bodies)
        with self._lock:
            # Low on disk, the spool must not grow: unless pages freed by sent messages can take
            # the records, they replace the oldest ones.
            low = self._low_on_disk() and not self._free_pages_for(size)
            try:
                return self._relieving(lambda relieved: self._add(kind, bodies, received, replace_oldest=low or relieved))
            except sqlite3.OperationalError as exc:
                if not is_disk_error(exc):
                    raise
                self._rollback()
                self._count("dropped_disk_full", len(bodies))  # the new records themselves
                return 0

    def _relieving(self, write):
        """``write(relieved)`` (one transaction).  On a full disk: make room without losing
        anything (the reserve, the WAL, free pages) and try again; then drop the oldest tenth
        and try once more; then raise the disk error."""
        for drop in (None, False, True):
            if drop is not None:
                self._relieve(drop)
            try:
                return write(drop is not None)
            except sqlite3.OperationalError as exc:
                if not is_disk_error(exc):
                    raise
                self.disk_errors += 1
                if drop:
                    raise

    def _add(self, kind: str, bodies: list[bytes], received: float, replace_oldest: bool = False) -> int:
        saved = dict(self._dropped)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT INTO records(type, body, received) VALUES(?, ?, ?)",
                                 [(kind, body, received) for body in bodies])
            self.pending_records += len(bodies)
            self.pending_bytes += sum(len(b) for b in bodies)
            dropped = self._enforce_bounds()
            if replace_oldest and not dropped:
                # Low on disk: do not grow; the new records take the oldest ones' place.
                dropped = self._delete_oldest(len(bodies), "dropped_disk_full")
            if self._unpersisted or dropped:
                self._persist_counters()
            self._db.execute("COMMIT")
        except BaseException:
            self._dropped = saved
            self._rollback()
            raise
        return dropped

    def _delete_oldest(self, n: int, counter: str) -> int:
        """In the open transaction: delete the ``n`` oldest waiting records (never the newest)."""
        n = min(n, self.pending_records - 1)
        if n <= 0:
            return 0
        row = self._db.execute("SELECT id FROM records ORDER BY id LIMIT 1 OFFSET ?", (n - 1,)).fetchone()
        if row is None:
            return 0
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records WHERE id <= ?",
                                       (row[0],)).fetchone()
        self._db.execute("DELETE FROM records WHERE id <= ?", (row[0],))
        self.pending_records -= count
        self.pending_bytes -= size
        self._dropped[counter] += count
        return count

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
        self._dropped["dropped_spool_full"] += len(ids)
        return len(ids)

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._unpersisted = True  # whatever the transaction persisted is undone
        self._reload_counts()

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass

    def _relieve(self, drop: bool) -> None:
        """The disk is full: release the reserve, checkpoint, (``drop``: delete the oldest tenth
        of the waiting records), give free pages back to the filesystem, take the reserve again
        if there is room for it twice.  Each step may fail on a full disk; none raises."""
        self._rollback()
        self._release_reserve()  # room for what follows (a checkpoint, a delete, a vacuum)
        self._checkpoint()
        if drop:
            saved = dict(self._dropped)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._delete_oldest(max(1, self.pending_records // 10), "dropped_disk_full")
                self._persist_counters()
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._dropped = saved  # nothing was dropped
                self._rollback()
                if not is_disk_error(exc):
                    raise
        try:
            self._db.execute("PRAGMA incremental_vacuum")
        except sqlite3.Error:
            pass
        self._checkpoint()
        self._maybe_take_reserve()

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
        new telemetry message with the next ``seq``.  None when nothing waits.  On a full
        disk: relieved (see :meth:`_relieving`), then sqlite3.OperationalError."""
        with self._lock:
            # chosen again at each try: a relief may drop the oldest
            return self._relieving(lambda _: self._build(thing, max_records, max_bytes, ts))

    def _build(self, thing: str, max_records: int, max_bytes: int, ts: float | None) -> Message | None:
        rows = self._db.execute("SELECT id, type, body FROM records ORDER BY id LIMIT ?", (max_records,)).fetchall()
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
            # Delete first: the message then reuses the records' pages (a full disk has no others).
            self._db.execute("DELETE FROM records WHERE id <= ?", (chosen[-1][0],))
            self._db.execute("INSERT INTO outbox(seq, payload, n_records, body_bytes) VALUES(?, ?, ?, ?)",
                             (seq, payload, len(chosen), size))
            self._set_meta("next_seq", seq + 1)
            if self._unpersisted:
                self._persist_counters()
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.pending_records -= len(chosen)
        self.pending_bytes -= size
        self.outbox_records += len(chosen)
        self.outbox_bytes += size
        return Message(seq, payload, len(chosen))

    def ack(self, seq: int) -> None:
        """The cloud acknowledged message ``seq``: forget it.  Raises sqlite3.OperationalError
        while a full disk refuses even that (the message is then resent: same seq, a duplicate)."""
        with self._lock:
            row = self._db.execute("SELECT n_records, body_bytes FROM outbox WHERE seq=?", (seq,)).fetchone()
            if row is None:
                return

            self._relieving(lambda _: self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,)))
            self.outbox_records -= row[0]
            self.outbox_bytes -= row[1]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._unpersisted:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._persist_counters()
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._rollback()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            # the reserve stays: the next start needs it as much as this one did
