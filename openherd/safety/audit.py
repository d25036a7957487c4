"""Audit log of shield decisions, in SQLite (``$HERD_HOME/audit.db``).

One row per decision: when, for which persona/model and request, which way
(input/output), which shield, what it did (allow/redact/block/flag), and the
categories with their counts (PII kinds, Llama Guard S-codes, blocked-topic
phrases from the policy, injection signal codes).

It never stores what was said. No message text, no matched value. With
``hash_values=True`` it also stores, per matched value, a keyed hash
(HMAC-SHA256 under a random key kept in ``audit.key`` next to the database,
mode 0600) truncated to 16 hex digits, so repeats of the same value can be
counted without keeping the value. A plain salted hash kept next to the data
would not do: phone numbers and most emails can be recovered from one by brute
force.

WAL mode with synchronous=NORMAL: a server appends from several threads while
``herd`` reads, and a decision lost in a power cut is acceptable, a stalled
request is not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, StoreError
from ..sqlite import DatabaseSpec, connect
from ..sqlite import describe_error as _reason

__all__ = ["AuditEntry", "AuditLog"]

DIRECTIONS = ("input", "output")
ACTIONS = ("allow", "redact", "block", "flag")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id         INTEGER PRIMARY KEY,
    ts         REAL NOT NULL,                 -- unix time, seconds
    persona    TEXT,                          -- persona name, if any
    model      TEXT,                          -- model name
    request_id TEXT,
    direction  TEXT NOT NULL CHECK (direction IN ('input', 'output')),
    shield     TEXT NOT NULL,                 -- topics | pii | llama_guard | injection
    action     TEXT NOT NULL CHECK (action IN ('allow', 'redact', 'block', 'flag')),
    categories TEXT NOT NULL,                 -- JSON list
    counts     TEXT NOT NULL,                 -- JSON object category -> n
    digests    TEXT                           -- JSON list of keyed hashes of the values, or NULL
);
CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts);
CREATE INDEX IF NOT EXISTS decisions_persona ON decisions (persona, ts);
"""


# synchronous=NORMAL and a short busy timeout: why, see the module docstring.
DATABASE = DatabaseSpec(
    what="the safety audit log",
    schema=_SCHEMA,
    synchronous="NORMAL",
    busy_timeout=5.0,
    on_error="check that HERD_HOME is writable",
)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    ts: float
    persona: str | None
    model: str | None
    request_id: str | None
    direction: str
    shield: str
    action: str
    categories: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    digests: list[str] | None = None


def default_path() -> Path:
    from ..settings import get_settings

    return get_settings().home / "audit.db"


class AuditLog:
    def __init__(self, path: str | Path | None = None, *, hash_values: bool = False):
        self.path = Path(path) if path is not None else default_path()
        self.hash_values = hash_values
        self._lock = threading.Lock()
        self._db = connect(self.path, DATABASE)
        self._key = self._load_key() if hash_values else b""

    # -- writing ----------------------------------------------------------
    def record(
        self,
        decision: Any,
        *,
        persona: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        ts: float | None = None,
    ) -> int:
        """Append one decision (a policy.Decision or anything with the same fields); returns its id."""
        return self.record_many([decision], persona=persona, model=model, request_id=request_id, ts=ts)[0]

    def record_many(
        self,
        decisions: Iterable[Any],
        *,
        persona: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        ts: float | None = None,
    ) -> list[int]:
        when = time.time() if ts is None else ts
        rows = [self._row(d, when, persona, model, request_id) for d in decisions]
        ids: list[int] = []
        with self._lock:
            try:
                self._db.execute("BEGIN")
                for row in rows:
                    cur = self._db.execute(
                        "INSERT INTO decisions (ts, persona, model, request_id, direction, shield, action, categories, counts, digests)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    ids.append(int(cur.lastrowid or 0))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(f"cannot write the safety audit log ({_reason(e)})") from None
        return ids

    def _row(
        self, d: Any, ts: float, persona: str | None, model: str | None, request_id: str | None
    ) -> tuple:
        if d.direction not in DIRECTIONS:
            raise InvalidRequest(
                f"audit: direction must be one of {', '.join(DIRECTIONS)}, got {d.direction!r}"
            )
        if d.action not in ACTIONS:
            raise InvalidRequest(f"audit: action must be one of {', '.join(ACTIONS)}, got {d.action!r}")
        categories = [str(c) for c in d.categories]
        counts = {str(k): int(v) for k, v in dict(d.counts).items()}
        digests = None
        values = getattr(d, "values", ())
        if self.hash_values and values:
            digests = json.dumps([self.fingerprint(v) for v in values])
        return (
            ts,
            persona,
            model,
            request_id,
            d.direction,
            str(d.shield),
            d.action,
            json.dumps(categories),
            json.dumps(counts, sort_keys=True),
            digests,
        )

    def fingerprint(self, value: str) -> str:
        """Keyed hash of a value: equal values give equal fingerprints within this HERD_HOME only."""
        if not self._key:
            self._key = self._load_key()
        return hmac.new(self._key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]

    def _load_key(self) -> bytes:
        key_path = self.path.with_name(self.path.stem + ".key")
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            data = key_path.read_bytes()
            if len(data) < 32:
                raise StoreError(
                    "the safety audit key file is damaged; remove audit.key to start a new one"
                ) from None
            return data[:32]
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        return key_path.read_bytes()[:32]

    # -- reading ----------------------------------------------------------
    def entries(
        self,
        *,
        limit: int = 100,
        persona: str | None = None,
        shield: str | None = None,
        action: str | None = None,
        since: float | None = None,
    ) -> list[AuditEntry]:
        """Most recent first."""
        where, args = [], []
        for col, val in (("persona", persona), ("shield", shield), ("action", action)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        sql = "SELECT id, ts, persona, model, request_id, direction, shield, action, categories, counts, digests FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(0, int(limit)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            AuditEntry(
                id=r[0], ts=r[1], persona=r[2], model=r[3], request_id=r[4], direction=r[5], shield=r[6], action=r[7],
                categories=json.loads(r[8]), counts=json.loads(r[9]), digests=json.loads(r[10]) if r[10] else None,
            )
            for r in rows
        ]  # fmt: skip

    def summary(self, since: float | None = None) -> dict[tuple[str, str], int]:
        """(shield, action) -> number of decisions."""
        sql = "SELECT shield, action, COUNT(*) FROM decisions" + (
            " WHERE ts >= ?" if since is not None else ""
        )
        sql += " GROUP BY shield, action"
        with self._lock:
            rows = self._db.execute(sql, [since] if since is not None else []).fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def prune(self, before: float) -> int:
        """Delete decisions older than `before` (unix time); returns how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM decisions WHERE ts < ?", (before,))
        return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
