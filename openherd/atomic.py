"""Writing a file so that readers see the old content or the new, never half of either.

One helper for every file openherd replaces in place (manifests, persona bundles, job
records, eval reports, training checkpoints' metadata): write a new temporary file
next to the target (created exclusively, never through a symlink), fsync it, rename
it over the target, then fsync the directory so the rename itself survives a crash.
A failure at any step leaves the old file as it was and removes the temporary one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "write_new"]


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """Create `path` (never overwrite, never follow a symlink) and make its content durable."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str is written as UTF-8) atomically and durably; the parent
    directory is created when missing."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random part: two processes (or threads) writing one file never share a temp file.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write_new(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
