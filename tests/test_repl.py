"""The terminal chat (openherd/repl.py) and `herd chat MODEL`'s saved conversations.

The loop and streaming run on the real tiny model through ``cli.main`` in-process
(stdin replaced, as a pipe would); one subprocess checks the console script's
one-line errors. The conversations are the very store the web app writes
(``personas.memory.open_conversations``); tests/test_web_app.py continues a chat
started over HTTP in the terminal.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import MODEL, register_model
from terminal import run_in_terminal

from openherd.cli import main
from openherd.engine.types import GenerationRequest, SamplingParams
from openherd.personas.memory import conversations_exist, open_conversations
from openherd.repl import Answer, chat_loop, print_conversations, read_message, stream_answer, usage_line
from openherd.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0", "--max-tokens", "4"]


@pytest.fixture
def home(herd_home: Path, tiny_gguf: Path) -> Path:
    register_model(herd_home, tiny_gguf, MODEL)
    return herd_home


def feed(monkeypatch, lines: list[str]) -> None:
    """What a pipe gives `herd chat`: no terminal, so no prompts and no readline."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))


def chat(monkeypatch, capsys, lines: list[str], *args: str) -> tuple[int, str, str]:
    feed(monkeypatch, lines)
    rc = main(["chat", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def saved(settings=None) -> list[tuple]:
    """Every saved model chat: (conversation, [(role, content, meta), ...]), most recent first."""
    settings = settings or get_settings()
    if not conversations_exist(settings):
        return []
    with open_conversations(settings) as mem:
        return [(c, [(t.role, t.content, t.meta) for t in mem.turns(c.id)]) for c in mem.list()]


# ----------------------------------------------------------------------------- the loop


def test_read_message_multiline(monkeypatch):
    feed(monkeypatch, ['"""first', "second", 'third"""', '"""one line"""', "plain"])
    assert read_message("", "") == "first\nsecond\nthird"
    assert read_message("", "") == "one line"
    assert read_message("", "") == "plain"
    assert read_message("", "") is None  # EOF
    feed(monkeypatch, ['"""never closed', "more"])
    assert read_message("", "") == "never closed\nmore"  # EOF ends an open block


def test_chat_loop_dispatches_commands_and_messages(monkeypatch, capsys):
    sent: list[str] = []
    ran: list[tuple[str, str]] = []
    commands = {
        "/system": lambda a: ran.append(("/system", a)),
        "/clear": lambda a: ran.append(("/clear", a)),
    }
    feed(
        monkeypatch,
        [
            "hello",
            "",
            "   ",
            "/system  Be  brief ",
            "/clear",
            "/nope x",
            "/",
            "/ not a command",
            '"""a',
            'b"""',
            "/exit",
            "never read",
        ],
    )
    chat_loop(sent.append, commands, interactive=False)
    assert sent == ["hello", "/", "/ not a command", "a\nb"]
    assert ran == [("/system", "Be  brief"), ("/clear", "")]
    assert capsys.readouterr().out == "unknown command /nope; try /system, /clear, /exit\n"
    for word in ("/bye", "/quit"):
        feed(monkeypatch, [word, "never read"])
        chat_loop(sent.append, {}, interactive=False)
    assert sent[-1] == "a\nb"


def test_print_conversations_table():
    from openherd.personas.memory import Conversation

    convs = [Conversation("20250101-000000-abcdef", "", "A title", "tiny", 0.0, 86400.0, 3)]
    out = io.StringIO()
    print_conversations(convs, out, with_model=True)
    assert out.getvalue().splitlines() == [
        "ID                        MODEL    TURNS    UPDATED             TITLE",
        "20250101-000000-abcdef    tiny     3        1970-01-02 00:00    A title",
    ]
    out = io.StringIO()
    print_conversations([], out)
    assert out.getvalue() == "ID    TURNS    UPDATED    TITLE\n"


# ----------------------------------------------------------------------------- streaming


class StopAfter:
    """The real request handle, with the user pressing Ctrl-C after ``n`` events."""

    def __init__(self, handle, n: int):
        self.handle, self.n, self.cancelled = handle, n, False

    def __iter__(self):
        for i, ev in enumerate(self.handle):
            if i == self.n:
                raise KeyboardInterrupt
            yield ev

    def cancel(self) -> None:
        self.cancelled = True
        self.handle.cancel()


def test_stream_answer_prints_returns_and_stops_on_ctrl_c(tiny_gguf):
    from openherd.engine import Engine, EngineConfig

    engine = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=1, n_threads=1, max_queue=1))
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
        params = SamplingParams(temperature=0, max_tokens=6, logit_bias={0: -100.0, 2: -100.0})
        out = io.StringIO()
        answer = stream_answer(engine.submit(GenerationRequest(prompt=prompt, params=params)), out)
        assert not answer.interrupted and answer.finish.reason == "length"
        assert out.getvalue() == answer.text + ("" if answer.text.endswith("\n") else "\n")
        meta = answer.meta()
        assert meta["finish"] == "length" and meta["tokens"] == 6 and meta["tok_s"] > 0
        line = usage_line(answer.finish, "passages: 2")
        assert line.startswith(f"prompt: {len(prompt)} tokens (") and "| decode: 6 tokens, " in line
        assert line.endswith(" | passages: 2 | finish: length")

        params = SamplingParams(temperature=0, max_tokens=200, logit_bias={0: -100.0, 2: -100.0})
        handle = StopAfter(engine.submit(GenerationRequest(prompt=prompt, params=params)), 3)
        out = io.StringIO()
        stopped = stream_answer(handle, out)
        assert stopped.interrupted and stopped.finish is None and handle.cancelled
        assert stopped.meta() == {"interrupted": True} and out.getvalue().endswith("\n")
        # The stopped sequence is freed: the one slot takes the next request.
        short = SamplingParams(temperature=0, max_tokens=2)
        again = stream_answer(engine.submit(GenerationRequest(prompt=prompt, params=short)), io.StringIO())
        assert again.finish is not None and engine.stats().active == 0
    finally:
        engine.close()


