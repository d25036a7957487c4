"""PersonaRuntime: turn a persona and a conversation into an engine request.

What the server and `herd chat` call (the persona is a step in serving, never
inside the engine)::

    rt = PersonaRuntime(persona, acquire)            # acquire(name) -> Engine (or an awaitable of one)
    prep = await rt.prepare(messages, overrides)     # server; prepare_sync(...) in the terminal
    handle = prep.engine.submit(GenerationRequest(prompt=prep.prompt, params=prep.params))
    ... stream the answer ...
    tail = prep.footer(answer)                       # "\\n\\nSources: [1] lighthouse.md", or ""
    extension = prep.herd(answer)                    # the marked `herd` field: persona, sources, quarantined

``prepare`` builds one system message (the persona's prompt, then any system text
the client sent), the example dialogues, and the client's history, trimmed
oldest-first to fit the context, with the retrieved knowledge put into the last
user message; and the SamplingParams: the persona's defaults under whatever the
request set. What of the knowledge goes in is ``knowledge.context``
(openherd.personas.context): the few sentences of the retrieved passages that
best match the question, with the assistant turn primed by
``knowledge.answer_prefix`` (``sentences``, the default), or the passages whole
(``passages``); either way marked [1], [2], ... by passage.

Retrieval runs on the last user message. Before it, the knowledge index is
brought up to date (new or changed documents are ingested, keyed by content
hash, so this is a few SQL lookups when nothing changed) and missing dense
vectors are computed with the embedding engine (the served model itself, or
``knowledge.embedding_model``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..context import DROP_OLDEST, fit_messages
from ..engine.backend import Backend, load_backend, require
from ..engine.types import EngineConfig, FinishEvent, GenerationRequest, SamplingParams
from ..errors import ContextOverflow, InvalidRequest, StoreError
from ..settings import Settings
from .bundle import KnowledgeSource, Persona, PersonaStore
from .context import (
    ANSWER_INSTRUCTION,
    ContextConfig,
    Note,
    choose_notes,
    notes_question,
    rank_notes,
    render_notes,
)
from .knowledge import (
    KnowledgeIndex,
    Passage,
    SearchResult,
    SyncReport,
    chunker_id,
    cited_indices,
    render_context,
    with_context,
)

__all__ = ["PersonaAnswer", "PersonaRuntime", "PreparedChat", "model_key"]

log = logging.getLogger("openherd.personas")

Acquire = Callable[[str], Any]  # name -> Engine, or an awaitable of one (ModelManager.acquire)

DEFAULT_RESERVE = 512  # completion tokens kept free when the request sets no max_tokens


def model_key(engine: Backend) -> str:
    """Identifies the weights (and so the tokenizer and embedding space) of an engine:
    store blobs are named by their sha256, so the file name plus size is stable and
    changes whenever the model does."""
    info = engine.info
    return f"{os.path.basename(info.path)}:{info.size_bytes}"


def _text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


@dataclass
class PreparedChat:
    """Everything needed to run one persona turn on the engine."""

    persona: Persona
    engine: Backend  # the served model's runtime
    messages: list[dict[str, Any]]  # final messages (system + examples + history)
    prompt: list[int]  # engine.encode_chat(messages, tools)
    params: SamplingParams
    sources: list[Passage] = field(default_factory=list)  # placed in the prompt as [1], [2], ...
    quarantined: list[Passage] = field(default_factory=list)  # matched but withheld by the injection shield
    dropped_turns: int = 0  # oldest history messages left out to fit the context
    decisions: list[Any] = field(default_factory=list)  # safety.policy.Decision of the injection shield (audit log)
    notes: list[Note] = field(default_factory=list)  # knowledge.context=sentences: the units placed, in prompt order
    # Text the prompt ends with in the assistant's voice (knowledge.answer_prefix); the answer
    # continues it but does not contain it.
    answer_prefix: str = ""

    def cited(self, answer: str) -> list[Passage]:
        """The placed passages the answer rests on: the ones it cites as [n]; when it cites none
        (small models rarely do), the ones whose words it repeats most (attribute()); when it
        repeats none, all of them, since they were its context."""
        idx = cited_indices(answer, len(self.sources))
        if idx:
            return [self.sources[i - 1] for i in idx]
        return attribute(answer, self.sources) or list(self.sources)

    def footer(self, answer: str) -> str:
        """Text to append to the answer so the sources travel with it ('' without knowledge).
        Lists what the answer cites, or every passage it was given when it cites none."""
        if not self.sources:
            return ""
        used = self.cited(answer)
        return "\n\nSources: " + "; ".join(f"[{p.index}] {p.source.label}" for p in used)

    def herd(self, answer: str | None = None) -> dict[str, Any]:
        """openherd's extension field (``"herd"`` in responses): which persona answered and from what."""
        out: dict[str, Any] = {
            "persona": self.persona.name,
            "model": self.persona.served_model,
            "sources": [p.to_dict() for p in self.sources],
        }
        if answer is not None and self.sources:
            out["cited"] = cited_indices(answer, len(self.sources))
        if self.notes:
            out["notes"] = [{"index": n.passage.index, "text": n.text} for n in self.notes]
        if self.quarantined:
            out["quarantined"] = [p.to_dict() for p in self.quarantined]
        if self.dropped_turns:
            out["dropped_turns"] = self.dropped_turns
        return out


