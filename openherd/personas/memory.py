"""Memory: a persona's conversations, persisted in SQLite (``memory.db``, WAL).

    store = ConversationStore(path, persona="glimmerfen")
    conv = store.latest() or store.new()          # `herd chat PERSONA` resumes; --new starts fresh
    store.append(conv.id, "user", "hello")        # one transaction per turn
    store.messages(conv.id)                       # [{"role": ..., "content": ...}, ...]
    store.export(conv.id, "markdown")             # or "json"

Durability. Every turn is its own transaction, so a crash (kill -9, OOM, power)
leaves each turn either fully there or not there at all, and the database
consistent (``PRAGMA integrity_check`` = ok; tests/test_personas_memory.py kills a
writer mid-loop to show it). ``journal_mode=WAL`` lets `herd chat` write while the
server or `herd persona conversations` reads. ``synchronous=FULL``: in WAL mode
NORMAL already survives a crash of the *process*, but after a power loss or
kernel crash the last commits may roll back, because the WAL is only fsynced at
checkpoints. A chat turn is a few hundred bytes every few seconds, so an fsync
per commit costs nothing anyone notices, and a turn the user saw saved stays
saved. (The knowledge index, which is derived data, uses NORMAL.)
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, NotFound, StoreError

__all__ = ["Conversation", "ConversationStore", "Turn"]

SCHEMA = 1
ROLES = ("system", "user", "assistant", "tool")
MAX_CONTENT_CHARS = 1_000_000  # one turn; far beyond any context window, small enough for the disk
EXPORT_FORMATS = ("json", "markdown")

_DDL = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    persona TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    UNIQUE (conversation_id, seq)
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated_at);
"""


