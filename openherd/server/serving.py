"""What both HTTP front ends share: the native engine calls, instrumented.

The OpenAI layer (``openai.py``) and the Ollama layer (``ollama.py``) are
translations: each turns its request into token prompts and
``SamplingParams``, calls ``start_generation`` here, and renders the events it
gets back in its own wire format. Everything with consequences lives here once:

* model names are checked before the manager sees them (a request can never
  make the server open a file path);
* the n sequences of a request are submitted together and cancelled together,
  whatever ends the response (done, client gone, server error);
* time to first token and inter-token latency are measured per stream;
* a client that disconnects from a non-streaming request cancels its
  sequences (``run_unless_disconnected``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.backend import Backend, RequestStream, require
from ..engine.types import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from ..errors import HerdError, InvalidRequest, ModelNotFound, Unavailable
from ..settings import Settings
from ..store.manifest import name_candidates, validate_name
from .metrics import Metrics
from .moderation import Shields

if TYPE_CHECKING:
    from ..engine.manager import ModelManager

log = logging.getLogger("openherd.server")

SEED_SPACE = 2**32  # llama.cpp's dist sampler takes a uint32 seed


class ClientGone(Exception):
    """The client disconnected before the response was ready; nothing to send."""


@dataclass
class ServerState:
    """Everything a request handler needs, hung on ``app.state.herd``."""

    settings: Settings
    manager: ModelManager  # loads, shares and evicts the engines
    metrics: Metrics = field(default_factory=Metrics)
    started_at: float = field(default_factory=time.time)
    shields: Shields | None = None  # the global safety policy and audit log (None: from the settings)
    _store: Any = None

    def __post_init__(self):
        if self.shields is None:
            self.shields = Shields(self.settings)
        # The shields run Llama Guard on this server's engines, through this completion.
        self.shields.bind(self.guard_complete, lambda: self.store)

    @property
    def store(self):
        if self._store is None:
            self._store = getattr(self.manager, "store", None)
            if self._store is None:
                from ..store import Store

                self._store = Store(self.settings)
        return self._store

    async def engine(self, name: str, keep_alive: float | None = None,
                     num_ctx: int | None = None) -> tuple[Backend, float]:
        """The loaded engine for a registered *store name* and the seconds spent
        loading it (0 when it was already loaded).

        Only names in the store are served: never a path, and never a name that
        merely happens to be a file in the server's working directory (the store's
        resolve() accepts those, for the CLI). "x" and "x:latest" are one model, so
        the manager is always asked for the stored name: one engine, not two."""
        validate_name(name)
        t0 = time.perf_counter()
        key = next((c for c in name_candidates(name) if self.manager.get_loaded(c) is not None), None)
        already = key is not None
        if key is None:
            manifest = await run_in_threadpool(self.store.get, name)
            if manifest is None:
                raise ModelNotFound(name)
            key = manifest.name
        engine = await self.manager.acquire(key, keep_alive=keep_alive, num_ctx=num_ctx)
        return engine, (0.0 if already else time.perf_counter() - t0)

    async def unload(self, name: str) -> None:
        validate_name(name)
        for c in name_candidates(name):
            await self.manager.unload(c)

    async def guard_complete(self, model: str, prompt: str, max_tokens: int) -> str:
        """Greedy decoding of `prompt` (special tokens parsed: it carries <|begin_of_text|> and
        the header tokens itself) on the guard model's engine."""
        t0 = time.perf_counter()
        engine, _ = await self.engine(model)
        tokens = await run_in_threadpool(engine.tokenize, prompt, False, True)
        params = SamplingParams(temperature=0.0, top_k=0, min_p=0.0, top_p=1.0, max_tokens=max_tokens)
        gen = await start_generation(self, engine, [(tokens, params)], t0, request_id("guard"))
        [result] = await gen.collect()
        return result.text

    def engine_stats(self) -> dict[str, Any]:
        return {lm.name: lm.engine.stats() for lm in self.manager.loaded()}


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def seeds(seed: int | None, n: int) -> list[int | None]:
    """Per-choice seeds: choice i uses seed+i, so n choices differ but each is reproducible."""
    if seed is None:
        return [None] * n
    return [(seed + i) % SEED_SPACE for i in range(n)]


def check_token_ids(engine: Backend, tokens: list[int], param: str) -> None:
    n_vocab = engine.info.n_vocab
    for t in tokens:
        if not 0 <= t < n_vocab:
            raise InvalidRequest(
                f"token id {t} is outside this model's vocabulary (0..{n_vocab - 1})", param=param
            )


def check_dimensions(engine: Backend, dimensions: int | None) -> None:
    """The embedding routes' `dimensions`: accepted only as the model's own size (no truncation)."""
    require(engine, "embeddings")
    if dimensions is not None and dimensions != engine.info.n_embd:
        raise InvalidRequest(
            f"this model's embeddings have {engine.info.n_embd} dimensions; 'dimensions' cannot change that",
            param="dimensions",
        )


# ----------------------------------------------------------------------------
# Generation: the sequences of one request
# ----------------------------------------------------------------------------


@dataclass
class ChoiceResult:
    """One finished sequence, accumulated (non-streaming responses)."""

    text: str
    events: list[TokenEvent]
    finish: FinishEvent


