"""`herd`: the one console script.

Each area registers its subcommands from ``openherd/commands/<area>.py`` via
``register(subparsers)``. Those modules import only argparse at module level and
import their heavy machinery (llama.cpp, torch, FastAPI) inside the handler, so
``herd --help`` stays well under a second.

Every handler is ``fn(args) -> int``. A ``HerdError`` anywhere becomes one line
on stderr and its exit code; nothing a user types produces a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import HerdError

# Order is the order in `herd --help`.
COMMAND_MODULES = ["run", "store", "serve", "tune", "persona", "safety", "evals"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd",
        description="Pull, run, serve, customise, evaluate and export open Llama-family models.",
    )
    parser.add_argument("--version", action="version", version=f"openherd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"openherd.commands.{name}")
        except ModuleNotFoundError as e:  # an area not built yet
            if e.name == f"openherd.commands.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except HerdError as e:
        print(f"herd: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        # Disk full, permissions...: say what and where, without a traceback.
        print(f"herd: error: {e.strerror or e}", file=sys.stderr)
        return 1
