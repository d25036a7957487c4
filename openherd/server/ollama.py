"""The Ollama API (``/api``) as a translation layer over the native engine.

Not a second server: each handler translates Ollama's request shape (``options``,
``format``, ``keep_alive``, ``context``) into the same token prompts and
``SamplingParams`` the OpenAI layer produces, starts a ``Generation`` through
``serving``, and renders the events as Ollama does: NDJSON lines while
streaming (the default), then a final object with ``done: true`` and Ollama's
statistics in nanoseconds (total_duration, load_duration, prompt_eval_count,
prompt_eval_duration, eval_count, eval_duration).

Errors are ``{"error": "message"}`` with the HTTP status (``app.py`` renders
them for every ``/api/`` path), which is what the official clients parse.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..engine.types import FinishEvent, GrammarSpec, SamplingParams, TokenEvent, Usage
from ..errors import HerdError, InvalidRequest, ModelNotFound
from ..store.manifest import validate_name
from . import protocol as p
from .personas import Turn, begin_turn, find_persona, list_personas, screen_turn
from .serving import (
    EventStream,
    Generation,
    ServerState,
    check_token_ids,
    error_in_stream,
    raise_for_finish,
    request_id,
    run_unless_disconnected,
    start_generation,
)
from .tools import ParsedCall, ToolCallParser, detect_format, prepare_messages

router = APIRouter()

NDJSON = "application/x-ndjson"
# Reported by /api/version. Clients gate features on Ollama's version (e.g. tools
# need >= 0.3), so we report the Ollama API level we implement, plus our own.
OLLAMA_API_VERSION = "0.6.0"


def _state(request: Request) -> ServerState:
    return request.app.state.herd


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _iso(ts: float | None) -> str:
    if ts is None:  # forever: Ollama reports a date centuries away
        return (datetime.now(UTC) + timedelta(days=365 * 100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


# ============================================================================
# options / format -> SamplingParams
# ============================================================================


def _grammar(fmt) -> GrammarSpec | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return GrammarSpec("json")
    return GrammarSpec("json_schema", fmt)


def sampling_params(opts: p.OllamaOptions | None, fmt, logprobs: int | None, engine) -> SamplingParams:
    """Ollama options -> SamplingParams. Unset options keep llama.cpp's defaults,
    which SamplingParams' defaults already are (Ollama's are the same)."""
    o = opts or p.OllamaOptions()
    kw: dict = {}
    for src, dst in (
        ("temperature", "temperature"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("repeat_penalty", "repeat_penalty"),
        ("repeat_last_n", "repeat_last_n"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ):
        v = getattr(o, src)
        if v is not None:
            kw[dst] = v
    if kw.get("top_p") == 0.0:
        kw["top_p"], kw["temperature"] = 1.0, 0.0
    if o.seed is not None and o.seed >= 0:  # Ollama: -1 = random
        kw["seed"] = o.seed % 2**32
    if o.num_predict is not None and o.num_predict >= 0:
        kw["max_tokens"] = o.num_predict
    if o.stop:
        kw["stop"] = list(o.stop)
    return SamplingParams(**kw, logprobs=logprobs, grammar=_grammar(fmt))


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


def _stats(t0: float, load_s: float, fin: FinishEvent) -> dict:
    u = fin.usage
    return {
        "total_duration": _ns(time.perf_counter() - t0),
        "load_duration": _ns(load_s),
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": int(u.prompt_ms * 1e6),
        "eval_count": u.completion_tokens,
        "eval_duration": int(u.decode_ms * 1e6),
    }


def _done_reason(fin: FinishEvent) -> str:
    return "length" if fin.reason == "length" else "stop"


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


def _fit_messages(engine, messages: list[dict], tools, n_ctx: int) -> list[int]:
    """Render and tokenise; like Ollama, drop the oldest non-system messages (never
    the last one) until the prompt fits the context window."""
    messages = list(messages)
    while True:
        prompt = engine.encode_chat(messages, tools=tools)
        if len(prompt) < n_ctx:
            return prompt
        droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"]
        if not droppable:
            return prompt  # the engine reports the overflow with the numbers
        del messages[droppable[0]]


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


def _ollama_calls(calls: list[ParsedCall]) -> list[dict]:
    return [{"id": c.id, "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def persona_overrides(opts: p.OllamaOptions, fmt, logprobs: int | None) -> dict:
    """The options the request set, over the persona's sampling defaults."""
    params = sampling_params(opts, fmt, logprobs, None)
    sent = {k for k, v in opts.model_dump().items() if v is not None and v != []}
    keys = {
        "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
        "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
        "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
        "seed": "seed", "num_predict": "max_tokens", "stop": "stop",
    }  # fmt: skip
    out = {dst: getattr(params, dst) for src, dst in keys.items() if src in sent}
    if "num_predict" in sent and params.max_tokens is None:
        out.pop("max_tokens")  # -1: no limit, so the persona's default stands
    if "seed" in sent and params.seed is None:
        out.pop("seed")  # -1: random
    out["logprobs"] = logprobs
    out["grammar"] = params.grammar
    return out


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.OllamaChatRequest, await request.body())
    keep_alive = p.parse_keep_alive(req.keep_alive)
    if not req.messages:
        return JSONResponse(
            await _load_only(
                state, req.model, keep_alive, t0, "message", {"role": "assistant", "content": ""}
            )
        )
    opts = req.options or p.OllamaOptions()
    rid = request_id("chat")
    turn = await begin_turn(state, req.model, _chat_messages(req), rid)  # persona, input shields
    if turn.refusal is not None:
        return _refused(req, turn, t0)
    engine, load_s = await state.engine(turn.served_model, keep_alive=keep_alive, num_ctx=opts.num_ctx)
    fmt = detect_format(engine.template.source)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
    names = {t["function"]["name"] for t in tools or []}
    if turn.persona is None:

        def build() -> list[int]:
            messages, template_tools = prepare_messages(turn.messages, tools, fmt)
            return _fit_messages(engine, messages, template_tools, engine.info.n_ctx)

        prompt = await run_in_threadpool(build)
        params = sampling_params(opts, req.format, _logprobs(req), engine)
    else:
        messages, template_tools = prepare_messages(turn.messages, tools, fmt)
        prep = await turn.prepare(
            state, persona_overrides(opts, req.format, _logprobs(req)), template_tools,
            messages=messages, keep_alive=keep_alive, num_ctx=opts.num_ctx,
        )  # fmt: skip
        engine, prompt, params = prep.engine, prep.prompt, prep.params
    gen = await start_generation(state, engine, [(prompt, params)], t0, rid)
    new_parser = (lambda: ToolCallParser(fmt, names)) if tools else (lambda: None)

    if req.stream is not False:
        return EventStream(_chat_stream(state, gen, req, new_parser(), turn, t0, load_s), media_type=NDJSON)

    async def collect() -> dict:
        parser = new_parser()
        content, calls, lps = [], [], []
        fin = None
        async for _, ev in gen.events():
            if isinstance(ev, TokenEvent) and req.logprobs:
                lps += _lp_entries(ev)
            c, k = parser.feed(ev.text) if parser else (ev.text, [])
            content.append(c)
            calls += k
            if isinstance(ev, FinishEvent):
                if parser:
                    c, k = parser.finish()
                    content.append(c)
                    calls += k
                fin = ev
        raise_for_finish(fin)
        raw = "".join(content).strip() if calls else "".join(content)
        done_reason = _done_reason(fin)
        text, blocked, decisions = await turn.screen_answer(state, raw)
        if blocked:
            calls, done_reason = [], "content_filter"
        await turn.finish(state, decisions)
        answer = text
        if text and not calls and done_reason != "content_filter":
            text += turn.footer(text)
        message: dict = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = _ollama_calls(calls)
        out = {
            "model": req.model,
            "created_at": now_iso(),
            "message": message,
            "done_reason": done_reason,
            "done": True,
        }
        if req.logprobs and text == raw:  # logprobs carry the tokens: not when a shield changed the text
            out["logprobs"] = lps
        herd = turn.herd(answer)
        return {**out, **_stats(t0, load_s, fin), **({"herd": herd} if herd is not None else {})}

    return JSONResponse(await run_unless_disconnected(request, collect()))