@dataclass
class Turn:
    seq: int  # 1-based position in the conversation
    role: str
    content: str
    created_at: float
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"sources": [...]} for an assistant turn

    def message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    id: str
    persona: str
    title: str
    model: str
    created_at: float
    updated_at: float
    turns: int = 0  # number of turns (filled by list/get)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def new_conversation_id() -> str:
    """Sortable and readable: '20250314-093012-5f2a9c' (UTC time, then randomness)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class ConversationStore:
    """Conversations of one persona. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path, persona: str = ""):
        self.path = Path(path)
        self.persona = persona
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # why: see the module docstring
                db.execute("PRAGMA foreign_keys=ON")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA:
                    raise StoreError("this persona's conversations were written by a newer openherd; upgrade openherd")
                db.executescript(_DDL)
                db.execute(f"PRAGMA user_version={SCHEMA}")
            except sqlite3.DatabaseError as e:
                raise StoreError(f"the conversation database is unreadable ({e})") from None
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ conversations

    def new(self, title: str = "", model: str = "") -> Conversation:
        now = time.time()
        conv = Conversation(id=new_conversation_id(), persona=self.persona, title=title[:200], model=model,
                            created_at=now, updated_at=now)
        with self._lock:
            self.db.execute(
                "INSERT INTO conversations(id, persona, title, model, created_at, updated_at) VALUES (?,?,?,?,?,?)",
                (conv.id, conv.persona, conv.title, conv.model, conv.created_at, conv.updated_at))
        return conv

    def get(self, conv_id: str) -> Conversation:
        """By id, or by a unique prefix of one (like git's short hashes); 'last' = the latest."""
        if not isinstance(conv_id, str) or not conv_id or len(conv_id) > 64:
            raise InvalidRequest("give a conversation id (see `herd persona conversations NAME`)", param="conversation")
        if conv_id == "last":
            conv = self.latest()
            if conv is None:
                raise NotFound(f"persona '{self.persona}' has no conversations yet", param="conversation")
            return conv
        with self._lock:
            escaped = conv_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            rows = self.db.execute(
                "SELECT c.id, c.persona, c.title, c.model, c.created_at, c.updated_at, "
                "(SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id) "
                "FROM conversations c WHERE c.id LIKE ? ESCAPE '\\' ORDER BY c.id LIMIT 2",
                (escaped + "%",)).fetchall()
        exact = [r for r in rows if r[0] == conv_id]
        if exact:
            rows = exact
        if not rows:
            raise NotFound(f"no conversation '{conv_id}' for persona '{self.persona}'; see "
                           f"`herd persona conversations {self.persona}`", param="conversation")
        if len(rows) > 1:
            raise InvalidRequest(f"'{conv_id}' matches more than one conversation; give more of the id",
                                 param="conversation")
        return Conversation(*rows[0])

    def latest(self) -> Conversation | None:
        """The conversation with the most recent activity."""
        rows = self.list(limit=1)
        return rows[0] if rows else None

    def list(self, limit: int | None = None) -> list[Conversation]:
        """Most recently active first."""
        with self._lock:
            rows = self.db.execute(
                "SELECT c.id, c.persona, c.title, c.model, c.created_at, c.updated_at, "
                "(SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id) "
                "FROM conversations c ORDER BY c.updated_at DESC, c.id DESC LIMIT ?",
                (-1 if limit is None else limit,)).fetchall()
        return [Conversation(*r) for r in rows]

    def delete(self, conv_id: str) -> None:
        conv = self.get(conv_id)
        with self._lock:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conv.id,))

    # ------------------------------------------------------------------ turns

    def append(self, conv_id: str, role: str, content: str, meta: dict[str, Any] | None = None) -> Turn:
        """Add one turn, durably, in one transaction (the conversation's clock and title with it)."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}; use one of {', '.join(ROLES)}", param="role")
        if not isinstance(content, str) or len(content) > MAX_CONTENT_CHARS:
            raise InvalidRequest(f"a turn must be text of at most {MAX_CONTENT_CHARS} characters", param="content")
        meta_json = json.dumps(meta or {}, ensure_ascii=False)
        now = time.time()
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT title FROM conversations WHERE id = ?", (conv_id,)).fetchone()
                if row is None:
                    raise NotFound(f"no conversation '{conv_id}'", param="conversation")
                seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM turns WHERE conversation_id = ?",
                                 (conv_id,)).fetchone()[0]
                db.execute("INSERT INTO turns(conversation_id, seq, role, content, meta, created_at) "
                           "VALUES (?,?,?,?,?,?)", (conv_id, seq, role, content, meta_json, now))
                title = row[0]
                if not title and role == "user":
                    title = " ".join(content.split())[:80]
                db.execute("UPDATE conversations SET updated_at = ?, title = ? WHERE id = ?", (now, title, conv_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Turn(seq=seq, role=role, content=content, created_at=now, meta=meta or {})

    def turns(self, conv_id: str) -> list[Turn]:
        with self._lock:
            rows = self.db.execute(
                "SELECT seq, role, content, created_at, meta FROM turns WHERE conversation_id = ? ORDER BY seq",
                (conv_id,)).fetchall()
        return [Turn(seq=s, role=r, content=c, created_at=t, meta=json.loads(m)) for s, r, c, t, m in rows]

    def messages(self, conv_id: str) -> list[dict[str, str]]:
        """The conversation as chat messages (what the model sees on resume)."""
        return [t.message() for t in self.turns(conv_id)]

    # ------------------------------------------------------------------ export

    def export(self, conv_id: str, fmt: str = "json") -> str:
        if fmt not in EXPORT_FORMATS:
            raise InvalidRequest(f"unknown export format {fmt!r}; use json or markdown", param="format")
        conv = self.get(conv_id)
        turns = self.turns(conv.id)
        if fmt == "json":
            doc = {
                "id": conv.id,
                "persona": conv.persona,
                "title": conv.title,
                "model": conv.model,
                "created_at": _iso(conv.created_at),
                "updated_at": _iso(conv.updated_at),
                "turns": [{**asdict(t), "created_at": _iso(t.created_at)} for t in turns],
            }
            return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        return _markdown(conv, turns)


def _markdown(conv: Conversation, turns: list[Turn]) -> str:
    names = {"user": "User", "assistant": conv.persona or "Assistant", "system": "System", "tool": "Tool"}
    lines = [f"# {conv.title or 'Conversation ' + conv.id}", "",
             f"*Persona `{conv.persona}` · conversation `{conv.id}` · started {_iso(conv.created_at)}*", ""]
    for t in turns:
        lines += [f"**{names.get(t.role, t.role)}:**", "", t.content.rstrip(), ""]
        sources = t.meta.get("sources") if isinstance(t.meta, dict) else None
        if sources:
            lines.append("Sources:")
            for s in sources:
                if isinstance(s, dict):
                    lines.append(f"- [{s.get('index', '?')}] {s.get('title') or s.get('document', '')}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
