"""`herd pull`, `herd list`, `herd show`, `herd rm`: the model store from the terminal."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

QUANT_CHOICES = ("f16", "q8_0", "f32")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pull",
        help="download or import a model into the store",
        description="Add a model to the store. MODEL is a catalog name (smollm2), a .gguf file, "
        "a Hugging Face model directory (config.json, *.safetensors, tokenizer.json; converted "
        "to GGUF) or a file on the Hugging Face Hub: hf:OWNER/REPO/FILE.gguf[@REVISION].",
    )
    p.add_argument(
        "source", metavar="MODEL", help="catalog name, .gguf path, HF directory or hf:OWNER/REPO/FILE.gguf"
    )
    p.add_argument("--name", default=None, help="store name (default: derived from MODEL)")
    p.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default=None,
        help="weight type when converting a Hugging Face directory (default f16)",
    )
    p.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", aliases=["ls"], help="list the models in the store")
    ls.set_defaults(func=cmd_list)

    s = sub.add_parser(
        "show", help="show a model's details", description="Show a store model or a .gguf file."
    )
    s.add_argument("model", metavar="MODEL", help="store name or path to a .gguf file")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")
    s.set_defaults(func=cmd_show)

    r = sub.add_parser("rm", help="remove models from the store")
    r.add_argument("models", nargs="+", metavar="MODEL", help="store names")
    r.set_defaults(func=cmd_rm)


# --------------------------------------------------------------------------- progress


class _PlainProgress:
    """Not a terminal (logs, CI): one line per step, no carriage returns."""

    def __init__(self, out: Any):
        self.out = out
        self.status = ""

    def __call__(self, ev: Any) -> None:
        if ev.status == self.status:
            return
        self.status = ev.status
        size = f" ({_size(ev.total)})" if ev.total else ""
        print(f"{ev.status}{size}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class _BarProgress:
    """A terminal: a tqdm bar for every step that moves bytes, a line for the others."""

    def __init__(self, out: Any):
        self.out = out
        self.status = ""
        self.bar: Any = None

    def __call__(self, ev: Any) -> None:
        from tqdm import tqdm

        if ev.status != self.status:
            self.close()
            self.status = ev.status
            if ev.total:
                desc = f"{ev.status} {ev.digest[7:19]}" if ev.digest else ev.status
                cols, rows = _terminal_size(self.out)
                self.bar = tqdm(
                    total=ev.total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,
                    desc=desc,
                    file=self.out,
                    leave=True,
                    ncols=min(cols, 100),
                    nrows=rows,
                )
            else:
                print(ev.status, file=self.out, flush=True)
        if self.bar is not None:
            if ev.total and self.bar.total != ev.total:
                self.bar.total = ev.total
            self.bar.update(max(0, ev.completed - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def progress_printer(out: Any = None) -> Iterator[Any]:
    """A pull progress callback for the terminal: tqdm bars on a TTY, plain lines otherwise."""
    out = out or sys.stderr
    printer = _BarProgress(out) if out.isatty() else _PlainProgress(out)
    try:
        yield printer
    finally:
        printer.close()


# --------------------------------------------------------------------------- commands


def cmd_pull(args: argparse.Namespace) -> int:
    from ..store import Store

    store = Store()
    with progress_printer() as progress:
        m = store.pull(args.source, name=args.name, progress=progress, quant=args.quant or "f16")
    print(f"pulled {m.name} ({m.short_id}, {_size(m.size)}, {m.quantization or 'unknown type'})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..store import Store

    rows = [("NAME", "ID", "SIZE", "QUANT", "MODIFIED")]
    for m in Store().list():
        rows.append((m.name, m.short_id, _size(m.size), m.quantization, _ago(m.created_at)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..store import Store
    from ..store.manifest import format_parameters

    m = Store().resolve(args.model)
    if args.json:
        sys.stdout.write(m.to_json())
        return 0
    d = m.details
    fields = [
        ("name", m.name or "(file, not in the store)"),
        ("architecture", m.architecture),
        ("parameters", format_parameters(m.parameters)),
        ("context length", str(m.context_length)),
        ("embedding length", str(d.get("embedding_length") or "")),
        ("quantization", m.quantization),
        ("size", _size(m.size)),
        ("digest", m.digest),
        ("source", m.source),
        ("path", m.path),
        ("modified", f"{m.created_at} ({_ago(m.created_at)})" if m.created_at else ""),
        ("chat template", f"yes ({len(m.chat_template)} chars)" if m.chat_template else "none"),
        ("license", str(d.get("license") or "")),
        ("base model", m.base or ""),
        ("adapter", m.adapter or ""),
    ]
    print("  Model")
    for label, value in fields:
        if value:
            print(f"    {label:<18}{value}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ..errors import ModelNotFound
    from ..store import Store, validate_name

    store = Store()
    for name in args.models:  # check every name first: a typo must not leave a half-done rm
        validate_name(name)
        if not store.exists(name):
            raise ModelNotFound(name)
    for name in args.models:
        print(f"deleted '{store.remove(name)}'")
    return 0


# --------------------------------------------------------------------------- formatting


def _terminal_size(out: Any) -> tuple[int, int]:
    """(columns, rows), 80x24 where unknown: a terminal that reports 0x0 (a fresh pty, some
    CI runners) would otherwise make tqdm draw nothing at all."""
    import os

    try:
        size = os.get_terminal_size(out.fileno())
    except (OSError, ValueError, AttributeError):
        return 80, 24
    return size.columns if size.columns > 0 else 80, size.lines if size.lines > 0 else 24


def _size(n: int) -> str:
    from ..store.manifest import format_size

    return format_size(n)


def _ago(iso: str) -> str:
    """'2025-01-02T03:04:05Z' -> '3 minutes ago' (ollama list's MODIFIED column)."""
    from datetime import UTC, datetime

    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    s = int((datetime.now(UTC) - then).total_seconds())
    if s < 0:
        return "just now"
    for unit, span in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("week", 7 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    ):
        if s >= span:
            n = s // span
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now" if s < 5 else f"{s} seconds ago"
