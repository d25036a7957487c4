"""The engine: one loaded model, one continuous-batching scheduler.

A single scheduler thread owns the llama.cpp context. Each step it builds one
``llama_batch`` holding

  * one token for every sequence that is decoding, and
  * a chunk of prompt tokens for sequences still prefilling (bounded, so a long
    prompt never stalls the other streams for more than one chunk),

runs one ``llama_decode``, samples every sequence that produced logits, and
hands the resulting events to the requests' handles. Requests join and leave
between steps. Sequences live in fixed *slots* (llama.cpp sequence ids); a
finished slot keeps its KV cells, and a new request reuses the slot whose
tokens share the longest prefix with its prompt (like llama-server), copies a
longer prefix another slot holds, or waits one step for a request admitted
with it to compute the prefix they share, then copies that: requests that
arrive together evaluate their common prefix once. The reused length is
reported as ``cached_tokens``.

Scoring requests (``prompt_logprobs_from`` with ``max_tokens=0``, for evals)
are prefill-only: logits only at the scored positions, never at the last
token; the distributions from the context's end on stay with the slot, so the
next choice after the same context evaluates only the tokens it does not share
with the previous one.

    submit() --> waiting queue --> slot --> prefill chunks --> decode --> FinishEvent
                 (bounded: QueueFull)        (interleaved with other sequences)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..chat_template import ChatTemplate
from ..errors import ContextOverflow, HerdError, InvalidRequest, QueueFull, Unavailable
from ..settings import default_threads
from . import grammar as _grammar
from .detok import StreamDecoder
from .runtime import ContextConfig, LlamaContext, LlamaModel, load_lora
from .sampling import Sampler, log_softmax, token_logprobs
from .types import (
    Capabilities,
    EngineConfig,
    EngineStats,
    FinishEvent,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenEvent,
    Usage,
)

log = logging.getLogger("openherd.engine")

Event = TokenEvent | FinishEvent


class RequestHandle:
    """The caller's side of one request: iterate events (sync or async), or cancel.

    Leaving the iteration early (``break``, a dropped HTTP stream cancelling the
    async generator) cancels the request, so its slot and KV are freed within
    one scheduler step.
    """

    def __init__(self, engine: Engine, req: GenerationRequest):
        self.engine = engine
        self.request = req
        self.cancelled = False
        self.finished = False
        self._events: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.submitted_at = time.perf_counter()

    # Scheduler side -------------------------------------------------------------
    def _push(self, ev: Event) -> None:
        with self._cond:
            self._events.append(ev)
            self._cond.notify()
            loop, wake = self._loop, self._wake
        if loop is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # loop closed: the consumer is gone
                self.cancelled = True

    # Consumer side --------------------------------------------------------------
    def cancel(self) -> None:
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.engine._notify()

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                with self._cond:
                    while not self._events:
                        self._cond.wait()
                    ev = self._events.popleft()
                if isinstance(ev, FinishEvent):
                    self.finished = True
                yield ev
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        with self._cond:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
        try:
            while True:
                self._wake.clear()
                with self._cond:
                    ev = self._events.popleft() if self._events else None
                if ev is None:
                    await self._wake.wait()
                    continue
                if isinstance(ev, FinishEvent):
                    self.finished = True
                yield ev
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.cancel()

    def result(self) -> tuple[str, FinishEvent]:
        """Block until done; return (text, finish)."""
        parts = []
        for ev in self:
            parts.append(ev.text)
            if isinstance(ev, FinishEvent):
                return "".join(parts), ev
        raise RuntimeError("stream ended without a FinishEvent")


@dataclass
class _Saved:
    """Distributions a scoring request computed, at consecutive positions of its slot.

    Every choice scored after the same context needs the distribution at the
    context's last position for its first token, and choices that begin alike
    (" 54", " 56" as " ", "5", ...) the ones after their common tokens too. Kept with
    the slot, a later choice reuses the context and those tokens instead of
    evaluating them again. The row at position p is valid while the slot keeps
    tokens[:p + 1].
    """

    start: int  # position of rows[0]
    rows: list[tuple[np.ndarray, int]]  # (log_softmax of the logits [n_vocab], its argmax) per position

    @property
    def end(self) -> int:
        return self.start + len(self.rows)


@dataclass
class _Slot:
    id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the cache, in order
    seq: _Seq | None = None
    last_used: float = 0.0
    saved: _Saved | None = None

    def keep(self, n: int) -> None:
        """Forget every cached token from position ``n`` on (the caller drops their KV)."""
        del self.tokens[n:]
        if self.saved is not None:
            del self.saved.rows[max(0, n - self.saved.start) :]
            if not self.saved.rows:
                self.saved = None

    def save(self, pos: int, logprobs: np.ndarray, argmax: int) -> None:
        """Keep the distribution computed at ``pos`` (a scored position of this slot's request)."""
        saved = self.saved
        if saved is None or pos != saved.end:
            self.saved = _Saved(pos, [(logprobs, argmax)])
        elif len(saved.rows) < _SAVED_ROWS:
            saved.rows.append((logprobs, argmax))


@dataclass
class _Seq:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    decoder: StreamDecoder
    constraint: object | None
    slot: _Slot | None = None
    pending: int | None = None  # sampled token not yet in the KV cache
    n_generated: int = 0
    cached: int = 0
    lp_from: int | None = None  # score prompt tokens from this index (evals)
    prompt_logprobs: list[tuple[float, bool]] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    # Parked: waiting for ``leader`` (admitted earlier, still prefilling) to have the first
    # ``wait_for`` prompt tokens, which this sequence shares, in its slot; then copied.
    leader: _Seq | None = None
    wait_for: int = 0

    @property
    def score_only(self) -> bool:
        """Prefill-only scoring (evals): logits are needed at the scored positions only."""
        return self.params.max_tokens == 0 and self.lp_from is not None and self.lp_from < len(self.prompt)

    @property
    def n_eval(self) -> int:
        """Prompt tokens to put through the model: all of them, except a scoring request's
        last token, whose logits would predict nothing that is scored."""
        return len(self.prompt) - 1 if self.score_only else len(self.prompt)

    @property
    def prefilling(self) -> bool:
        return self.slot is not None and self.leader is None and len(self.slot.tokens) < self.n_eval

    @property
    def reuse_limit(self) -> int:
        """Prompt tokens that may come from the cache: a position whose logits are needed
        (the last one, or the first scored one) must be evaluated."""
        limit = len(self.prompt) - 1
        return limit if self.lp_from is None else min(limit, self.lp_from - 1)

    def limit_in(self, slot: _Slot) -> int:
        """``reuse_limit`` for a prefix taken from ``slot``: further when the slot saved the
        distributions from this request's first scored position on (read by _use_saved)."""
        saved = slot.saved
        if self.score_only and saved is not None and saved.start <= self.lp_from - 1 < saved.end:
            return min(saved.end, self.n_eval)
        return self.reuse_limit

    @property
    def depth(self) -> int:
        """Steps before this sequence computes anything: the length of its chain of leaders."""
        d, t = 0, self.leader
        while t is not None:
            d, t = d + 1, t.leader
        return d


# Prefix sharing between slots (Engine._assign). On a CPU, a sequence waits for another to
# compute a prefix they share if that saves this many prompt tokens per llama_decode the wait
# adds (a call's fixed cost: graph build, thread wake-up, the weights streamed once more).
_MIN_WAIT_GAIN = 2
# Split KV: copy a prefix out of a slot only if the slot holds at most this many cells per
# token the copy saves (the copy moves all of the source's cells; see _copy_pays).
_COPY_CELLS_PER_TOKEN = 64
# Distributions a slot keeps for the next scoring request (_Saved): a multiple-choice answer's
# first few tokens; n_vocab floats each (0.2-0.5 MB for today's vocabularies).
_SAVED_ROWS = 4


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    # Vectorised compare: prompts are thousands of tokens and this runs per admission.
    x = np.asarray(a[:n], dtype=np.int32) != np.asarray(b[:n], dtype=np.int32)
    idx = int(np.argmax(x))
    return idx if x[idx] else n


class Engine:
    """The llama.cpp backend (openherd.engine.backend.Backend): everything, LoRA included."""

    kind = "llama.cpp"
    capabilities = Capabilities()

    def __init__(self, model: LlamaModel, config: EngineConfig, name: str = "", own_model: bool = True):
        self.config = config
        self.model = model
        self._own_model = own_model
        n_threads = config.n_threads or default_threads()
        self.n_threads = n_threads
        n_ctx_train = _n_ctx_train(model)
        self.n_ctx_seq = min(config.n_ctx, n_ctx_train) if n_ctx_train > 0 else config.n_ctx
        self.ctx = LlamaContext(
            model,
            ContextConfig(
                n_ctx=self.n_ctx_seq * config.n_parallel,
                n_seq_max=config.n_parallel,
                n_batch=config.n_batch,
                n_threads=n_threads,
                kv_unified=config.kv_unified,
            ),
        )
        self._lora = None
        if config.lora:
            self._lora = load_lora(model, config.lora)
            self.ctx.set_adapters([self._lora], [config.lora_scale])
        self.info: ModelInfo = model.info(name or os.path.basename(model.path), self.n_ctx_seq)
        self.template = ChatTemplate(self.info.chat_template, self.info.bos_text, self.info.eos_text)
        self._slots = [_Slot(i) for i in range(config.n_parallel)]
        # Tokens a wait for another sequence's prefix must save per llama_decode it adds
        # (_leader_for): on a CPU a call's fixed cost is that of a token or two of prompt;
        # on a GPU, where a prompt token in a batch is nearly free, of a hundred or more.
        self._wait_gain = _MIN_WAIT_GAIN if config.n_gpu_layers == 0 else 128
        self._recurrent = model.recurrent
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._active: list[_Seq] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = EngineStats()
        self._embed_ctx: LlamaContext | None = None
        self._embed_lock = threading.Lock()
        self.last_used = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"herd-sched-{self.info.name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str, config: EngineConfig | None = None, name: str = "") -> Engine:
        from ..gguf import read_gguf

        read_gguf(path)  # validate in Python before llama.cpp parses anything
        config = config or EngineConfig()
        model = LlamaModel(path, n_gpu_layers=config.n_gpu_layers)
        try:
            return cls(model, config, name=name)
        except BaseException:
            model.close()
            raise

    # ----------------------------------------------------------------- tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def token_piece(self, token: int) -> bytes:
        return self.model.piece(token)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, **extra) -> list[int]:
        """Render the model's template and tokenise, adding BOS only if the template didn't."""
        text = self.template.render(messages, tools=tools, add_generation_prompt=True, **extra)
        add_bos = self.info.add_bos and not (self.info.bos_text and text.startswith(self.info.bos_text))
        toks = self.model.tokenize(text, add_special=False, parse_special=True)
        return [self.info.bos] + toks if add_bos else toks

    # ----------------------------------------------------------------- requests
    def submit(self, req: GenerationRequest) -> RequestHandle:
        if self._closed:
            raise Unavailable("the model is unloading; retry")
        p = req.params
        n_prompt = len(req.prompt)
        if n_prompt == 0:
            raise InvalidRequest("the prompt is empty")
        bad = [t for t in req.prompt if not 0 <= t < self.info.n_vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.info.n_vocab - 1})")
        if n_prompt >= self.n_ctx_seq:
            raise ContextOverflow(
                f"the prompt has {n_prompt} tokens but the context window is {self.n_ctx_seq} tokens; "
                "shorten the prompt or raise the context size (num_ctx / --ctx)"
            )
        if p.max_tokens is not None and n_prompt + p.max_tokens > self.n_ctx_seq:
            raise ContextOverflow(
                f"this model's context window is {self.n_ctx_seq} tokens, but {n_prompt + p.max_tokens} were "
                f"requested ({n_prompt} in the prompt, {p.max_tokens} for the completion); "
                "reduce the prompt or max_tokens"
            )
        lp_from = req.prompt_logprobs_from
        if lp_from is not None and not 1 <= lp_from <= n_prompt:
            raise InvalidRequest("prompt_logprobs_from must be within the prompt")
        constraint = None
        if p.grammar is not None:
            constraint = _grammar.Constraint(p.grammar, self.model, self.info.n_vocab)
        handle = RequestHandle(self, req)
        seq = _Seq(
            handle=handle,
            prompt=list(req.prompt),
            params=p,
            sampler=Sampler(p, self.info.n_vocab, tuple(self.info.eog_tokens) if p.ignore_eos else ()),
            decoder=StreamDecoder(p.stop),
            constraint=constraint,
            lp_from=lp_from,
        )
        with self._cond:
            if len(self._waiting) >= self.config.max_queue + max(0, self._free_slots()):
                raise QueueFull(retry_after=max(1, len(self._waiting) // max(1, self.config.n_parallel)))
            self._waiting.append(seq)
            self._stats.requests += 1
            self._cond.notify()
        self.last_used = time.monotonic()
        return handle

    def submit_many(self, reqs: list[GenerationRequest]) -> list[RequestHandle]:
        """Submit every request under the scheduler's lock (it is re-entrant), so they are
        admitted in one step: a wave of scoring requests computes the prefix it shares once,
        and no request can finish and hand its slot to a stranger before its siblings are in.
        All or none: on an error the ones already queued are cancelled."""
        handles: list[RequestHandle] = []
        with self._cond:
            try:
                for r in reqs:
                    handles.append(self.submit(r))
            except BaseException:
                for h in handles:
                    h.cancel()
                raise
        return handles

    def generate(self, req: GenerationRequest) -> Iterator[Event]:
        return iter(self.submit(req))

    def loglikelihood(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log P(continuation | context) and whether it is the greedy continuation."""
        return self.score_many([(context, continuation)])[0]

    def score_many(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Prefill-only scoring of many (context, continuation) pairs, batched by the scheduler."""
        for ctx_toks, cont in pairs:
            if not ctx_toks or not cont:
                raise InvalidRequest("context and continuation must both be non-empty")
        out: list[tuple[float, bool]] = []
        wave = max(1, self.config.n_parallel + self.config.max_queue)  # what the queue bound admits
        for start in range(0, len(pairs), wave):
            handles = []
            # Admit the whole wave at once (the lock is re-entrant): otherwise a finished
            # request's slot goes to the next arrival before its siblings can reuse its prefix.
            with self._cond:
                for ctx_toks, cont in pairs[start : start + wave]:
                    req = GenerationRequest(prompt=ctx_toks + cont, params=SamplingParams(temperature=0, max_tokens=0),
                                            prompt_logprobs_from=len(ctx_toks))
                    handles.append(self.submit(req))
            for h in handles:
                _, fin = h.result()
                if fin.reason == "error":
                    raise Unavailable(fin.error or "scoring failed")
                lps = fin.prompt_logprobs
                out.append((float(sum(lp for lp, _ in lps)), all(g for _, g in lps)))
        return out

    def stats(self) -> EngineStats:
        with self._cond:
            s = EngineStats(**vars(self._stats))
            s.queue_depth = len(self._waiting)
            s.active = len(self._active)
        return s

    # ----------------------------------------------------------------- embeddings
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings from a dedicated embedding context.

        Pooling is mean over the sequence's last hidden states (llama.cpp
        LLAMA_POOLING_TYPE_MEAN): decoder-only chat models have no CLS token and
        last-token pooling is worse for retrieval with models not trained for it.
        """
        toks = [self.model.tokenize(t, add_special=True, parse_special=False) for t in texts]
        limit = self.config.embed_ctx
        for i, t in enumerate(toks):
            if len(t) > limit:
                raise ContextOverflow(f"input {i} has {len(t)} tokens; the embedding context is {limit} tokens")
            if not t:
                raise InvalidRequest(f"input {i} is empty", param="input")
        n_seq = 8
        with self._embed_lock:
            if self._embed_ctx is None:
                self._embed_ctx = LlamaContext(
                    self.model,
                    ContextConfig(n_ctx=limit, n_seq_max=n_seq, n_batch=limit, n_threads=self.n_threads,
                                  embeddings=True, pooling=1),
                )
            ec = self._embed_ctx
            out: list[list[float]] = []
            i = 0
            while i < len(toks):
                ec.clear()
                ec.batch.clear()
                group = []
                used = 0
                while i < len(toks) and len(group) < n_seq and used + len(toks[i]) <= limit:
                    s = len(group)
                    for pos, t in enumerate(toks[i]):
                        ec.batch.add(t, pos, s, True)
                    used += len(toks[i])
                    group.append(i)
                    i += 1
                rc = ec.decode()
                if rc != 0:
                    raise Unavailable(f"embedding failed (llama_decode returned {rc})")
                for s, _ in enumerate(group):
                    v = ec.embedding(s, self.info.n_embd).astype(np.float64)
                    norm = float(np.linalg.norm(v)) or 1.0
                    out.append((v / norm).tolist())
        self.last_used = time.monotonic()
        return out, sum(len(t) for t in toks)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._embed_ctx is not None:
            self._embed_ctx.close()
        self.ctx.close()
        _grammar.forget_model(self.model)
        if self._own_model:
            self.model.close()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._active)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def _free_slots(self) -> int:
        return sum(1 for s in self._slots if s.seq is None)

    # ----------------------------------------------------------------- scheduler
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self._step()
            except Exception as e:  # never let the scheduler die silently
                log.exception("scheduler step failed")
                self._fail_all(f"internal engine error: {type(e).__name__}")
        self._fail_all("the model was unloaded", reason="abort")

    def _fail_all(self, message: str, reason: str = "error") -> None:
        with self._cond:
            seqs = list(self._active) + list(self._waiting)
            self._waiting.clear()
        for s in seqs:
            self._finish(s, reason, error=message)

    def _admit(self) -> None:
        with self._cond:
            while self._waiting and any(sl.seq is None for sl in self._slots):
                s = self._waiting.popleft()
                if s.handle.cancelled:
                    self._push_finish(s, "abort")
                    continue
                self._assign(s)
                self._active.append(s)
                self._complete_scoring(s)

    def _assign(self, s: _Seq) -> None:
        """Give ``s`` a free slot and as much of its prompt's KV as the cache holds, or will hold.

        By preference, in tokens saved:
          * the free slot whose cached tokens share the longest prefix, reused in place (free);
          * a longer prefix that another slot (busy or idle) holds, copied (``_copy_pays``);
          * a longer prefix that a sequence admitted earlier is still prefilling: ``s`` is
            parked on that *leader* and copies the prefix once it is computed (``_unpark``).
            Requests admitted together (an eval wave, n choices of one prompt, users behind
            one system prompt) so evaluate their common prefix once, not once per slot.
        """
        free = [sl for sl in self._slots if sl.seq is None]
        if not self.config.prefix_cache:
            best = min(free, key=lambda sl: sl.last_used)
            best.seq, s.slot = s, best
            s.cached = self._trim(best, 0)
            s.t_admit = time.perf_counter()
            return
        best = max(free, key=lambda sl: (_lcp(sl.tokens, s.prompt), -sl.last_used))
        n_reuse = min(_lcp(best.tokens, s.prompt), s.limit_in(best))
        donor, n_donor = None, 0
        for sl in self._slots:
            if sl is not best and sl.tokens:
                n = min(_lcp(sl.tokens, s.prompt), s.limit_in(sl))
                if n > n_donor:
                    donor, n_donor = sl, n
        best.seq = s
        s.slot = best
        copy_now = donor is not None and self._copy_pays(len(donor.tokens), n_donor - n_reuse)
        s.leader, s.wait_for = self._leader_for(s, n_donor if copy_now else n_reuse)
        if copy_now and s.leader is None:
            n_reuse = self._copy(donor, best, n_donor)
        else:  # parked: the leader's prefix will be copied over this one anyway
            n_reuse = self._trim(best, n_reuse)
        s.cached = n_reuse
        s.t_admit = time.perf_counter()
        self._use_saved(s)

    def _leader_for(self, s: _Seq, have: int) -> tuple[_Seq | None, int]:
        """The prefilling sequence worth waiting for, and the prefix length to wait for.

        Each step a sequence waits adds a llama_decode to the batch it belongs to, so a
        leader that is itself parked (``depth``) must save proportionally more. Ties go
        to the earliest admitted: the shortest chain.
        """
        leader, wait_for, score = None, 0, -1
        for t in self._active:
            if t is s or not (t.prefilling or t.leader is not None):
                continue
            share = min(_lcp(t.prompt, s.prompt), s.reuse_limit, t.n_eval)
            depth = t.depth
            gain = share - have
            if gain < self._wait_gain * (depth + 1) or not self._copy_pays(len(t.prompt), gain):
                continue
            if share - self._wait_gain * depth > score:
                leader, wait_for, score = t, share, share - self._wait_gain * depth
        return leader, wait_for

    def _unpark(self) -> None:
        """Parked sequences whose leader now holds the shared prefix (or has stopped
        prefilling: finished, cancelled, failed) copy what it has and start prefilling.

        Runs before admission, so a leader that finished last step still has its tokens
        in its (now free) slot when its followers copy them.
        """
        for s in list(self._active):
            t = s.leader
            if t is None:
                continue
            src = t.slot
            working = src.seq is t and (t.prefilling or t.leader is not None)
            if working and len(src.tokens) < s.wait_for:
                continue
            s.leader = None
            n = min(_lcp(src.tokens, s.prompt), s.limit_in(src))
            have = len(s.slot.tokens)
            if n > have and self._copy_pays(len(src.tokens), n - have):
                s.cached = self._copy(src, s.slot, n)
                self._use_saved(s)
                self._complete_scoring(s)

    def _copy_pays(self, n_src: int, gain: int) -> bool:
        """Whether copying a prefix out of a slot holding ``n_src`` cells beats computing ``gain`` tokens."""
        if gain < 1 or self._recurrent:
            return False
        if self.config.kv_unified:
            return True  # the cells are shared, nothing is moved
        # Split KV moves the source's cells through host memory: on a CPU a token's KV copies
        # some 1000x faster than it computes; with GPU offload the two cost about the same.
        return self.config.n_gpu_layers == 0 and n_src <= _COPY_CELLS_PER_TOKEN * gain

    def _copy(self, src: _Slot, dst: _Slot, n: int) -> int:
        """Copy ``src``'s first ``n`` cells into ``dst``; the number of tokens ``dst`` now holds."""
        if self.ctx.copy_prefix(src.id, dst.id, n):
            dst.tokens = src.tokens[:n]
            saved = src.saved
            dst.saved = None if saved is None else _Saved(saved.start, list(saved.rows))
            dst.keep(n)
        else:
            log.warning("copying a cached prefix between sequences failed; computing it instead")
            dst.keep(0)
        return len(dst.tokens)

    def _trim(self, slot: _Slot, n: int) -> int:
        """Keep ``slot``'s first ``n`` cached tokens; the number kept."""
        if not self.ctx.seq_rm(slot.id, n, -1):  # partial removal can fail (recurrent state)
            self.ctx.seq_rm(slot.id, 0, -1)
            n = 0
        slot.keep(n)
        return n

    def _use_saved(self, s: _Seq) -> None:
        """A scoring request that reused its context and more takes the log-probabilities
        of the reused scored tokens from the distributions its slot saved (see _Saved)."""
        if not (s.score_only and s.cached >= s.lp_from and not s.prompt_logprobs):
            return
        saved = s.slot.saved
        if saved is None or not saved.start <= s.lp_from - 1 < s.cached <= saved.end:
            # No distributions to read them from: evaluate from the context's last token after all.
            s.cached = self._trim(s.slot, s.lp_from - 1)
            return
        for pos in range(s.lp_from - 1, s.cached):
            logprobs, argmax = saved.rows[pos - saved.start]
            nxt = s.prompt[pos + 1]
            s.prompt_logprobs.append((float(logprobs[nxt]), argmax == nxt))

    def _complete_scoring(self, s: _Seq) -> None:
        """Finish a scoring request that has every scored log-probability (never sampling)."""
        if s.score_only and s.leader is None and s.slot is not None and not s.prefilling:
            if len(s.prompt_logprobs) == len(s.prompt) - s.lp_from and not s.handle.cancelled:
                self._prompt_done(s, time.perf_counter())
                self._finish(s, "length")

    def _prompt_done(self, s: _Seq, now: float) -> None:
        s.t_first = now
        with self._cond:
            self._stats.prompt_tokens += len(s.prompt)
            self._stats.cached_tokens += s.cached

    def _step(self) -> None:
        self._unpark()
        self._admit()
        # Cancelled sequences leave before we spend compute on them.
        for s in [s for s in self._active if s.handle.cancelled]:
            self._finish(s, "abort")
        if not self._active:
            return
        batch = self.ctx.batch
        batch.clear()
        outputs: list[tuple[_Seq, int, int]] = []  # (seq, batch index, position)
        staged: list[tuple[_Seq, list[int]]] = []  # tokens to commit to slots once decode succeeds
        decoding = [s for s in self._active if s.pending is not None]
        for s in decoding:
            pos = len(s.slot.tokens)
            outputs.append((s, batch.add(s.pending, pos, s.slot.id, True), pos))
            staged.append((s, [s.pending]))
        budget = batch.free if not decoding else min(batch.free, self.config.prefill_chunk)
        n_prompt = 0
        for s in self._active:
            if budget <= 0:
                break
            if not s.prefilling:
                continue
            start = len(s.slot.tokens)
            chunk = s.prompt[start : min(s.n_eval, start + budget)]
            last = len(s.prompt) - 1
            for j, t in enumerate(chunk):
                pos = start + j
                want = pos == last or (s.lp_from is not None and pos >= s.lp_from - 1)
                idx = batch.add(t, pos, s.slot.id, want)
                if want:
                    outputs.append((s, idx, pos))
            staged.append((s, chunk))
            budget -= len(chunk)
            n_prompt += len(chunk)
        if batch.n == 0:
            return
        rc = self.ctx.decode()
        if rc != 0:
            self._recover_decode(rc, [s for s, _ in staged])
            return
        self._stats.steps += 1
        self._stats.evaluated_tokens += n_prompt
        for s, toks in staged:
            s.slot.tokens.extend(toks)
            if s in decoding:
                s.pending = None
        now = time.perf_counter()
        for s, idx, pos in outputs:
            if s.handle.cancelled or s.slot is None:
                continue
            if pos < len(s.prompt) - 1:  # a scored prompt position (evals)
                lp = log_softmax(self.ctx.logits(idx))
                nxt = s.prompt[pos + 1]
                best = int(np.argmax(lp))
                s.prompt_logprobs.append((float(lp[nxt]), best == nxt))
                if s.score_only:
                    s.slot.save(pos, lp, best)
                continue
            self._sample(s, idx, now)
        for s, _ in staged:
            self._complete_scoring(s)

    def _sample(self, s: _Seq, idx: int, now: float) -> None:
        p = s.params
        if s.n_generated == 0 and s.pending is None and s.t_first == 0.0:
            self._prompt_done(s, now)
        if p.max_tokens == 0:
            self._finish(s, "length")
            return
        raw = None
        if s.constraint is not None or p.logprobs is not None:
            logits = self.ctx.logits(idx)  # zero-copy: edits here are what the sampler sees
            raw = logits.copy() if p.logprobs is not None else None
            if s.constraint is not None:
                s.constraint.apply(logits)
        tok = s.sampler.sample(self.ctx.ptr, idx)
        lp = top = None
        if raw is not None:
            lp, top = token_logprobs(raw, tok, p.logprobs, self.model.piece)
        if s.constraint is not None:
            s.constraint.consume(tok)
        s.t_last = now
        if tok in self.info.eog_tokens and not p.ignore_eos:
            self._finish(s, "stop")
            return
        s.n_generated += 1
        self._stats.generated_tokens += 1
        piece = self.model.piece(tok)
        text = s.decoder.feed(piece)
        s.handle._push(TokenEvent(token=tok, text=text, logprob=lp, top_logprobs=top, bytes=piece))
        if s.decoder.stopped:
            self._finish(s, "stop")
        elif s.constraint is not None and s.constraint.done:
            self._finish(s, "stop")
        elif p.max_tokens is not None and s.n_generated >= p.max_tokens:
            self._finish(s, "length")
        elif len(s.slot.tokens) + 1 >= self.n_ctx_seq:
            self._finish(s, "length")
        else:
            s.pending = tok

    def _recover_decode(self, rc: int, seqs: list[_Seq]) -> None:
        """llama_decode failed: free idle cached prefixes and retry next step; if the
        cache is truly full, fail the longest sequence so the others continue."""
        for s in seqs:  # roll back any cells the failed batch may have written
            self.ctx.seq_rm(s.slot.id, len(s.slot.tokens), -1)
        idle = [sl for sl in self._slots if sl.seq is None and sl.tokens]
        if rc == 1 and idle:
            for sl in idle:
                self.ctx.seq_rm(sl.id, 0, -1)
                sl.keep(0)
            return
        victim = max(seqs, key=lambda s: len(s.slot.tokens))
        log.error("llama_decode returned %d; failing one sequence", rc)
        self._finish(victim, "error", error="out of KV cache space; retry with a shorter prompt" if rc == 1
                     else f"llama_decode failed ({rc})")

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        s.leader = None
        with self._cond:
            if s in self._active:
                self._active.remove(s)
            if s.slot is not None:
                s.slot.seq = None
                s.slot.last_used = time.monotonic()
                if reason == "error":
                    self.ctx.seq_rm(s.slot.id, 0, -1)
                    s.slot.keep(0)
        self._push_finish(s, reason, error)

    def _push_finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        tail = s.decoder.flush() if reason != "error" else ""
        t_end = s.t_last or time.perf_counter()
        usage = Usage(
            prompt_tokens=len(s.prompt),
            completion_tokens=s.n_generated,
            cached_tokens=s.cached,
            queue_ms=((s.t_admit or t_end) - s.handle.submitted_at) * 1000,
            prompt_ms=((s.t_first or t_end) - (s.t_admit or t_end)) * 1000,
            decode_ms=(t_end - (s.t_first or t_end)) * 1000,
        )
        fin = FinishEvent(reason=reason, usage=usage, text=tail, error=error, prompt_logprobs=s.prompt_logprobs)
        s.sampler.close()
        self.last_used = time.monotonic()  # keep_alive counts from the end of the last request
        s.handle._push(fin)


def _n_ctx_train(model: LlamaModel) -> int:
    import llama_cpp

    return int(llama_cpp.llama_model_n_ctx_train(model.ptr))


__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestHandle", "HerdError"]
