"""Memory: conversations, persisted in SQLite (WAL): a persona's in its ``memory.db``,
chats with a plain model in ``$HERD_HOME/conversations.db`` (the same schema, persona '').

    store = open_conversations(settings, "glimmerfen")   # or ConversationStore(path, persona=...)
    conv = store.latest() or store.new()          # `herd chat PERSONA` resumes; --new starts fresh
    store.append(conv.id, "user", "hello")        # one transaction per turn
    store.messages(conv.id)                       # [{"role": ..., "content": ...}, ...]
    store.rename(conv.id, "Ferry times")          # the web app's sidebar
    store.truncate(conv.id, from_seq=4)           # drop turns 4.. (regenerate an answer)
    store.export(conv.id, "markdown")             # or "json"

This module owns the schema: `herd chat`, `herd persona conversations`, the
personas API and the web app all go through ``ConversationStore``.

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
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, NotFound
from ..settings import Settings
from ..sqlite import DatabaseSpec, LazyConnection, immediate
from .bundle import PersonaStore

__all__ = [
    "Conversation",
    "ConversationStore",
    "Turn",
    "clean_title",
    "conversations_exist",
    "model_chats_db",
    "open_conversations",
]

SCHEMA = 1
ROLES = ("system", "user", "assistant", "tool")
MAX_CONTENT_CHARS = 1_000_000  # one turn; far beyond any context window, small enough for the disk
MAX_TITLE = 200  # characters; a title is one line in a list
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

# Conversation rows as Conversation(*row) takes them, with the number of turns.
_CONVERSATION_COLUMNS = ("c.id, c.persona, c.title, c.model, c.created_at, c.updated_at, "
                         "(SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id)")

# synchronous=FULL: why, see the module docstring.
DATABASE = DatabaseSpec(what="the conversation database", schema=_DDL, version=SCHEMA, synchronous="FULL")


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


def clean_title(title: object) -> str:
    """One line of printable text: a title is shown in lists, never interpreted."""
    if not isinstance(title, str):
        raise InvalidRequest("title must be a string", param="title")
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in title)
    text = " ".join(text.split())
    if len(text) > MAX_TITLE:
        raise InvalidRequest(f"title is longer than {MAX_TITLE} characters", param="title")
    return text


def model_chats_db(settings: Settings) -> Path:
    """Where chats with a plain model (no persona) are kept, whoever started them."""
    return settings.home / "conversations.db"


def _db_path(settings: Settings, persona: str) -> tuple[Path, str]:
    if not persona:
        return model_chats_db(settings), ""
    personas = PersonaStore(settings)
    name = personas.get(persona).name  # validates the name (no path tricks); NotFound for unknown personas
    return personas.memory_db(name), name


def open_conversations(settings: Settings, persona: str = "") -> ConversationStore:
    """The store of a persona's conversations (its memory.db), or of the plain-model chats
    for persona ''. `herd chat` and the web app open the same files, so a chat started in
    one continues in the other."""
    path, name = _db_path(settings, persona)
    return ConversationStore(path, name)


def conversations_exist(settings: Settings, persona: str = "") -> bool:
    """Whether that store exists yet: listing must not create an empty database as a side effect."""
    return _db_path(settings, persona)[0].is_file()


def new_conversation_id() -> str:
    """Sortable and readable: '20250314-093012-5f2a9c' (UTC time, then randomness)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class ConversationStore:
    """Conversations of one persona. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path, persona: str = ""):
        self.path = Path(path)
        self.persona = persona
        self._lock = threading.RLock()
        self._conn = LazyConnection(self.path, DATABASE, self._lock)

    @property
    def db(self) -> sqlite3.Connection:
        return self._conn.get()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ conversations

    def new(self, title: str = "", model: str = "", greeting: str = "") -> Conversation:
        """Start a conversation. A persona's opens with its greeting: the first turn, an
        assistant turn marked ``{"greeting": True}`` (so a client can tell it from an answer)."""
        now = time.time()
        conv = Conversation(id=new_conversation_id(), persona=self.persona, title=title[:MAX_TITLE], model=model,
                            created_at=now, updated_at=now)
        with self._lock:
            self.db.execute(
                "INSERT INTO conversations(id, persona, title, model, created_at, updated_at) VALUES (?,?,?,?,?,?)",
                (conv.id, conv.persona, conv.title, conv.model, conv.created_at, conv.updated_at))
        if greeting:
            self.append(conv.id, "assistant", greeting, {"greeting": True})
            conv = self.get(conv.id)
        return conv

    def get(self, conv_id: str) -> Conversation:
        """By id, or by a unique prefix of one (like git's short hashes); 'last' = the latest."""
        if not isinstance(conv_id, str) or not conv_id or len(conv_id) > 64:
            raise InvalidRequest(f"give a conversation id (see `{self._list_command()}`)", param="conversation")
        if conv_id == "last":
            conv = self.latest()
            if conv is None:
                raise NotFound(f"{self._owner()} no conversations yet", param="conversation")
            return conv
        with self._lock:
            escaped = conv_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            rows = self.db.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE c.id LIKE ? ESCAPE '\\' "
                "ORDER BY c.id LIMIT 2", (escaped + "%",)).fetchall()
        exact = [r for r in rows if r[0] == conv_id]
        if exact:
            rows = exact
        if not rows:
            where = f" for persona '{self.persona}'" if self.persona else ""
            raise NotFound(f"no conversation '{conv_id}'{where}; see `{self._list_command()}`", param="conversation")
        if len(rows) > 1:
            raise InvalidRequest(f"'{conv_id}' matches more than one conversation; give more of the id",
                                 param="conversation")
        return Conversation(*rows[0])

    def latest(self, models: Sequence[str] = ()) -> Conversation | None:
        """The conversation with the most recent activity (with one of ``models``, if given)."""
        rows = self.list(limit=1, models=models)
        return rows[0] if rows else None

    def list(self, limit: int | None = None, models: Sequence[str] = ()) -> list[Conversation]:
        """Most recently active first; only those with one of ``models`` if any are given
        (a plain-model store holds the chats of every model)."""
        where, params = "", [*models]
        if models:
            where = f"WHERE c.model IN ({', '.join('?' * len(models))}) "
        with self._lock:
            rows = self.db.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c {where}"
                "ORDER BY c.updated_at DESC, c.id DESC LIMIT ?", (*params, -1 if limit is None else limit)).fetchall()
        return [Conversation(*r) for r in rows]

    def rename(self, conv_id: str, title: str) -> Conversation:
        """Set the title (one line of printable text, see ``clean_title``). Renaming is not
        activity: the conversation keeps its place in the most-recent-first list."""
        title = clean_title(title)
        conv = self.get(conv_id)
        with self._lock:
            self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv.id))
        return self.get(conv.id)

    def truncate(self, conv_id: str, from_seq: int) -> Conversation:
        """Drop turns ``from_seq`` and after, in one transaction (regenerating an answer
        drops it before the new one is appended)."""
        if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 1:
            raise InvalidRequest("give the first turn to drop as a number >= 1", param="from")
        conv = self.get(conv_id)
        with self._lock, immediate(self.db) as db:
            db.execute("DELETE FROM turns WHERE conversation_id = ? AND seq >= ?", (conv.id, from_seq))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conv.id))
        return self.get(conv.id)

    def delete(self, conv_id: str) -> None:
        conv = self.get(conv_id)
        with self._lock:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conv.id,))

    def _owner(self) -> str:
        return f"persona '{self.persona}' has" if self.persona else "there are"

    def _list_command(self) -> str:
        return f"herd persona conversations {self.persona}" if self.persona else "herd chat --list"

    # ------------------------------------------------------------------ turns

    def append(self, conv_id: str, role: str, content: str, meta: dict[str, Any] | None = None) -> Turn:
        """Add one turn, durably, in one transaction (the conversation's clock and title with it)."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}; use one of {', '.join(ROLES)}", param="role")
        if not isinstance(content, str) or len(content) > MAX_CONTENT_CHARS:
            raise InvalidRequest(f"a turn must be text of at most {MAX_CONTENT_CHARS} characters", param="content")
        meta_json = json.dumps(meta or {}, ensure_ascii=False)
        now = time.time()
        with self._lock, immediate(self.db) as db:
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
