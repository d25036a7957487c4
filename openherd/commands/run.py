"""`herd run` and `herd chat`: talk to a model from the terminal.

Both load the model in-process on the same engine the server batches on (one
sequence slot), stream tokens as they arrive, and share sampling flags. The chat
loop itself (input, commands, streaming, Ctrl-C) is openherd/repl.py, shared with
`herd chat PERSONA` (personas/chat.py).

Chats with a store model are saved in ``$HERD_HOME/conversations.db``, the store
the web app keeps its model chats in (``personas.memory.open_conversations``):
``--list`` shows them, ``--resume [ID]`` continues one, whichever side started it.
A model chat starts fresh unless resumed; a persona's resumes its last one unless
``--new`` (a persona is a character with a memory, a model is not).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.95)")
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling, 0 disables (default 40)")
    g.add_argument("--seed", type=int, default=None, help="the same seed reproduces the same output")
    g.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--ctx", type=int, default=None, help="context size in tokens (default HERD_NUM_CTX)")
    g.add_argument("--verbose", action="store_true", help="print prompt and decode speed")


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="answer one prompt (pulls the default model on first use)",
        description="Answer one prompt and exit. MODEL defaults to the default model (smollm2), "
        "pulled on first use; it may be a store name or a path to a .gguf file. "
        "PROMPT '-' (or a pipe) reads standard input.",
    )
    p.add_argument("args", nargs="*", metavar="[MODEL] PROMPT", help="model (optional) and prompt")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "chat",
        help="interactive chat (REPL) with a model or persona",
        description='Interactive chat. Commands: /system TEXT, /clear, /exit (a persona: /new, /sources, /exit). '
        'Start and end a multi-line message with """. Ctrl-C stops the current answer; Ctrl-D exits. '
        "Chats are saved (a model's in $HERD_HOME/conversations.db, shared with the web app; a persona's in "
        "its memory): --list shows them, --resume continues one.",
    )
    c.add_argument("model", nargs="?", default=None, help="model name, persona or .gguf path (default smollm2)")
    c.add_argument("--new", action="store_true", help="start a new conversation (personas resume the last one)")
    c.add_argument("--resume", nargs="?", const="last", default=None, metavar="ID",
                   help="continue a saved conversation: its ID, a prefix of it, or (no ID) the last one "
                   "(with MODEL: the last one with that model)")
    c.add_argument("--list", action="store_true",
                   help="list the saved conversations (of MODEL or PERSONA; without one, every model chat) and exit")
    _add_sampling_flags(c)
    c.set_defaults(func=cmd_chat)


# --------------------------------------------------------------------------- helpers
def _looks_like_model(arg: str) -> bool:
    """Decide whether a lone positional is a model or a prompt."""
    from ..store import Store
    from ..store.manifest import is_valid_name

    if arg.endswith(".gguf"):
        return True
    if not is_valid_name(arg):
        return False
    return Store().exists(arg)


def _sampling(args):
    from ..engine.types import SamplingParams

    kw = {}
    for k in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
        v = getattr(args, k)
        if v is not None:
            kw[k] = v
    return SamplingParams(**kw)


def load_engine(model: str | None, args, n_parallel: int = 1):
    """Resolve (pulling catalog aliases on first use) and load a model for the terminal.
    Returns (engine, manifest); the manifest's name is '' for a .gguf path outside the store."""
    from ..engine.engine import Engine, EngineConfig
    from ..settings import get_settings
    from ..store import Store
    from .store import progress_printer

    settings = get_settings()
    store = Store(settings)
    name = model or settings.default_model
    with progress_printer() as progress:
        manifest = store.ensure(name, progress=progress)
    cfg = EngineConfig(n_ctx=args.ctx or settings.num_ctx, n_parallel=n_parallel,
                       n_threads=settings.threads, max_queue=1, lora=manifest.adapter)
    return Engine.load(manifest.path, cfg, name=manifest.name or name), manifest


def _with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


# --------------------------------------------------------------------------- run
def cmd_run(args) -> int:
    from ..engine.types import GenerationRequest
    from ..errors import InvalidRequest
    from ..repl import stream_answer, usage_line

    pos = list(args.args)
    if len(pos) > 2:
        raise InvalidRequest("too many arguments: quote the prompt, e.g. herd run smollm2 \"Why is the sky blue?\"")
    model = prompt = None
    if len(pos) == 2:
        model, prompt = pos
    elif len(pos) == 1:
        if pos[0] != "-" and _looks_like_model(pos[0]):
            model = pos[0]
        else:
            prompt = pos[0]
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise InvalidRequest('no prompt given: herd run [MODEL] "PROMPT" (or pipe it, or use herd chat)')
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise InvalidRequest("the prompt is empty")
    engine, _ = load_engine(model, args)
    try:
        messages = _with_system(args.system, [{"role": "user", "content": prompt}])
        handle = engine.submit(GenerationRequest(prompt=engine.encode_chat(messages), params=_sampling(args)))
        answer = stream_answer(handle, sys.stdout)
        if args.verbose and answer.finish is not None:
            print(usage_line(answer.finish), file=sys.stderr)
    finally:
        engine.close()
    return 0


# --------------------------------------------------------------------------- chat
def cmd_chat(args) -> int:
    from ..errors import InvalidRequest

    if args.new and args.resume:
        raise InvalidRequest("--new starts a conversation and --resume continues one; give one of them")
    if args.model:
        from ..personas.chat import find_persona, run_persona_chat
        from .store import progress_printer

        # Store models win over a persona of the same name, as on the server.
        if find_persona(args.model) is not None:
            return run_persona_chat(args, progress_printer)
    if args.list:
        return _list_model_chats(args.model)
    return _model_chat(args)