def _refused(req: p.OllamaChatRequest | p.OllamaGenerateRequest, turn: Turn, t0: float) -> Response:
    """An input shield blocked the request: the refusal as the answer (the message of /api/chat,
    the response of /api/generate), done_reason "content_filter", no tokens spent."""
    chat = isinstance(req, p.OllamaChatRequest)
    key = "message" if chat else "response"

    def reply(text: str):
        return {"role": "assistant", "content": text} if chat else text

    herd = turn.herd()
    final = {
        "model": req.model,
        "created_at": now_iso(),
        key: reply(turn.refusal or ""),
        "done_reason": "content_filter",
        "done": True,
        "total_duration": _ns(time.perf_counter() - t0),
        "load_duration": 0,
        "prompt_eval_count": 0,
        "prompt_eval_duration": 0,
        "eval_count": 0,
        "eval_duration": 0,
        **({"herd": herd} if herd is not None else {}),
    }
    if req.stream is False:
        return JSONResponse(final)

    async def stream() -> AsyncIterator[str]:
        yield _line({"model": req.model, "created_at": final["created_at"], key: final[key], "done": False})
        yield _line({**final, key: reply("")})

    return EventStream(stream(), media_type=NDJSON)


async def _chat_stream(
    state: ServerState,
    gen: Generation,
    req: p.OllamaChatRequest,
    parser,
    turn: Turn,
    t0: float,
    load_s: float,
) -> AsyncIterator[str]:
    def line(content: str, calls: list[ParsedCall] | None = None, lps: list | None = None) -> str:
        message: dict = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = _ollama_calls(calls)
        obj = {"model": req.model, "created_at": now_iso(), "message": message, "done": False}
        if lps is not None:
            obj["logprobs"] = lps
        return _line(obj)

    def final(done_reason: str, ev: FinishEvent, answer: str) -> str:
        herd = turn.herd(answer)
        obj = {
            "model": req.model,
            "created_at": now_iso(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": done_reason,
            "done": True,
            **_stats(t0, load_s, ev),
        }
        return _line({**obj, "herd": herd} if herd is not None else obj)

    screen = turn.output()
    n_calls = 0
    try:
        async for _, ev in gen.events():
            content, calls = parser.feed(ev.text) if parser else (ev.text, [])
            if isinstance(ev, FinishEvent):
                if parser:
                    c, k = parser.finish()
                    content, calls = content + c, calls + k
                raise_for_finish(ev)
            content = screen.feed(content) if content else ""
            if isinstance(ev, FinishEvent):
                content += screen.finish()
            if screen.blocked:  # cancel the sequence and end with the refusal
                gen.cancel()
                if not screen.text().strip():
                    yield line(screen.refusal)
                await turn.finish(state, screen.decisions())
                fin = ev if isinstance(ev, FinishEvent) else FinishEvent(reason="abort", usage=Usage())
                yield final("content_filter", fin, screen.text())
                return
            n_calls += len(calls)
            if isinstance(ev, TokenEvent):
                # Logprobs carry the tokens themselves: none while an output shield screens the text.
                lps = _lp_entries(ev) if req.logprobs and screen.guard is None else None
                if content or calls or lps:
                    yield line(content, calls, lps)
                continue
            answer = screen.text()
            if not n_calls:
                content += turn.footer(answer)
            if content or calls:
                yield line(content, calls)
            await turn.finish(state, screen.decisions())
            yield final(_done_reason(ev), ev, answer)
    except Exception as e:
        yield _line({"error": error_in_stream(e).message})
    finally:
        gen.cancel()


# ============================================================================
# /api/generate
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
    policy = state.shields.policy_for(persona)
    context = list(req.context or [])
    engine, load_s = None, 0.0
    # The persona and the input shields come first, as in chat. Only a token context needs
    # the model before them: it is screened as the text it stands for.
    if persona is None and (policy is None or context):
        engine, load_s = await state.engine(req.model, keep_alive=keep_alive, num_ctx=opts.num_ctx)
    messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": "user", "content": req.prompt or ""}
    ]
    context_text = None
    if policy is not None and context:
        check_token_ids(engine, context, "context")
        context_text = await run_in_threadpool(engine.detokenize, context)
        messages.insert(len(messages) - 1, {"role": "user", "content": context_text})
    turn = await screen_turn(state, req.model, persona, messages, rid)
    if turn.refusal is not None:
        return _refused(req, turn, t0)
    if persona is not None:
        engine, load_s = await state.engine(persona.served_model, keep_alive=keep_alive, num_ctx=opts.num_ctx)
        prep = await turn.prepare(
            state, persona_overrides(opts, req.format, _logprobs(req)), None,
            keep_alive=keep_alive, num_ctx=opts.num_ctx,
        )  # fmt: skip
        engine, prompt, params = prep.engine, prep.prompt, prep.params
    else:
        if engine is None:
            engine, load_s = await state.engine(req.model, keep_alive=keep_alive, num_ctx=opts.num_ctx)
        if context_text is not None and turn.messages[-2]["content"] != context_text:
            # A shield rewrote the context (PII redaction): the rewritten text, tokenised.
            context = await run_in_threadpool(engine.tokenize, turn.messages[-2]["content"], False, True)
        system = turn.messages[0]["content"] if req.system else None
        text = turn.messages[-1]["content"]
        prompt = await run_in_threadpool(_generate_prompt, engine, req, context, system, text)
        params = sampling_params(opts, req.format, _logprobs(req), engine)
    gen = await start_generation(state, engine, [(prompt, params)], t0, rid)
    # A persona's prompt is its own (system prompt, examples, passages): it hands out no
    # token context, and takes none (see _check_persona_generate).
    with_context = persona is None

    if req.stream is not False:
        stream = _generate_stream(state, gen, req, engine, prompt, turn, t0, load_s, with_context)
        return EventStream(stream, media_type=NDJSON)

    async def collect() -> dict:
        [r] = await gen.collect()
        text, blocked, decisions = await turn.screen_answer(state, r.text)
        await turn.finish(state, decisions)
        answer = text
        if text and not blocked:
            text += turn.footer(text)
        out = {
            "model": req.model,
            "created_at": now_iso(),
            "response": text,
            "done": True,
            "done_reason": "content_filter" if blocked else _done_reason(r.finish),
        }
        if with_context:
            out["context"] = prompt + (
                [ev.token for ev in r.events] if text == r.text else await _tokens_of(engine, text)
            )
        out.update(_stats(t0, load_s, r.finish))
        if req.logprobs and text == r.text:  # logprobs carry the tokens: not when a shield changed the text
            out["logprobs"] = [e for ev in r.events for e in _lp_entries(ev)]
        herd = turn.herd(answer)
        return {**out, "herd": herd} if herd is not None else out

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