class Generation:
    """The sequences of one HTTP request: submitted together, iterated as one
    merged stream of (index, event), cancelled together."""

    def __init__(self, state: ServerState, model: str, handles: list[RequestStream], t0: float):
        self.state = state
        self.model = model
        self.handles = handles
        self.t0 = t0
        self._last_token: list[float | None] = [None] * len(handles)
        self._finished = [False] * len(handles)

    def cancel(self) -> None:
        """Cancel every sequence still running (the engine frees each within one step)."""
        for i, h in enumerate(self.handles):
            if not self._finished[i]:
                self._finished[i] = True
                h.cancel()
                self.state.metrics.sequences.inc(self.model, "cancelled")

    def cancel_one(self, i: int) -> None:
        """Cancel sequence i alone (an output shield stopped that choice); its abort
        FinishEvent still arrives and ends its part of ``events()``."""
        if not self._finished[i]:
            self.handles[i].cancel()

    def _observe(self, i: int, ev: TokenEvent | FinishEvent) -> None:
        m = self.state.metrics
        now = time.perf_counter()
        if isinstance(ev, TokenEvent):
            last = self._last_token[i]
            if last is None:
                m.ttft.observe(now - self.t0, self.model)
            else:
                m.itl.observe(now - last, self.model)
            self._last_token[i] = now
            return
        self._finished[i] = True
        u = ev.usage
        m.prompt_tokens.inc(self.model, value=u.prompt_tokens)
        m.completion_tokens.inc(self.model, value=u.completion_tokens)
        m.cached_tokens.inc(self.model, value=u.cached_tokens)
        m.sequences.inc(self.model, ev.reason)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
        """Every event of every sequence, in arrival order; ends after the last FinishEvent.
        Leaving early (break, cancellation, an exception) cancels all sequences."""
        try:
            if len(self.handles) == 1:
                async for ev in self.handles[0]:
                    self._observe(0, ev)
                    yield 0, ev
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, handle) -> None:
                try:
                    async for ev in handle:
                        queue.put_nowait((i, ev))
                except BaseException as e:  # surface it to the consumer, never lose it
                    queue.put_nowait((i, e))
                    raise

            tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
            try:
                remaining = len(self.handles)
                while remaining:
                    i, ev = await queue.get()
                    if isinstance(ev, BaseException):
                        raise ev
                    self._observe(i, ev)
                    yield i, ev
                    if isinstance(ev, FinishEvent):
                        remaining -= 1
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            self.cancel()

    async def collect(self) -> list[ChoiceResult]:
        texts: list[list[str]] = [[] for _ in self.handles]
        events: list[list[TokenEvent]] = [[] for _ in self.handles]
        finishes: list[FinishEvent | None] = [None] * len(self.handles)
        async for i, ev in self.events():
            texts[i].append(ev.text)
            if isinstance(ev, TokenEvent):
                events[i].append(ev)
            else:
                finishes[i] = ev
        out = []
        for t, e, f in zip(texts, events, finishes, strict=True):
            assert f is not None
            raise_for_finish(f)
            out.append(ChoiceResult("".join(t), e, f))
        return out


def raise_for_finish(fin: FinishEvent) -> None:
    """An engine-side failure of one sequence -> a HerdError for the HTTP layer."""
    if fin.reason == "error":
        raise Unavailable(f"generation failed: {fin.error or 'engine error'}")
    if fin.reason == "abort":
        raise Unavailable(f"generation was interrupted: {fin.error or 'cancelled'}; retry")


async def start_generation(
    state: ServerState,
    engine: Backend,
    jobs: list[tuple[list[int], SamplingParams]],
    t0: float,
    rid: str = "",
) -> Generation:
    """Submit every (prompt, params) job; all or none (QueueFull/ContextOverflow on
    any job cancels the ones already queued). Metrics are labelled with the engine's
    own (stored) name, never a client-supplied string."""
    handles: list[RequestStream] = []

    def submit_all() -> None:
        for i, (prompt, params) in enumerate(jobs):
            handles.append(
                engine.submit(GenerationRequest(prompt=prompt, params=params, request_id=f"{rid}/{i}"))
            )

    try:
        if any(p.grammar is not None for _, p in jobs):
            # Compiling a grammar (and, once per model, llguidance's view of the
            # vocabulary) takes milliseconds to a second: keep it off the event loop.
            await run_in_threadpool(submit_all)
        else:
            submit_all()
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return Generation(state, engine.info.name, handles, t0)


# ----------------------------------------------------------------------------
# Client disconnects
# ----------------------------------------------------------------------------


async def _until_disconnected(receive: Receive) -> None:
    # Once the body has been read, the server's receive() only returns when the
    # client goes away (or the response is complete).
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (which cancels the
    engine sequences through Generation.events' finally) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientGone()


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its body generator, so a stream that
    ends for any reason (client gone mid-send, server shutting down) runs the
    generator's ``finally`` and cancels its sequences at once rather than at GC."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose: Callable[[], Awaitable[None]] | None = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def error_in_stream(exc: BaseException) -> HerdError:
    """An exception raised after a stream has started: log unexpected ones, and turn
    them into a HerdError whose message is safe to send."""
    if isinstance(exc, HerdError):
        return exc
    log.error("error while streaming a response", exc_info=exc)
    return HerdError("internal server error while generating; see the server log")
