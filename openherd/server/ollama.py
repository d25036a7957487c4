"""The Ollama API (``/api``): a translation over the native pipeline.

Not a second server: each handler maps Ollama's request shape (``options``,
``format``, ``keep_alive``, ``context``) into the same native request the OpenAI
layer builds (``pipeline.ChatRequest``, ``pipeline.PromptRequest``), and renders
the pipeline's steps as Ollama does: NDJSON lines while streaming (the default),
then a final object with ``done: true`` and Ollama's statistics in nanoseconds
(total_duration, load_duration, prompt_eval_count, prompt_eval_duration,
eval_count, eval_duration). Ollama's convention for an over-long conversation is
to drop the oldest turns and keep the system prompt (``openherd.context.DROP_OLDEST``).
The model store routes (tags, show, ps, pull, delete) are ``models.py``.

Errors are ``{"error": "message"}`` with the HTTP status (``app.py`` renders
them for every ``/api/`` path), which is what the official clients parse.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..context import DROP_OLDEST
from ..engine.backend import Backend
from ..engine.types import FinishEvent, GrammarSpec, SamplingParams, TokenEvent, Usage
from ..errors import InvalidRequest
from . import protocol as p
from .personas import Turn, find_persona
from .pipeline import (
    ChatRequest,
    ChoiceStream,
    Prepared,
    PromptRequest,
    finish_whole,
    prepare_chat,
    prepare_prompts,
    sampling,
    stream_choices,
)
from .serving import (
    EventStream,
    Generation,
    ServerState,
    check_dimensions,
    error_in_stream,
    request_id,
    run_unless_disconnected,
    start_generation,
)
from .tools import ParsedCall

router = APIRouter()

NDJSON = "application/x-ndjson"
# Reported by /api/version. Clients gate features on Ollama's version (e.g. tools
# need >= 0.3), so we report the Ollama API level we implement, plus our own.
OLLAMA_API_VERSION = "0.6.0"


def _state(request: Request) -> ServerState:
    return request.app.state.herd


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_time(ts: float | None) -> str:
    if ts is None:  # forever: Ollama reports a date centuries away
        return (datetime.now(UTC) + timedelta(days=365 * 100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def ndjson_line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


# ============================================================================
# Field mapping: options / format -> the native request
# ============================================================================


def _grammar(fmt) -> GrammarSpec | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return GrammarSpec("json")
    return GrammarSpec("json_schema", fmt)


_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
            "frequency_penalty")


def _sent(opts: p.OllamaOptions | None) -> dict:
    """The options the request set, as SamplingParams fields. Unset options keep llama.cpp's
    defaults, which SamplingParams' defaults already are (Ollama's are the same)."""
    o = opts or p.OllamaOptions()
    out = {k: getattr(o, k) for k in _OPTIONS if getattr(o, k) is not None}
    if o.seed is not None and o.seed >= 0:  # Ollama: -1 = random
        out["seed"] = o.seed % 2**32
    if o.num_predict is not None and o.num_predict >= 0:  # -1: no limit
        out["max_tokens"] = o.num_predict
    if o.stop:
        out["stop"] = list(o.stop)
    return out


def sampling_params(opts: p.OllamaOptions | None, fmt, logprobs: int | None, engine: Backend | None) -> SamplingParams:
    """Ollama options -> SamplingParams for a plain model (pipeline.sampling's one rule)."""
    return sampling({}, _sent(opts), engine, _grammar(fmt), logprobs)


def _logprobs(req) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


def _lp_entries(ev: TokenEvent) -> list[dict]:
    return [
        {
            "token": ev.bytes.decode("utf-8", errors="replace"),
            "logprob": ev.logprob if ev.logprob is not None else 0.0,
            "bytes": list(ev.bytes),
            "top_logprobs": [
                {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode("utf-8"))}
                for t in (ev.top_logprobs or [])
            ],
        }
    ]


def _stats(t0: float, load_s: float, fin: FinishEvent | None) -> dict:
    u = fin.usage if fin is not None else Usage()
    return {
        "total_duration": _ns(time.perf_counter() - t0),
        "load_duration": _ns(load_s),
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": int(u.prompt_ms * 1e6),
        "eval_count": u.completion_tokens,
        "eval_duration": int(u.decode_ms * 1e6),
    }