def test_answer_meta_without_timing():
    from openherd.engine.types import FinishEvent, Usage

    assert Answer("x", FinishEvent("stop", Usage(completion_tokens=1)), False).meta() == {
        "finish": "stop",
        "tokens": 1,
    }


# ----------------------------------------------------------------------------- herd run


def test_herd_run_streams_one_answer(home, monkeypatch, capsys):
    feed(monkeypatch, [])
    assert main(["run", MODEL, "Why is the sky blue?", *GREEDY, "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and out.endswith("\n")
    assert (
        err.startswith("prompt: ")
        and " | decode: " in err
        and err.rstrip().endswith(("finish: length", "finish: stop"))
    )
    assert not conversations_exist(get_settings())  # one-shot answers are not chats
    feed(monkeypatch, ["   "])
    assert main(["run", MODEL, "-"]) == 1 and capsys.readouterr().err == "herd: error: the prompt is empty\n"


# ----------------------------------------------------------------------------- herd chat MODEL, saved


def test_model_chat_is_saved_listed_and_resumed(home, monkeypatch, capsys):
    rc, out, err = chat(monkeypatch, capsys, ["hello there", "/system Be brief", "again"], MODEL, *GREEDY)
    assert rc == 0 and "(system prompt set)" in out
    ((conv, turns),) = saved()
    assert conv.model == MODEL and conv.title == "hello there" and conv.persona == ""
    assert [(r, c) for r, c, _ in turns][::2] == [("user", "hello there"), ("user", "again")]
    assert [r for r, _, _ in turns] == ["user", "assistant", "user", "assistant"]
    assert all(m["finish"] in ("stop", "length") and "tokens" in m for r, _, m in turns if r == "assistant")
    assert "system" not in [r for r, _, _ in turns]  # the system prompt is the session's, as in the web app

    rc, out, _ = chat(monkeypatch, capsys, [], "--list")
    header, row = out.splitlines()
    assert header.split() == ["ID", "MODEL", "TURNS", "UPDATED", "TITLE"]
    assert row.split()[:3] == [conv.id, MODEL, "4"] and row.endswith("hello there")
    assert chat(monkeypatch, capsys, [], MODEL + ":latest", "--list")[1].splitlines()[1].startswith(conv.id)
    assert len(chat(monkeypatch, capsys, [], "other", "--list")[1].splitlines()) == 1  # header only

    # --resume without an id: the last chat (with MODEL if given); the model comes from the chat.
    rc, out, err = chat(monkeypatch, capsys, ["and more"], "--resume", *GREEDY)
    assert rc == 0, err
    ((same, turns),) = saved()
    assert same.id == conv.id and len(turns) == 6 and turns[4][:2] == ("user", "and more")

    # /clear leaves the saved chat as it is and starts another at the next message.
    rc, out, _ = chat(
        monkeypatch, capsys, ["/clear", "fresh start"], MODEL, "--resume", conv.id[:-2], *GREEDY
    )
    assert f"(new conversation; {conv.id} stays saved)" in out
    (newer, t2), (older, t1) = saved()
    assert older.id == conv.id and len(t1) == 6 and newer.title == "fresh start" and len(t2) == 2

    # Opening and leaving a chat saves nothing.
    assert chat(monkeypatch, capsys, [], MODEL, *GREEDY)[0] == 0 and len(saved()) == 2


def test_chat_with_a_file_is_not_saved(home, tiny_gguf, monkeypatch, capsys):
    rc, out, _ = chat(monkeypatch, capsys, ["hi"], str(tiny_gguf), *GREEDY)
    assert rc == 0 and out.strip()
    assert saved() == [] and not conversations_exist(get_settings())


def test_resume_errors_are_one_line_and_create_nothing(home, monkeypatch, capsys):
    rc, _, err = chat(monkeypatch, capsys, [], "--resume")
    assert (
        rc == 1 and err == "herd: error: there are no saved model chats yet; `herd chat MODEL` starts one\n"
    )
    assert not conversations_exist(get_settings())
    rc, _, err = chat(monkeypatch, capsys, [], MODEL, "--list")
    assert rc == 0 and not conversations_exist(get_settings())  # listing creates no database

    chat(monkeypatch, capsys, ["hi"], MODEL, *GREEDY)
    for args, message in [
        (("--resume", "zzz"), "no conversation 'zzz'; see `herd chat --list`"),
        (("other", "--resume"), "there are no saved chats with 'other'; see `herd chat --list`"),
        (("--resume", "%"), "no conversation '%'"),
        (("--new", "--resume"), "--new starts a conversation and --resume continues one"),
    ]:
        rc, _, err = chat(monkeypatch, capsys, [], *args)
        assert rc == 1 and err.startswith("herd: error: " + message) and err.count("\n") == 1, err


def test_console_script_errors(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    env.update(HERD_HOME=str(home), PYTHONPATH=str(REPO))
    p = subprocess.run(
        [sys.executable, "-m", "openherd", "chat", "--resume", "nope"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == "herd: error: there are no saved model chats yet; `herd chat MODEL` starts one\n"


def run_on_a_terminal(home: Path, args: list[str], lines: list[str]) -> str:
    """`herd chat ARGS` at a terminal (prompts, banners, readline), typing ``lines`` at its prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    env.update(HERD_HOME=str(home), PYTHONPATH=str(REPO), TERM="dumb")
    run = run_in_terminal(["chat", *args], env, on_tty=["stdin", "stdout", "stderr"], typed=lines)
    assert run.returncode == 0, run.tty
    return run.tty


def test_resuming_on_a_terminal_shows_where_it_was(home, monkeypatch, capsys):
    assert (
        chat(monkeypatch, capsys, ['"""Where is the lighthouse?', 'On the cliff?"""'], MODEL, *GREEDY)[0] == 0
    )
    ((conv, _),) = saved()
    out = run_on_a_terminal(home, ["--resume", *GREEDY], ["and the ferry?", "/exit"])
    assert f"Resuming conversation {conv.id} with {MODEL} (2 turns)." in out
    assert "  you: Where is the lighthouse? …\n" in out  # the recap: first lines of the last turns
    assert f"  {MODEL}: " in out and "Chatting with tiny. /system TEXT, /clear, /exit;" in out
    assert out.count(">>> ") == 2
    ((conv, turns),) = saved()
    assert [c for _, c, _ in turns][2] == "and the ferry?"
    assert "and the ferry?" in (home / "chat_history").read_text()  # readline history, saved at exit

    out = run_on_a_terminal(home, ["--list"], [])  # lists and exits: no prompt, no banner
    header, row = out.splitlines()
    assert header.split() == ["ID", "MODEL", "TURNS", "UPDATED", "TITLE"] and row.split()[:3] == [
        conv.id,
        MODEL,
        "4",
    ]


def test_persona_chat_lists_and_resumes_by_id(home, monkeypatch, capsys):
    from openherd.personas.bundle import Persona, PersonaStore

    PersonaStore(get_settings()).create(
        Persona(name="glim", model=MODEL, system="You are Glim.", greeting="Welcome!")
    )
    rc, out, _ = chat(monkeypatch, capsys, [], "glim", "--list")
    assert rc == 0 and out == "ID    TURNS    UPDATED    TITLE\n"
    assert chat(monkeypatch, capsys, ["first"], "glim", *GREEDY)[1].startswith("Welcome!")
    assert chat(monkeypatch, capsys, ["second"], "glim", "--new", *GREEDY)[1].startswith("Welcome!")
    with open_conversations(get_settings(), "glim") as mem:
        newest, first = mem.list()
    rows = chat(monkeypatch, capsys, [], "glim", "--list")[1].splitlines()
    assert [r.split()[0] for r in rows[1:]] == [newest.id, first.id]

    # --resume ID continues that one (not the latest); no greeting, the turns go to it.
    rc, out, _ = chat(monkeypatch, capsys, ["third"], "glim", "--resume", first.id, *GREEDY)
    assert rc == 0 and "Welcome!" not in out
    with open_conversations(get_settings(), "glim") as mem:
        assert [t.content for t in mem.turns(first.id) if t.role == "user"] == ["first", "third"]
        assert mem.get(newest.id).turns == 3
    rc, _, err = chat(monkeypatch, capsys, [], "glim", "--resume", "zzz")
    assert rc == 1 and "no conversation 'zzz' for persona 'glim'" in err
