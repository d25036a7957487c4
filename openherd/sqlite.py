"""Opening openherd's SQLite files, the one way they are all opened.

    db = connect(path, DatabaseSpec(what="the knowledge index", schema=DDL, version=1))
    with immediate(db):                      # BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error
        db.execute(...)

    conn = LazyConnection(path, spec, lock)  # a store's: opened at first use, closed and reopenable

Every database (a persona's ``memory.db`` and ``knowledge.db``, the model chats'
``conversations.db``, the safety ``audit.db``) is written by one process while
others read it: `herd chat` appends turns while `herd serve` lists them. So each
connection is:

* ``journal_mode=WAL``: readers never block the writer nor the writer readers.
* autocommit (``isolation_level=None``): Python's sqlite3 otherwise opens
  transactions behind our back; ours are explicit (``immediate``), so one turn
  or one document is one transaction and a crash leaves it all there or not at all.
* a busy timeout: a second writer waits for the first instead of failing at once.
* ``check_same_thread=False``: the server calls stores from worker threads;
  each store serialises its own use of the connection with a lock.
* versioned with ``PRAGMA user_version``: a file written by a newer openherd is
  refused with "upgrade openherd" rather than misread.

How hard a commit is made durable is each store's call (``synchronous``): FULL
fsyncs the WAL on every commit and survives a power loss, NORMAL survives a
crash of the process only. See the stores' docstrings for why each picks its own.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError

__all__ = ["DatabaseSpec", "LazyConnection", "connect", "describe_error", "immediate"]

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclass(frozen=True)
class DatabaseSpec:
    """What one kind of database holds, how it is opened, and what to tell the user when it can't be."""

    what: str  # how errors name it: "the knowledge index"; never a path (errors may go over HTTP)
    schema: str  # idempotent DDL (CREATE ... IF NOT EXISTS), run on every open
    version: int = 0  # PRAGMA user_version this openherd writes; 0 = the file is not versioned
    synchronous: str = "NORMAL"  # FULL where a commit the user saw must survive a power loss
    busy_timeout: float = 30.0  # seconds a writer waits for another writer's lock
    on_newer: str = "upgrade openherd"  # what to do about a file from a newer version
    on_error: str = ""  # what to do about a file that cannot be opened or read ("" = nothing to add)

    def __post_init__(self) -> None:
        if self.synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {self.synchronous!r}")
        if self.version < 0 or self.busy_timeout < 0:
            raise ValueError("version and busy_timeout must not be negative")


def describe_error(e: BaseException) -> str:
    """The reason of a failed open, without the file name: errors travel to HTTP clients.
    (sqlite's messages name no paths; OSError.strerror is the reason without its filename.)"""
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__


def connect(path: str | Path, spec: DatabaseSpec) -> sqlite3.Connection:
    """Open (creating it and its directory if need be) and migrate the database at ``path``.

    Raises StoreError with a one-line, path-free message when the file cannot be created,
    is not a database, or was written by a newer openherd."""
    path = Path(path)
    db: sqlite3.Connection | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=spec.busy_timeout, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={spec.synchronous}")
        db.execute("PRAGMA foreign_keys=ON")  # SQLite leaves them off on every new connection
        if spec.version and db.execute("PRAGMA user_version").fetchone()[0] > spec.version:
            raise StoreError(f"{spec.what} was written by a newer openherd; {spec.on_newer}")
        # The DDL is idempotent (IF NOT EXISTS), so a crash before the version stamp
        # below is harmless: the next open runs it again.
        db.executescript(spec.schema)
        if spec.version:
            db.execute(f"PRAGMA user_version={int(spec.version)}")
    except BaseException as e:
        if db is not None:
            db.close()
        if isinstance(e, (OSError, sqlite3.Error)):
            hint = f"; {spec.on_error}" if spec.on_error else ""
            raise StoreError(f"cannot open {spec.what} ({describe_error(e)}){hint}") from None
        raise
    return db


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on an autocommit connection.

    IMMEDIATE takes the write lock at BEGIN, so two writers queue on the busy timeout
    instead of both reading and then one failing with SQLITE_BUSY at its first write
    (which a DEFERRED transaction cannot recover from by waiting). Any exception,
    KeyboardInterrupt included, and a failed COMMIT roll the whole transaction back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class LazyConnection:
    """The one connection of a store, opened at its first use and reopened after ``close``.

    Lazy because a store object is cheap to make and often only asked whether it has
    anything (`herd persona show` makes one per persona). ``lock`` is the store's own:
    the store holds it around every statement, so closing waits for a statement in
    flight instead of pulling the connection from under it."""

    def __init__(self, path: str | Path, spec: DatabaseSpec, lock: threading.RLock):
        self.path = Path(path)
        self.spec = spec
        self._lock = lock
        self._db: sqlite3.Connection | None = None

    def get(self) -> sqlite3.Connection:
        with self._lock:
            if self._db is None:
                self._db = connect(self.path, self.spec)
            return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
