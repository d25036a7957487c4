"""The persona bundle: ``persona.yaml`` as typed dataclasses, its directory, and ``.herd`` files.

A persona is a directory ``$HERD_HOME/personas/<name>/``::

    persona.yaml     the character: model, system prompt, greeting, examples, sampling,
                     knowledge sources, safety policy (schema below, checked on every read)
    knowledge/       the persona's own documents, copied in (flat, safe file names)
    knowledge.db     derived: chunks and embeddings (SQLite WAL), rebuilt when missing
    memory.db        conversations (SQLite WAL), see memory.py

A ``.herd`` file is that bundle, portable: a zip of ``herd.json`` (format version
and the sha256 + size of every other member), ``persona.yaml`` and
``knowledge/*``. The derived index and the conversations stay home: the index is
model-specific and rebuilt on first use, and conversations are private.

Import trusts nothing in the archive. Before a byte is written it checks each
member's name (no ``..``, no absolute or drive paths, no backslashes, only
``persona.yaml``, ``herd.json`` and ``knowledge/<safe name>``), type (regular files
only: symlinks, devices and encrypted members are refused), declared sizes (per
member, total, and the compression ratio, against zip bombs) and duplicates; then
it reads each member with a hard byte limit (declared sizes can lie), checks its
sha256 against ``herd.json``, and validates the schema. Files are written only
into a fresh staging directory inside the personas directory (``O_EXCL |
O_NOFOLLOW``), which is renamed into place at the end; on any error it is removed.

Naming: a persona is served as a model id, so its name follows the store's name
rules (no ``:tag``; ``name:latest`` from Ollama clients resolves to ``name``) and
may not equal a model in the store or a catalog alias. Should a model of the same
name be pulled later, the model wins: persona names shadow nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from .. import untrusted
from ..atomic import atomic_write, fsync_dir, write_new
from ..errors import HerdError, InvalidName, InvalidRequest, NotFound, PayloadTooLarge, StoreError
from ..settings import Settings, get_settings
from ..store.manifest import NAME_RE, display, utcnow

log = logging.getLogger("openherd.personas")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ExampleDialogue",
    "KnowledgeConfig",
    "KnowledgeSource",
    "Persona",
    "PersonaExists",
    "PersonaStore",
    "SamplingDefaults",
    "validate_persona_name",
]

SCHEMA_VERSION = 1  # persona.yaml `schema`; readers refuse newer versions
ARCHIVE_FORMAT = "openherd-persona"  # herd.json `format`
ARCHIVE_VERSION = 1  # herd.json `version`
PERSONA_FILE = "persona.yaml"
ARCHIVE_MANIFEST = "herd.json"
KNOWLEDGE_DIR = "knowledge"

RETRIEVAL_MODES = ("auto", "hybrid", "bm25", "dense")
CONTEXT_MODES = ("sentences", "passages")  # knowledge.context: what of the retrieved passages the prompt gets
KNOWLEDGE_EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")

# Limits. Generous for real personas, small enough that a hostile archive or
# request cannot fill the disk or memory.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024  # one knowledge document
MAX_DOCUMENTS = 1000  # knowledge documents per persona
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024  # a .herd file on disk, and the sum of its members uncompressed
MAX_MEMBERS = MAX_DOCUMENTS + 8
MAX_YAML_BYTES = 1024 * 1024  # persona.yaml / herd.json
MAX_RATIO = 100  # uncompressed / compressed for members over RATIO_FLOOR (zip bombs reach ~1000)
RATIO_FLOOR = 1024 * 1024  # small members may compress absurdly well (a file of spaces) and harm no one
MAX_SYSTEM_CHARS = 32_000
MAX_TEXT_CHARS = 8_000  # greeting, description, one side of an example
MAX_EXAMPLES = 32

# Knowledge file names inside a bundle: one level, a letter or digit first, no path
# separators, so a name from an archive can never address anything outside knowledge/.
_SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+()-]{0,150}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same persona exports to the same bytes


class PersonaExists(InvalidRequest):
    """409: a persona (or model) of that name is already there."""

    status = 409
    code = "persona_exists"


def _invalid(where: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"persona {where}: {problem}", param=where, code="invalid_persona")


# ----------------------------------------------------------------------------- names


def validate_persona_name(name: object) -> str:
    """A store-style name without a tag. ``name:latest`` (what Ollama clients send) -> ``name``."""
    if isinstance(name, str):
        m = NAME_RE.fullmatch(name)
        if m and m["tag"] in (None, "latest"):
            return m["model"]
    raise InvalidName(
        f"invalid persona name {display(name)}: use letters, digits, '.', '_' and '-' "
        "(starting with a letter or digit, at most 128, no ':tag')",
        param="name",
    )


def safe_file_name(original: str) -> str:
    """A knowledge document's name inside the bundle, from any user-supplied file name."""
    base = original.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    ext = ext.lower()
    stem = re.sub(r"[^A-Za-z0-9._+()-]+", "_", stem).strip("._-")[:120] or "document"
    if not stem[0].isalnum():
        stem = "d" + stem
    name = f"{stem}.{ext}" if ext else stem
    if not name.lower().endswith(KNOWLEDGE_EXTENSIONS):
        raise InvalidRequest(
            f"unsupported knowledge document {display(base)}: use {', '.join(KNOWLEDGE_EXTENSIONS)}",
            param="file",
        )
    return name


def _check_file_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _SAFE_FILE.fullmatch(name) or ".." in name:
        raise _invalid(where, f"{display(name)} is not a safe knowledge file name")
    if not name.lower().endswith(KNOWLEDGE_EXTENSIONS):
        raise _invalid(where, f"{display(name)} is not one of {', '.join(KNOWLEDGE_EXTENSIONS)}")
    return name


