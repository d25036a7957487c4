"""Which models are loaded: on demand, kept alive, evicted least-recently-used.

Like Ollama's scheduler: a request names a model; if it is not loaded, it is
loaded (in a worker thread, so the event loop keeps serving); it stays loaded
for ``keep_alive`` seconds after its last use (per request, default 5 min,
0 = unload when idle, negative = forever). When loading another model would
exceed the memory budget or the model count, idle models are evicted oldest
first. A model that fails to load produces an error for that request only.

LoRA-tuned models (a manifest with ``base`` + ``adapter``) get their own engine
(llama.cpp applies adapters per context) but share the base model's weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from ..errors import HerdError, ModelNotFound, Unavailable
from ..settings import Settings, get_settings
from .engine import Engine, EngineConfig
from .runtime import LlamaModel

log = logging.getLogger("openherd.manager")

_GRACE_S = 2.0  # seconds after acquire() during which a model is never evicted


@dataclass
class LoadedModel:
    name: str
    engine: Engine
    manifest: object  # openherd.store.Manifest
    size: int  # bytes llama.cpp allocated at load: weights + KV cache + compute buffers
    loaded_at: float = field(default_factory=time.time)
    keep_alive: float = 300.0  # seconds after last use; < 0 = forever
    load_seconds: float = 0.0  # wall time the load took (Ollama's load_duration)

    def memory(self) -> ModelMemory:
        return engine_memory(self.engine)

    @property
    def expires_at(self) -> float | None:
        """Wall-clock expiry (None = never), as /api/ps reports it."""
        if self.keep_alive < 0:
            return None
        idle_for = time.monotonic() - self.engine.last_used
        return time.time() - idle_for + self.keep_alive


class _SharedModels:
    """Ref-counted llama_model objects so adapters of one base share its weights."""

    def __init__(self):
        self._models: dict[str, tuple[LlamaModel, int]] = {}

    def get(self, path: str, n_gpu_layers: int) -> LlamaModel:
        key = os.path.realpath(path)
        if key in self._models:
            m, n = self._models[key]
            self._models[key] = (m, n + 1)
            return m
        m = LlamaModel(path, n_gpu_layers=n_gpu_layers)
        self._models[key] = (m, 1)
        return m

    def put(self, model: LlamaModel) -> None:
        key = os.path.realpath(model.path)
        m, n = self._models[key]
        if n <= 1:
            del self._models[key]
            m.close()
        else:
            self._models[key] = (m, n - 1)


@dataclass(frozen=True)
class ModelMemory:
    """What one loaded model holds, in bytes, as llama.cpp allocated it.

    ``weights`` is ``llama_model_size`` (every tensor of the file). LoRA variants of one
    base share those weights, so each reports them: add up ``kv_cache`` and ``compute``
    across models, but read the process' resident memory for the whole."""

    weights: int
    kv_cache: int | None  # None: llama.cpp could not tell
    compute: int | None

    @property
    def total(self) -> int:
        return self.weights + (self.kv_cache or 0) + (self.compute or 0)


def engine_memory(engine: Engine) -> ModelMemory:
    """Weights plus every context of the engine: the generation context and, once an
    embeddings request has created it, the embedding context (read-only)."""
    contexts = [engine.ctx, getattr(engine, "_embed_ctx", None)]  # the latter is created on demand
    parts = [c.memory() for c in contexts if c is not None]
    return ModelMemory(
        weights=engine.info.size_bytes,
        kv_cache=_sum_known([p.kv_cache for p in parts]),
        compute=_sum_known([p.compute for p in parts]),
    )