def _done_reason(finish: str) -> str:
    # Ollama has no "tool_calls": a turn that ends in calls is "stop".
    return "stop" if finish == "tool_calls" else finish


def _herd(obj: dict, herd: dict | None) -> dict:
    return {**obj, "herd": herd} if herd is not None else obj


async def _load_only(
    state: ServerState, model: str, keep_alive: float | None, t0: float, key: str, empty
) -> dict:
    """A request with nothing to generate loads (or, with keep_alive 0, unloads) the model;
    for a persona, the model it runs on."""
    persona = await find_persona(state, model)
    served = persona.served_model if persona is not None else model
    if keep_alive == 0:
        await state.unload(served)
        return {"model": model, "created_at": now_iso(), key: empty, "done_reason": "unload", "done": True}
    _, load_s = await state.engine(served, keep_alive=keep_alive)
    return {
        "model": model,
        "created_at": now_iso(),
        key: empty,
        "done_reason": "load",
        "done": True,
        "total_duration": _ns(time.perf_counter() - t0),
        "load_duration": _ns(load_s),
    }


def _refused(req: p.OllamaChatRequest | p.OllamaGenerateRequest, turn: Turn, t0: float) -> Response:
    """An input shield blocked the request: the refusal as the answer (the message of /api/chat,
    the response of /api/generate), done_reason "content_filter", no tokens spent."""
    chat = isinstance(req, p.OllamaChatRequest)
    key = "message" if chat else "response"

    def reply(text: str):
        return {"role": "assistant", "content": text} if chat else text

    final = _herd({
        "model": req.model,
        "created_at": now_iso(),
        key: reply(turn.refusal or ""),
        "done_reason": "content_filter",
        "done": True,
        **_stats(t0, 0.0, None),
    }, turn.herd())  # fmt: skip
    if req.stream is False:
        return JSONResponse(final)

    async def stream() -> AsyncIterator[str]:
        yield ndjson_line({"model": req.model, "created_at": final["created_at"], key: final[key], "done": False})
        yield ndjson_line({**final, key: reply("")})

    return EventStream(stream(), media_type=NDJSON)


# ============================================================================
# /api/chat
# ============================================================================


