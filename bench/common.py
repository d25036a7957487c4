"""Shared helpers for the benchmarks: model resolution and RESULTS.md sections."""

from __future__ import annotations

import os
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def resolve_model(name_or_path: str) -> str:
    """A store name (pulled on first use, e.g. the default 'smollm2') or a .gguf path."""
    if name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        return name_or_path
    from openherd.store import Store

    return Store().ensure(name_or_path).path


def write_section(name: str, body: str) -> None:
    """Replace (or append) the '## name' section of bench/RESULTS.md, leaving the others."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is written by `bench/<name>.py`; peers run in the same run.\n"
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")
