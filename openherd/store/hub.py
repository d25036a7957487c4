"""Hugging Face Hub source: ``hf:OWNER/REPO/FILE.gguf[@REVISION]`` via huggingface_hub.

The hub is asked for the file's metadata first (a HEAD that returns the LFS sha256
as ``X-Linked-Etag``), so the bytes can be checked against the digest the hub itself
published and a file already in the store is not downloaded twice. The download
goes through ``hf_hub_download`` into a scratch directory beside the blobs (never
the user's HF cache), then is hashed, checked and staged like every other blob.
``HF_ENDPOINT`` (mirrors, tests) and ``HF_TOKEN`` (gated repos) work as usual.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HerdError, InvalidModelFile, InvalidName, ModelNotFound, OfflineError, Unavailable
from .blobs import BlobStore, Progress, ProgressFn, Reporter, Staged
from .manifest import display

log = logging.getLogger("openherd.store")

PREFIXES = ("hf:", "hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
_OWNER_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_FILE_PART = re.compile(r"[A-Za-z0-9_.+-][A-Za-z0-9 _.,+=@()\[\]-]{0,254}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # "OWNER/REPO"
    filename: str  # path inside the repo, ends in .gguf
    revision: str | None = None  # branch, tag or commit; None = main

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.repo_id}/{self.filename}{rev}"

    @property
    def stem(self) -> str:
        return Path(self.filename).name[: -len(".gguf")]


def is_hub_ref(text: str) -> bool:
    return text.startswith(PREFIXES)


def parse_hub_ref(text: str) -> HubRef:
    """hf:OWNER/REPO/FILE.gguf, hf.co/OWNER/REPO/FILE.gguf, with an optional @REVISION after the
    repo or the file; pasted https://huggingface.co/OWNER/REPO/(blob|resolve)/REV/FILE URLs too."""

    def bad(why: str) -> InvalidName:
        return InvalidName(
            f"invalid Hugging Face reference {display(text)} ({why}): use hf:OWNER/REPO/FILE.gguf[@REVISION]",
            param="model",
        )

    rest = next((text[len(p) :] for p in PREFIXES if text.startswith(p)), None)
    if rest is None:
        raise bad("unknown prefix")
    rest = rest.split("?", 1)[0]  # pasted URLs may carry ?download=true
    parts = rest.split("/")
    if len(parts) < 3:
        raise bad("need owner, repo and file")
    owner, repo, path = parts[0], parts[1], parts[2:]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    if len(path) >= 3 and path[0] in ("resolve", "blob") and revision is None:
        revision, path = path[1], path[2:]
    filename = "/".join(path)
    m = re.fullmatch(r"(.+\.gguf)@([^/]+)", filename, flags=re.IGNORECASE)
    if m and revision is None:
        filename, revision = m[1], m[2]
    if not (_OWNER_REPO.fullmatch(owner) and _OWNER_REPO.fullmatch(repo)):
        raise bad("bad owner or repo name")
    if any(not _FILE_PART.fullmatch(p) or p in (".", "..") for p in path if p) or "" in filename.split("/"):
        raise bad("bad file path")
    if not filename.lower().endswith(".gguf"):
        raise bad("only .gguf files can be pulled from the hub; convert other repos locally")
    if revision is not None and (not _REVISION.fullmatch(revision) or ".." in revision):
        raise bad("bad revision")
    return HubRef(f"{owner}/{repo}", filename, revision)


def _endpoint() -> str | None:
    # huggingface_hub reads HF_ENDPOINT once, at import; read it per call so a changed
    # environment (tests, long-lived servers) is honoured.
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _tqdm_class(progress: ProgressFn | None, digest: str) -> type:
    """A tqdm stand-in that turns huggingface_hub's byte counts into our Progress events."""

    class _Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
            self.n = initial
            self.total = total
            self._r = Reporter(progress, "downloading", int(total or 0), digest)
            if initial:
                self._r.set(initial)

        def update(self, n: float | None = 1) -> None:
            n = int(n or 0)
            self.n += n
            self._r.advance(n)

        def close(self) -> None:
            self._r.done()

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return _Bar


@dataclass
class HubFile:
    staged: Staged
    commit: str | None
    size: int


