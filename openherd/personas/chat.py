"""`herd chat PERSONA`: talk to a persona in the terminal, with memory.

The conversation is resumed where it was left (the most recently active one),
``--new`` (or ``/new`` in the chat) starts a fresh one that opens with the
persona's greeting. Every turn is written to the persona's memory.db as soon as
it exists: the user's message before generation starts, the answer when it ends
(or is interrupted), so a crash loses at most the answer being generated.

Hook for ``commands/run.py`` (owned by the CLI): in ``cmd_chat``, before loading
a model::

    from ..personas.chat import find_persona, run_persona_chat
    if args.model and find_persona(args.model) is not None:
        return run_persona_chat(args)

and a ``--new`` flag on the ``chat`` parser. Store models win over personas of the
same name, as on the server.
"""

from __future__ import annotations

import sys
from typing import Any

from ..engine.types import FinishEvent, GenerationRequest
from ..errors import Unavailable
from .bundle import Persona, PersonaStore
from .memory import ConversationStore
from .runtime import LocalEngines, PersonaRuntime

__all__ = ["find_persona", "run_persona_chat"]

RECAP_TURNS = 4  # turns shown when resuming, so the user knows where they were
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "seed", "max_tokens")


def find_persona(name: str) -> Persona | None:
    """The persona `herd chat NAME` should talk to, or None (a store model, or no such persona)."""
    return PersonaStore().lookup(name)


def _overrides(args: Any) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}


def _show(role: str, text: str, persona: str, out) -> None:
    label = "you" if role == "user" else persona
    first, *rest = text.strip().splitlines() or [""]
    more = " …" if rest else ""
    out.write(f"  {label}: {first[:200]}{more}\n")


def run_persona_chat(args: Any) -> int:
    """The REPL. `args` carries the chat flags: model (the persona name), new, ctx, verbose and
    the sampling flags (temperature, top_p, top_k, seed, max_tokens; unset = persona default)."""
    from ..commands.run import _read_message, _setup_history
    from ..commands.store import progress_printer
    from ..settings import get_settings

    settings = get_settings()
    personas = PersonaStore(settings)
    persona = personas.get(args.model)
    if getattr(args, "system", None):
        # A persona's character is its system prompt; a one-off override would silently
        # make it someone else. Say so instead.
        print("note: --system is ignored for personas; change it with `herd persona edit "
              f"{persona.name} --system TEXT`", file=sys.stderr)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    memory = ConversationStore(personas.memory_db(persona.name), persona=persona.name)
    with progress_printer() as progress:
        engines = LocalEngines(settings, progress=progress, n_ctx=getattr(args, "ctx", None))
        try:
            engine = engines(persona.served_model)
            if persona.knowledge.sources and persona.knowledge.embedding_model and persona.knowledge.mode != "bm25":
                engines(persona.knowledge.embedding_model)
        except BaseException:
            engines.close()
            raise
    runtime = PersonaRuntime(persona, engines, settings, store=personas)
    try:
        if interactive:
            _setup_history(settings)
        conv = None if getattr(args, "new", False) else memory.latest()
        if conv is None:
            conv = _start(memory, persona, out)
        elif interactive:
            turns = memory.turns(conv.id)
            print(f"Resuming conversation {conv.id} with {persona.name} ({len(turns)} turns; "
                  "`herd chat --new` or /new starts fresh).")
            for t in turns[-RECAP_TURNS:]:
                _show(t.role, t.content, persona.name, out)
        if interactive:
            print("/new starts a new conversation, /sources shows the last answer's sources, /exit quits; "
                  '""" for multi-line.')
        last_sources: list[dict] = []
        overrides = _overrides(args)
        while True:
            try:
                text = _read_message(">>> ", "... ") if interactive else _read_message("", "")
            except KeyboardInterrupt:
                print()
                continue
            if text is None:
                if interactive:
                    print()
                break
            cmd = text.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/bye", "/quit"):
                break
            if cmd in ("/new", "/clear"):
                conv = _start(memory, persona, out)
                continue
            if cmd == "/sources":
                for s in last_sources or [{"index": "-", "title": "(no sources)"}]:
                    print(f"  [{s.get('index')}] {s.get('title', '')}")
                continue
            if cmd.startswith("/") and cmd.split()[0] != "/":
                print(f"unknown command {cmd.split()[0]}; try /new, /sources or /exit")
                continue
            # Prepared before the user turn is stored: a message too long for the context is
            # refused without leaving an unanswered turn behind.
            prep = runtime.prepare_sync(memory.messages(conv.id) + [{"role": "user", "content": text}], overrides)
            memory.append(conv.id, "user", text)
            answer, finish, interrupted = _stream(engine, prep, out, getattr(args, "verbose", False))
            footer = prep.footer(answer) if not interrupted else ""
            if footer:
                out.write(footer.lstrip("\n") + "\n")
                out.flush()
            used = prep.cited(answer) if prep.sources else []
            last_sources = [p.to_dict(text_limit=200) for p in used]
            meta: dict[str, Any] = {"sources": last_sources}
            if prep.quarantined:
                meta["quarantined"] = len(prep.quarantined)
            if interrupted:
                meta["interrupted"] = True
            elif finish is not None:
                meta["finish"] = finish.reason
            memory.append(conv.id, "assistant", answer, meta)
    finally:
        engines.close()
        memory.close()
    return 0


def _start(memory: ConversationStore, persona: Persona, out) -> Any:
    conv = memory.new(model=persona.served_model)
    if persona.greeting:
        out.write(persona.greeting.rstrip() + "\n")
        out.flush()
        memory.append(conv.id, "assistant", persona.greeting, {"greeting": True})
    return conv


def _stream(engine, prep, out, verbose: bool) -> tuple[str, FinishEvent | None, bool]:
    """Generate one answer, printing as it streams. Ctrl-C stops this answer only."""
    handle = engine.submit(GenerationRequest(prompt=prep.prompt, params=prep.params))
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
        return "".join(parts), None, True
    text = "".join(parts)
    if not text.endswith("\n"):
        out.write("\n")
    out.flush()
    if fin is not None and fin.reason == "error":
        raise Unavailable(fin.error or "generation failed")
    if verbose and fin is not None:
        u = fin.usage
        print(f"prompt: {u.prompt_tokens} tokens ({u.cached_tokens} cached) | decode: {u.completion_tokens} tokens | "
              f"passages: {len(prep.sources)} ({len(prep.quarantined)} quarantined) | finish: {fin.reason}",
              file=sys.stderr)
    return text, fin, False
