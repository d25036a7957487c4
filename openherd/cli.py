"""`herd`: the one console script.

Each area registers its subcommands from ``openherd/commands/<area>.py`` via
``register(subparsers)``. Those modules import only argparse at module level and
import their heavy machinery (llama.cpp, torch, FastAPI) inside the handler, so
``herd --help`` stays well under a second.

Every handler is ``fn(args) -> int``. A ``HerdError`` anywhere becomes one line
on stderr and its exit code; any other exception becomes one ``herd: error:`` line
too, with exit 1: nothing a user types produces a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import HerdError

# Order is the order in `herd --help`.
COMMAND_MODULES = ["run", "store", "serve", "tune", "persona", "safety", "evals", "cost"]


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
    except (RecursionError, MemoryError):
        # Input past a limit that no check of ours caught first (a fuzzer's find).
        print("herd: error: the input is too large or nested too deeply to process", file=sys.stderr)
        return 1
    except Exception as e:
        # A bug, but still one line: whatever a user types must not end in a traceback.
        first = (str(e).splitlines() or [""])[0][:200]
        print(f"herd: error: internal error ({type(e).__name__}{': ' + first if first else ''}); "
              "please report it", file=sys.stderr)
        return 1
