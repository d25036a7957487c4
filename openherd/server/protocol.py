"""Request and response schemas of the HTTP APIs (pydantic).

Laid out like vLLM's ``protocol.py``: the OpenAI models in the order of OpenAI's
API reference (chat completions, completions, embeddings, models), then the
Ollama models in the order of Ollama's ``docs/api.md``. Fields that OpenAI does
not have are marked ``# extension``.

Validation lives here, as constraints on the fields, so that any out-of-range
value is a 400 with the offending ``param`` named (see ``validation_message``)
and never reaches the engine. Checks that span fields raise ``InvalidRequest``
with the param themselves (pydantic passes non-ValueErrors through unchanged). Unknown fields are ignored, as vLLM and Ollama do:
clients routinely send vendor extras (``user``, ``metadata``, ``store`` ...).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from ..errors import InvalidRequest
from ..untrusted import loads_json

MAX_N = 8  # choices per request; each is a sequence in the batch
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_STOP_LEN = 256  # chars per stop string; the detokenizer holds this much text back
MAX_LOGIT_BIAS = 1024  # entries; the sampler applies each one per token
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_EMBED_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
SEED_MAX = 2**63 - 1  # OpenAI accepts any int64


class _Request(BaseModel):
    # strict: "2" is not a number and true is not 1 (OpenAI's own validation agrees).
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------
# Validation errors -> one message with `param`
# ----------------------------------------------------------------------------

# pydantic puts union member tags into `loc` ("str", "list[str]", "function-after[...]").
_TAG = re.compile(r"^[a-z_-]+\[.*\]$|^(str|int|float|bool|list|dict|none|tagged-union|literal)$")


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """The first error of a ValidationError as (message, param), e.g.
    ("temperature: must be <= 2", "temperature")."""
    e = err.errors(include_url=False)[0]
    parts: list[str] = []
    for loc in e["loc"]:
        if isinstance(loc, int):
            parts.append(f"[{loc}]")
        elif not _TAG.match(str(loc)):
            parts.append(("." if parts else "") + str(loc))
    param = "".join(parts) or None
    msg = e["msg"]
    if msg.startswith(("Value error, ", "Assertion failed, ")):
        msg = msg.split(", ", 1)[1]
    if e["type"] == "missing":
        msg = "is required"
    elif e["type"] == "extra_forbidden":
        msg = "is not a known field"
    msg = msg[0].lower() + msg[1:] if msg else "is invalid"
    return (f"{param}: {msg}" if param else msg), param


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Bytes of a JSON body -> a validated request model, or InvalidRequest (400)."""
    # Depth, integer size, NaN and lone surrogates are refused by untrusted.loads_json (400).
    obj = loads_json(body, "request body") if body else None
    if not isinstance(obj, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise InvalidRequest(msg, param=param) from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
    if any(len(s) > MAX_STOP_LEN for s in v):
        raise ValueError(f"each stop sequence must be at most {MAX_STOP_LEN} characters")
    return [s for s in v if s]


def _logit_bias(v: Any) -> dict[int, float]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("must be an object mapping token ids to biases")
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed")
    out: dict[int, float] = {}
    for k, b in v.items():
        key = str(k)
        if not key.isdigit() or len(key) > 9:
            raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise ValueError(f"bias for token {key} must be a number in [-100, 100]")
        out[int(key)] = float(b)
    return out


# ============================================================================
# OpenAI: chat completions  (POST /v1/chat/completions)
# ============================================================================


class ContentPart(_Request):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type not in ("text", "refusal", "input_text"):
            raise ValueError(
                f"content parts of type {self.type!r} are not supported; this server takes text only"
            )
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


class FunctionCall(_Request):
    name: str = Field(max_length=256)
    arguments: str = Field(max_length=1_000_000)  # a JSON string, as the model produced it


class ToolCall(_Request):
    id: str = Field(default="", max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = Field(default=None, max_length=256)  # tool

    @model_validator(mode="after")
    def _check(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class FunctionDefinition(_Request):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = Field(default=None, max_length=100_000)
    parameters: dict[str, Any] | None = None  # a JSON schema; None = no arguments
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str = Field(max_length=64)


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(_Request):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    model: str = Field(min_length=1, max_length=300)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)  # deprecated by OpenAI, still universal
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    parallel_tool_calls: bool | None = True
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(default=None, ge=-SEED_MAX - 1, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    top_p: float | None = Field(default=1.0, ge=0.0, le=1.0)
    user: str | None = None
    # extension: samplers OpenAI does not expose (llama.cpp / vLLM semantics)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return _stop_list(v)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, v):
        return {str(k): b for k, b in _logit_bias(v).items()}

    @model_validator(mode="before")
    @classmethod
    def _reject_legacy_functions(cls, data):
        if isinstance(data, dict) and (data.get("functions") or data.get("function_call")):
            raise InvalidRequest(
                "'functions'/'function_call' are deprecated; use 'tools' and 'tool_choice'", param="functions"
            )
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise InvalidRequest("tool_choice requires 'tools'", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise InvalidRequest(
                    f"tool_choice names function {self.tool_choice.function.name!r}, which is not in 'tools'",
                    param="tool_choice",
                )
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise InvalidRequest("tool function names must be unique", param="tools")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(
                "response_format cannot be combined with a forced tool_choice", param="response_format"
            )
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --- chat completion responses ---


class TopLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobEntry]


class ChoiceLogprobs(_Response):
    content: list[LogprobEntry] | None
    refusal: list[LogprobEntry] | None = None


class ResponseFunctionCall(_Response):
    name: str
    arguments: str


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_empty_tool_calls(self, handler):
        d = handler(self)
        if d.get("tool_calls") is None:
            d.pop("tool_calls", None)
        return d


class ChatChoice(_Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def _drop_absent_herd(d: dict) -> dict:
    if d.get("herd") is None:
        d.pop("herd", None)
    return d


class ChatCompletion(_Response):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: UsageInfo
    # extension: persona and knowledge sources of the answer (left out when not a persona)
    herd: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _omit_herd(self, handler):
        return _drop_absent_herd(handler(self))


def _without_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class DeltaFunctionCall(_Response):
    name: str | None = None  # on a call's first delta only
    arguments: str | None = None  # "" on the first delta, then fragments

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return _without_none(handler(self))


class DeltaToolCall(_Response):
    """One piece of a streamed tool call. As OpenAI sends them, the first carries index,
    id, type and function.name (arguments ""); the rest only index and an arguments
    fragment, with the absent keys left out."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return _without_none(handler(self))


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    # OpenAI omits absent keys from deltas (`{"content": "x"}`, then `{}` at the end).
    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None = None


class ChatCompletionChunk(_Response):
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    # With stream_options.include_usage every chunk carries "usage": null and the last
    # one (choices: []) the totals; without it the key is left out (exclude={"usage"}).
    usage: UsageInfo | None = None
    # extension: on a persona's finish chunks, its persona and knowledge sources
    herd: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _omit_herd(self, handler):
        return _drop_absent_herd(handler(self))


# ============================================================================
# OpenAI: completions (legacy)  (POST /v1/completions)
# ============================================================================


class CompletionRequest(_Request):
    model: str = Field(min_length=1, max_length=300)
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    echo: bool | None = False
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI: <= 5; extension: 20
    max_tokens: int | None = Field(default=16, ge=0, le=2**31 - 1)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-SEED_MAX - 1, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, ge=0.0, le=1.0)
    user: str | None = None
    # extension
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return _stop_list(v)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, v):
        return {str(k): b for k, b in _logit_bias(v).items()}

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if len(v) > MAX_N * 16:
                raise ValueError(f"at most {MAX_N * 16} prompts per request")
            flat = [t for p in v for t in (p if isinstance(p, list) else [p])]
            if any(isinstance(t, int) and t < 0 for t in flat):
                raise ValueError("token ids must be non-negative")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("token prompts must not be empty")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise InvalidRequest("'suffix' (fill-in-the-middle) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidRequest("best_of must equal n: choices are returned, not ranked", param="best_of")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Normalise the four prompt shapes to a list of strings or token lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionLogprobs(_Response):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(_Response):
    finish_reason: Literal["stop", "length", "content_filter"] | None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(_Response):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    # extension: for a persona, its name, served model and knowledge sources (as in chat)
    herd: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _omit_herd(self, handler):
        return _drop_absent_herd(handler(self))


# ============================================================================
# OpenAI: embeddings  (POST /v1/embeddings)
# ============================================================================


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    model: str = Field(min_length=1, max_length=300)
    dimensions: int | None = Field(default=None, ge=1)
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, str):
            if not v:
                raise ValueError("must not be empty")
            return v
        if not v:
            raise ValueError("must not be empty")
        if len(v) > MAX_EMBED_INPUTS:
            raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request")
        for x in v:
            if isinstance(x, (str, list)) and not x:
                raise ValueError("inputs must not be empty")
            if isinstance(x, int) and x < 0 or isinstance(x, list) and any(t < 0 for t in x):
                raise ValueError("token ids must be non-negative")
        return v

    def inputs(self) -> list[str | list[int]]:
        v = self.input
        if isinstance(v, str):
            return [v]
        if all(isinstance(t, int) for t in v):
            return [list(v)]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]


class EmbeddingData(_Response):
    index: int
    embedding: list[float] | str  # str when encoding_format="base64"
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    data: list[EmbeddingData]
    model: str
    object: Literal["list"] = "list"
    usage: EmbeddingUsage


# ============================================================================
# OpenAI: models  (GET /v1/models, GET /v1/models/{id})
# ============================================================================


class ModelCard(_Response):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "openherd"  # "persona" for personas
    herd: dict[str, Any] | None = None  # extension: what a persona is built on

    @model_serializer(mode="wrap")
    def _omit_herd(self, handler):
        return _drop_absent_herd(handler(self))


class ModelList(_Response):
    data: list[ModelCard]
    object: Literal["list"] = "list"


# ============================================================================
# OpenAI: moderations  (POST /v1/moderations)
# ============================================================================

MAX_MODERATION_INPUTS = 32  # each input may cost a Llama Guard generation


class ModerationRequest(_Request):
    input: str | list[str]
    model: str | None = Field(default=None, min_length=1, max_length=300)  # a persona: its policy

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if len(v) > MAX_MODERATION_INPUTS:
                raise ValueError(f"at most {MAX_MODERATION_INPUTS} inputs per request")
        return v

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ============================================================================
# Ollama  (docs/api.md: generate, chat, tags, show, delete, pull, embed, ps, version)
# ============================================================================


class OllamaOptions(_Request):
    """Ollama's runtime `options`; the ones llama.cpp sampling has are mapped, the
    hardware ones (num_gpu, num_thread, use_mmap ...) are accepted and ignored
    because the server, not the request, owns the hardware."""

    num_ctx: int | None = Field(default=None, ge=1, le=2**24)
    num_predict: int | None = Field(
        default=None, ge=-2, le=2**31 - 1
    )  # -1 = unbounded, -2 = fill the context
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-SEED_MAX - 1, le=SEED_MAX)
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=2**24)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return _stop_list(v)


KeepAlive = float | int | str | None


class _OllamaBase(_Request):
    model: str = Field(min_length=1, max_length=300)
    options: OllamaOptions | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    stream: bool | None = True  # Ollama streams unless told otherwise
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("keep_alive")
    @classmethod
    def _ka(cls, v):
        parse_keep_alive(v)  # raise early, with the param named
        return v


class OllamaGenerateRequest(_OllamaBase):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[Annotated[int, Field(ge=0)]] | None = None
    raw: bool | None = False
    images: list[Any] | None = None
    think: bool | str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.images:
            raise InvalidRequest("images are not supported; this server serves text models", param="images")
        if self.suffix:
            raise InvalidRequest("'suffix' (fill-in-the-middle) is not supported", param="suffix")
        if self.template:
            raise InvalidRequest(
                "per-request 'template' overrides are not supported; the model's own template is used",
                param="template",
            )
        return self


class OllamaToolFunctionCall(_Request):
    name: str = Field(max_length=256)
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(_Request):
    function: OllamaToolFunctionCall


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.images:
            raise ValueError("images are not supported; this server serves text models")
        return self


class OllamaChatRequest(_OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=10_000)
    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    think: bool | str | None = None


class OllamaShowRequest(_Request):
    model: str = Field(min_length=1, max_length=300)
    verbose: bool | None = False

    @model_validator(mode="before")
    @classmethod
    def _name_alias(cls, data):
        # Older clients send {"name": ...}.
        if isinstance(data, dict) and "model" not in data and "name" in data:
            data = {**data, "model": data["name"]}
        return data


class OllamaDeleteRequest(OllamaShowRequest):
    pass


class OllamaPullRequest(OllamaShowRequest):
    insecure: bool | None = False
    stream: bool | None = True


class OllamaEmbedRequest(_Request):
    model: str = Field(min_length=1, max_length=300)
    input: str | list[str]
    truncate: bool | None = True
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if len(v) > MAX_EMBED_INPUTS:
                raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request")
        return v

    @field_validator("keep_alive")
    @classmethod
    def _ka(cls, v):
        parse_keep_alive(v)
        return v


class OllamaEmbeddingsRequest(_Request):
    """The legacy /api/embeddings."""

    model: str = Field(min_length=1, max_length=300)
    prompt: str = ""
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None

    @field_validator("keep_alive")
    @classmethod
    def _ka(cls, v):
        parse_keep_alive(v)
        return v


# --- keep_alive: Go durations ("5m", "1h30m", "300ms"), seconds, 0, negative ---

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
KEEP_FOREVER = -1.0  # the model manager's "never unload"
_KEEP_MAX = 10 * 365 * 86400.0  # longer than this is forever (and keeps expiry dates representable)


def parse_keep_alive(v: Any) -> float | None:
    """Ollama's keep_alive -> seconds. None = server default, 0 = unload when idle,
    KEEP_FOREVER (-1) = never unload (any negative value, as in Ollama)."""
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise ValueError("keep_alive must be a duration like '5m' or a number of seconds")
    if isinstance(v, (int, float)):
        if v != v:  # NaN
            raise ValueError("keep_alive must be a number of seconds")
        return KEEP_FOREVER if v < 0 or v > _KEEP_MAX else float(v)
    if not isinstance(v, str) or len(v) > 64:
        raise ValueError("keep_alive must be a duration like '5m' or a number of seconds")
    s = v.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    try:  # Ollama clients also send bare numbers as strings
        secs = float(s)
        if secs != secs or secs == float("inf"):
            raise ValueError
    except ValueError:
        pos, secs = 0, 0.0
        for m in _DURATION.finditer(s):
            if m.start() != pos:
                break
            secs += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise ValueError(
                f"keep_alive {v!r} is not a duration; use e.g. '5m', '1h', '30s', 0 or -1"
            ) from None
    return KEEP_FOREVER if (sign < 0 and secs > 0) or secs > _KEEP_MAX else secs
