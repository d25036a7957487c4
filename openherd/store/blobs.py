"""Content-addressed blobs (``$HERD_HOME/blobs/sha256-<hex>``) and atomic writes.

Every byte that enters the store goes the same way: into a temporary file in the
blobs directory itself (so the final rename never crosses a filesystem, even when
``blobs`` is a symlink to a bigger disk), hashed as it is written, flushed and
fsynced, checked against the digest the source promised, and only then moved in
place with ``os.replace``. A pull killed half-way therefore leaves at worst a
``.partial-<pid>-...`` entry, never a blob or manifest that lies; the next pull
removes partials whose process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..atomic import fsync_dir
from ..errors import InvalidModelFile, StoreError

try:  # POSIX; on Windows the store runs without the cross-process lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CHUNK = 4 << 20  # read/write granularity: large enough for disk throughput, small enough for progress
PARTIAL_PREFIX = ".partial-"
_PARTIAL_RE = re.compile(r"\.partial-(\d+)-[0-9a-f]+")
_BLOB_RE = re.compile(r"sha256-([0-9a-f]{64})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PROGRESS_INTERVAL = 0.1  # seconds between byte-progress callbacks


@dataclass(frozen=True)
class Progress:
    """One step of a pull, shaped like Ollama's /api/pull stream lines."""

    status: str  # "pulling manifest", "downloading", "verifying sha256 digest", "success", ...
    completed: int = 0  # bytes done in this step
    total: int = 0  # bytes in this step; 0 = unknown
    digest: str = ""  # "sha256:<hex>" of the blob this step concerns, when known


ProgressFn = Callable[[Progress], None]


def _silent(_: Progress) -> None:
    pass


class Reporter:
    """Throttles byte progress so a callback per 4 MiB chunk doesn't flood a terminal or a socket."""

    def __init__(self, progress: ProgressFn | None, status: str, total: int = 0, digest: str = ""):
        self.progress = progress or _silent
        self.status, self.total, self.digest = status, total, digest
        self.completed = 0
        self._last = 0.0
        self._sent = -1  # `completed` of the last event sent
        self._send()

    def _send(self) -> None:
        self._sent = self.completed
        self.progress(Progress(self.status, self.completed, self.total or self.completed, self.digest))

    def advance(self, n: int) -> None:
        if n == 0:
            return
        self.completed += n
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL:
            self._last = now
            self._send()

    def set(self, completed: int) -> None:
        self.advance(completed - self.completed)

    def done(self) -> None:
        if self._sent != self.completed:
            self._send()


@dataclass(frozen=True)
class Blob:
    sha256: str  # hex
    size: int
    path: Path