def _list_model_chats(model: str | None) -> int:
    from ..personas.memory import conversations_exist, open_conversations
    from ..repl import print_conversations
    from ..settings import get_settings

    settings = get_settings()
    conversations = []
    if conversations_exist(settings):  # listing must not create the database
        with open_conversations(settings) as memory:
            conversations = memory.list(models=_model_names(model))
    print_conversations(conversations, sys.stdout, with_model=True)
    return 0


def _model_names(model: str | None) -> list[str]:
    """The names a saved chat may record for MODEL ('smollm2' and 'smollm2:latest' are one model)."""
    from ..store.manifest import is_valid_name, name_candidates

    if not model:
        return []
    return name_candidates(model) if is_valid_name(model) else [model]


def _resume(settings, resume: str, model: str | None):
    """The saved model chat --resume names: an id (or a prefix), or 'last' (with MODEL, the last with it)."""
    from ..errors import NotFound
    from ..personas.memory import conversations_exist, open_conversations

    if not conversations_exist(settings):
        raise NotFound("there are no saved model chats yet; `herd chat MODEL` starts one", param="conversation")
    with open_conversations(settings) as memory:
        if resume != "last":
            return memory.get(resume)
        conv = memory.latest(models=_model_names(model))
    if conv is None:
        raise NotFound(f"there are no saved chats with '{model}'; see `herd chat --list`", param="conversation")
    return conv


@dataclass
class ModelChat:
    """`herd chat MODEL`: the model's own chat template over the conversation so far.

    With ``memory`` set, every turn is saved as it happens (the user's once the request
    is accepted, the answer when it ends or is stopped), as the web app and persona
    chats save theirs; the conversation itself is created at the first message, so
    opening and leaving a chat leaves nothing behind."""

    engine: Any
    params: Any  # SamplingParams
    model: str  # the name the saved conversation records
    system: str | None = None  # --system / /system: not part of the saved conversation, as in the web app
    verbose: bool = False
    memory: Any = None  # personas.memory.ConversationStore, or None: nothing is saved
    conv: Any = None  # the saved conversation being continued (memory.Conversation)
    history: list[dict] = field(default_factory=list)

    def send(self, text: str) -> None:
        from ..engine.types import GenerationRequest
        from ..repl import stream_answer, usage_line

        user = {"role": "user", "content": text}
        prompt = self.engine.encode_chat(_with_system(self.system, self.history + [user]))
        # Submitted before the user's turn is saved: a message the context cannot hold is
        # refused without leaving an unanswered turn behind.
        handle = self.engine.submit(GenerationRequest(prompt=prompt, params=self.params))
        if self.memory is not None:
            if self.conv is None:
                self.conv = self.memory.new(model=self.model)
            self.memory.append(self.conv.id, "user", text)
        self.history.append(user)
        answer = stream_answer(handle, sys.stdout)
        self.history.append({"role": "assistant", "content": answer.text})
        if self.memory is not None:
            self.memory.append(self.conv.id, "assistant", answer.text, answer.meta())
        if self.verbose and answer.finish is not None:
            print(usage_line(answer.finish), file=sys.stderr)

    def clear(self, _arg: str = "") -> None:
        saved = self.conv
        self.history.clear()
        self.conv = None
        print(f"(new conversation; {saved.id} stays saved)" if saved is not None else "(conversation cleared)")

    def set_system(self, text: str) -> None:
        self.system = text or None
        print("(system prompt set)" if self.system else "(system prompt cleared)")


def _model_chat(args) -> int:
    from ..personas.memory import open_conversations
    from ..repl import chat_loop, setup_history, show_recap
    from ..settings import get_settings

    settings = get_settings()
    # Resolved before the model loads: a wrong id fails in a moment, not after a load.
    conv = _resume(settings, args.resume, args.model) if args.resume else None
    engine, manifest = load_engine(args.model or (conv.model if conv is not None else None), args)
    interactive = sys.stdin.isatty()
    # Only a store model can be chatted with again (from here or the web app); a chat with
    # a .gguf path is not saved unless it continues a saved one.
    memory = open_conversations(settings) if conv is not None or manifest.name else None
    chat = ModelChat(engine, _sampling(args), model=manifest.name, system=args.system, verbose=args.verbose,
                     memory=memory, conv=conv)
    turns = []
    try:
        if conv is not None:
            turns = memory.turns(conv.id)
            chat.history = [t.message() for t in turns]
            if conv.model and conv.model not in _model_names(manifest.name):
                print(f"note: conversation {conv.id} was with '{conv.model}'; it continues with "
                      f"'{engine.info.name}'", file=sys.stderr)
        if interactive:
            setup_history(settings)
            if conv is not None:
                print(f"Resuming conversation {conv.id} with {engine.info.name} ({len(turns)} turns).")
                show_recap(turns, engine.info.name, sys.stdout)
            print(f"Chatting with {engine.info.name}. /system TEXT, /clear, /exit; \"\"\" for multi-line; "
                  "Ctrl-D exits.")
            if memory is None:
                print("(not saved: only chats with a store model are; `herd pull` the file to keep them)")
        chat_loop(chat.send, {"/system": chat.set_system, "/clear": chat.clear, "/new": chat.clear},
                  interactive=interactive)
    finally:
        engine.close()
        if memory is not None:
            memory.close()
    return 0
