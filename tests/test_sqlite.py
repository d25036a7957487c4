"""openherd.sqlite: how every database is opened (WAL, durability, versions, errors) and
the write transaction every store uses; then each store that opens its file through it."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from openherd.errors import StoreError
from openherd.sqlite import DatabaseSpec, LazyConnection, connect, immediate

DDL = """
CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS child (
    id INTEGER PRIMARY KEY,
    parent_id INTEGER NOT NULL REFERENCES parent (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED
);
"""
SPEC = DatabaseSpec(
    what="the test database", schema=DDL, version=3, synchronous="FULL", on_error="delete test.db"
)


def test_connect_creates_migrates_and_configures(tmp_path):
    path = tmp_path / "deep" / "dir" / "test.db"
    db = connect(path, SPEC)
    assert path.is_file()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    assert db.isolation_level is None  # autocommit: transactions are ours (immediate)
    db.execute("INSERT INTO parent(id) VALUES (1)")
    db.close()
    # Opening again is idempotent and keeps the data.
    db = connect(path, DatabaseSpec(what="x", schema=DDL, version=3))
    assert db.execute("SELECT COUNT(*) FROM parent").fetchone()[0] == 1
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL, the default
    db.close()


def test_unversioned_database_keeps_user_version(tmp_path):
    db = connect(tmp_path / "a.db", DatabaseSpec(what="the audit log", schema=DDL))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()


def test_a_newer_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "test.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version=4")
    raw.close()
    with pytest.raises(StoreError) as e:
        connect(path, SPEC)
    assert e.value.message == "the test database was written by a newer openherd; upgrade openherd"
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 4
    assert raw.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0  # no tables were added
    raw.close()


def test_damaged_and_unwritable_files_give_one_line_without_the_path(tmp_path):
    junk = tmp_path / "test.db"
    junk.write_bytes(b"not a database at all" * 200)
    with pytest.raises(StoreError) as e:
        connect(junk, SPEC)
    assert e.value.message == "cannot open the test database (file is not a database); delete test.db"

    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(StoreError) as e:
        connect(blocker / "sub" / "test.db", SPEC)
    assert (
        e.value.message.startswith("cannot open the test database (") and str(tmp_path) not in e.value.message
    )


def test_immediate_commits_or_rolls_back_everything(tmp_path):
    db = connect(tmp_path / "t.db", SPEC)
    with immediate(db):
        db.execute("INSERT INTO parent(id) VALUES (1)")
        db.execute("INSERT INTO child(id, parent_id) VALUES (1, 1)")
    assert not db.in_transaction

    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc):
            with immediate(db):
                db.execute("INSERT INTO parent(id) VALUES (2)")
                raise exc()
        assert not db.in_transaction
    assert db.execute("SELECT COUNT(*) FROM parent").fetchone()[0] == 1

    # A COMMIT that fails (a deferred foreign key is checked at commit) must not leave the
    # connection inside a transaction that every later write would join.
    with pytest.raises(sqlite3.IntegrityError):
        with immediate(db):
            db.execute("INSERT INTO child(id, parent_id) VALUES (2, 99)")
    assert not db.in_transaction
    assert db.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 1
    db.close()


def test_immediate_takes_the_write_lock_at_begin(tmp_path):
    path = tmp_path / "t.db"
    a = connect(path, SPEC)
    b = connect(path, DatabaseSpec(what="b", schema=DDL, version=3, busy_timeout=0.05))
    with immediate(a):
        a.execute("INSERT INTO parent(id) VALUES (1)")
        # The second writer is refused at BEGIN (after its busy timeout), before it read anything.
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with immediate(b):
                pass
        assert not b.in_transaction
        assert b.execute("SELECT COUNT(*) FROM parent").fetchone()[0] == 0  # WAL: readers see the last commit
    with immediate(b):
        b.execute("INSERT INTO parent(id) VALUES (2)")
    assert a.execute("SELECT COUNT(*) FROM parent").fetchone()[0] == 2
    a.close()
    b.close()


def test_lazy_connection_opens_at_first_use_and_reopens(tmp_path):
    path = tmp_path / "lazy.db"
    conn = LazyConnection(path, SPEC, threading.RLock())
    assert not path.exists()  # making a store touches nothing
    db = conn.get()
    assert path.is_file() and conn.get() is db
    conn.close()
    conn.close()  # idempotent
    with pytest.raises(sqlite3.ProgrammingError):
        db.execute("SELECT 1")
    again = conn.get()
    assert again is not db and again.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()


def test_spec_is_checked():
    with pytest.raises(ValueError, match="synchronous"):
        DatabaseSpec(what="x", schema="", synchronous="SOMETIMES")
    with pytest.raises(ValueError):
        DatabaseSpec(what="x", schema="", version=-1)


# ----------------------------------------------------------------------------- the stores


def _conversations(path):
    from openherd.personas.memory import ConversationStore

    store = ConversationStore(path)
    store.list()
    return store, store.db


def _knowledge(path):
    from openherd.personas.knowledge import KnowledgeIndex

    index = KnowledgeIndex(path)
    index.chunks()
    return index, index.db


def _audit(path):
    from openherd.safety.audit import AuditLog

    log = AuditLog(path)
    return log, log._db


STORES = {
    # opener, PRAGMA synchronous (2 = FULL, 1 = NORMAL), what a newer file says, what a damaged one says
    "conversations": (
        _conversations, 2,
        "the conversation database was written by a newer openherd; upgrade openherd",
        "cannot open the conversation database (file is not a database)",
    ),
    "knowledge": (
        _knowledge, 1,
        "the knowledge index was written by a newer openherd; upgrade openherd, "
        "or delete the persona's knowledge.db to rebuild it",
        "cannot open the knowledge index (file is not a database); "
        "delete the persona's knowledge.db and it is rebuilt on next use",
    ),
    "audit": (
        _audit, 1,
        None,  # not versioned
        "cannot open the safety audit log (file is not a database); check that HERD_HOME is writable",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", STORES)
def test_each_store_opens_through_the_helper(tmp_path, kind):
    opener, synchronous, newer, damaged = STORES[kind]
    store, db = opener(tmp_path / "fresh" / "x.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == synchronous
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    store.close()

    if newer is not None:
        path = tmp_path / "newer.db"
        raw = sqlite3.connect(path)
        raw.execute("PRAGMA user_version=999")
        raw.close()
        with pytest.raises(StoreError) as e:
            opener(path)
        assert e.value.message == newer

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 300)
    with pytest.raises(StoreError) as e:
        opener(junk)
    assert e.value.message == damaged
