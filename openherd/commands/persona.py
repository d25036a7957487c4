"""`herd persona ...`: create, list, show, edit, remove, export and import personas,
and read their conversations. `herd chat PERSONA` talks to one (personas/chat.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "persona",
        help="custom AI characters: a model, a character, documents, memory and a safety policy",
        description="Personas are served like models (`herd serve`, model id = persona name) and "
        "talked to with `herd chat NAME`.",
    )
    ps = p.add_subparsers(dest="persona_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    c = ps.add_parser("create", help="create a persona", description="Create a persona on a base model. "
                      "--knowledge documents (.txt .md .html .pdf) are copied in and indexed now.")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--model", required=True, metavar="BASE", help="base model (store name or catalog alias)")
    _add_fields(c)
    c.add_argument("--knowledge", nargs="+", default=[], metavar="FILE", help="documents the persona answers from")
    c.add_argument("--no-index", action="store_true", help="index the documents on first use instead of now")
    c.set_defaults(func=cmd_create)

    ls = ps.add_parser("list", aliases=["ls"], help="list personas")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)

    s = ps.add_parser("show", help="show a persona")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--yaml", action="store_true", help="print persona.yaml")
    s.set_defaults(func=cmd_show)

    e = ps.add_parser("edit", help="change a persona (flags, or $EDITOR on persona.yaml without flags)",
                      description="Set fields with flags; with no flags on a terminal, opens persona.yaml in "
                      "$EDITOR and validates it on save.")
    e.add_argument("name", metavar="NAME")
    e.add_argument("--model", default=None, metavar="BASE", help="base model")
    _add_fields(e)
    e.add_argument("--clear-examples", action="store_true", help="remove every example dialogue")
    e.add_argument("--add-knowledge", nargs="+", default=[], metavar="FILE", help="add (or update) documents")
    e.add_argument("--remove-knowledge", nargs="+", default=[], metavar="DOC", help="remove documents by name")
    e.add_argument("--no-index", action="store_true", help="index added documents on first use instead of now")
    e.set_defaults(func=cmd_edit)

    r = ps.add_parser("rm", help="remove personas (documents, index and conversations)")
    r.add_argument("names", nargs="+", metavar="NAME")
    r.set_defaults(func=cmd_rm)

    x = ps.add_parser("export", help="write a persona to one portable .herd file")
    x.add_argument("name", metavar="NAME")
    x.add_argument("--out", "-o", default=None, metavar="FILE.herd", help="output file (default NAME.herd)")
    x.set_defaults(func=cmd_export)

    i = ps.add_parser("import", help="install a persona from a .herd file (validated first)")
    i.add_argument("file", metavar="FILE.herd")
    i.add_argument("--name", default=None, metavar="NEW", help="install under another name")
    i.set_defaults(func=cmd_import)

    v = ps.add_parser("conversations", aliases=["convs"], help="list or export a persona's conversations")
    v.add_argument("name", metavar="NAME")
    v.add_argument("--export", default=None, metavar="ID", help="export one conversation (ID, a prefix, or 'last')")
    v.add_argument("--format", choices=("json", "markdown"), default="markdown", help="export format")
    v.add_argument("--out", "-o", default=None, metavar="FILE", help="write the export here instead of stdout")
    v.add_argument("--delete", default=None, metavar="ID", help="delete one conversation")
    v.set_defaults(func=cmd_conversations)


def _add_fields(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("character")
    g.add_argument("--adapter", default=None, metavar="TUNED", help="LoRA-tuned model (store name) built on BASE")
    g.add_argument("--description", default=None)
    g.add_argument("--version", dest="persona_version", default=None, metavar="VERSION", help="the persona's version")
    g.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    g.add_argument("--system-file", default=None, metavar="FILE", help="read the system prompt from a file")
    g.add_argument("--greeting", default=None, metavar="TEXT", help="first message of a new conversation")
    g.add_argument("--example", nargs=2, action="append", default=[], metavar=("USER", "ASSISTANT"),
                   help="an example exchange (repeatable)")
    s = p.add_argument_group("sampling defaults")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--max-tokens", type=int, default=None)
    k = p.add_argument_group("knowledge")
    k.add_argument("--top-k-passages", type=int, default=None, metavar="N", help="passages per answer (default 4)")
    k.add_argument("--embedding-model", default=None, metavar="MODEL", help="dedicated embedding model (store name)")
    k.add_argument("--retrieval", choices=("auto", "hybrid", "bm25", "dense"), default=None,
                   help="auto (default): hybrid BM25 + dense with an embedding model, else BM25")


# --------------------------------------------------------------------------- helpers


def _read_documents(paths: list[str]) -> list[tuple[str, bytes]]:
    """Read and check every document before anything is written (a bad PDF fails the command)."""
    from pathlib import Path

    from ..errors import InvalidRequest, NotFound, PayloadTooLarge
    from ..personas.bundle import MAX_DOCUMENT_BYTES, safe_file_name
    from ..personas.knowledge import check_document

    docs = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise NotFound(f"no such document: {raw}")
        safe_file_name(path.name)  # the extension check, before reading
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise PayloadTooLarge(f"{raw} is larger than {MAX_DOCUMENT_BYTES} bytes")
        data = path.read_bytes()
        if not data:
            raise InvalidRequest(f"{raw} is empty")
        try:
            check_document(path.name, data)
        except InvalidRequest as e:
            raise InvalidRequest(f"{raw}: {e.message}") from None
        docs.append((path.name, data))
    return docs


def _patch_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    patch: dict[str, Any] = {}
    for flag, key in (("description", "description"), ("persona_version", "version"), ("greeting", "greeting"),
                      ("adapter", "adapter")):
        value = getattr(args, flag, None)
        if value is not None:
            patch[key] = value
    if getattr(args, "model", None) is not None:
        patch["model"] = args.model
    system = args.system
    if args.system_file:
        system = Path(args.system_file).expanduser().read_text(encoding="utf-8")
    if system is not None:
        patch["system"] = system
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "max_tokens") if getattr(args, k) is not None}
    if sampling:
        patch["sampling"] = sampling
    knowledge: dict[str, Any] = {}
    if args.top_k_passages is not None:
        knowledge["top_k"] = args.top_k_passages
    if args.embedding_model is not None:
        knowledge["embedding_model"] = args.embedding_model
    if args.retrieval is not None:
        knowledge["retrieval"] = args.retrieval
    if knowledge:
        patch["knowledge"] = knowledge
    return patch


def _index(persona, store) -> None:
    """Ingest and embed now, reporting what the injection shield quarantined."""
    from ..personas.runtime import LocalEngines, index_persona
    from .store import progress_printer

    if not persona.knowledge.sources:
        return
    with progress_printer(sys.stderr) as progress:
        engines = LocalEngines(store.settings, progress=progress)
    with engines:
        report = index_persona(persona, engines, store)
    print(f"indexed {len(report.added)} document(s) into {report.chunks} passages"
          + (f" ({len(report.unchanged)} unchanged)" if report.unchanged else ""))
    _warn_flags(report)


def _warn_flags(report) -> None:
    for file, i, reasons in report.flagged:
        print(f"warning: {file} passage {i + 1} looks like a prompt injection and is quarantined "
              f"({reasons[0] if reasons else 'flagged'})", file=sys.stderr)
    for file, reasons in report.document_flags:
        if not any(f == file for f, _, _ in report.flagged):
            print(f"warning: {file} carries hidden instructions ({reasons[0] if reasons else 'flagged'}); "
                  "they are not shown to the model", file=sys.stderr)


# --------------------------------------------------------------------------- commands


def cmd_create(args: argparse.Namespace) -> int:
    from ..personas.bundle import Persona, PersonaStore

    store = PersonaStore()
    store.check_new_name(args.name)
    docs = _read_documents(args.knowledge)
    patch = _patch_from_flags(args)
    data: dict[str, Any] = {"name": args.name, **patch, "model": args.model,
                            "examples": [{"user": u, "assistant": a} for u, a in args.example]}
    persona = Persona.from_dict(data)
    store.check_models(persona)
    persona = store.create(persona, docs)
    print(f"created persona '{persona.name}' on {persona.served_model}"
          + (f" with {len(docs)} document(s)" if docs else ""))
    if docs and not args.no_index:
        _index(persona, store)
    print(f"talk to it with `herd chat {persona.name}`, or as model '{persona.name}' on `herd serve`")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from ..personas.bundle import PersonaStore

    personas = PersonaStore().list()
    if args.json:
        print(json.dumps([p.to_dict() for p in personas], indent=2, ensure_ascii=False))
        return 0
    rows = [("NAME", "MODEL", "DOCS", "VERSION", "DESCRIPTION")]
    for p in personas:
        desc = " ".join(p.description.split())
        rows.append((p.name, p.served_model, str(len(p.knowledge.sources)), p.version,
                     desc[:50] + ("…" if len(desc) > 50 else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..personas.bundle import PersonaStore
    from ..personas.memory import ConversationStore

    store = PersonaStore()
    persona = store.get(args.name)
    if args.yaml:
        sys.stdout.write(persona.to_yaml())
        return 0
    print("  Persona")
    fields = [
        ("name", persona.name),
        ("description", persona.description),
        ("version", persona.version),
        ("model", persona.model),
        ("adapter", persona.adapter or ""),
        ("greeting", persona.greeting),
        ("examples", str(len(persona.examples)) if persona.examples else ""),
        ("sampling", ", ".join(f"{k}={v}" for k, v in persona.sampling.values().items())),
        ("safety", _safety_summary(persona.safety)),
        ("modified", persona.updated_at),
    ]
    for label, value in fields:
        if value:
            first = value.strip().splitlines()[0] if value.strip() else ""
            print(f"    {label:<14}{first[:100]}")
    if persona.system:
        print("  System prompt")
        for line in persona.system.strip().splitlines()[:20]:
            print(f"    {line}")
    if persona.knowledge.sources:
        print("  Knowledge")
        stats = {}
        if store.knowledge_db(persona.name).is_file():
            from ..personas.runtime import knowledge_index

            idx = knowledge_index(store.knowledge_db(persona.name))
            stats = idx.stats()
            flagged = {}
            for ch in idx.chunks(only_flagged=True):
                flagged.setdefault(ch.sha256, []).append(ch)
        for src in persona.knowledge.sources:
            extra = ""
            if stats and flagged.get(src.sha256):
                extra = f"  ({len(flagged[src.sha256])} passage(s) quarantined)"
            print(f"    {src.file:<32}{_size(src.size):>10}{extra}")
        if stats:
            print(f"    index: {stats['chunks']} passages, {stats['quarantined']} quarantined")
        else:
            print("    index: not built yet (built on first use)")
    if store.memory_db(persona.name).is_file():
        with ConversationStore(store.memory_db(persona.name), persona.name) as mem:
            n = len(mem.list())
        if n:
            print(f"  Conversations: {n} (herd persona conversations {persona.name})")
    return 0


def _safety_summary(policy) -> str:
    if policy is None:
        return "server default (knowledge injections quarantined)"
    d = policy.to_dict()
    parts = [f"{k}={v}" for k, v in d.items() if v not in (None, "off", [], False, "")
             and k not in ("refusal_message", "llama_guard_fail_closed")]
    return ", ".join(parts) or "off"


def cmd_edit(args: argparse.Namespace) -> int:
    from ..personas.bundle import Persona, PersonaStore, merge_patch

    store = PersonaStore()
    persona = store.get(args.name)
    patch = _patch_from_flags(args)
    any_flag = bool(patch or args.example or args.clear_examples or args.add_knowledge or args.remove_knowledge)
    if not any_flag:
        if not sys.stdin.isatty():
            from ..errors import InvalidRequest

            raise InvalidRequest("nothing to change: pass flags (see `herd persona edit --help`), "
                                 "or run it on a terminal to open $EDITOR")
        persona = _edit_in_editor(store, persona)
        print(f"updated persona '{persona.name}'")
        return 0
    docs = _read_documents(args.add_knowledge)  # all checked before anything changes
    for doc in args.remove_knowledge:
        if persona.knowledge.source(doc) is None:
            from ..errors import NotFound

            raise NotFound(f"persona '{persona.name}' has no document '{doc}'; see `herd persona show {persona.name}`")
    if args.example or args.clear_examples:
        examples = [] if args.clear_examples else [{"user": e.user, "assistant": e.assistant} for e in persona.examples]
        patch["examples"] = examples + [{"user": u, "assistant": a} for u, a in args.example]
    if patch:
        if {"model", "adapter", "knowledge"} & set(patch):
            store.check_models(Persona.from_dict(merge_patch(persona.to_dict(), patch)))
        persona = store.update(persona.name, patch)
    for doc in args.remove_knowledge:
        store.remove_document(persona.name, doc)
    for original, data in docs:
        store.add_document(persona.name, original, data)
    persona = store.get(persona.name)
    print(f"updated persona '{persona.name}'")
    if docs and not args.no_index:
        _index(persona, store)
    return 0


def _edit_in_editor(store, persona):
    """$EDITOR on a copy of persona.yaml; re-open on a validation error until it is fixed or abandoned."""
    import os
    import shlex
    import subprocess
    import tempfile

    from ..errors import HerdError, InvalidRequest
    from ..personas.bundle import Persona

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    text = persona.to_yaml()
    with tempfile.TemporaryDirectory(prefix="herd-persona-") as tmp:
        path = os.path.join(tmp, f"{persona.name}.yaml")
        while True:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            rc = subprocess.call([*shlex.split(editor), path])
            if rc != 0:
                raise InvalidRequest(f"the editor exited with status {rc}; nothing changed")
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                edited = Persona.from_yaml(text)
                return store.replace(persona.name, edited)
            except HerdError as e:
                print(f"herd: {e.message}", file=sys.stderr)
                answer = input("edit again? [Y/n] ").strip().lower()
                if answer in ("n", "no"):
                    raise InvalidRequest("edit abandoned; nothing changed") from None


def cmd_rm(args: argparse.Namespace) -> int:
    from ..personas.bundle import PersonaStore

    store = PersonaStore()
    for name in args.names:  # check every name first: a typo must not leave a half-done rm
        store.get(name)
    for name in args.names:
        print(f"deleted persona '{store.remove(name)}'")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..personas.bundle import PersonaStore, validate_persona_name

    name = validate_persona_name(args.name)
    out = Path(args.out or f"{name}.herd").expanduser()
    written = PersonaStore().export(name, out)
    print(f"exported persona '{name}' to {written} ({_size(written.stat().st_size)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..personas.bundle import PersonaStore

    result = PersonaStore().import_file(Path(args.file).expanduser(), name=args.name)
    p = result.persona
    print(f"imported persona '{p.name}' ({result.files} document(s)); its knowledge is indexed on first use")
    from ..store import Store
    from ..store.catalog import CATALOG

    if p.model not in CATALOG and not Store().exists(p.model):
        print(f"note: it runs on '{p.model}', which is not in the store; `herd pull` it first", file=sys.stderr)
    return 0


def cmd_conversations(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..personas.bundle import PersonaStore
    from ..personas.memory import ConversationStore
    from ..repl import print_conversations

    store = PersonaStore()
    persona = store.get(args.name)
    with ConversationStore(store.memory_db(persona.name), persona.name) as mem:
        if args.delete:
            conv = mem.get(args.delete)
            mem.delete(conv.id)
            print(f"deleted conversation {conv.id}")
            return 0
        if args.export:
            text = mem.export(args.export, args.format)
            if args.out:
                Path(args.out).expanduser().write_text(text, encoding="utf-8")
                print(f"wrote {args.out}")
            else:
                sys.stdout.write(text)
            return 0
        print_conversations(mem.list(), sys.stdout)
    return 0


def _size(n: int) -> str:
    from ..store.manifest import format_size

    return format_size(n)