def hash_file(path: Path, reporter: Reporter | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streaming."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if reporter:
                reporter.advance(len(chunk))
    return h.hexdigest(), size


_STALE_AGE = 24 * 3600  # where liveness can't be checked, a partial this old is abandoned


def _pid_alive(pid: int, path: Path) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would *terminate* the process on Windows
        try:
            return time.time() - path.lstat().st_mtime < _STALE_AGE
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


class Staged:
    """A verified, fsynced file waiting in the blobs directory to be moved into place.

    Sources stage; the Store commits under its lock together with the manifest, so a
    concurrent `herd rm` can never collect a blob between its arrival and its manifest.
    """

    def __init__(self, blobs: BlobStore, tmp: Path | None, sha256: str, size: int):
        self.blobs, self.tmp, self.sha256, self.size = blobs, tmp, sha256, size

    @property
    def path(self) -> Path:
        """Where the bytes are now: the temp file, or the existing blob."""
        return self.tmp if self.tmp is not None else self.blobs.path(self.sha256)

    def commit(self) -> Blob:
        final = self.blobs.path(self.sha256)
        if self.tmp is None:  # the blob was already in the store
            if not final.is_file():
                raise StoreError(f"blob sha256-{self.sha256[:12]} was removed while pulling; pull again")
        else:
            os.replace(self.tmp, final)
            self.tmp = None
            fsync_dir(self.blobs.root)
        return Blob(self.sha256, self.size, final)

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


class Incoming:
    """A file being written into the blob store: hashed while written, verified before staging."""

    def __init__(self, blobs: BlobStore, reporter: Reporter | None = None):
        self.blobs = blobs
        self.reporter = reporter
        self.tmp: Path | None = blobs.partial_path()
        self._f: BinaryIO | None = open(self.tmp, "xb")  # noqa: SIM115 - closed in stage/discard
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._f is not None
        self._f.write(data)
        self._h.update(data)
        self.size += len(data)
        if self.reporter:
            self.reporter.advance(len(data))

    def copy_from(self, src: BinaryIO) -> None:
        while chunk := src.read(CHUNK):
            self.write(chunk)

    def stage(
        self, expected_sha256: str | None = None, expected_size: int | None = None, what: str = "file"
    ) -> Staged:
        """Flush, fsync and verify; on mismatch the temp file is removed and InvalidModelFile raised."""
        assert self._f is not None and self.tmp is not None
        f, self._f = self._f, None
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        if self.reporter:
            self.reporter.done()
        sha = self._h.hexdigest()
        problem = _mismatch(sha, self.size, expected_sha256, expected_size)
        if problem:
            self.tmp.unlink(missing_ok=True)
            raise InvalidModelFile(f"{what} failed verification ({problem}); nothing was saved, try again")
        staged = Staged(self.blobs, self.tmp, sha, self.size)
        self.tmp = None  # now owned by `staged`
        return staged

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()  # no-op after stage()


def _mismatch(sha: str, size: int, expected_sha: str | None, expected_size: int | None) -> str | None:
    if expected_size is not None and size != expected_size:
        return f"{size} bytes, expected {expected_size}"
    if expected_sha is not None and sha != expected_sha:
        return f"sha256 {sha[:12]}..., expected {expected_sha[:12]}..."
    return None


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not _HEX64.fullmatch(sha256):  # the digest becomes a file name: never trust it unchecked
            raise InvalidModelFile(f"not a sha256 digest: {sha256[:80]!r}")
        return self.root / f"sha256-{sha256}"

    def has(self, sha256: str, size: int | None = None) -> bool:
        try:
            st = self.path(sha256).stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    def existing(self, sha256: str, size: int | None = None) -> Staged | None:
        """A Staged for a blob already present (dedupe: pulling the same file twice costs nothing)."""
        if not self.has(sha256, size):
            return None
        return Staged(self, None, sha256, self.path(sha256).stat().st_size)

    def digests(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(m[1] for p in self.root.iterdir() if (m := _BLOB_RE.fullmatch(p.name)))

    def partial_path(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"

    @contextlib.contextmanager
    def tempdir(self) -> Iterator[Path]:
        """A scratch directory beside the blobs (same filesystem), removed on exit."""
        path = self.partial_path()
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def incoming(self, reporter: Reporter | None = None) -> Incoming:
        return Incoming(self, reporter)

    def stage_file(
        self,
        tmp: Path,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        progress: ProgressFn | None = None,
        what: str = "file",
    ) -> Staged:
        """Hash and verify a file some other writer produced in a tempdir() here, then stage it."""
        size = tmp.stat().st_size
        reporter = Reporter(
            progress, "verifying sha256 digest", size, f"sha256:{expected_sha256}" if expected_sha256 else ""
        )
        sha, size = hash_file(tmp, reporter)
        reporter.done()
        problem = _mismatch(sha, size, expected_sha256, expected_size)
        if problem:
            tmp.unlink(missing_ok=True)
            raise InvalidModelFile(f"{what} failed verification ({problem}); nothing was saved, try again")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        dest = self.partial_path()  # out of the tempdir, which is about to be removed
        os.replace(tmp, dest)
        return Staged(self, dest, sha, size)

    def remove(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def clean_partials(self) -> int:
        """Remove partial files and scratch dirs left by pulls whose process has died."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for p in self.root.iterdir():
            m = _PARTIAL_RE.fullmatch(p.name)
            if not m or _pid_alive(int(m[1]), p):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        return removed


@contextlib.contextmanager
def store_lock(home: Path) -> Iterator[None]:
    """Serialise manifest writes and blob garbage collection across processes."""
    home.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(home / ".store.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