@dataclass
class PersonaAnswer:
    text: str  # the answer with its sources footer
    answer: str  # the model's text alone
    prepared: PreparedChat
    finish: FinishEvent


# One index object per knowledge.db per process: it caches the BM25 and dense matrices
# between requests, which is what makes retrieval cheap on the server.
_indexes: dict[str, KnowledgeIndex] = {}
_indexes_lock = threading.Lock()


def knowledge_index(path: Path) -> KnowledgeIndex:
    key = os.path.realpath(path)
    with _indexes_lock:
        idx = _indexes.get(key)
        if idx is None:
            idx = _indexes[key] = KnowledgeIndex(Path(path))
        return idx


def forget_index(path: Path) -> None:
    """Drop the cached index of a removed persona (the server calls this on DELETE)."""
    with _indexes_lock:
        idx = _indexes.pop(os.path.realpath(path), None)
    if idx is not None:
        idx.close()


class PersonaRuntime:
    def __init__(
        self,
        persona: Persona,
        acquire: Acquire,
        settings: Settings | None = None,
        *,
        store: PersonaStore | None = None,
        retrieval: str | None = None,  # hybrid | bm25 | dense; None = the persona's knowledge.retrieval
        context: ContextConfig | None = None,  # None = the persona's knowledge.context settings
    ):
        self.persona = persona
        self.acquire = acquire
        self.store = store or PersonaStore(settings)
        self.retrieval = retrieval or persona.knowledge.mode
        if self.retrieval not in ("hybrid", "bm25", "dense"):
            raise InvalidRequest(f"unknown retrieval mode {self.retrieval!r}; use hybrid, bm25 or dense")
        self.context = context or ContextConfig.of(persona.knowledge)

    # ------------------------------------------------------------------ engines

    async def _engines_async(self):
        engine = self.acquire(self.persona.served_model)
        if inspect.isawaitable(engine):
            engine = await engine
        embedder = engine
        if self._needs_embedder():
            embedder = self.acquire(self.persona.knowledge.embedding_model)
            if inspect.isawaitable(embedder):
                embedder = await embedder
        return engine, embedder

    def _needs_embedder(self) -> bool:
        k = self.persona.knowledge
        return bool(k.sources and k.embedding_model and self.retrieval != "bm25")

    def _engines_sync(self):
        engine = self.acquire(self.persona.served_model)
        if inspect.isawaitable(engine):
            raise TypeError("prepare_sync needs a synchronous acquire(); use `await prepare(...)`")
        embedder = engine
        if self._needs_embedder():
            embedder = self.acquire(self.persona.knowledge.embedding_model)
        return engine, embedder

    # ------------------------------------------------------------------ public

    async def prepare(self, messages: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None,
                      tools: list[dict] | None = None) -> PreparedChat:
        """The engine, final prompt and sampling for one request (server)."""
        engine, embedder = await self._engines_async()
        # Ingest, embedding and tokenising are CPU work: keep the event loop free.
        return await asyncio.to_thread(self.build, engine, messages, overrides, tools, embedder)

    def prepare_sync(self, messages: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None,
                     tools: list[dict] | None = None) -> PreparedChat:
        engine, embedder = self._engines_sync()
        return self.build(engine, messages, overrides, tools, embedder)

    def answer_sync(self, messages: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None) -> PersonaAnswer:
        """Prepare, generate to the end, and add the sources footer (tests, benchmarks)."""
        prep = self.prepare_sync(messages, overrides)
        text, fin = prep.engine.submit(GenerationRequest(prompt=prep.prompt, params=prep.params)).result()
        if fin.reason == "error":
            from ..errors import Unavailable

            raise Unavailable(fin.error or "generation failed")
        return PersonaAnswer(text=text + prep.footer(text), answer=text, prepared=prep, finish=fin)

    def sampling(self, overrides: Mapping[str, Any] | None = None) -> SamplingParams:
        """Persona defaults, then whatever the request set explicitly (None values don't count)."""
        values = self.persona.sampling.values()
        for k, v in (overrides or {}).items():
            if v is not None:
                values[k] = v
        return SamplingParams(**values)

    # ------------------------------------------------------------------ knowledge

    def _read(self, src: KnowledgeSource) -> bytes:
        path = self.store.knowledge_dir(self.persona.name) / src.file
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise StoreError(f"persona '{self.persona.name}' lists the document '{src.file}' but it is missing; "
                             f"remove it with `herd persona edit {self.persona.name} --remove-knowledge {src.file}`"
                             ) from None
        except OSError as e:
            raise StoreError(f"cannot read document '{src.file}' of persona '{self.persona.name}': "
                             f"{e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def index(self) -> KnowledgeIndex:
        return knowledge_index(self.store.knowledge_db(self.persona.name))

    def chunker(self, engine: Backend) -> str:
        k = self.persona.knowledge
        return chunker_id(model_key(engine), k.chunk_tokens, k.chunk_overlap)

    def sync(self, engine: Backend, embedder: Backend | None = None) -> SyncReport:
        """Bring the index up to date: ingest new/changed documents, embed what lacks vectors."""
        k = self.persona.knowledge
        with self.index().sync_lock:  # per index: concurrent requests of one persona ingest once
            report = self.index().sync(
                k.sources, self._read, _tokenizer(engine), model_key(engine), k.chunk_tokens, k.chunk_overlap)
            if embedder is not None and self.retrieval != "bm25":
                self.index().embed_missing(_embedder(embedder), model_key(embedder))
        for file, i, reasons in report.flagged:
            log.info("persona %s: chunk %d of %s looks like a prompt injection (%s); injection policy: %s",
                        self.persona.name, i, file, "; ".join(reasons[:2]), self.injection_mode())
        return report

    def injection_mode(self) -> str:
        """What happens to flagged passages: quarantine (the persona default), flag or off,
        from the persona's safety policy (openherd.safety.policy.SafetyPolicy.injection)."""
        policy = self.persona.safety
        return policy.injection if policy is not None else "quarantine"

    def retrieve(self, engine: Backend, query: str, embedder: Backend | None = None,
                 k: int | None = None) -> SearchResult:
        persona = self.persona
        if not persona.knowledge.sources or not query.strip():
            return SearchResult([], [])
        embedder = embedder or engine
        self.sync(engine, embedder)
        vector = None
        key = None
        if self.retrieval != "bm25":
            require(embedder, "embeddings")
            key = model_key(embedder)
            vector = _embedder(embedder)([query])[0]
        return self.index().search(query, persona.knowledge.sources, self.chunker(engine),
                                   k=k or persona.knowledge.top_k, query_vector=vector, model_key=key,
                                   mode=self.retrieval, min_score=persona.knowledge.min_score,
                                   include_flagged=self.injection_mode() != "quarantine",
                                   relative=persona.knowledge.relative_score)

    # ------------------------------------------------------------------ the prompt

    def build(self, engine: Backend, messages: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None,
              tools: list[dict] | None = None, embedder=None) -> PreparedChat:
        persona = self.persona
        params = self.sampling(overrides)
        client_system: list[str] = []
        history: list[dict[str, Any]] = []
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m:
                raise InvalidRequest("each message needs a role", param="messages")
            if m["role"] in ("system", "developer"):
                client_system.append(_text(m.get("content")))
            else:
                history.append(dict(m))
        query = next((_text(m.get("content")) for m in reversed(history) if m.get("role") == "user"), "")

        result = self.retrieve(engine, query, embedder) if query else SearchResult([], [])
        count = _counter(engine)
        n_ctx = engine.info.n_ctx
        reserve = params.max_tokens if params.max_tokens is not None else min(DEFAULT_RESERVE, n_ctx // 4)
        examples = [m for e in persona.examples for m in ({"role": "user", "content": e.user},
                                                           {"role": "assistant", "content": e.assistant})]
        passage_budget = persona.knowledge.max_context_tokens
        system = "\n\n".join(s for s in [persona.system.strip(), *[c.strip() for c in client_system]] if s)
        # Sentences mode scores every unit of the retrieved passages once; the loop below only
        # chooses within a budget that may shrink.
        sentences = self.context.mode == "sentences" and bool(result.passages)
        ranked = []
        if sentences:
            around = None
            if self.context.complete_units:
                around = self.index().neighbours([p.chunk for p in result.passages], self.chunker(engine))
            ranked = rank_notes(query, result.passages, embed=self._unit_embedder(engine, embedder), neighbours=around)
        while True:
            for p in result.passages:
                p.index = 0
            notes: list[Note] = []
            if sentences:
                notes = choose_notes(ranked, self.context.sentences, passage_budget, count)
                block, placed = render_notes(notes)
            else:
                block, placed = render_context(result.passages, passage_budget, count)
            head = ([{"role": "system", "content": system}] if system else []) + examples

            def encode(kept: list[dict[str, Any]], head=head, block=block, notes=notes) -> list[int]:
                asked = _ask_with(kept, block, notes=sentences)
                prompt = engine.encode_chat(head + asked, tools=tools) if tools else engine.encode_chat(head + asked)
                prefix = self._answer_prefix(notes, asked, tools, params)
                if prefix:
                    prompt = prompt + engine.tokenize(prefix, add_special=False, parse_special=False)
                return prompt

            # The one context policy (openherd.context): the oldest history turns go first; when the
            # last message alone does not fit, the examples go, then half the passages at a time.
            try:
                # reserve + 1: the answer's room and one token of slack, as this loop always kept.
                fitted = fit_messages(encode, history, n_ctx, reserve + 1, DROP_OLDEST)
                break
            except ContextOverflow:
                if examples:
                    examples = []
                    continue
                if placed and passage_budget > 64:
                    passage_budget //= 2
                    continue
                n_prompt = len(encode(history[-1:]))
            raise ContextOverflow(
                f"the conversation needs {n_prompt} tokens but persona '{persona.name}' has a context of "
                f"{n_ctx} tokens with {reserve} kept for the answer; shorten the message or lower max_tokens")
        asked = _ask_with(fitted.messages, block, notes=sentences)
        final = head + asked
        prompt, dropped = fitted.prompt, len(history) - len(fitted.messages)
        prefix = self._answer_prefix(notes, asked, tools, params)
        return PreparedChat(persona=persona, engine=engine, messages=final, prompt=prompt, params=params,
                            sources=placed, quarantined=result.quarantined, dropped_turns=dropped,
                            decisions=self._decisions(query, placed, result.quarantined), notes=notes,
                            answer_prefix=prefix)

    def _unit_embedder(self, engine: Backend, embedder: Backend | None):
        """Sentence scoring uses the retrieval's embedder, when retrieval uses one: a sentence
        encoder compares a question with one line as well as with a chunk, while a small chat
        model's mean-pooled vectors are noise (bench/RESULTS.md), so BM25 mode goes without."""
        if self.retrieval == "bm25":
            return None
        return _embedder(embedder or engine)

    def _answer_prefix(self, notes: list[Note], asked: list[dict[str, Any]], tools, params: SamplingParams) -> str:
        """knowledge.answer_prefix, when it applies: notes were placed in the last message, which
        the model answers (not a client-sent assistant prefix), and nothing constrains the output
        (tools or a grammar expect their own first tokens)."""
        prefix = self.context.answer_prefix
        if not prefix or not notes or tools or params.grammar is not None:
            return ""
        if not asked or asked[-1].get("role") != "user":
            return ""
        return prefix

    def _decisions(self, query: str, placed: list[Passage], quarantined: list[Passage]) -> list[Any]:
        """The injection shield's decisions, in safety.policy's shape, for the audit log."""
        mode = self.injection_mode()
        if mode == "off" or not query or not self.persona.knowledge.sources:
            return []
        from collections import Counter

        from ..safety.policy import Decision

        out = []
        for p in quarantined:
            out.append(Decision("input", "injection", "block", tuple(p.chunk.codes), dict(Counter(p.chunk.codes))))
        if mode == "flag":
            for p in placed:
                if p.chunk.flagged:
                    out.append(Decision("input", "injection", "flag", tuple(p.chunk.codes),
                                        dict(Counter(p.chunk.codes))))
        return out or [Decision("input", "injection", "allow")]


def _ask_with(history: list[dict[str, Any]], block: str, notes: bool = False) -> list[dict[str, Any]]:
    """History with the retrieved text put into its last user message (a copy; memory keeps the
    original): numbered passages before the question, or (notes) the notes before it and the
    instruction to answer in their words after it."""
    if not block:
        return history
    last = max(i for i, m in enumerate(history) if m.get("role") == "user")
    msg = dict(history[last])
    content = msg.get("content")
    if isinstance(content, list):  # content parts: the retrieved text goes into parts of its own
        if notes:
            msg["content"] = [{"type": "text", "text": block}, *content,
                              {"type": "text", "text": ANSWER_INSTRUCTION}]
        else:
            msg["content"] = [{"type": "text", "text": with_context("", block).rstrip()}, *content]
    else:
        msg["content"] = notes_question(_text(content), block) if notes else with_context(_text(content), block)
    return history[:last] + [msg] + history[last + 1:]


def attribute(answer: str, passages: Sequence[Passage], share: float = 0.6) -> list[Passage]:
    """Passages an uncited answer draws on, by word overlap: each passage scores the number
    of distinct content words (stemmed, stopwords out) it shares with the answer, and those
    within `share` of the best are kept. Crude but cheap, and right for the common case of
    an answer that restates a fact from one passage."""
    from .knowledge import lexical_terms

    words = set(lexical_terms(answer))
    if not words:
        return []
    scores = [len(words & set(lexical_terms(p.chunk.text))) for p in passages]
    best = max(scores, default=0)
    if best < 2:  # one shared word ("lighthouse") says nothing about where a fact came from
        return []
    return [p for p, sc in zip(passages, scores, strict=True) if sc >= share * best]


def _tokenizer(engine: Backend):
    return lambda text: engine.tokenize(text, add_special=False, parse_special=False)


def _counter(engine: Backend):
    return lambda text: len(engine.tokenize(text, add_special=False, parse_special=False))


EMBED_BATCH_TOKENS = 512  # llama.cpp's n_ubatch in the engine's embedding context


def _embedder(engine: Backend):
    """texts -> vectors through engine.embed, in calls of at most EMBED_BATCH_TOKENS tokens.

    Encoder models (BERT) must see every token of a llama_decode call in one
    micro-batch (n_ubatch, 512 in the engine's embedding context); llama.cpp aborts
    the process otherwise. Texts are cut to fit (a chunk is 192 tokens of the
    generation model, far below that, but an embedding tokenizer may count more).
    """

    def count(text: str) -> int:
        return len(engine.tokenize(text, add_special=True, parse_special=False))

    def embed(texts: list[str]) -> list[list[float]]:
        limit = EMBED_BATCH_TOKENS
        n_train = getattr(engine.info, "n_ctx_train", 0)
        if n_train:
            limit = min(limit, n_train)  # BERT-style encoders have 512 positions
        fitted: list[tuple[str, int]] = []
        for t in texts:
            t = t if t.strip() else "."
            n = count(t)
            if n > limit:
                toks = engine.tokenize(t, add_special=False, parse_special=False)
                keep = limit - (n - len(toks)) - 1  # room for the special tokens embed() adds
                t = engine.detokenize(toks[:keep])
                n = count(t)
                while n > limit and keep > 1:  # detokenize/tokenize need not round-trip exactly
                    keep -= 8
                    t = engine.detokenize(toks[:keep])
                    n = count(t)
            fitted.append((t, n))
        out: list[list[float]] = []
        group: list[str] = []
        used = 0
        for t, n in fitted:
            if group and used + n > limit:
                out += engine.embed(group)[0]
                group, used = [], 0
            group.append(t)
            used += n
        if group:
            out += engine.embed(group)[0]
        return out

    return embed


class LocalEngines:
    """An acquire() for the terminal: loads each model once, in-process, one sequence slot.
    `herd chat PERSONA` and `herd persona create --knowledge` use it; close() frees them."""

    def __init__(self, settings: Settings | None = None, progress=None, n_ctx: int | None = None):
        from ..settings import get_settings

        self.settings = settings or get_settings()
        self.progress = progress
        self.n_ctx = n_ctx
        self._engines: dict[str, Any] = {}

    def __call__(self, name: str):
        engine = self._engines.get(name)
        if engine is None:
            from ..store import Store

            manifest = Store(self.settings).ensure(name, progress=self.progress)
            cfg = EngineConfig(n_ctx=self.n_ctx or self.settings.num_ctx, n_parallel=1,
                               n_threads=self.settings.threads, max_queue=1, lora=manifest.adapter)
            engine = self._engines[name] = load_backend(manifest.path, cfg, name=manifest.name or name)
        return engine

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def __enter__(self) -> LocalEngines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def index_persona(persona: Persona, acquire: Acquire, store: PersonaStore | None = None) -> SyncReport:
    """Ingest and embed a persona's documents now (instead of on its first question)."""
    rt = PersonaRuntime(persona, acquire, store=store)
    if not persona.knowledge.sources:
        return SyncReport()
    engine, embedder = rt._engines_sync()
    return rt.sync(engine, embedder)
