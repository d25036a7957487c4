"""Memory: conversations in SQLite (WAL), listing, export, and survival of a kill -9 mid-write."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from openherd.errors import InvalidRequest, NotFound
from openherd.personas.memory import (
    ConversationStore,
    clean_title,
    conversations_exist,
    model_chats_db,
    open_conversations,
)
from openherd.settings import get_settings

REPO = Path(__file__).resolve().parent.parent


def test_conversations_round_trip(tmp_path):
    with ConversationStore(tmp_path / "memory.db", persona="glim") as store:
        assert store.latest() is None
        a = store.new(model="tiny")
        store.append(a.id, "assistant", "Welcome to the lighthouse!", {"greeting": True})
        store.append(a.id, "user", "What is the cat called?\nAnd why?")
        store.append(a.id, "assistant", "Bartholomew Quince [1].",
                     {"sources": [{"index": 1, "title": "keeper.md", "document": "keeper.md"}]})
        time.sleep(0.01)
        b = store.new()
        store.append(b.id, "user", "Second conversation")
        assert store.latest().id == b.id
        time.sleep(0.01)
        store.append(a.id, "user", "back to the first")
        assert store.latest().id == a.id  # most recent activity, not creation
        convs = store.list()
        assert [c.id for c in convs] == [a.id, b.id] and convs[0].turns == 4
        assert convs[0].title == "What is the cat called? And why?"  # the first user message
        assert store.messages(a.id)[1] == {"role": "user", "content": "What is the cat called?\nAnd why?"}
        assert store.get(a.id).id == a.id
        assert store.get("last").id == a.id

        doc = json.loads(store.export(a.id, "json"))
        assert doc["persona"] == "glim" and [t["role"] for t in doc["turns"]] == ["assistant", "user", "assistant", "user"]
        assert doc["turns"][2]["meta"]["sources"][0]["title"] == "keeper.md"
        md = store.export(a.id, "markdown")
        assert "**User:**" in md and "**glim:**" in md and "- [1] keeper.md" in md

        with pytest.raises(InvalidRequest):
            store.append(a.id, "wizard", "x")
        with pytest.raises(NotFound):
            store.append("nope", "user", "x")
        with pytest.raises(NotFound):
            store.get("zzz")
        with pytest.raises(InvalidRequest):
            store.export(a.id, "pdf")
        store.delete(b.id)
        assert [c.id for c in store.list()] == [a.id]
        assert store.turns(b.id) == []  # cascaded

    db = sqlite3.connect(tmp_path / "memory.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_prefix_ambiguity(tmp_path):
    with ConversationStore(tmp_path / "m.db", "glim") as store:
        a, b = store.new(), store.new()
        common = os.path.commonprefix([a.id, b.id])
        with pytest.raises(InvalidRequest, match="more than one"):
            store.get(common)
        with pytest.raises(NotFound):
            store.get("%")  # LIKE wildcards are escaped, not patterns


def test_greeting_rename_and_truncate(tmp_path):
    with ConversationStore(tmp_path / "m.db", "glim") as store:
        conv = store.new(model="tiny", greeting="Welcome!")
        assert conv.turns == 1 and conv.title == ""  # a greeting does not title the conversation
        (greeting,) = store.turns(conv.id)
        assert (greeting.role, greeting.content, greeting.meta) == ("assistant", "Welcome!", {"greeting": True})
        for i in range(2):
            store.append(conv.id, "user", f"question {i}")
            store.append(conv.id, "assistant", f"answer {i}")
        time.sleep(0.01)
        other = store.new()
        store.append(other.id, "user", "newer")

        renamed = store.rename(conv.id, "  Ferry\n\x1b[31mtimes\t ")
        assert renamed.id == conv.id and renamed.title == "Ferry [31mtimes" and renamed.turns == 5
        assert store.latest().id == other.id  # a rename is not activity
        with pytest.raises(InvalidRequest, match="longer than 200"):
            store.rename(conv.id, "x" * 201)
        with pytest.raises(InvalidRequest, match="must be a string"):
            store.rename(conv.id, 5)
        with pytest.raises(NotFound):
            store.rename("nope", "title")

        # Regenerate the last answer: drop turns 5.. (the answer), keep the question.
        time.sleep(0.01)
        cut = store.truncate(conv.id, 5)
        assert cut.turns == 4 and [t.seq for t in store.turns(conv.id)] == [1, 2, 3, 4]
        assert store.latest().id == conv.id  # truncating is activity (an answer is on its way)
        store.append(conv.id, "assistant", "answer 1, again")
        assert [t.seq for t in store.turns(conv.id)][-1] == 5  # seq continues without a gap
        assert store.truncate(conv.id, 99).turns == 5  # past the end: nothing to drop
        for bad in (0, -1, "2", 1.5, True):
            with pytest.raises(InvalidRequest, match=">= 1"):
                store.truncate(conv.id, bad)
        assert store.truncate(conv.id, 1).turns == 0
        assert store.turns(other.id)[0].content == "newer"  # other conversations untouched


def test_list_by_model(tmp_path):
    with ConversationStore(tmp_path / "c.db") as store:
        a = store.new(model="smollm2")
        time.sleep(0.01)
        b = store.new(model="smollm2:latest")
        time.sleep(0.01)
        c = store.new(model="qwen")
        assert [x.id for x in store.list()] == [c.id, b.id, a.id]
        assert [x.id for x in store.list(models=["smollm2", "smollm2:latest"])] == [b.id, a.id]
        assert store.latest(models=["qwen"]).id == c.id and store.latest(models=["nope"]) is None
        assert [x.id for x in store.list(limit=1, models=["smollm2"])] == [a.id]
        with pytest.raises(NotFound, match="herd chat --list"):  # model chats point at their own listing
            store.get("zzz")


def test_clean_title():
    # Control and format characters (newlines, NUL, zero-width space) become spaces, runs of space one.
    assert clean_title(" a\u200bb\n c\x00d ") == "a b c d"
    assert clean_title("") == ""


def test_open_conversations_locates_the_stores(herd_home):
    from openherd.personas.bundle import Persona, PersonaStore

    settings = get_settings()
    assert not conversations_exist(settings)
    with open_conversations(settings) as store:
        assert store.path == model_chats_db(settings) == herd_home / "conversations.db" and store.persona == ""
        assert not conversations_exist(settings)  # opening is lazy: nothing is created until used
        store.new(model="tiny")
    assert conversations_exist(settings)

    with pytest.raises(NotFound):
        open_conversations(settings, "nobody")
    with pytest.raises(InvalidRequest):
        open_conversations(settings, "../../etc")
    personas = PersonaStore(settings)
    personas.create(Persona(name="glim", model="tiny", system="You are Glim."))
    assert not conversations_exist(settings, "glim")
    with open_conversations(settings, "glim") as store:
        assert store.path == personas.memory_db("glim") and store.persona == "glim"
        store.new()
    assert conversations_exist(settings, "glim")


WRITER = textwrap.dedent("""
    import sys
    from openherd.personas.memory import ConversationStore

    store = ConversationStore(sys.argv[1], persona="glim")
    conv = store.new()
    print("conv", conv.id, flush=True)
    i = 0
    while True:
        # Big turns make each commit slow enough that the kill lands mid-transaction.
        store.append(conv.id, "user" if i % 2 == 0 else "assistant", f"turn {i} " + "x" * 200_000)
        print("committed", i, flush=True)
        i += 1
""")


def test_kill_9_mid_write_leaves_the_database_intact(tmp_path):
    db_path = tmp_path / "memory.db"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    committed: list[int] = []
    conv_id = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            kind, value = line.split()
            if kind == "conv":
                conv_id = value
            else:
                committed.append(int(value))
            if len(committed) >= 25:
                break
        # Let it get into the next write, then kill it without any chance to clean up.
        time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        committed += [int(x.split()[1]) for x in proc.stdout.read().splitlines() if x.startswith("committed")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert conv_id is not None and len(committed) >= 25

    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ConversationStore(db_path, persona="glim") as store:
        turns = store.turns(conv_id)
        # Every turn reported committed is there, whole; at most the one being written is extra.
        assert [t.seq for t in turns] == list(range(1, len(turns) + 1))
        assert len(committed) <= len(turns) <= len(committed) + 1
        for t in turns:
            i = t.seq - 1
            assert t.content == f"turn {i} " + "x" * 200_000
        store.append(conv_id, "user", "still writable after the crash")
        assert store.turns(conv_id)[-1].content == "still writable after the crash"