def _generate_prompt(engine, req: p.OllamaGenerateRequest, context: list[int], system: str | None,
                     text: str) -> list[int]:
    """context + this turn: the prompt as is when raw, else rendered by the chat template."""
    check_token_ids(engine, context, "context")
    if req.raw:
        toks = engine.tokenize(text, add_special=not context, parse_special=True) if text else []
    else:
        messages = [{"role": "system", "content": system}] if system else []
        toks = engine.encode_chat([*messages, {"role": "user", "content": text}])
        if context and toks and toks[0] == engine.info.bos and engine.info.add_bos:
            toks = toks[1:]  # the context already starts the sequence
    return context + toks


async def _tokens_of(engine, text: str) -> list[int]:
    """The tokens of text the shields let through, for the returned context: the context must
    not hand back what they redacted or withheld."""
    return await run_in_threadpool(engine.tokenize, text, False, False) if text else []


async def _generate_stream(
    state: ServerState,
    gen: Generation,
    req: p.OllamaGenerateRequest,
    engine,
    prompt: list[int],
    turn: Turn,
    t0: float,
    load_s: float,
    with_context: bool,
) -> AsyncIterator[str]:
    """NDJSON lines of /api/generate. The text passes the output shields as it streams (as
    /api/chat): on a block the sequence is cancelled, the refusal is sent if nothing was, and
    the final line says done_reason "content_filter"."""

    def line(text: str, lps: list | None = None) -> str:
        obj = {"model": req.model, "created_at": now_iso(), "response": text, "done": False}
        if lps is not None:
            obj["logprobs"] = lps
        return _line(obj)

    async def final(done_reason: str, ev: FinishEvent, answer: str, sent: str) -> str:
        obj = {"model": req.model, "created_at": now_iso(), "response": "", "done": True}
        obj["done_reason"] = done_reason
        if with_context:  # what was sent, so redacted or withheld tokens never come back this way
            obj["context"] = prompt + (tokens if screen.guard is None else await _tokens_of(engine, sent))
        obj.update(_stats(t0, load_s, ev))
        herd = turn.herd(answer)
        return _line({**obj, "herd": herd} if herd is not None else obj)

    screen = turn.output()
    tokens: list[int] = []
    try:
        async for _, ev in gen.events():
            if isinstance(ev, FinishEvent):
                raise_for_finish(ev)
            else:
                tokens.append(ev.token)
            text = screen.feed(ev.text) if ev.text else ""
            if isinstance(ev, FinishEvent):
                text += screen.finish()
            if screen.blocked:  # cancel the sequence and end with the refusal
                gen.cancel()
                sent = screen.text()
                if not sent.strip():
                    sent = screen.refusal
                    yield line(sent)
                await turn.finish(state, screen.decisions())
                fin = ev if isinstance(ev, FinishEvent) else FinishEvent(reason="abort", usage=Usage())
                yield await final("content_filter", fin, screen.text(), sent)
                return
            if isinstance(ev, TokenEvent):
                # Logprobs carry the tokens themselves: none while an output shield screens the text.
                lps = _lp_entries(ev) if req.logprobs and screen.guard is None else None
                if text or lps is not None:
                    yield line(text, lps)
                continue
            answer = screen.text()
            text += turn.footer(answer)
            if text:
                yield line(text)
            await turn.finish(state, screen.decisions())
            yield await final(_done_reason(ev), ev, answer, answer)
    except Exception as e:
        yield _line({"error": error_in_stream(e).message})
    finally:
        gen.cancel()