def _sum_known(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class ModelManager:
    def __init__(self, settings: Settings | None = None, store=None):
        self.settings = settings or get_settings()
        if store is None:
            from ..store import Store

            store = Store(self.settings)
        self.store = store
        self._loaded: dict[str, LoadedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._global = asyncio.Lock()
        self._shared = _SharedModels()
        self._reaper: asyncio.Task | None = None
        self.budget = self.settings.memory_budget or int(_total_ram() * 0.7)

    # ------------------------------------------------------------------ public
    async def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_loop())

    async def acquire(self, name: str, keep_alive: float | None = None, num_ctx: int | None = None) -> Engine:
        """The loaded engine for ``name``, loading it if needed."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            lm = self._loaded.get(name)
            if lm is not None and num_ctx and num_ctx != lm.engine.config.n_ctx and not lm.engine.busy:
                await self._unload(name)  # Ollama semantics: a new num_ctx reloads the model
                lm = None
            if lm is None:
                lm = await self._load(name, num_ctx)
            if keep_alive is not None:
                lm.keep_alive = keep_alive
            lm.engine.last_used = time.monotonic()
            return lm.engine

    def loaded(self) -> list[LoadedModel]:
        return sorted(self._loaded.values(), key=lambda m: -m.engine.last_used)

    def get_loaded(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    def memory(self) -> dict[str, ModelMemory]:
        """Per loaded model, what llama.cpp allocated for it (for /metrics)."""
        return {lm.name: lm.memory() for lm in self.loaded()}

    async def unload(self, name: str) -> bool:
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await self._unload(name)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for name in list(self._loaded):
            await self._unload(name)

    # ------------------------------------------------------------------ loading
    def _config(self, num_ctx: int | None, adapter: str | None) -> EngineConfig:
        s = self.settings
        return EngineConfig(
            n_ctx=num_ctx or s.num_ctx,
            n_parallel=s.num_parallel,
            n_threads=s.threads,
            max_queue=s.max_queue,
            lora=adapter,
        )

    async def _load(self, name: str, num_ctx: int | None) -> LoadedModel:
        # Store names only: a server must never load an arbitrary path a client names.
        manifest = await asyncio.to_thread(self.store.get, name)
        if manifest is None:
            raise ModelNotFound(name)
        cfg = self._config(num_ctx, manifest.adapter)
        async with self._global:
            await self._make_room(manifest.size)
            t0 = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self._build, manifest, cfg, name)
            except HerdError:
                raise
            except Exception as e:  # llama.cpp allocation failures, OS errors
                log.exception("loading %s failed", name)
                raise Unavailable(f"model '{name}' failed to load: {type(e).__name__}") from None
            # What llama.cpp allocated (weights, KV cache, compute buffers), as Ollama's
            # /api/ps "size" means it; the memory budget counts the same figure.
            lm = LoadedModel(name=name, engine=engine, manifest=manifest,
                             size=engine_memory(engine).total, keep_alive=self.settings.keep_alive,
                             load_seconds=time.perf_counter() - t0)
            self._loaded[name] = lm
            log.info("loaded %s in %.2fs", name, lm.load_seconds)
            return lm

    def _build(self, manifest, cfg: EngineConfig, name: str) -> Engine:
        from ..gguf import read_gguf

        read_gguf(manifest.path)  # validate before llama.cpp parses the file
        model = self._shared.get(manifest.path, cfg.n_gpu_layers)
        try:
            return Engine(model, cfg, name=name, own_model=False)
        except BaseException:
            self._shared.put(model)
            raise

    async def _make_room(self, incoming: int) -> None:
        """Evict idle models, oldest first, until the new one fits."""
        def over() -> bool:
            used = sum(m.size for m in self._loaded.values())
            return len(self._loaded) >= self.settings.max_loaded_models or used + incoming > self.budget

        while self._loaded and over():
            # A model handed out in the last moments may not have its request submitted
            # yet; evicting it would fail that request, so it counts as busy.
            now = time.monotonic()
            idle = [m for m in self._loaded.values() if not m.engine.busy and now - m.engine.last_used > _GRACE_S]
            if not idle:
                if len(self._loaded) >= self.settings.max_loaded_models:
                    raise Unavailable("all loaded models are busy and no more can be loaded; retry shortly")
                return  # over the memory budget but nothing idle: try anyway
            victim = min(idle, key=lambda m: m.engine.last_used)
            await self._unload(victim.name)

    async def _unload(self, name: str) -> bool:
        lm = self._loaded.pop(name, None)
        if lm is None:
            return False
        await asyncio.to_thread(self._teardown, lm)
        log.info("unloaded %s", name)
        return True

    def _teardown(self, lm: LoadedModel) -> None:
        lm.engine.close()
        self._shared.put(lm.engine.model)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for name, lm in list(self._loaded.items()):
                if lm.keep_alive < 0 or lm.engine.busy:
                    continue
                if now - lm.engine.last_used >= lm.keep_alive:
                    try:
                        await self.unload(name)
                    except Exception:  # keep reaping the others
                        log.exception("unloading %s failed", name)