def download(ref: HubRef, blobs: BlobStore, progress: ProgressFn | None = None) -> HubFile:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = _endpoint()
    where = endpoint or "https://huggingface.co"
    # An exception from the caller's callback (a server cancelling the pull of a client that
    # left) must come out as itself, not be translated into a download error below.
    from_callback: list[BaseException] = []

    def report(ev: Progress) -> None:
        if progress is None:
            return
        try:
            progress(ev)
        except BaseException as e:
            from_callback.append(e)
            raise

    report(Progress("pulling manifest"))
    try:
        url = hf_hub_url(ref.repo_id, ref.filename, revision=ref.revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url)
        expected_sha = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
        digest = f"sha256:{expected_sha}" if expected_sha else ""
        if expected_sha and (existing := blobs.existing(expected_sha, meta.size)):
            return HubFile(existing, meta.commit_hash, existing.size)
        kwargs: dict[str, Any] = {}
        if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
            kwargs["tqdm_class"] = _tqdm_class(report, digest)
        with blobs.tempdir() as tmp:
            path = hf_hub_download(
                ref.repo_id,
                ref.filename,
                # Pin the GET to the commit the HEAD saw, so a push in between can't mix files.
                revision=meta.commit_hash or ref.revision,
                local_dir=tmp / "download",
                cache_dir=tmp / "cache",
                endpoint=endpoint,
                **kwargs,
            )
            staged = blobs.stage_file(Path(path), expected_sha, meta.size, report, what=f"download of {ref}")
        return HubFile(staged, meta.commit_hash, staged.size)
    except HerdError:
        raise
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one actionable line
        if from_callback:
            raise from_callback[0] from None
        log.debug("hub download of %s failed", ref, exc_info=True)
        raise _translate(e, ref, where) from None


def _translate(e: BaseException, ref: HubRef, where: str) -> HerdError:
    try:
        from huggingface_hub import errors as hfe
    except ImportError:  # huggingface_hub < 0.24 kept them in utils
        from huggingface_hub import utils as hfe

    # 1.x split EntryNotFoundError into Remote (404 from the hub) and Local (not in the cache,
    # raised when the hub could not be reached): only the remote one means "no such file".
    remote_missing = getattr(hfe, "RemoteEntryNotFoundError", hfe.EntryNotFoundError)
    local_missing = getattr(hfe, "LocalEntryNotFoundError", ())
    rev = ref.revision or "main"
    if isinstance(e, hfe.GatedRepoError):
        return InvalidModelFile(
            f"{ref.repo_id} is gated: accept its license on huggingface.co, then set HF_TOKEN and pull again"
        )
    if isinstance(e, hfe.RepositoryNotFoundError):
        return ModelNotFound(
            str(ref), f"Hugging Face repo '{ref.repo_id}' not found (if it is private, set HF_TOKEN)"
        )
    if isinstance(e, hfe.RevisionNotFoundError):
        return ModelNotFound(str(ref), f"revision '{rev}' not found in Hugging Face repo '{ref.repo_id}'")
    if isinstance(e, remote_missing) and not isinstance(e, local_missing):
        return ModelNotFound(
            str(ref), f"file '{ref.filename}' not found in Hugging Face repo '{ref.repo_id}' at '{rev}'"
        )
    if isinstance(e, hfe.OfflineModeIsEnabled):
        return OfflineError(f"cannot download {ref}: HF_HUB_OFFLINE is set; unset it to allow downloads")
    reason = _network_reason(e)
    if reason:
        return OfflineError(
            f"cannot reach the Hugging Face hub at {where}: you appear to be offline ({reason})"
        )
    if isinstance(e, hfe.HfHubHTTPError) and e.response is not None:
        return Unavailable(
            f"the Hugging Face hub returned HTTP {e.response.status_code} for {ref}; try again later"
        )
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return InvalidModelFile(
            f"download of {ref} was cut short (size mismatch); nothing was saved, pull again"
        )
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return Unavailable(f"cannot download {ref}: {first[:200]}")


def _network_reason(e: BaseException) -> str | None:
    """A short reason if `e` (or anything it was raised from) is a connectivity failure."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        text = str(cur).lower()
        if (
            isinstance(cur, socket.gaierror)
            or "name resolution" in text
            or "name or service not known" in text
        ):
            return "could not resolve the host name"
        if (
            isinstance(cur, ConnectionRefusedError)
            or "connection refused" in text
            or (isinstance(cur, OSError) and cur.errno == errno.ECONNREFUSED)
        ):
            return "connection refused"
        if "network is unreachable" in text:
            return "network is unreachable"
        if name in ("ConnectTimeout", "ConnectTimeoutError") or "timed out" in text:
            return "connection timed out"
        if name in ("ConnectError", "ConnectionError", "NewConnectionError", "NameResolutionError"):
            return "cannot connect"
        cur = cur.__cause__ or cur.__context__
    return None