# ============================================================================
# Models: /api/tags, /api/show, /api/ps, /api/pull, /api/delete
# ============================================================================


def _parameter_size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return str(n)


def _details(m) -> dict:
    return {
        "parent_model": m.base or "",
        "format": m.format,
        "family": m.architecture,
        "families": [m.architecture] if m.architecture else None,
        "parameter_size": _parameter_size(m.parameters),
        "quantization_level": m.quantization,
    }


def _modified(m) -> str:
    return m.created_at or now_iso()


@router.get("/api/tags")
async def tags(request: Request) -> Response:
    manifests = await run_in_threadpool(_state(request).store.list)
    models = [
        {
            "name": m.name,
            "model": m.name,
            "modified_at": _modified(m),
            "size": m.size,
            "digest": m.sha256,
            "details": _details(m),
        }
        for m in manifests
    ]
    for persona in await list_personas(_state(request)):
        card = persona.model_card()
        models.append(
            {
                "name": persona.name,
                "model": persona.name,
                "modified_at": persona.updated_at or now_iso(),
                "size": 0,
                "digest": "",
                "details": {"parent_model": persona.served_model, "format": "persona", "family": "persona",
                            "families": None, "parameter_size": "", "quantization_level": ""},
                "herd": card["herd"],
            }
        )
    return JSONResponse({"models": models})


