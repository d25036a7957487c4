"""`herd chat PERSONA`: talk to a persona in the terminal, with memory.

The conversation is resumed where it was left (the most recently active one);
``--resume ID`` picks another, ``--new`` (or ``/new`` in the chat) starts a fresh
one that opens with the persona's greeting, ``--list`` lists them. Every turn is
written to the persona's memory.db as soon as it exists: the user's message
before generation starts, the answer when it ends (or is interrupted), so a crash
loses at most the answer being generated.

The loop itself (input, commands, streaming, Ctrl-C) is openherd/repl.py, shared
with `herd chat MODEL`; what is a persona's own is here: each message goes through
``PersonaRuntime`` (character, retrieved passages, sampling defaults), answers
carry their sources, and /sources shows them.

Hook for ``commands/run.py`` (owned by the CLI): in ``cmd_chat``, before loading
a model::

    from ..personas.chat import find_persona, run_persona_chat
    if args.model and find_persona(args.model) is not None:
        return run_persona_chat(args, progress_printer)

and ``--new``, ``--resume [ID]`` and ``--list`` flags on the ``chat`` parser. Store
models win over personas of the same name, as on the server.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..engine.backend import Backend
from ..engine.types import GenerationRequest
from ..repl import chat_loop, print_conversations, setup_history, show_recap, stream_answer, usage_line
from .bundle import Persona, PersonaStore
from .memory import Conversation, ConversationStore, conversations_exist, open_conversations
from .runtime import LocalEngines, PersonaRuntime

__all__ = ["find_persona", "run_persona_chat"]

# () -> a context manager yielding a pull progress callback (commands.store.progress_printer).
ProgressPrinter = Callable[[], AbstractContextManager[Any]]

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "seed", "max_tokens")


def find_persona(name: str) -> Persona | None:
    """The persona `herd chat NAME` should talk to, or None (a store model, or no such persona)."""
    return PersonaStore().lookup(name)


def _overrides(args: Any) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}


@dataclass
class PersonaChat:
    """One terminal session with a persona: its runtime, its memory, the conversation."""

    persona: Persona
    runtime: PersonaRuntime
    engine: Backend  # the runtime the persona's model runs on
    memory: ConversationStore
    conv: Conversation
    overrides: dict[str, Any] = field(default_factory=dict)  # sampling flags given on the command line
    verbose: bool = False
    out: TextIO = sys.stdout
    last_sources: list[dict] = field(default_factory=list)  # the last answer's cited passages, for /sources

    def send(self, text: str) -> None:
        # Prepared and submitted before the user turn is stored: a message too long for
        # the context is refused without leaving an unanswered turn behind.
        prep = self.runtime.prepare_sync(self.memory.messages(self.conv.id) + [{"role": "user", "content": text}],
                                         self.overrides)
        handle = self.engine.submit(GenerationRequest(prompt=prep.prompt, params=prep.params))
        self.memory.append(self.conv.id, "user", text)
        answer = stream_answer(handle, self.out)
        footer = prep.footer(answer.text) if not answer.interrupted else ""
        if footer:
            self.out.write(footer.lstrip("\n") + "\n")
            self.out.flush()
        used = prep.cited(answer.text) if prep.sources else []
        self.last_sources = [p.to_dict(text_limit=200) for p in used]
        meta: dict[str, Any] = {"sources": self.last_sources, **answer.meta()}
        if prep.quarantined:
            meta["quarantined"] = len(prep.quarantined)
        self.memory.append(self.conv.id, "assistant", answer.text, meta)
        if self.verbose and answer.finish is not None:
            passages = f"passages: {len(prep.sources)} ({len(prep.quarantined)} quarantined)"
            print(usage_line(answer.finish, passages), file=sys.stderr)

    def new(self, _arg: str = "") -> None:
        self.conv = _start(self.memory, self.persona, self.out)
        self.last_sources = []

    def sources(self, _arg: str = "") -> None:
        for s in self.last_sources or [{"index": "-", "title": "(no sources)"}]:
            print(f"  [{s.get('index')}] {s.get('title', '')}")


def run_persona_chat(args: Any, progress_printer: ProgressPrinter | None = None) -> int:
    """The REPL. `args` carries the chat flags: model (the persona name), new, resume, list, ctx,
    verbose and the sampling flags (temperature, top_p, top_k, seed, max_tokens; unset = persona
    default). `progress_printer` shows a model pull (the CLI passes its terminal bars; the
    personas layer does not reach back into the CLI for them); None shows nothing."""
    from ..settings import get_settings

    progress_printer = progress_printer or _no_progress
    settings = get_settings()
    personas = PersonaStore(settings)
    persona = personas.get(args.model)
    if getattr(args, "list", False):
        conversations = []
        if conversations_exist(settings, persona.name):  # listing must not create memory.db
            with open_conversations(settings, persona.name) as memory:
                conversations = memory.list()
        print_conversations(conversations, sys.stdout)
        return 0
    if getattr(args, "system", None):
        # A persona's character is its system prompt; a one-off override would silently
        # make it someone else. Say so instead.
        print("note: --system is ignored for personas; change it with `herd persona edit "
              f"{persona.name} --system TEXT`", file=sys.stderr)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    memory = open_conversations(settings, persona.name)
    try:
        # Picked before the models load: a wrong --resume id fails in a moment.
        resume = getattr(args, "resume", None)
        conv = None if getattr(args, "new", False) else memory.get(resume) if resume else memory.latest()
        engines, engine = _load(persona, settings, getattr(args, "ctx", None), progress_printer)
    except BaseException:
        memory.close()
        raise
    runtime = PersonaRuntime(persona, engines, settings, store=personas)
    try:
        if interactive:
            setup_history(settings)
        if conv is None:
            conv = _start(memory, persona, out)
        elif interactive:
            turns = memory.turns(conv.id)
            print(f"Resuming conversation {conv.id} with {persona.name} ({len(turns)} turns; "
                  "`herd chat --new` or /new starts fresh).")
            show_recap(turns, persona.name, out)
        if interactive:
            print("/new starts a new conversation, /sources shows the last answer's sources, /exit quits; "
                  '""" for multi-line.')
        chat = PersonaChat(persona, runtime, engine, memory, conv, overrides=_overrides(args),
                           verbose=getattr(args, "verbose", False), out=out)
        chat_loop(chat.send, {"/new": chat.new, "/clear": chat.new, "/sources": chat.sources},
                  interactive=interactive)
    finally:
        engines.close()
        memory.close()
    return 0


def _no_progress() -> AbstractContextManager[Any]:
    return contextlib.nullcontext(None)


def _load(persona: Persona, settings: Any, n_ctx: int | None,
          progress_printer: ProgressPrinter) -> tuple[LocalEngines, Any]:
    """The persona's model (and its embedding model, for dense retrieval), pulled if need be."""
    with progress_printer() as progress:
        engines = LocalEngines(settings, progress=progress, n_ctx=n_ctx)
        try:
            engine = engines(persona.served_model)
            if persona.knowledge.sources and persona.knowledge.embedding_model and persona.knowledge.mode != "bm25":
                engines(persona.knowledge.embedding_model)
        except BaseException:
            engines.close()
            raise
    return engines, engine


def _start(memory: ConversationStore, persona: Persona, out: TextIO) -> Conversation:
    """A new conversation; the persona's greeting is its first turn (as in the web app)."""
    conv = memory.new(model=persona.served_model, greeting=persona.greeting or "")
    if persona.greeting:
        out.write(persona.greeting.rstrip() + "\n")
        out.flush()
    return conv
