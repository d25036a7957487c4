"""The models `herd eval` can evaluate: anything the store or a persona serves.

    with open_model("smollm2") as lm:            # a store name (catalog aliases are pulled)
    with open_model("./model.gguf") as lm:       # a GGUF file
    with open_model("my-tuned-model") as lm:     # a LoRA-tuned store model: base + adapter
    with open_model("glim") as lm:               # a persona: its system prompt, examples and knowledge
        result = run_task(lm, task)

Each object implements ``runner.LanguageModel``, lm-evaluation-harness's three
request types, on the native engine API:

* ``loglikelihood``: prefill-only scoring, ``Engine.score_many``'s requests
  (never generation). Requests are grouped by context and scored in *waves*: the
  first wave scores one continuation of each of up to ``n_parallel`` contexts,
  one per sequence slot; every later wave scores the next continuation of the
  same contexts, and the engine puts each request back in the slot that holds
  its context (longest-prefix slot reuse), so a shared context is evaluated
  once, not once per choice, while every wave still fills one batch. Within the
  first wave the engine computes the prefix its contexts share (the task's
  description, common few-shot examples) in one slot and copies it into the
  others before they go on, and a later choice reads the log-probabilities of
  its first token (and of any it shares with the choice before) from the
  distributions that choice left with the slot: each token is evaluated about
  once (bench/eval.py: within 3% of that minimum on basics-mc, below one request
  per choice).
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows, all windows of
  all texts scored together.
* ``generate``: every request submitted at once (up to the engine's queue), so
  the continuous-batching scheduler decodes them together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.backend import Backend, load_backend, require
from ..engine.types import EngineConfig
from ..errors import ContextOverflow, InvalidRequest, Unavailable


@dataclass
class EvalModelConfig:
    n_ctx: int = 2048  # context per sequence (clamped to the model's); longer prompts are left-truncated
    n_parallel: int = 16  # sequences scored or decoded together: one wave of contexts per batch
    n_batch: int = 512  # tokens per llama_decode
    n_threads: int = 0  # 0 = HERD_THREADS, else the physical cores
    adapter: str | None = None  # a LoRA GGUF applied on top (a tuned candidate not yet in the store)

    def __post_init__(self):
        if self.n_ctx < 16:
            raise InvalidRequest("--ctx must be at least 16 tokens")
        if not 1 <= self.n_parallel <= 256:
            raise InvalidRequest("--parallel must be between 1 and 256")
        if self.n_batch < 1:
            raise InvalidRequest("n_batch must be positive")


# ---------------------------------------------------------------- engine helpers


def fit_pair(context: list[int], continuation: list[int], n_ctx: int) -> tuple[list[int], list[int]]:
    """Left-truncate the context so context + continuation fits one sequence, as lm-eval does.

    The engine needs the whole prompt below the context size (it evaluates the
    last token too), so at most ``n_ctx - 1`` tokens; at least one context token
    must stay to condition the first continuation token on.
    """
    room = n_ctx - 1
    if len(continuation) > room - 1:
        raise ContextOverflow(
            f"a continuation of {len(continuation)} tokens does not fit the {n_ctx}-token context; "
            "raise --ctx or shorten the choice"
        )
    return context[-(room - len(continuation)) :], continuation


def score_pairs(
    engine, pairs: Sequence[tuple[list[int], list[int]]], width: int | None = None
) -> list[tuple[float, bool]]:
    """(sum log P(continuation | context), is_greedy) for every pair, prefill-only and batched.

    Identical pairs are scored once. Contexts are sorted by their tokens, so
    contexts that share a prefix (the description, the same few-shot examples)
    are neighbours: within a block the engine computes what they share once and
    copies it into the other slots, and a block's first wave finds that prefix
    in the slots the previous block left behind and evaluates only the rest.

    Numerics: the same settings give the same numbers, run after run. Against
    scoring each pair alone they can differ in float rounding where a batch
    changes how llama.cpp splits the work (which matmul kernel, which ubatch a
    long prompt's tokens land in); GGUFs with quantized weights re-quantize the
    activations of every layer, which turns such rounding into differences of
    up to a few tenths of a nat on a single choice (on basics-mc 3-shot with the
    Q4_1 default model; identical numbers at 0-shot, where every wave fits one
    llama_decode; ~1e-3 nats with f32 weights). The engine's split (per-sequence)
    KV cache is kept: it shares a wave's prefix by copying the cells, values
    bit-identical and at the same cell indices as if each slot had computed them,
    so sharing moves no number. llama.cpp's unified cache would share the cells
    without a copy, but there a sequence's result depends on where other
    sequences' cells lie (0.6 nats and 2 changed answers of 20 on basics-mc 0-shot).
    """
    width = width or _n_parallel(engine)
    by_ctx: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for ctx, cont in pairs:
        conts = by_ctx.setdefault(tuple(ctx), [])
        if tuple(cont) not in conts:
            conts.append(tuple(cont))
    contexts = sorted(by_ctx)
    scored: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, bool]] = {}
    for start in range(0, len(contexts), width):
        block = contexts[start : start + width]
        depth = max(len(by_ctx[c]) for c in block)
        for k in range(depth):
            wave = [(c, by_ctx[c][k]) for c in block if k < len(by_ctx[c])]
            results = score_wave(engine, [(list(c), list(x)) for c, x in wave])
            for key, res in zip(wave, results, strict=True):
                scored[key] = res
    return [scored[(tuple(c), tuple(x))] for c, x in pairs]


def score_wave(engine: Backend, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """``Backend.score_many`` for one wave, admitted by the scheduler as a whole.

    The same requests as score_many (prompt = context + continuation, logprobs
    from the continuation's first position, ``max_tokens=0``: prefill only), and
    like it, all of them reach the scheduler's queue before it admits any
    (``Backend.submit_many``). Admitted in one step, the
    wave's requests wait for the one that computes the prefix they share instead
    of each computing it (``Engine._assign``), and no request finishes and gives
    up its slot, with the context a later choice needs, before the rest arrive.
    """
    from ..engine.types import GenerationRequest, SamplingParams

    requests = []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise InvalidRequest("context and continuation must both be non-empty")
        requests.append(
            GenerationRequest(
                prompt=list(ctx) + list(cont),
                params=SamplingParams(temperature=0, max_tokens=0),
                prompt_logprobs_from=len(ctx),
            )
        )
    require(engine, "score")
    handles = []
    out = []
    try:
        handles = engine.submit_many(requests)
        for h in handles:
            _, fin = h.result()
            if fin.reason == "error":
                raise Unavailable(f"scoring failed: {fin.error}")
            lps = fin.prompt_logprobs
            out.append((float(sum(lp for lp, _ in lps)), all(g for _, g in lps)))
    finally:
        for h in handles[len(out) :]:  # an error: free whatever is still queued or running
            h.cancel()
    return out


def generate_all(engine: Backend, prompts: Sequence[list[int]], params: Sequence[Any]) -> list[str]:
    """Submit every request (a sliding window as deep as the engine's queue) and collect the texts in order."""
    from ..engine.types import GenerationRequest

    window = max(1, engine.config.n_parallel + engine.config.max_queue)
    handles: dict[int, Any] = {}
    out: list[str] = []
    submitted = 0
    try:
        for i in range(len(prompts)):
            while submitted < len(prompts) and submitted - i < window:
                handles[submitted] = engine.submit(
                    GenerationRequest(prompt=prompts[submitted], params=params[submitted])
                )
                submitted += 1
            text, fin = handles.pop(i).result()
            if fin.reason == "error":
                raise Unavailable(f"generation failed: {fin.error}")
            out.append(text)
    finally:
        for h in handles.values():  # an error above: free the slots of what is still running
            h.cancel()
    return out


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``.

    Every token is predicted exactly once, each window with as much preceding
    text as fits: (context, continuation) pairs whose continuations tile ``tokens``.
    """
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    out = [([prefix], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        out.append((tokens[end - max_len - 1 : predicted], tokens[predicted:end]))
        predicted = end
    return out


def _n_parallel(engine: Backend) -> int:
    return max(1, engine.config.n_parallel)


def _prefix_token(engine: Backend) -> int:
    """lm-eval's prefix_token_id: BOS, or EOS for models without one."""
    info = engine.info
    bos = getattr(info, "bos", -1)
    return bos if bos is not None and bos >= 0 else info.eos


def _sampling(req, base: dict | None = None):
    from ..engine.types import SamplingParams

    # Plain temperature sampling (no top-p/top-k/min-p truncation) unless the caller says otherwise:
    # greedy at 0, the unmodified distribution above it, as pass@k estimates assume.
    values = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, **(base or {})}
    values.update(temperature=req.temperature, max_tokens=req.max_tokens, seed=req.seed)
    values["stop"] = list(dict.fromkeys([*values.get("stop", []), *req.stop]))
    return SamplingParams(**values)


# ---------------------------------------------------------------- the engine as a LanguageModel


class EngineLM:
    """`LanguageModel` over an ``openherd.engine.Engine``.

    Tokenisation follows lm-eval's HF models: the tokenizer's own special-token
    convention (BOS where the model adds one), context and continuation encoded
    together and split at the context's length, trailing spaces of the context
    moved to the continuation so BPE merges across the boundary match training.
    """

    chat = False  # prompts are raw text (see PersonaLM for chat-formatted ones)

    def __init__(self, engine: Backend, name: str):
        self.engine = engine
        self.name = name

    @property
    def n_ctx(self) -> int:
        return self.engine.info.n_ctx

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=special, parse_special=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:  # lm-eval: an empty context is the prefix token (BOS) alone
            cont = self.encode(continuation, special=False)
            prefix = _prefix_token(self.engine)
            return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs, empty = [], set()
        for i, (context, continuation) in enumerate(requests):
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:  # nothing to score: log 1 = 0, and trivially greedy
                empty.add(i)
                continue
            pairs.append(fit_pair(ctx, cont, self.n_ctx))
        scores = iter(score_pairs(self.engine, pairs))
        return [(0.0, True) if i in empty else next(scores) for i in range(len(requests))]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        # Windows are n_ctx - 2 tokens: the engine evaluates a window's prompt
        # (max_len + 1 tokens with its one context token) below n_ctx. The text is
        # tokenised without BOS; BOS is the prefix every first token is conditioned on.
        max_len = self.n_ctx - 2
        prefix = _prefix_token(self.engine)
        pairs, spans = [], []
        for text in texts:
            windows = rolling_windows(self.encode(text, special=False), prefix, max_len)
            spans.append((len(pairs), len(windows), sum(len(c) for _, c in windows)))
            pairs += windows
        scores = score_pairs(self.engine, pairs)
        return [(sum(s[0] for s in scores[a : a + n]), n_tok) for a, n, n_tok in spans]

    def generate(self, requests: Sequence) -> list[str]:
        prompts, params = [], []
        for req in requests:
            prompt = self.encode(req.prompt) or [_prefix_token(self.engine)]
            keep = self.n_ctx - req.max_tokens - 1  # lm-eval: left-truncate to leave room for the answer
            if keep < 1:
                raise ContextOverflow(
                    f"max_tokens={req.max_tokens} leaves no room for the prompt in the {self.n_ctx}-token context; raise --ctx"
                )
            prompts.append(prompt[-keep:])
            params.append(_sampling(req))
        return generate_all(self.engine, prompts, params)


# ---------------------------------------------------------------- personas


class PersonaLM:
    """`LanguageModel` for a persona: every prompt goes through ``PersonaRuntime``.

    The task's context becomes the user message; the runtime adds the persona's
    system prompt, retrieved knowledge and example dialogues and renders the
    model's chat template, so the score is the persona's, not the bare model's.
    ``chat = True`` makes the runner drop the target delimiter before choices,
    as lm-eval does with a chat template (the answer starts the assistant turn).
    Perplexity and HumanEval are raw-text measures and use the persona's
    served model (with its adapter) directly.
    """

    chat = True

    def __init__(self, runtime, engine: Backend, name: str):
        self.runtime = runtime
        self.engine = engine
        self.name = name
        self.raw = EngineLM(engine, name)

    def _prompt(self, context: str, overrides: dict | None = None):
        return self.runtime.prepare_sync([{"role": "user", "content": context}], overrides or {})

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        longest = max((len(c) for _, c in requests), default=1)
        prompts: dict[str, list[int]] = {}
        pairs, empty = [], set()
        for i, (context, continuation) in enumerate(requests):
            if context not in prompts:
                # Reserve room for the continuation: the runtime trims history/passages to fit.
                prompts[context] = self._prompt(
                    context, {"max_tokens": min(longest + 8, self.raw.n_ctx // 2)}
                ).prompt
            cont = self.raw.encode(continuation, special=False)
            if not cont:
                empty.add(i)
                continue
            pairs.append(fit_pair(prompts[context], cont, self.raw.n_ctx))
        scores = iter(score_pairs(self.engine, pairs))
        return [(0.0, True) if i in empty else next(scores) for i in range(len(requests))]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        return self.raw.loglikelihood_rolling(texts)

    def generate(self, requests: Sequence) -> list[str]:
        prompts, params = [], []
        for req in requests:
            prep = self._prompt(req.prompt, {"max_tokens": req.max_tokens, "temperature": req.temperature})
            prompts.append(prep.prompt)
            persona_defaults = {k: v for k, v in vars(prep.params).items() if k in _PERSONA_KEEP}
            params.append(_sampling(req, persona_defaults))
        return generate_all(self.engine, prompts, params)


# What a persona's sampling defaults may change in a scored run: penalties and its own
# stop strings. Temperature, max_tokens and seed are the task's (greedy, reproducible).
_PERSONA_KEEP = ("repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty", "stop")


# ---------------------------------------------------------------- opening models


class OpenModel:
    """A LanguageModel and the engines behind it; close() (or ``with``) frees them."""

    def __init__(self, lm, engines: dict[str, Backend]):
        self.lm = lm
        self.engines = engines  # model -> engine; a persona may load its embedding model lazily

    @property
    def name(self) -> str:
        return self.lm.name

    def close(self) -> None:
        while self.engines:
            self.engines.popitem()[1].close()

    def __enter__(self):
        return self.lm

    def __exit__(self, *exc) -> None:
        self.close()


def engine_config(config: EvalModelConfig, lora: str | None) -> EngineConfig:
    from ..settings import get_settings

    return EngineConfig(
        n_ctx=config.n_ctx,
        n_parallel=config.n_parallel,
        n_batch=config.n_batch,
        n_threads=config.n_threads or get_settings().threads,
        # Generation keeps the queue this deep; scoring submits one wave (<= n_parallel) at a time.
        max_queue=4 * config.n_parallel,
        lora=lora,
        kv_unified=False,  # split KV: batching and prefix sharing perturb scores least (see score_pairs)
    )


def load_engine(name_or_path: str, config: EvalModelConfig) -> tuple[Backend, str]:
    """(engine, display name) for a store name, catalog alias or .gguf path, with any adapter."""
    from ..store import Store

    manifest = Store().ensure(name_or_path)
    adapters = [a for a in (manifest.adapter, config.adapter) if a]
    if len(adapters) > 1:
        raise InvalidRequest(
            f"'{name_or_path}' is already a tuned model with an adapter; pass its base model "
            "to evaluate another adapter on it"
        )
    lora = adapters[0] if adapters else None
    if lora and not os.path.isfile(lora):
        raise InvalidRequest(f"adapter file {lora} does not exist")
    name = manifest.name or os.path.basename(manifest.path)
    engine = load_backend(manifest.path, engine_config(config, lora), name=name)
    if config.adapter:
        name = f"{name}+{os.path.basename(config.adapter)}"
    return engine, name


def open_model(name_or_path: str, config: EvalModelConfig | None = None) -> OpenModel:
    """A store name, catalog alias, .gguf path or persona, ready to evaluate.

    Store models win over personas of the same name, as in the server.
    """
    config = config or EvalModelConfig()
    persona = None
    if not name_or_path.endswith(".gguf") and "/" not in name_or_path:
        from ..personas.bundle import PersonaStore

        persona = PersonaStore().lookup(name_or_path)
    if persona is None:
        engine, name = load_engine(name_or_path, config)
        return OpenModel(EngineLM(engine, name), {name: engine})
    return _open_persona(persona, config)


def _open_persona(persona, config: EvalModelConfig) -> OpenModel:
    from ..personas.runtime import PersonaRuntime

    if config.adapter:
        raise InvalidRequest(f"'{persona.name}' is a persona; its adapter comes from the persona itself")
    engines: dict[str, Backend] = {}

    def acquire(model: str):
        if model not in engines:
            engines[model] = load_engine(model, config)[0]
        return engines[model]

    try:
        engine = acquire(persona.served_model)
        runtime = PersonaRuntime(persona, acquire)
        return OpenModel(PersonaLM(runtime, engine, persona.name), engines)
    except BaseException:
        for e in engines.values():
            e.close()
        raise