def _resolve(state: ServerState, name: str):
    validate_name(name)
    manifest = state.store.get(name)
    if manifest is None:
        raise ModelNotFound(name)
    return manifest


@router.post("/api/show")
async def show(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.OllamaShowRequest, await request.body())
    m = await run_in_threadpool(_resolve, state, req.model)
    arch = m.architecture or "llama"
    info: dict = {
        "general.architecture": arch,
        "general.parameter_count": m.parameters,
        f"{arch}.context_length": m.context_length,
    }
    for key, gguf_key in (
        ("block_count", "block_count"),
        ("embedding_length", "embedding_length"),
        ("head_count", "attention.head_count"),
        ("head_count_kv", "attention.head_count_kv"),
    ):
        if m.details.get(key):
            info[f"{arch}.{gguf_key}"] = m.details[key]
    if m.details.get("model_name"):
        info["general.name"] = m.details["model_name"]
    template = m.chat_template or ""
    modelfile = f"# Modelfile generated by openherd\nFROM {m.name}\n"
    if template:
        modelfile += f'TEMPLATE """{template}"""\n'
    body = {
        "license": m.details.get("license", ""),
        "modelfile": modelfile,
        "parameters": "",
        "template": template,
        "details": _details(m),
        "model_info": info,
        # Tools work with any chat model here (see tools.py); embeddings with any model.
        "capabilities": ["completion", "tools"],
        "modified_at": _modified(m),
    }
    return JSONResponse(body)


