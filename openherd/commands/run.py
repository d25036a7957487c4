"""`herd run` and `herd chat`: talk to a model from the terminal.

Both load the model in-process on the same engine the server batches on (one
sequence slot), stream tokens as they arrive, and share sampling flags.
"""

from __future__ import annotations

import argparse
import sys


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
        help="interactive chat (REPL) with a model",
        description='Interactive chat. Commands: /system TEXT, /clear, /exit. Start and end a multi-line '
        'message with """. Ctrl-C stops the current answer; Ctrl-D exits.',
    )
    c.add_argument("model", nargs="?", default=None, help="model name, persona or .gguf path (default smollm2)")
    c.add_argument("--new", action="store_true", help="start a new conversation (personas resume the last one)")
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


def _sampling(args, settings):
    from ..engine.types import SamplingParams

    kw = {}
    for k in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
        v = getattr(args, k)
        if v is not None:
            kw[k] = v
    return SamplingParams(**kw)


def load_engine(model: str | None, args, n_parallel: int = 1):
    """Resolve (pulling catalog aliases on first use) and load a model for the terminal."""
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
    return Engine.load(manifest.path, cfg, name=manifest.name or name), settings


def _stream(engine, messages, params, verbose: bool) -> str:
    """Generate one answer, printing it as it streams. Ctrl-C stops this answer only."""
    from ..engine.types import FinishEvent, GenerationRequest

    prompt = engine.encode_chat(messages)
    handle = engine.submit(GenerationRequest(prompt=prompt, params=params))
    parts: list[str] = []
    out = sys.stdout
    fin = None
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
        return "".join(parts)
    if not "".join(parts).endswith("\n"):
        out.write("\n")
    out.flush()
    if fin is not None and fin.reason == "error":
        from ..errors import Unavailable

        raise Unavailable(fin.error or "generation failed")
    if verbose and fin is not None:
        u = fin.usage
        evald = max(u.prompt_tokens - u.cached_tokens, 0)
        pr = evald / (u.prompt_ms / 1000) if u.prompt_ms > 0 else 0.0
        dr = (u.completion_tokens - 1) / (u.decode_ms / 1000) if u.decode_ms > 0 and u.completion_tokens > 1 else 0.0
        print(
            f"prompt: {u.prompt_tokens} tokens ({u.cached_tokens} cached), {pr:.1f} tok/s | "
            f"decode: {u.completion_tokens} tokens, {dr:.1f} tok/s | finish: {fin.reason}",
            file=sys.stderr,
        )
    return "".join(parts)


# --------------------------------------------------------------------------- run
def cmd_run(args) -> int:
    from ..errors import InvalidRequest

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
    engine, settings = load_engine(model, args)
    try:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        _stream(engine, messages, _sampling(args, settings), args.verbose)
    finally:
        engine.close()
    return 0


# --------------------------------------------------------------------------- chat
def _read_message(prompt: str, more: str = "... ") -> str | None:
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


def _setup_history(settings) -> None:
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
    atexit.register(lambda: _save_history(readline, path))


def _save_history(readline, path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def cmd_chat(args) -> int:
    if args.model:
        from ..personas.chat import find_persona, run_persona_chat

        # Store models win over a persona of the same name, as on the server.
        if find_persona(args.model) is not None:
            return run_persona_chat(args)
    engine, settings = load_engine(args.model, args)
    interactive = sys.stdin.isatty()
    if interactive:
        _setup_history(settings)
        print(f"Chatting with {engine.info.name}. /system TEXT, /clear, /exit; \"\"\" for multi-line; Ctrl-D exits.")
    system = args.system
    history: list[dict] = []
    params = _sampling(args, settings)
    try:
        while True:
            try:
                text = _read_message(">>> ", "... ") if interactive else _read_message("", "")
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, like a shell
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
            if cmd == "/clear":
                history.clear()
                print("(conversation cleared)")
                continue
            if cmd.startswith("/system"):
                system = cmd[len("/system"):].strip() or None
                print("(system prompt set)" if system else "(system prompt cleared)")
                continue
            if cmd.startswith("/") and cmd.split()[0] not in ("/",):
                print(f"unknown command {cmd.split()[0]}; try /system, /clear or /exit")
                continue
            history.append({"role": "user", "content": text})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            answer = _stream(engine, messages, params, args.verbose)
            history.append({"role": "assistant", "content": answer})
    finally:
        engine.close()
    return 0