# ----------------------------------------------------------------------------- schema helpers


def _str(data: Mapping, key: str, where: str, *, default: str | None = "", limit: int = MAX_TEXT_CHARS,
         required: bool = False) -> Any:
    if key not in data or data[key] is None:
        if required:
            raise _invalid(f"{where}{key}", "is required")
        return default
    value = data[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "version":
        value = str(value)  # `version: 1.0` in YAML is a float; keep what the user meant
    if not isinstance(value, str):
        raise _invalid(f"{where}{key}", f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise _invalid(f"{where}{key}", "must not contain NUL characters")
    if len(value) > limit:
        raise _invalid(f"{where}{key}", f"is longer than {limit} characters")
    return value


def _num(data: Mapping, key: str, where: str, kind: type) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise _invalid(f"{where}{key}", f"must be {'a number' if kind is float else 'an integer'}")
    return kind(value)


def _mapping(value: object, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _invalid(where, f"must be a mapping, got {type(value).__name__}")
    return value


def _no_unknown(data: Mapping, known: set[str], where: str) -> None:
    for key in data:
        if key not in known:
            raise _invalid(f"{where}{key}", f"unknown field (known: {', '.join(sorted(known))})")


# ----------------------------------------------------------------------------- the schema


@dataclass
class SamplingDefaults:
    """Sampling defaults for the persona; None = the engine's default. A request's
    own parameters override these (see PersonaRuntime.sampling)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        from ..engine.types import SamplingParams

        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 16:
            raise _invalid("sampling.stop", "must be a list of at most 16 non-empty strings")
        try:
            SamplingParams(**self.values())  # one set of range checks, the engine's
        except InvalidRequest as e:
            raise _invalid("sampling", e.message) from None

    def values(self) -> dict[str, Any]:
        """The fields that are set, as SamplingParams keyword arguments."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not self.stop:
            out.pop("stop", None)
        return out

    @classmethod
    def from_dict(cls, data: object) -> SamplingDefaults:
        d = _mapping(data, "sampling")
        where = "sampling."
        _no_unknown(d, {f.name for f in fields(cls)}, where)
        stop = d.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        return cls(
            temperature=_num(d, "temperature", where, float),
            top_p=_num(d, "top_p", where, float),
            top_k=_num(d, "top_k", where, int),
            min_p=_num(d, "min_p", where, float),
            repeat_penalty=_num(d, "repeat_penalty", where, float),
            frequency_penalty=_num(d, "frequency_penalty", where, float),
            presence_penalty=_num(d, "presence_penalty", where, float),
            max_tokens=_num(d, "max_tokens", where, int),
            seed=_num(d, "seed", where, int),
            stop=list(stop) if isinstance(stop, list) else stop,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.values()


@dataclass
class ExampleDialogue:
    """One few-shot exchange, placed between the system prompt and the conversation."""

    user: str
    assistant: str

    def __post_init__(self):
        for side in ("user", "assistant"):
            value = getattr(self, side)
            if not isinstance(value, str) or not value.strip():
                raise _invalid(f"examples.{side}", "must be a non-empty string")
            if len(value) > MAX_TEXT_CHARS:
                raise _invalid(f"examples.{side}", f"is longer than {MAX_TEXT_CHARS} characters")

    @classmethod
    def from_dict(cls, data: object, i: int) -> ExampleDialogue:
        d = _mapping(data, f"examples[{i}]")
        _no_unknown(d, {"user", "assistant"}, f"examples[{i}].")
        return cls(user=_str(d, "user", f"examples[{i}].", required=True),
                   assistant=_str(d, "assistant", f"examples[{i}].", required=True))


@dataclass
class KnowledgeSource:
    """One document in ``knowledge/``. The sha256 keys the index: a changed file is re-ingested."""

    file: str  # name inside knowledge/ (safe, one level)
    sha256: str  # hex digest of the file's bytes
    size: int  # bytes
    title: str = ""  # shown with citations; defaults to the file name
    added_at: str = ""

    def __post_init__(self):
        _check_file_name(self.file, "knowledge.sources.file")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise _invalid("knowledge.sources.sha256", f"{display(self.sha256)} is not a sha256 hex digest")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= MAX_DOCUMENT_BYTES:
            raise _invalid("knowledge.sources.size", f"must be an integer in 0..{MAX_DOCUMENT_BYTES}")

    @property
    def label(self) -> str:
        return self.title or self.file

    @classmethod
    def from_dict(cls, data: object, i: int) -> KnowledgeSource:
        where = f"knowledge.sources[{i}]."
        d = _mapping(data, where[:-1])
        _no_unknown(d, {f.name for f in fields(cls)}, where)
        return cls(
            file=_str(d, "file", where, required=True, limit=200),
            sha256=_str(d, "sha256", where, required=True, limit=64),
            size=_num(d, "size", where, int) if d.get("size") is not None else -1,
            title=_str(d, "title", where, limit=300),
            added_at=_str(d, "added_at", where, limit=64),
        )


@dataclass
class KnowledgeConfig:
    """The persona's documents and how they are chunked and retrieved."""

    sources: list[KnowledgeSource] = field(default_factory=list)
    # Small chunks: the default 135M model answers best from one or two short lines
    # (bench/knowledge.py); raise chunk_tokens for bigger models and longer documents.
    # top_k passages are retrieved: placed whole in passages mode, and in sentences mode the
    # pool the best units are chosen from (5 holds an answer-bearing unit for 32 of the bench's
    # 38 questions, 3 for 29 to 30; only the chosen units reach the prompt).
    top_k: int = 5  # passages retrieved for each question
    chunk_tokens: int = 64  # target tokens per chunk (of the base model's tokenizer)
    chunk_overlap: int = 16  # tokens shared by neighbouring chunks, so a fact on a boundary survives
    max_context_tokens: int = 1024  # budget for all passages together in the prompt
    embedding_model: str | None = None  # store name of a dedicated embedding model; None = the served model
    min_score: float = 0.0  # drop fused results below this RRF score (0 keeps top_k)
    relative_score: float = 0.25  # drop BM25 matches scoring under this fraction of the best one
    # hybrid | bm25 | dense | auto. auto = hybrid with a dedicated embedding model, else BM25 alone:
    # mean-pooled vectors of a small chat model rank worse than BM25 and drag the fusion below it
    # (bench/knowledge.py measures both; see docs/personas.md).
    retrieval: str = "auto"
    # What of the retrieved passages goes into the prompt (openherd.personas.context):
    # "sentences" = the few sentence/line units that best match the question, then the
    # assistant's turn starts with answer_prefix; "passages" = the chunks whole, numbered.
    # Sentences are the default because the 135M default model copies a fact from two short
    # lines far more often than from three chunks (bench/knowledge.py, docs/personas.md).
    context: str = "sentences"
    sentences: int = 2  # units placed in sentences mode
    answer_prefix: str = "From the notes:"  # '' = the assistant's turn starts empty
    # Complete the units cut by a passage's edges from the chunks around it (context.split_window).
    # Off by default: it puts the answer among the best 3 units more often (23 -> 28 of 38 on
    # bench/knowledge.py) but the 135M default model copied from the longer units less often
    # (bench/RESULTS.md); worth turning on with more units or a bigger model.
    complete_units: bool = False

    def __post_init__(self):
        if len(self.sources) > MAX_DOCUMENTS:
            raise _invalid("knowledge.sources", f"has more than {MAX_DOCUMENTS} documents")
        seen = set()
        for s in self.sources:
            if s.file in seen:
                raise _invalid("knowledge.sources", f"lists {display(s.file)} twice")
            seen.add(s.file)
        if not 1 <= self.top_k <= 32:
            raise _invalid("knowledge.top_k", "must be between 1 and 32")
        if not 16 <= self.chunk_tokens <= 4096:
            raise _invalid("knowledge.chunk_tokens", "must be between 16 and 4096")
        if not 0 <= self.chunk_overlap < self.chunk_tokens // 2 + 1:
            raise _invalid("knowledge.chunk_overlap", "must be >= 0 and at most half of chunk_tokens")
        if not 64 <= self.max_context_tokens <= 65536:
            raise _invalid("knowledge.max_context_tokens", "must be between 64 and 65536")
        if self.embedding_model is not None:
            m = NAME_RE.fullmatch(self.embedding_model) if isinstance(self.embedding_model, str) else None
            if not m:
                raise _invalid("knowledge.embedding_model", f"{display(self.embedding_model)} is not a model name")
        if self.min_score < 0:
            raise _invalid("knowledge.min_score", "must be >= 0")
        if not 0 <= self.relative_score < 1:
            raise _invalid("knowledge.relative_score", "must be in [0, 1)")
        if self.retrieval not in RETRIEVAL_MODES:
            raise _invalid("knowledge.retrieval", f"must be one of {', '.join(RETRIEVAL_MODES)}")
        if self.context not in CONTEXT_MODES:
            raise _invalid("knowledge.context", f"must be one of {', '.join(CONTEXT_MODES)}")
        if not isinstance(self.sentences, int) or isinstance(self.sentences, bool) or not 1 <= self.sentences <= 32:
            raise _invalid("knowledge.sentences", "must be between 1 and 32")
        if not isinstance(self.answer_prefix, str) or len(self.answer_prefix) > 200:
            raise _invalid("knowledge.answer_prefix", "must be text of at most 200 characters")
        if not isinstance(self.complete_units, bool):
            raise _invalid("knowledge.complete_units", "must be true or false")

    @property
    def mode(self) -> str:
        """The retrieval actually used (auto resolved)."""
        if self.retrieval != "auto":
            return self.retrieval
        return "hybrid" if self.embedding_model else "bm25"

    def source(self, file: str) -> KnowledgeSource | None:
        return next((s for s in self.sources if s.file == file), None)

    @classmethod
    def from_dict(cls, data: object) -> KnowledgeConfig:
        d = _mapping(data, "knowledge")
        where = "knowledge."
        _no_unknown(d, {f.name for f in fields(cls)}, where)
        raw_sources = d.get("sources") or []
        if not isinstance(raw_sources, list):
            raise _invalid("knowledge.sources", "must be a list")
        defaults = cls()
        embedding = d.get("embedding_model")

        def num(key: str, kind: type) -> Any:
            value = _num(d, key, where, kind)
            return getattr(defaults, key) if value is None else value

        return cls(
            sources=[KnowledgeSource.from_dict(s, i) for i, s in enumerate(raw_sources)],
            top_k=num("top_k", int),
            chunk_tokens=num("chunk_tokens", int),
            chunk_overlap=num("chunk_overlap", int),
            max_context_tokens=num("max_context_tokens", int),
            embedding_model=embedding if embedding is None else _str(d, "embedding_model", where, limit=300),
            min_score=num("min_score", float),
            relative_score=num("relative_score", float),
            retrieval=_str(d, "retrieval", where, default="auto", limit=16),
            context=_str(d, "context", where, default=defaults.context, limit=16),
            sentences=num("sentences", int),
            answer_prefix=_str(d, "answer_prefix", where, default=defaults.answer_prefix, limit=200),
            complete_units=d.get("complete_units", defaults.complete_units),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _safety_from_dict(data: object):
    """The persona's SafetyPolicy. For personas, retrieved passages that carry instructions are
    quarantined unless the policy says otherwise (the server-wide default is "off" because a
    plain model has no retrieved text)."""
    from ..safety.policy import SafetyPolicy

    d = dict(_mapping(data, "safety"))
    d.setdefault("injection", "quarantine")
    try:
        return SafetyPolicy.from_dict(d)
    except HerdError as e:
        raise _invalid("safety", e.message) from None
    except (TypeError, ValueError) as e:  # defensive: a policy parser that raised a plain error
        raise _invalid("safety", str(e)) from None


@dataclass
class Persona:
    """persona.yaml, checked. Construct through from_dict (or the dataclass, which checks too)."""

    name: str
    model: str  # base model: a store name or catalog alias ("smollm2")
    description: str = ""
    version: str = "1"  # the persona's own version, free-form ("1", "2.3.0")
    adapter: str | None = None  # store name of a LoRA-tuned model built on `model`; served instead of it
    system: str = ""  # system prompt
    greeting: str = ""  # first assistant message of a new conversation (herd chat)
    examples: list[ExampleDialogue] = field(default_factory=list)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    safety: Any = None  # openherd.safety.policy.SafetyPolicy; None = the server's global policy
    created_at: str = ""
    updated_at: str = ""
    schema: int = SCHEMA_VERSION

    def __post_init__(self):
        self.name = validate_persona_name(self.name)
        for key in ("model", "adapter"):
            value = getattr(self, key)
            if value is None and key == "adapter":
                continue
            if not isinstance(value, str) or not NAME_RE.fullmatch(value):
                raise _invalid(key, f"{display(value)} is not a model name (see `herd list`)")
        for key, limit in (("description", MAX_TEXT_CHARS), ("version", 64), ("system", MAX_SYSTEM_CHARS),
                           ("greeting", MAX_TEXT_CHARS)):
            value = getattr(self, key)
            if not isinstance(value, str) or len(value) > limit or "\x00" in value:
                raise _invalid(key, f"must be a string of at most {limit} characters")
        if not self.version.strip():
            raise _invalid("version", "must not be empty")
        if len(self.examples) > MAX_EXAMPLES:
            raise _invalid("examples", f"has more than {MAX_EXAMPLES} entries")
        if self.schema != SCHEMA_VERSION:
            raise _invalid("schema", f"version {self.schema} is not {SCHEMA_VERSION}")

    @property
    def served_model(self) -> str:
        """The store name to load: the tuned model when there is one, else the base."""
        return self.adapter or self.model

    @property
    def embedding_model(self) -> str:
        return self.knowledge.embedding_model or self.served_model

    # ------------------------------------------------------------------ dict / yaml

    @classmethod
    def from_dict(cls, data: object) -> Persona:
        d = _mapping(data, "persona.yaml")
        # A lone surrogate ("\ud800" in JSON, "\uD800" in YAML) survives a YAML dump and
        # load but no UTF-8 encode: refused here, before anything is written, it cannot
        # leave a persona that every later listing and chat fails on.
        bad = untrusted.find_surrogate(d)
        if bad is not None:
            raise _invalid(bad, "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
        schema = d.get("schema", SCHEMA_VERSION)
        if isinstance(schema, bool) or not isinstance(schema, int):
            raise _invalid("schema", "must be an integer")
        if schema > SCHEMA_VERSION:
            raise _invalid("schema", f"version {schema} is newer than this openherd understands "
                                     f"({SCHEMA_VERSION}); upgrade openherd (pip install -U openherd)")
        _no_unknown(d, {f.name for f in fields(cls)}, "")
        raw_examples = d.get("examples") or []
        if not isinstance(raw_examples, list):
            raise _invalid("examples", "must be a list of {user, assistant}")
        adapter = d.get("adapter")
        return cls(
            name=_str(d, "name", "", required=True, limit=200),
            model=_str(d, "model", "", required=True, limit=300),
            description=_str(d, "description", ""),
            version=_str(d, "version", "", default="1", limit=64),
            adapter=None if adapter is None else _str(d, "adapter", "", limit=300),
            system=_str(d, "system", "", limit=MAX_SYSTEM_CHARS),
            greeting=_str(d, "greeting", ""),
            examples=[ExampleDialogue.from_dict(x, i) for i, x in enumerate(raw_examples[: MAX_EXAMPLES + 1])],
            sampling=SamplingDefaults.from_dict(d.get("sampling")),
            knowledge=KnowledgeConfig.from_dict(d.get("knowledge")),
            safety=_safety_from_dict(d["safety"]) if d.get("safety") is not None else None,
            created_at=_str(d, "created_at", "", limit=64),
            updated_at=_str(d, "updated_at", "", limit=64),
            schema=SCHEMA_VERSION,
        )

    def to_dict(self) -> dict[str, Any]:
        """The persona.yaml mapping, in schema order (also the JSON of the HTTP API)."""
        return {
            "schema": self.schema,
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "model": self.model,
            "adapter": self.adapter,
            "system": self.system,
            "greeting": self.greeting,
            "examples": [asdict(e) for e in self.examples],
            "sampling": self.sampling.to_dict(),
            "knowledge": self.knowledge.to_dict(),
            "safety": self.safety.to_dict() if self.safety is not None else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def to_yaml(self) -> str:
        import yaml

        head = f"# openherd persona '{self.name}' (schema {self.schema}); edit with `herd persona edit {self.name}`\n"
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)

    @classmethod
    def from_yaml(cls, text: str | bytes, where: str = PERSONA_FILE) -> Persona:
        return cls.from_dict(load_yaml(text, where))

    def model_card(self) -> dict[str, Any]:
        """The persona as an OpenAI /v1/models entry (``herd`` marks openherd's extension)."""
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "persona",
            "herd": {"persona": True, "model": self.model, "adapter": self.adapter, "version": self.version,
                     "description": self.description, "documents": len(self.knowledge.sources)},
        }


def load_yaml(text: str | bytes, where: str = PERSONA_FILE) -> Any:
    """Safe YAML within untrusted.load_yaml's limits: depth checked before any parser
    runs (a 1 KB document 100,000 levels deep kept PyYAML busy for minutes), a node budget,
    no numbers past MAX_INT_DIGITS, and no anchors/aliases: an alias bomb ("billion
    laughs") is tiny on disk and exponential to walk, and personas never need them."""
    if isinstance(text, bytes):
        if len(text) > MAX_YAML_BYTES:
            raise _invalid(where, f"is larger than {MAX_YAML_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(where, "is not UTF-8 text") from None
    if len(text) > MAX_YAML_BYTES:
        raise _invalid(where, f"is larger than {MAX_YAML_BYTES} bytes")
    try:
        return untrusted.load_yaml(text, where)
    except untrusted.BadYAML as e:
        at = f" at line {e.line}" if e.line else ""
        raise _invalid(where, f"{e.problem}{at}") from None


# ----------------------------------------------------------------------------- merge patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch: mappings merge recursively, null removes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# ----------------------------------------------------------------------------- files


def _read_limited(f: IO[bytes], limit: int, what: str) -> bytes:
    """Read at most `limit` bytes; more is an error (a zip member's declared size can lie)."""
    buf = io.BytesIO()
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return buf.getvalue()
        if buf.tell() + len(chunk) > limit:
            raise PayloadTooLarge(f"{what} is larger than {limit} bytes")
        buf.write(chunk)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- the store


@dataclass
class ImportResult:
    persona: Persona
    files: int  # knowledge documents written
    bytes: int  # bytes written


class PersonaStore:
    """Personas on disk under ``settings.personas_dir``. Every method that takes a name
    validates it before building a path from it."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.root = self.settings.personas_dir

    # ------------------------------------------------------------------ paths and locks

    def dir(self, name: str) -> Path:
        return self.root / validate_persona_name(name)

    def knowledge_dir(self, name: str) -> Path:
        return self.dir(name) / KNOWLEDGE_DIR

    def knowledge_db(self, name: str) -> Path:
        return self.dir(name) / "knowledge.db"

    def memory_db(self, name: str) -> Path:
        return self.dir(name) / "memory.db"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time across processes (CLI and server may edit the same persona)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading

    def exists(self, name: str) -> bool:
        try:
            return (self.dir(name) / PERSONA_FILE).is_file()
        except InvalidName:
            return False

    def get(self, name: str) -> Persona:
        name = validate_persona_name(name)
        path = self.root / name / PERSONA_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"persona '{name}' not found; see `herd persona list`", param="name",
                           code="persona_not_found") from None
        except OSError as e:
            raise StoreError(f"cannot read persona '{name}': {e.strerror or e}") from None
        persona = Persona.from_yaml(data, where=f"'{name}'")
        if persona.name != name:
            raise StoreError(f"persona '{name}' names itself '{persona.name}' in its persona.yaml; "
                             f"fix it with `herd persona edit {name}`")
        return persona

    def list(self) -> list[Persona]:
        """Every readable persona, by name. A broken one is skipped (and `herd persona show` says why)."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / PERSONA_FILE).is_file():
                continue
            try:
                out.append(self.get(entry.name))
            except HerdError as e:
                log.warning("skipping persona %s: %s", entry.name, e.message)
        return out

    def lookup(self, model_id: str) -> Persona | None:
        """The persona a request's model id names, or None. Store models win over personas
        (a persona never shadows a model), so the server asks the store first anyway."""
        try:
            name = validate_persona_name(model_id)
        except InvalidName:
            return None
        if not self.exists(name):
            return None
        if self._model_taken(name):
            return None
        return self.get(name)

    # ------------------------------------------------------------------ checks

    def _model_taken(self, name: str) -> bool:
        from ..store import Store
        from ..store.catalog import CATALOG

        if name in CATALOG:
            return True
        try:
            return Store(self.settings).exists(name)
        except HerdError:
            return False

    def check_new_name(self, name: str) -> str:
        name = validate_persona_name(name)
        if self._model_taken(name):
            raise PersonaExists(f"'{name}' is a model name; a persona is served as a model id, so pick another name",
                                param="name")
        if self.exists(name):
            raise PersonaExists(f"persona '{name}' already exists; remove it with `herd persona rm {name}` "
                                "or pick another name (import: --name NEW)", param="name")
        return name

    # ------------------------------------------------------------------ writing

    def _write_yaml(self, persona: Persona, directory: Path) -> None:
        atomic_write(directory / PERSONA_FILE, persona.to_yaml().encode("utf-8"))

    def create(self, persona: Persona, documents: list[tuple[str, bytes]] = ()) -> Persona:
        """Write a new persona with its knowledge documents [(original file name, bytes)]."""
        with self.lock():
            self.check_new_name(persona.name)
            staging = self._staging()
            try:
                now = utcnow()
                persona.created_at = persona.created_at or now
                persona.updated_at = now
                (staging / KNOWLEDGE_DIR).mkdir()
                for original, data in documents:
                    persona.knowledge.sources.append(self._add_document(staging, persona, original, data))
                self._check_persona(persona)
                self._write_yaml(persona, staging)
                self._commit(staging, persona.name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return persona

    def update(self, name: str, patch: Mapping[str, Any]) -> Persona:
        """Apply a JSON merge patch to persona.yaml. The name and the knowledge sources are
        not patchable (export/import --name renames; add/remove documents explicitly)."""
        with self.lock():
            current = self.get(name)
            base = current.to_dict()
            if "name" in patch and patch["name"] != current.name:
                raise InvalidRequest("a persona cannot be renamed in place; use `herd persona export` and "
                                     "`herd persona import --name NEW`", param="name")
            knowledge = patch.get("knowledge")
            if isinstance(knowledge, Mapping) and "sources" in knowledge:
                raise InvalidRequest("knowledge sources change by adding or removing documents "
                                     "(`herd persona edit --add-knowledge/--remove-knowledge`)", param="knowledge.sources")
            for key in ("schema", "created_at", "updated_at"):
                patch = {k: v for k, v in patch.items() if k != key}
            merged = merge_patch(base, patch)
            merged["updated_at"] = utcnow()
            persona = Persona.from_dict(merged)
            self._check_persona(persona)
            self._write_yaml(persona, self.dir(name))
        return persona

    def replace(self, name: str, persona: Persona) -> Persona:
        """Write an edited persona.yaml (herd persona edit with $EDITOR). Sources must still
        match the documents on disk."""
        with self.lock():
            current = self.get(name)
            if persona.name != current.name:
                raise InvalidRequest("a persona cannot be renamed in place; use export and import --name NEW",
                                     param="name")
            persona.created_at = current.created_at
            persona.updated_at = utcnow()
            kdir = self.knowledge_dir(name)
            for src in persona.knowledge.sources:
                path = kdir / src.file
                if not path.is_file():
                    raise _invalid("knowledge.sources", f"{display(src.file)} is not in the persona's knowledge folder")
            dropped = {s.file for s in current.knowledge.sources} - {s.file for s in persona.knowledge.sources}
            # Sources keep the digests of the files on disk: the yaml cannot claim another content.
            actual = {s.file: s for s in current.knowledge.sources}
            sources = []
            for src in persona.knowledge.sources:
                if src.file in actual:  # the title is the user's to edit, the digest is not
                    old = actual[src.file]
                    sources.append(KnowledgeSource(file=old.file, sha256=old.sha256, size=old.size,
                                                   title=src.title, added_at=old.added_at))
                    continue
                data = (kdir / src.file).read_bytes()  # listed by hand: describe what is really there
                _check_document(src.file, data)
                sources.append(KnowledgeSource(file=src.file, sha256=_sha256(data), size=len(data),
                                               title=src.title, added_at=utcnow()))
            persona.knowledge.sources = sources
            self._check_persona(persona)
            self._write_yaml(persona, self.dir(name))
            for file in dropped:
                (kdir / file).unlink(missing_ok=True)
        return persona

    def add_document(self, name: str, original: str, data: bytes, title: str = "") -> KnowledgeSource:
        """Copy one knowledge document in (a new file, or a new version of one of the same name)."""
        with self.lock():
            persona = self.get(name)
            directory = self.dir(name)
            (directory / KNOWLEDGE_DIR).mkdir(exist_ok=True)
            file = safe_file_name(original)
            old = persona.knowledge.source(file)
            if old is None and len(persona.knowledge.sources) >= MAX_DOCUMENTS:
                raise InvalidRequest(f"persona '{name}' already has {MAX_DOCUMENTS} documents")
            _check_document(file, data)
            atomic_write(directory / KNOWLEDGE_DIR / file, data)
            src = KnowledgeSource(file=file, sha256=_sha256(data), size=len(data), title=title or (old.title if old else ""),
                                  added_at=utcnow())
            persona.knowledge.sources = [s for s in persona.knowledge.sources if s.file != file] + [src]
            persona.updated_at = utcnow()
            self._write_yaml(persona, directory)
        return src

    def remove_document(self, name: str, file: str) -> None:
        with self.lock():
            persona = self.get(name)
            if persona.knowledge.source(file) is None:
                raise NotFound(f"persona '{name}' has no document {display(file)}", param="file")
            persona.knowledge.sources = [s for s in persona.knowledge.sources if s.file != file]
            persona.updated_at = utcnow()
            self._write_yaml(persona, self.dir(name))
            (self.knowledge_dir(name) / _check_file_name(file, "file")).unlink(missing_ok=True)

    def remove(self, name: str) -> str:
        """Delete a persona: its yaml, documents, index and conversations."""
        with self.lock():
            name = validate_persona_name(name)
            directory = self.root / name
            if not directory.is_dir() or directory.is_symlink():
                raise NotFound(f"persona '{name}' not found; see `herd persona list`", param="name",
                               code="persona_not_found")
            # Rename first so a crash half-way leaves a hidden leftover, never a half persona.
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(directory, trash)
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        return name

    def check_models(self, persona: Persona) -> None:
        """The base model (and the tuned one) must be in the store, or a catalog alias pulled on
        first use. Import skips this: a persona may travel ahead of its model (`herd pull` it)."""
        from ..errors import ModelNotFound
        from ..store import Store
        from ..store.catalog import CATALOG

        store = Store(self.settings)
        if persona.model not in CATALOG and not store.exists(persona.model):
            raise ModelNotFound(persona.model)
        if persona.adapter:
            tuned = store.get(persona.adapter)
            if tuned is None:
                raise ModelNotFound(persona.adapter, f"tuned model '{persona.adapter}' not found; see `herd list`")
            if tuned.base and tuned.base not in (persona.model, persona.model.removesuffix(":latest")):
                raise _invalid("adapter", f"'{persona.adapter}' was tuned from '{tuned.base}', not from "
                                          f"'{persona.model}'; use --model {tuned.base}")
        if persona.knowledge.embedding_model:
            em = persona.knowledge.embedding_model
            if em not in CATALOG and not store.exists(em):
                raise ModelNotFound(em)

    def _check_persona(self, persona: Persona) -> None:
        from ..store.catalog import CATALOG

        for key in ("model", "adapter"):
            value = getattr(persona, key)
            if value and self.exists(value.split(":")[0]) and value not in CATALOG:
                raise _invalid(key, f"'{value}' is a persona; a persona's model must be a store model")

    def _add_document(self, directory: Path, persona: Persona, original: str, data: bytes) -> KnowledgeSource:
        file = safe_file_name(original)
        taken = {s.file for s in persona.knowledge.sources}
        stem, _, ext = file.rpartition(".")
        n = 2
        while file in taken:  # two documents with one name from different folders
            file = f"{stem}-{n}.{ext}"
            n += 1
        if len(taken) >= MAX_DOCUMENTS:
            raise InvalidRequest(f"a persona holds at most {MAX_DOCUMENTS} documents")
        _check_document(file, data)
        write_new(directory / KNOWLEDGE_DIR / file, data)
        return KnowledgeSource(file=file, sha256=_sha256(data), size=len(data), added_at=utcnow())

    def _staging(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".staging-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def _commit(self, staging: Path, name: str) -> None:
        final = self.root / name
        if final.exists() or final.is_symlink():
            raise PersonaExists(f"persona '{name}' already exists", param="name")
        fsync_dir(staging / KNOWLEDGE_DIR)
        fsync_dir(staging)
        os.rename(staging, final)
        fsync_dir(self.root)

    def clean_staging(self) -> None:
        """Remove leftovers of interrupted creates, imports and removals."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith((".staging-", ".trash-")) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ export / import

    def export_bytes(self, name: str) -> bytes:
        buf = io.BytesIO()
        self.export_to(name, buf)
        return buf.getvalue()

    def export(self, name: str, out: Path) -> Path:
        """Write ``out`` (a .herd file) atomically."""
        out = Path(out)
        if out.is_dir():
            out = out / f"{validate_persona_name(name)}.herd"
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "xb") as f:
                self.export_to(name, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    def export_to(self, name: str, f: IO[bytes]) -> None:
        persona = self.get(name)
        kdir = self.knowledge_dir(name)
        members: list[tuple[str, bytes]] = [(PERSONA_FILE, persona.to_yaml().encode("utf-8"))]
        for src in persona.knowledge.sources:
            path = kdir / src.file
            if path.is_symlink():
                raise StoreError(f"persona '{name}': knowledge document {display(src.file)} is a symlink; re-add it")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise StoreError(f"persona '{name}': cannot read knowledge document {display(src.file)} "
                                 f"({e.strerror or e}); remove it with `herd persona edit {name} "
                                 f"--remove-knowledge {src.file}`") from None
            if _sha256(data) != src.sha256:
                raise StoreError(f"persona '{name}': knowledge document {display(src.file)} changed on disk; "
                                 f"re-add it with `herd persona edit {name} --add-knowledge FILE`")
            members.append((f"{KNOWLEDGE_DIR}/{src.file}", data))
        manifest = {
            "format": ARCHIVE_FORMAT,
            "version": ARCHIVE_VERSION,
            "persona": persona.name,
            "files": {path: {"sha256": _sha256(data), "size": len(data)} for path, data in members},
        }
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path, data in [(ARCHIVE_MANIFEST, json.dumps(manifest, indent=2).encode())] + members:
                info = zipfile.ZipInfo(path, date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, data)

    def import_file(self, path: Path, name: str | None = None) -> ImportResult:
        path = Path(path)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise InvalidRequest(f"{path} is not a file")
        except FileNotFoundError:
            raise NotFound(f"no such file: {path}") from None
        if size > MAX_ARCHIVE_BYTES:
            raise PayloadTooLarge(f"{path.name} is larger than {MAX_ARCHIVE_BYTES} bytes")
        with open(path, "rb") as f:
            return self.import_from(f, name)

    def import_bytes(self, data: bytes, name: str | None = None) -> ImportResult:
        if len(data) > MAX_ARCHIVE_BYTES:
            raise PayloadTooLarge(f"the .herd file is larger than {MAX_ARCHIVE_BYTES} bytes")
        return self.import_from(io.BytesIO(data), name)

    def import_from(self, f: IO[bytes], name: str | None = None) -> ImportResult:
        """Validate a .herd archive completely, then install it as `name` (default: its own)."""
        if name is not None:
            name = validate_persona_name(name)
        try:
            zf = zipfile.ZipFile(f)
        # NotImplementedError: a "version needed to extract" past what zipfile knows (atheris found it).
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
            raise InvalidRequest("not a .herd file (not a zip archive); create one with `herd persona export`",
                                 code="invalid_archive") from None
        with zf:
            plan = _plan_archive(zf)
            manifest = _read_manifest(zf, plan)
            persona_bytes = _read_member(zf, plan[PERSONA_FILE], MAX_YAML_BYTES)
            _check_digest(PERSONA_FILE, persona_bytes, manifest)
            persona = Persona.from_yaml(persona_bytes, where="in the archive")
            if name is not None:
                persona.name = name
            docs = {p[len(KNOWLEDGE_DIR) + 1:]: info for p, info in plan.items() if p.startswith(KNOWLEDGE_DIR + "/")}
            listed = {s.file for s in persona.knowledge.sources}
            if set(docs) != listed:
                extra = sorted(set(docs) - listed) or sorted(listed - set(docs))
                raise _archive_error(f"its documents do not match persona.yaml ({display(extra[0])})")
            with self.lock():
                self.check_new_name(persona.name)
                self._check_persona(persona)
                staging = self._staging()
                written = 0
                try:
                    kdir = staging / KNOWLEDGE_DIR
                    kdir.mkdir()
                    for src in persona.knowledge.sources:
                        data = _read_member(zf, docs[src.file], MAX_DOCUMENT_BYTES)
                        _check_digest(f"{KNOWLEDGE_DIR}/{src.file}", data, manifest)
                        if _sha256(data) != src.sha256 or len(data) != src.size:
                            raise _archive_error(f"{display(src.file)} does not match its sha256 in persona.yaml")
                        write_new(kdir / src.file, data)
                        written += len(data)
                    persona.updated_at = utcnow()
                    self._write_yaml(persona, staging)
                    self._commit(staging, persona.name)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
        return ImportResult(persona=persona, files=len(persona.knowledge.sources), bytes=written)


# ----------------------------------------------------------------------------- archive checks


def _archive_error(problem: str) -> InvalidRequest:
    return InvalidRequest(f"invalid .herd file: {problem}", code="invalid_archive")


def _member_name_ok(name: str) -> bool:
    """Only the three shapes a .herd holds; everything else (../, /abs, C:\\, a\\b, nested dirs) fails."""
    if name in (PERSONA_FILE, ARCHIVE_MANIFEST):
        return True
    prefix = KNOWLEDGE_DIR + "/"
    if not name.startswith(prefix):
        return False
    file = name[len(prefix):]
    return bool(_SAFE_FILE.fullmatch(file)) and ".." not in file and file.lower().endswith(KNOWLEDGE_EXTENSIONS)


def _plan_archive(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Every member checked from the central directory, before anything is read or written."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _archive_error(f"it has {len(infos)} members (at most {MAX_MEMBERS})")
    plan: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        shown = display(name)
        if name == KNOWLEDGE_DIR + "/" and info.is_dir():
            continue  # a directory entry some zip tools add; nothing to write
        if "\x00" in name or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "\\" in name:
            raise _archive_error(f"member {shown} has an absolute or non-portable path")
        if ".." in name.split("/"):
            raise _archive_error(f"member {shown} points outside the persona (..)")
        if not _member_name_ok(name):
            raise _archive_error(f"unexpected member {shown} (a .herd holds herd.json, persona.yaml and knowledge/*)")
        # Unix zips keep st_mode in the high 16 bits; a file type other than regular (symlink,
        # device, fifo) is refused. Zips from other systems (or Python's writestr) leave it 0.
        ftype = stat.S_IFMT(info.external_attr >> 16)
        if info.is_dir() or (ftype and ftype != stat.S_IFREG):
            kind = "a symlink" if ftype == stat.S_IFLNK else "not a regular file"
            raise _archive_error(f"member {shown} is {kind}")
        if info.flag_bits & 0x1:
            raise _archive_error(f"member {shown} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _archive_error(f"member {shown} uses an unsupported compression method")
        if name in plan:
            raise _archive_error(f"member {shown} appears twice")
        limit = MAX_YAML_BYTES if name in (PERSONA_FILE, ARCHIVE_MANIFEST) else MAX_DOCUMENT_BYTES
        if info.file_size > limit:
            raise PayloadTooLarge(f"invalid .herd file: member {shown} is {info.file_size} bytes (at most {limit})")
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise _archive_error(f"member {shown} expands {info.file_size // max(info.compress_size, 1)}x "
                                 "(a zip bomb?)")
        total += info.file_size
        if total > MAX_ARCHIVE_BYTES:
            raise PayloadTooLarge(f"invalid .herd file: its members add up to more than {MAX_ARCHIVE_BYTES} bytes")
        plan[name] = info
    for required in (ARCHIVE_MANIFEST, PERSONA_FILE):
        if required not in plan:
            raise _archive_error(f"it has no {required}")
    return plan


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    try:
        with zf.open(info) as f:
            data = _read_limited(f, min(limit, info.file_size), f"member {display(info.filename)}")
    # ValueError: a header offset that points before the file ("negative seek value"),
    # NotImplementedError: an unknown compression method; both found by tests/fuzz_targets.py.
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise _archive_error(f"member {display(info.filename)} is corrupt ({type(e).__name__})") from None
    if len(data) != info.file_size:
        raise _archive_error(f"member {display(info.filename)} is truncated")
    return data


def _read_manifest(zf: zipfile.ZipFile, plan: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    raw = _read_member(zf, plan[ARCHIVE_MANIFEST], MAX_YAML_BYTES)
    try:
        manifest = untrusted.loads_json(raw, "herd.json")
    except InvalidRequest as e:
        raise _archive_error("herd.json is not valid JSON" if isinstance(e, untrusted.NotJSON) else e.message) from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise _archive_error("herd.json does not describe an openherd persona")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _archive_error("herd.json has no valid version")
    if version > ARCHIVE_VERSION:
        raise _archive_error(f"format version {version} is newer than this openherd understands "
                             f"({ARCHIVE_VERSION}); upgrade openherd")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _archive_error("herd.json has no file list")
    listed = set(files)
    present = set(plan) - {ARCHIVE_MANIFEST}
    if listed != present:
        odd = sorted(listed ^ present)[0]
        raise _archive_error(f"herd.json and the archive disagree about {display(odd)}")
    for path, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise _archive_error(f"herd.json has no sha256 for {display(path)}")
        if entry.get("size") != plan[path].file_size:
            raise _archive_error(f"herd.json gives the wrong size for {display(path)}")
    return manifest


def _check_digest(path: str, data: bytes, manifest: dict[str, Any]) -> None:
    if _sha256(data) != manifest["files"][path]["sha256"]:
        raise _archive_error(f"{display(path)} does not match its sha256 in herd.json (corrupted or tampered with)")


def _check_document(file: str, data: bytes) -> None:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise PayloadTooLarge(f"document {display(file)} is larger than {MAX_DOCUMENT_BYTES} bytes")
    if not data:
        raise InvalidRequest(f"document {display(file)} is empty", param="file")