@router.get("/api/ps")
async def ps(request: Request) -> Response:
    models = []
    for lm in _state(request).manager.loaded():
        m = lm.manifest
        models.append(
            {
                "name": lm.name,
                "model": lm.name,
                "size": lm.size,
                "digest": getattr(m, "sha256", ""),
                "details": _details(m),
                "expires_at": _iso(lm.expires_at),
                "size_vram": 0,  # llama.cpp CPU build: nothing in GPU memory
                "context_length": lm.engine.info.n_ctx,
            }
        )
    return JSONResponse({"models": models})


class _PullCancelled(Exception):
    pass


def _pullable(state: ServerState, name: str) -> str:
    """Over HTTP only catalog names and hub references can be pulled: a path would let a
    client import any file the server can read. (`herd pull PATH` is for local files.)"""
    from ..store.hub import is_hub_ref

    if is_hub_ref(name):
        return name
    validate_name(name)
    key = name[: -len(":latest")] if name.endswith(":latest") else name
    if key not in state.store.catalog:
        known = ", ".join(sorted(state.store.catalog)) or "none"
        raise ModelNotFound(
            name, f"model '{name}' is not in the catalog (known: {known}); or pull hf:OWNER/REPO/FILE.gguf"
        )
    return key


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.OllamaPullRequest, await request.body())
    source = _pullable(state, req.model)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = False

    def progress(ev) -> None:
        if cancelled:  # the client went away: stop the download between chunks
            raise _PullCancelled()
        line = {"status": ev.status}
        if ev.digest:
            line["digest"] = ev.digest
        if ev.total:
            line["total"], line["completed"] = ev.total, ev.completed
        loop.call_soon_threadsafe(queue.put_nowait, line)

    def work() -> None:
        state.store.pull(source, progress=progress)

    task = asyncio.ensure_future(run_in_threadpool(work))
    # A pull whose client left ends in _PullCancelled; nobody awaits it then.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())

    if req.stream is False:
        try:
            await run_unless_disconnected(request, asyncio.shield(task))
        except BaseException:
            cancelled = True
            raise
        return JSONResponse({"status": "success"})

    async def stream() -> AsyncIterator[str]:
        nonlocal cancelled
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    line = getter.result()
                    yield _line(line)
                    if line["status"] == "success":
                        await task
                        return
                    continue
                getter.cancel()
                while not queue.empty():
                    yield _line(queue.get_nowait())
                exc = task.exception()
                if exc is not None:
                    raise exc
                return
        except Exception as e:
            err = e if isinstance(e, HerdError) else error_in_stream(e)
            yield _line({"error": err.message})
        finally:
            cancelled = True

    return EventStream(stream(), media_type=NDJSON)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.OllamaDeleteRequest, await request.body())
    await state.unload(req.model)
    await run_in_threadpool(state.store.remove, req.model)
    return Response(status_code=200)


# ============================================================================
# Embeddings: /api/embed, /api/embeddings (legacy)
# ============================================================================


def _embed(engine, texts: list[str], truncate: bool):
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
    if req.dimensions is not None and req.dimensions != engine.info.n_embd:
        raise InvalidRequest(
            f"this model's embeddings have {engine.info.n_embd} dimensions; 'dimensions' cannot change that",
            param="dimensions",
        )
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
