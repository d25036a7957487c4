"""The native engine API: the one set of types every front end speaks.

The CLI, the OpenAI layer and the Ollama layer all translate their requests
into a ``GenerationRequest`` and read back ``TokenEvent``s and one final
``FinishEvent``. Nothing here knows about HTTP or terminals.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import InvalidRequest


@dataclass
class GrammarSpec:
    """A constraint applied to one sequence by constrained decoding (llguidance).

    kind:
      "json"         any JSON object (OpenAI json_object / Ollama format="json")
      "json_schema"  ``value`` is a JSON schema dict
      "lark"         ``value`` is a Lark grammar string (llguidance dialect)
      "regex"        ``value`` is a regular expression
    """

    kind: str
    value: Any = None

    def __post_init__(self):
        if self.kind not in ("json", "json_schema", "lark", "regex"):
            raise InvalidRequest(f"unknown grammar kind {self.kind!r}")


@dataclass
class SamplingParams:
    # Defaults follow llama.cpp / Ollama so `herd run` feels the same as peers.
    temperature: float = 0.8  # 0 = greedy (argmax)
    top_p: float = 0.95  # nucleus; 1.0 disables
    top_k: int = 40  # 0 disables
    min_p: float = 0.05  # 0 disables
    repeat_penalty: float = 1.0  # llama.cpp-style multiplicative penalty; 1.0 disables
    repeat_last_n: int = 64  # window the penalties look back over
    frequency_penalty: float = 0.0  # OpenAI semantics, -2..2
    presence_penalty: float = 0.0  # OpenAI semantics, -2..2
    seed: int | None = None  # same seed + same prompt => same output
    max_tokens: int | None = None  # None = until EOS or the context is full
    stop: list[str] = field(default_factory=list)  # stop strings; never included in output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> additive bias
    logprobs: int | None = None  # None: off; k>=0: chosen token logprob plus top-k alternatives
    grammar: GrammarSpec | None = None
    ignore_eos: bool = False  # benchmarks only

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "top_logprobs must be in [0, 20]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequest(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationRequest:
    prompt: list[int]  # token ids, already templated and tokenised
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    # Evals: return log P(prompt[i] | prompt[:i]) for i >= this index (prefill only,
    # never through generation); see FinishEvent.prompt_logprobs.
    prompt_logprobs_from: int | None = None


@dataclass
class TopLogprob:
    token: int
    text: str
    logprob: float


@dataclass
class TokenEvent:
    """One sampled token and the text it completes.

    ``text`` may be "" when the token ends mid-way through a UTF-8 character or
    could still start a stop string; the held-back text arrives with a later event
    (or the FinishEvent), so concatenating every ``text`` gives the full output.
    """

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None
    bytes: bytes = b""  # raw bytes of this token's piece (OpenAI logprobs 'bytes')


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_ms: float = 0.0  # time spent evaluating the prompt
    decode_ms: float = 0.0  # time from first to last generated token
    queue_ms: float = 0.0  # time waiting for a free sequence slot

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class FinishEvent:
    reason: str  # "stop" (EOS or stop string), "length" (max_tokens or context), "abort", "error"
    usage: Usage
    text: str = ""  # any held-back text flushed at the end
    error: str | None = None
    prompt_logprobs: list[tuple[float, bool]] = field(default_factory=list)  # (logprob, is_greedy) per scored token


@dataclass
class ModelInfo:
    name: str
    path: str
    architecture: str
    n_ctx: int  # context available to one sequence
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    n_layer: int
    n_params: int
    size_bytes: int
    bos: int
    eos: int
    eog_tokens: frozenset[int]  # every end-of-generation token (eos, eot, <|im_end|>, ...)
    add_bos: bool
    bos_text: str
    eos_text: str
    chat_template: str | None
    description: str


@dataclass
class EngineConfig:
    n_ctx: int = 4096  # context per sequence (clamped to the model's training context)
    n_parallel: int = 8  # sequences decoded together (llama.cpp sequence ids)
    n_threads: int = 0  # 0 = settings.default_threads()
    n_batch: int = 512  # max tokens per llama_decode
    prefill_chunk: int = 256  # prompt tokens per step while other sequences decode
    max_queue: int = 64  # waiting requests before QueueFull
    lora: str | None = None  # GGUF LoRA adapter applied to every sequence of this engine
    lora_scale: float = 1.0
    n_gpu_layers: int = 0  # layers offloaded to a GPU build of llama.cpp
    embed_ctx: int = 2048  # context of the lazily created embedding context
    # A prefix shared between slots (n>1 choices, users behind one system prompt, an eval
    # wave) is computed once either way: unified KV shares its cells (seq_cp, free), split
    # KV copies them (LlamaContext.copy_prefix) and decodes ~15% faster on CPU when prompts
    # differ, its numbers independent of the other sequences' cells.
    kv_unified: bool = False
    # Reuse KV cells across requests (a finished slot's tokens, a prefix another slot holds or
    # is computing). Off, every request evaluates its whole prompt, as llama.cpp's server with
    # cache_prompt=false or vLLM without enable_prefix_caching do: results then never depend
    # on what ran before, at the price of recomputing shared prefixes (bench/eval.py).
    prefix_cache: bool = True

    def __post_init__(self):
        if self.n_ctx < 16:
            raise InvalidRequest("context size must be at least 16 tokens")
        if not 1 <= self.n_parallel <= 256:
            raise InvalidRequest("n_parallel must be between 1 and 256")
        if self.n_batch < 1 or self.prefill_chunk < 1:
            raise InvalidRequest("n_batch and prefill_chunk must be positive")
        if self.max_queue < 0:
            raise InvalidRequest("max_queue must be >= 0")


@dataclass
class EngineStats:
    queue_depth: int = 0
    active: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0  # llama_decode calls
    evaluated_tokens: int = 0  # prompt tokens put through llama_decode (the rest came from the cache)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond plain generation and tokenizing."""

    grammar: bool = True  # constrained decoding (json_object, json_schema, forced tool calls)
    logprobs: bool = True  # per-token log-probabilities and top alternatives
    embeddings: bool = True  # embed(): /v1/embeddings, /api/embed, dense retrieval
    lora: bool = True  # LoRA adapters applied to the weights
    score: bool = True  # prompt log-likelihoods (score_many): evals

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]
