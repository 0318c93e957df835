"""The local store: one SQLite database (WAL) plus plain files under a home directory.

Several processes (the CLI, the dashboard, every local device runtime) open the
same store at once; SQLite in WAL mode with ``BEGIN IMMEDIATE`` write
transactions and a busy timeout serialises writers, and files are written to a
temporary name and renamed so a reader never sees half an artifact.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_package_groups (
    name TEXT PRIMARY KEY, description TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS model_packages (
    grp TEXT NOT NULL, version INTEGER NOT NULL, description TEXT, approval TEXT NOT NULL,
    approval_description TEXT, metadata TEXT NOT NULL, metrics TEXT, created REAL NOT NULL,
    modified REAL NOT NULL, PRIMARY KEY (grp, version));
CREATE TABLE IF NOT EXISTS components (
    name TEXT NOT NULL, version TEXT NOT NULL, recipe TEXT NOT NULL, state TEXT NOT NULL,
    message TEXT, errors TEXT, created REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY, target_arn TEXT NOT NULL, name TEXT, body TEXT NOT NULL,
    status TEXT NOT NULL, revision INTEGER NOT NULL, client_token TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS deployments_target ON deployments (target_arn, created);
CREATE TABLE IF NOT EXISTS core_devices (
    thing TEXT PRIMARY KEY, groups TEXT NOT NULL, registered REAL NOT NULL, seen REAL NOT NULL,
    components TEXT);
CREATE TABLE IF NOT EXISTS device_status (
    thing TEXT NOT NULL, deployment_id TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    created REAL NOT NULL, modified REAL NOT NULL, PRIMARY KEY (thing, deployment_id));
"""


def default_home() -> Path:
    """``$WINDFLEET_HOME`` or ``~/.windfleet``."""
    return Path(os.environ.get("WINDFLEET_HOME") or Path.home() / ".windfleet")


class Store:
    """A home directory holding ``cloud.db`` and ``s3/<bucket>/<key>`` files."""

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "cloud.db"
        self.objects = self.home / "s3"
        self.objects.mkdir(exist_ok=True)
        with self.connect() as db:
            db.executescript(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: one writer at a time across processes)."""
        db = self.connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        db = self.connect()
        try:
            yield db
        finally:
            db.close()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
