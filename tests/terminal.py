"""Run `herd` as a user at a terminal does: some of its streams on a pseudo-terminal.

Progress bars, prompts, banners and readline only appear when a stream is a TTY,
so tests that check them need a real one (``pty.openpty``), not a pipe.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STREAMS = ("stdin", "stdout", "stderr")


@dataclass
class TerminalRun:
    returncode: int
    tty: str  # everything written to the terminal, line ends as "\n"
    stdout: bytes  # stdout, when it was a pipe rather than the terminal


def run_in_terminal(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    on_tty: Sequence[str] = ("stderr",),
    typed: Sequence[str] = (),
    prompt: bytes = b">>> ",
    timeout: float = 120,
) -> TerminalRun:
    """``python -m openherd ARGS`` with the streams in ``on_tty`` on one terminal (the rest
    are pipes; stdin, if not on it, is empty). Each of ``typed`` is typed as a line once
    the terminal shows one more ``prompt`` than lines typed so far."""
    assert set(on_tty) <= set(STREAMS), on_tty
    master, slave = pty.openpty()
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openherd", *args],
        env=dict(env),
        cwd=REPO,
        **{name: slave if name in on_tty else pipes[name] for name in STREAMS},
    )
    os.close(slave)
    seen, pending = b"", list(typed)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if pending and seen.count(prompt) > len(typed) - len(pending):
                os.write(master, pending.pop(0).encode() + b"\n")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                seen += data
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    tty = seen.decode(errors="replace").replace("\r\n", "\n")
    return TerminalRun(proc.returncode, tty, out or b"")