def _chat_messages(req: p.OllamaChatRequest) -> list[dict]:
    out = []
    for m in req.messages:
        d: dict = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            d["tool_calls"] = [
                {"type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls
            ]
        if m.role == "tool" and m.tool_name:
            d["name"] = m.tool_name
        out.append(d)
    return out


def native_chat(req: p.OllamaChatRequest, keep_alive: float | None) -> ChatRequest:
    opts = req.options or p.OllamaOptions()
    return ChatRequest(
        model=req.model,
        messages=_chat_messages(req),
        defaults={},
        sent=_sent(opts),
        grammar=_grammar(req.format),
        tools=[t.model_dump(exclude_none=True) for t in req.tools or []] or None,
        logprobs=_logprobs(req),
        context=DROP_OLDEST,  # Ollama: the oldest turns go, the system prompt stays
        keep_alive=keep_alive,
        num_ctx=opts.num_ctx,
    )


def _ollama_calls(calls: list[ParsedCall]) -> list[dict]:
    return [{"id": c.id, "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.OllamaChatRequest, await request.body())
    keep_alive = p.parse_keep_alive(req.keep_alive)
    if not req.messages:
        return JSONResponse(
            await _load_only(state, req.model, keep_alive, t0, "message", {"role": "assistant", "content": ""})
        )
    rid = request_id("chat")
    prep = await prepare_chat(state, native_chat(req, keep_alive), rid)
    if prep.turn.refusal is not None:
        return _refused(req, prep.turn, t0)
    gen = await start_generation(state, prep.engine, prep.jobs(), t0, rid)
    if req.stream is not False:
        return EventStream(_chat_stream(state, gen, req, prep, t0), media_type=NDJSON)

    async def collect() -> dict:
        [r] = await gen.collect()
        w = await finish_whole(state, prep.turn, prep.plan, r)
        await prep.turn.finish(state, w.decisions)
        message: dict = {"role": "assistant", "content": w.text}
        if w.calls:
            message["tool_calls"] = _ollama_calls(w.calls)
        out = {"model": req.model, "created_at": now_iso(), "message": message,
               "done_reason": _done_reason(w.finish), "done": True}
        if req.logprobs and w.shown:  # logprobs carry the tokens: not when a shield changed the text
            out["logprobs"] = [e for ev in r.events for e in _lp_entries(ev)]
        return _herd({**out, **_stats(t0, prep.load_s, r.finish)}, w.herd)

    return JSONResponse(await run_unless_disconnected(request, collect()))


async def _chat_stream(
    state: ServerState, gen: Generation, req: p.OllamaChatRequest, prep: Prepared, t0: float
) -> AsyncIterator[str]:
    """NDJSON lines of the pipeline's steps; each tool call goes out whole once complete."""

    def line(content: str, calls: list[ParsedCall] | None = None, lps: list | None = None) -> str:
        message: dict = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = _ollama_calls(calls)
        obj = {"model": req.model, "created_at": now_iso(), "message": message, "done": False}
        if lps is not None:
            obj["logprobs"] = lps
        return ndjson_line(obj)

    choice = ChoiceStream(prep.turn, prep.plan, incremental=False)
    try:
        async for _, step in stream_choices(state, gen, [choice]):
            if step.refusal is not None:
                yield line(step.refusal)
            lps = _lp_entries(step.token) if req.logprobs and step.token is not None else None
            if step.content or step.calls or lps:
                yield line(step.content, step.calls, lps)
            if step.last:
                final = {"model": req.model, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                         "done_reason": _done_reason(step.finish), "done": True,
                         **_stats(t0, prep.load_s, step.event)}
                yield ndjson_line(_herd(final, step.herd))
                return
    except Exception as e:
        yield ndjson_line({"error": error_in_stream(e).message})
    finally:
        gen.cancel()


# ============================================================================
# /api/generate: the pipeline with a raw prompt (or a one-turn conversation)
# ============================================================================


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.OllamaGenerateRequest, await request.body())
    keep_alive = p.parse_keep_alive(req.keep_alive)
    if not req.prompt and not req.context:
        return JSONResponse(await _load_only(state, req.model, keep_alive, t0, "response", ""))
    opts = req.options or p.OllamaOptions()
    rid = request_id("gen")
    persona = await find_persona(state, req.model)
    if persona is not None:
        _check_persona_generate(req, persona)
    native = PromptRequest(
        model=req.model, prompts=[req.prompt or ""], defaults={}, sent=_sent(opts), grammar=_grammar(req.format),
        logprobs=_logprobs(req), template=not req.raw, system=req.system or None, context=list(req.context or []),
        keep_alive=keep_alive, num_ctx=opts.num_ctx,
    )  # fmt: skip
    engine, load_s, [plan] = await prepare_prompts(state, native, persona, rid)
    turn = plan.turn
    if turn.refusal is not None:
        return _refused(req, turn, t0)
    prompt, params = plan.tokens, plan.params[0]
    gen = await start_generation(state, engine, [(prompt, params)], t0, rid)
    # A persona's prompt is its own (system prompt, examples, passages): it hands out no
    # token context, and takes none (see _check_persona_generate).
    with_context = persona is None

    if req.stream is not False:
        stream = _generate_stream(state, gen, req, engine, prompt, turn, t0, load_s, with_context)
        return EventStream(stream, media_type=NDJSON)

    async def collect() -> dict:
        [r] = await gen.collect()
        w = await finish_whole(state, turn, None, r)
        await turn.finish(state, w.decisions)
        out = {"model": req.model, "created_at": now_iso(), "response": w.text, "done": True,
               "done_reason": _done_reason(w.finish)}
        if with_context:  # what was sent, so redacted or withheld tokens never come back this way
            out["context"] = prompt + ([ev.token for ev in r.events] if w.shown else await _tokens_of(engine, w.text))
        out.update(_stats(t0, load_s, r.finish))
        if req.logprobs and w.shown:
            out["logprobs"] = [e for ev in r.events for e in _lp_entries(ev)]
        return _herd(out, w.herd)

    return JSONResponse(await run_unless_disconnected(request, collect()))


def _check_persona_generate(req: p.OllamaGenerateRequest, persona) -> None:
    if req.raw:
        raise InvalidRequest(
            f"persona '{persona.name}' cannot take a raw prompt: its system prompt and knowledge go "
            "through the chat template; leave out 'raw'",
            param="raw",
        )
    if req.context:
        raise InvalidRequest(
            f"persona '{persona.name}' keeps no token context; send the conversation as messages "
            "to /api/chat instead",
            param="context",
        )


async def _tokens_of(engine: Backend, text: str) -> list[int]:
    """The tokens of text the shields let through, for the returned context: the context must
    not hand back what they redacted or withheld."""
    return await run_in_threadpool(engine.tokenize, text, False, False) if text else []


async def _generate_stream(
    state: ServerState,
    gen: Generation,
    req: p.OllamaGenerateRequest,
    engine: Backend,
    prompt: list[int],
    turn: Turn,
    t0: float,
    load_s: float,
    with_context: bool,
) -> AsyncIterator[str]:
    """NDJSON lines of /api/generate, from the pipeline's steps; the final line hands back the
    token context of what was sent."""

    def line(text: str, lps: list | None = None) -> str:
        obj = {"model": req.model, "created_at": now_iso(), "response": text, "done": False}
        if lps is not None:
            obj["logprobs"] = lps
        return ndjson_line(obj)

    choice = ChoiceStream(turn, None)
    tokens: list[int] = []
    try:
        async for _, step in stream_choices(state, gen, [choice]):
            if step.refusal is not None:
                yield line(step.refusal)
            if not step.last:
                if step.token is not None:
                    tokens.append(step.token.token)
                lps = _lp_entries(step.token) if req.logprobs and step.token is not None else None
                if step.content or lps is not None:
                    yield line(step.content, lps)
                continue
            if step.content:
                yield line(step.content)
            obj = {"model": req.model, "created_at": now_iso(), "response": "", "done": True,
                   "done_reason": _done_reason(step.finish)}
            if with_context:  # what was sent, so redacted or withheld tokens never come back this way
                sent = step.refusal if step.refusal is not None else step.answer
                screened = choice.screen.guard is not None
                obj["context"] = prompt + (await _tokens_of(engine, sent) if screened else tokens)
            obj.update(_stats(t0, load_s, step.event))
            yield ndjson_line(_herd(obj, step.herd))
            return
    except Exception as e:
        yield ndjson_line({"error": error_in_stream(e).message})
    finally:
        gen.cancel()


# ============================================================================
# Embeddings: /api/embed, /api/embeddings (legacy)
# ============================================================================


def _embed(engine: Backend, texts: list[str], truncate: bool):
    limit = engine.config.embed_ctx
    if truncate:
        clipped = []
        for t in texts:
            toks = engine.tokenize(t, add_special=True, parse_special=False)
            clipped.append(engine.detokenize(toks[: limit - 1]) if len(toks) > limit else t)
        texts = clipped
    if any(not t for t in texts):
        raise InvalidRequest("inputs must not be empty", param="input")
    return engine.embed(texts)


@router.post("/api/embed")
async def embed(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.OllamaEmbedRequest, await request.body())
    opts = req.options or p.OllamaOptions()
    engine, load_s = await state.engine(
        req.model, keep_alive=p.parse_keep_alive(req.keep_alive), num_ctx=opts.num_ctx
    )
    check_dimensions(engine, req.dimensions)
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    vectors, n_tokens = await run_in_threadpool(_embed, engine, texts, req.truncate is not False)
    return JSONResponse(
        {
            "model": req.model,
            "embeddings": vectors,
            "total_duration": _ns(time.perf_counter() - t0),
            "load_duration": _ns(load_s),
            "prompt_eval_count": n_tokens,
        }
    )


@router.post("/api/embeddings")
async def embeddings(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.OllamaEmbeddingsRequest, await request.body())
    opts = req.options or p.OllamaOptions()
    engine, _ = await state.engine(
        req.model, keep_alive=p.parse_keep_alive(req.keep_alive), num_ctx=opts.num_ctx
    )
    check_dimensions(engine, None)
    if not req.prompt:
        return JSONResponse({"embedding": []})
    vectors, _ = await run_in_threadpool(_embed, engine, [req.prompt], True)
    return JSONResponse({"embedding": vectors[0]})


# ============================================================================
# /api/version, /
# ============================================================================


@router.get("/api/version")
async def version() -> Response:
    return JSONResponse({"version": OLLAMA_API_VERSION, "openherd": __version__})


@router.get("/")
@router.head("/")
async def root() -> Response:
    # Ollama answers "Ollama is running"; health checks written for it probe "/".
    return Response("openherd is running", media_type="text/plain")
