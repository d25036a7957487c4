"""The terminal chat, written once: `herd chat MODEL` (commands/run.py) and `herd chat
PERSONA` (personas/chat.py) differ only in what a message turns into and in their
commands; `herd run` streams its one answer the same way.

    chat_loop(session.send, {"/clear": session.clear}, interactive=sys.stdin.isatty())
    answer = stream_answer(engine.submit(request), sys.stdout)   # Answer(text, finish, interrupted)
    memory.append(conv.id, "assistant", answer.text, answer.meta())

What "the same" means for a user: ``\"\"\"`` starts and ends a multi-line message;
readline history is kept in ``$HERD_HOME/chat_history``; Ctrl-C at the prompt clears
the line and during an answer stops that answer only; Ctrl-D, /exit, /bye or /quit
leave; with stdin not a terminal there are no prompts, so `herd chat < script.txt`
prints only the answers. A saved turn's ``meta`` is what the web app shows under an
answer (finish, interrupted, tokens, tok/s), whoever wrote it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from .engine.types import FinishEvent
from .errors import Unavailable

__all__ = [
    "Answer",
    "chat_loop",
    "print_conversations",
    "read_message",
    "setup_history",
    "show_recap",
    "stream_answer",
    "usage_line",
]

EXIT_COMMANDS = ("/exit", "/bye", "/quit")
RECAP_TURNS = 4  # turns shown when resuming, so the user knows where they were

Command = Callable[[str], None]  # gets the text after the command word ("" if none)


# --------------------------------------------------------------------------- one answer


@dataclass
class Answer:
    text: str
    finish: FinishEvent | None  # None when the user stopped it
    interrupted: bool

    def meta(self) -> dict[str, Any]:
        """How the answer ended, as a saved turn records it (the web app shows the same keys)."""
        if self.interrupted or self.finish is None:
            return {"interrupted": True}
        u = self.finish.usage
        meta: dict[str, Any] = {"finish": self.finish.reason, "tokens": u.completion_tokens}
        rate = decode_rate(self.finish)
        if rate:
            meta["tok_s"] = round(rate, 1)
        return meta


def stream_answer(handle: Any, out: TextIO) -> Answer:
    """Print an answer as it streams from a submitted request (engine.RequestHandle).

    Ctrl-C cancels the request, which frees its sequence at once, and returns what was
    generated so far: it stops this answer, not the chat. A generation that fails
    raises Unavailable with the engine's reason."""
    parts: list[str] = []
    fin: FinishEvent | None = None
    try:
        for ev in handle:
            if ev.text:
                out.write(ev.text)
                out.flush()
                parts.append(ev.text)
            if isinstance(ev, FinishEvent):
                fin = ev
    except KeyboardInterrupt:
        handle.cancel()
        out.write("\n")
        out.flush()
        return Answer("".join(parts), None, True)
    text = "".join(parts)
    if not text.endswith("\n"):
        out.write("\n")
    out.flush()
    if fin is not None and fin.reason == "error":
        raise Unavailable(fin.error or "generation failed")
    return Answer(text, fin, False)


def decode_rate(fin: FinishEvent) -> float:
    """Tokens per second after the first: the first token's time is prompt processing."""
    u = fin.usage
    return (
        (u.completion_tokens - 1) / (u.decode_ms / 1000)
        if u.decode_ms > 0 and u.completion_tokens > 1
        else 0.0
    )


def usage_line(fin: FinishEvent, *extra: str) -> str:
    """The --verbose line: prompt and decode speed, then ``extra`` fields, then the finish reason."""
    u = fin.usage
    evaluated = max(u.prompt_tokens - u.cached_tokens, 0)  # cached tokens cost no prompt time
    prompt_rate = evaluated / (u.prompt_ms / 1000) if u.prompt_ms > 0 else 0.0
    fields = [
        f"prompt: {u.prompt_tokens} tokens ({u.cached_tokens} cached), {prompt_rate:.1f} tok/s",
        f"decode: {u.completion_tokens} tokens, {decode_rate(fin):.1f} tok/s",
        *extra,
        f"finish: {fin.reason}",
    ]
    return " | ".join(fields)


# --------------------------------------------------------------------------- input


def read_message(prompt: str, more: str = "... ") -> str | None:
    """One user message; triple quotes start/end a multi-line message. None = EOF."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    body = [line.lstrip()[3:]]
    if body[0].rstrip().endswith('"""') and len(body[0].rstrip()) >= 3:
        return body[0].rstrip()[:-3]
    while True:
        try:
            nxt = input(more)
        except EOFError:
            break
        if nxt.rstrip().endswith('"""'):
            body.append(nxt.rstrip()[:-3])
            break
        body.append(nxt)
    return "\n".join(body)


def setup_history(settings: Any) -> None:
    """Up-arrow history across chats, in ``$HERD_HOME/chat_history`` (saved at exit)."""
    try:
        import atexit
        import readline
    except ImportError:  # Windows without pyreadline: plain input still works
        return
    path = settings.home / "chat_history"
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(_save_history, readline, path)


def _save_history(readline: Any, path: Any) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- the loop


def chat_loop(send: Callable[[str], None], commands: Mapping[str, Command], *, interactive: bool) -> None:
    """Read messages until EOF or an exit command. ``/word ARG`` runs ``commands["/word"](ARG)``;
    anything else (a lone "/" included) is a message for ``send``."""
    while True:
        try:
            text = read_message(">>> ", "... ") if interactive else read_message("", "")
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, like a shell
            print()
            continue
        if text is None:
            if interactive:
                print()
            return
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in EXIT_COMMANDS:
            return
        word, *arg = cmd.split(maxsplit=1)
        if word.startswith("/") and word != "/":
            run = commands.get(word)
            if run is None:
                print(f"unknown command {word}; try {', '.join([*commands, '/exit'])}")
            else:
                run(arg[0] if arg else "")
            continue
        send(text)


# --------------------------------------------------------------------------- saved conversations


def show_recap(turns: Iterable[Any], assistant: str, out: TextIO, n: int = RECAP_TURNS) -> None:
    """The last ``n`` turns of a resumed conversation, first line of each."""
    for t in list(turns)[-n:]:
        label = "you" if t.role == "user" else assistant
        first, *rest = t.content.strip().splitlines() or [""]
        more = " …" if rest else ""
        out.write(f"  {label}: {first[:200]}{more}\n")


def print_conversations(conversations: Iterable[Any], out: TextIO, *, with_model: bool = False) -> None:
    """A table of conversations (``memory.Conversation``), most recently active first."""
    header = (
        ("ID", "MODEL", "TURNS", "UPDATED", "TITLE") if with_model else ("ID", "TURNS", "UPDATED", "TITLE")
    )
    rows = [header]
    for c in conversations:
        when = datetime.fromtimestamp(c.updated_at, UTC).strftime("%Y-%m-%d %H:%M")
        cells = (c.id, c.model, str(c.turns), when, c.title[:60])
        rows.append(cells if with_model else cells[:1] + cells[2:])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        out.write("    ".join(col.ljust(w) for col, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.flush()
