"""The OpenAI API (``/v1``) over the native engine.

Each handler parses its request (``protocol``), translates it into token
prompts and ``SamplingParams``, starts a ``Generation`` (``serving``) and
returns one of three things: a full JSON response, an SSE stream in OpenAI's
exact chunk format, or (by raising a ``HerdError``) an OpenAI error body.

SSE format, as OpenAI sends it: one ``data: {json}\\n\\n`` per chunk; the first
chunk of each choice carries ``delta.role``; the last carries ``finish_reason``
and an empty delta; with ``stream_options.include_usage`` every chunk has
``"usage": null`` and one more chunk with ``"choices": []`` carries the totals;
then ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..engine.types import FinishEvent, GrammarSpec, SamplingParams, TokenEvent
from ..errors import InvalidRequest, ModelNotFound
from ..store.manifest import is_valid_name
from . import protocol as p
from .serving import (
    ChoiceResult,
    EventStream,
    Generation,
    ServerState,
    check_token_ids,
    error_in_stream,
    raise_for_finish,
    request_id,
    run_unless_disconnected,
    seeds,
    start_generation,
)
from .tools import (
    ParsedCall,
    ToolCallParser,
    ToolFormat,
    detect_format,
    forced_call_grammar,
    prepare_messages,
)

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FINGERPRINT = "fp_openherd"


def _state(request: Request) -> ServerState:
    return request.app.state.herd


def json_response(model, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


# ============================================================================
# Models
# ============================================================================


def _created(manifest) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    manifests = await run_in_threadpool(state.store.list)
    cards = [p.ModelCard(id=m.name, created=_created(m)) for m in manifests]
    return json_response(p.ModelList(data=cards))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Response:
    state = _state(request)
    if not is_valid_name(model_id):
        raise ModelNotFound(model_id, f"model '{model_id[:80]}' not found")
    manifest = await run_in_threadpool(state.store.get, model_id)
    if manifest is None:
        raise ModelNotFound(model_id)
    return json_response(p.ModelCard(id=manifest.name, created=_created(manifest)))


# ============================================================================
# Shared translation
# ============================================================================


def _grammar(fmt: p.ResponseFormat | None) -> GrammarSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json")
    schema = fmt.json_schema.schema_ if fmt.json_schema else None
    return GrammarSpec("json_schema", schema if schema is not None else {"type": "object"})


def sampling_params(
    req, engine, max_tokens: int | None, grammar: GrammarSpec | None, logprobs: int | None, seed
) -> SamplingParams:
    """OpenAI fields -> SamplingParams. OpenAI's samplers are temperature and top_p
    only, so top_k and min_p are off unless the request sets the extensions."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # "only the most likely token"
        temperature, top_p = 0.0, 1.0
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    check_token_ids(engine, list(bias), "logit_bias")
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repeat_penalty=req.repetition_penalty or 1.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        seed=seed,
        max_tokens=max_tokens,
        stop=list(req.stop or []),
        logit_bias=bias,
        logprobs=logprobs,
        grammar=grammar,
    )


def _finish_reason(fin: FinishEvent, n_calls: int) -> str:
    # As OpenAI: a cut-off output is "length" even if complete calls precede the cut.
    if fin.reason == "length":
        return "length"
    return "tool_calls" if n_calls else "stop"


def _usage(prompt_tokens: int, finishes: list[FinishEvent]) -> p.UsageInfo:
    completion = sum(f.usage.completion_tokens for f in finishes)
    # n choices share one prompt: report it once, and as cached only what every
    # choice reused (the later choices usually reuse all of it from the first).
    cached = min((f.usage.cached_tokens for f in finishes), default=0)
    return p.UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached),
    )


def _logprob_entry(ev: TokenEvent) -> p.LogprobEntry:
    return p.LogprobEntry(
        token=ev.bytes.decode("utf-8", errors="replace"),
        logprob=ev.logprob if ev.logprob is not None else 0.0,
        bytes=list(ev.bytes),
        top_logprobs=[
            p.TopLogprobEntry(token=t.text, logprob=t.logprob, bytes=list(t.text.encode("utf-8")))
            for t in (ev.top_logprobs or [])
        ],
    )


# ============================================================================
# Chat completions
# ============================================================================


@dataclass
class ToolPlan:
    fmt: ToolFormat
    names: set[str]
    parallel: bool
    parse: bool  # read tool calls out of the output
    grammar: GrammarSpec | None  # forced call (required / named)

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.fmt, self.names, self.parallel) if self.parse else None


def _message_dict(m: p.ChatMessage) -> dict:
    d: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in m.tool_calls
        ]
        if m.content is None:
            d["content"] = ""
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


def chat_prompt(engine, req: p.ChatCompletionRequest) -> tuple[list[int], ToolPlan]:
    fmt = detect_format(engine.template.source)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice or ("auto" if tools else "none")
    offered = tools if tools and choice != "none" else None
    messages, template_tools = prepare_messages([_message_dict(m) for m in req.messages], offered, fmt)
    prompt = engine.encode_chat(messages, tools=template_tools)
    parallel = req.parallel_tool_calls is not False
    grammar = None
    if choice == "required":
        grammar = forced_call_grammar(tools, fmt, None, parallel)
    elif isinstance(choice, p.NamedToolChoice):
        grammar = forced_call_grammar(tools, fmt, choice.function.name, parallel)
    names = {t["function"]["name"] for t in tools}
    return prompt, ToolPlan(fmt, names, parallel, parse=offered is not None, grammar=grammar)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.ChatCompletionRequest, await request.body())
    engine, _ = await state.engine(req.model)
    prompt, plan = await run_in_threadpool(chat_prompt, engine, req)
    n = req.n or 1
    grammar = plan.grammar or _grammar(req.response_format)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = [
        sampling_params(req, engine, req.completion_limit, grammar, logprobs, s) for s in seeds(req.seed, n)
    ]
    rid = request_id("chatcmpl")
    gen = await start_generation(state, engine, [(prompt, sp) for sp in params], t0, rid)
    created = int(time.time())
    if req.stream:
        return EventStream(
            _chat_stream(gen, req, plan, rid, created, len(prompt)),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results: list[ChoiceResult] = await run_unless_disconnected(request, gen.collect())
    choices = []
    for i, r in enumerate(results):
        content, calls = r.text, []
        parser = plan.parser()
        if parser is not None:
            c1, k1 = parser.feed(r.text)
            c2, k2 = parser.finish()
            content, calls = c1 + c2, k1 + k2
            if calls:
                content = content.strip()
        message = p.ResponseMessage(
            content=content if (content or not calls) else None,
            tool_calls=[
                p.ResponseToolCall(
                    id=c.id, function=p.ResponseFunctionCall(name=c.name, arguments=c.arguments_json)
                )
                for c in calls
            ]
            or None,
        )
        lp = p.ChoiceLogprobs(content=[_logprob_entry(ev) for ev in r.events]) if req.logprobs else None
        choices.append(
            p.ChatChoice(
                index=i, message=message, logprobs=lp, finish_reason=_finish_reason(r.finish, len(calls))
            )
        )
    body = p.ChatCompletion(
        id=rid,
        choices=choices,
        created=created,
        model=req.model,
        system_fingerprint=FINGERPRINT,
        usage=_usage(len(prompt), [r.finish for r in results]),
    )
    return json_response(body)


def _sse(obj) -> str:
    return f"data: {obj}\n\n"


async def _chat_stream(
    gen: Generation, req: p.ChatCompletionRequest, plan: ToolPlan, rid: str, created: int, prompt_tokens: int
) -> AsyncIterator[str]:
    include_usage = req.include_usage
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[p.ChunkChoice]) -> str:
        c = p.ChatCompletionChunk(
            id=rid, choices=choices, created=created, model=req.model, system_fingerprint=FINGERPRINT
        )
        return _sse(c.model_dump_json(exclude=exclude))

    def tool_deltas(calls: list[ParsedCall], first_index: int) -> list[p.DeltaToolCall]:
        return [
            p.DeltaToolCall(
                index=first_index + k,
                id=c.id,
                type="function",
                function=p.DeltaFunctionCall(name=c.name, arguments=c.arguments_json),
            )
            for k, c in enumerate(calls)
        ]

    n = len(gen.handles)
    parsers = [plan.parser() for _ in range(n)]
    n_calls = [0] * n
    finishes: list[FinishEvent] = []
    try:
        for i in range(n):
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
        async for i, ev in gen.events():
            parser = parsers[i]
            text = ev.text
            if parser is not None:
                content, calls = parser.feed(text)
                if isinstance(ev, FinishEvent):
                    c2, k2 = parser.finish()
                    content, calls = content + c2, calls + k2
            else:
                content, calls = text, []
            if isinstance(ev, TokenEvent):
                lp = p.ChoiceLogprobs(content=[_logprob_entry(ev)]) if req.logprobs else None
                if content or calls or lp is not None:
                    delta = p.Delta(
                        content=content if (content or not calls) else None,
                        tool_calls=tool_deltas(calls, n_calls[i]) or None,
                    )
                    yield chunk([p.ChunkChoice(index=i, delta=delta, logprobs=lp)])
                n_calls[i] += len(calls)
                continue
            raise_for_finish(ev)
            if content or calls:
                delta = p.Delta(content=content or None, tool_calls=tool_deltas(calls, n_calls[i]) or None)
                yield chunk([p.ChunkChoice(index=i, delta=delta)])
            n_calls[i] += len(calls)
            finishes.append(ev)
            yield chunk(
                [p.ChunkChoice(index=i, delta=p.Delta(), finish_reason=_finish_reason(ev, n_calls[i]))]
            )
        if include_usage:
            c = p.ChatCompletionChunk(
                id=rid,
                choices=[],
                created=created,
                model=req.model,
                system_fingerprint=FINGERPRINT,
                usage=_usage(prompt_tokens, finishes),
            )
            yield _sse(c.model_dump_json())
        yield "data: [DONE]\n\n"
    except Exception as e:  # after the 200 went out: report in-band, as OpenAI does
        yield _sse(json.dumps(error_in_stream(e).to_openai()))
    finally:
        gen.cancel()


# ============================================================================
# Completions (legacy)
# ============================================================================


def _completion_logprobs(events: list[TokenEvent], offset: int) -> p.CompletionLogprobs:
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        tok = ev.bytes.decode("utf-8", errors="replace")
        tokens.append(tok)
        lps.append(ev.logprob)
        tops.append({t.text: t.logprob for t in ev.top_logprobs} if ev.top_logprobs else None)
        offsets.append(offset)
        offset += len(tok)
    return p.CompletionLogprobs(text_offset=offsets, token_logprobs=lps, tokens=tokens, top_logprobs=tops)


def completion_prompts(engine, req: p.CompletionRequest) -> list[tuple[list[int], str]]:
    out = []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            toks = engine.tokenize(prompt, add_special=True, parse_special=True)
            out.append((toks, prompt))
        else:
            check_token_ids(engine, prompt, "prompt")
            out.append((prompt, engine.detokenize(prompt) if req.echo else ""))
    return out


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.CompletionRequest, await request.body())
    engine, _ = await state.engine(req.model)
    prompts = await run_in_threadpool(completion_prompts, engine, req)
    if any(not toks for toks, _ in prompts):
        raise InvalidRequest("the prompt is empty", param="prompt")
    n = req.n or 1
    grammar = _grammar(req.response_format)
    jobs = []
    for toks, _ in prompts:
        for s in seeds(req.seed, n):
            jobs.append((toks, sampling_params(req, engine, req.max_tokens, grammar, req.logprobs, s)))
    rid = request_id("cmpl")
    gen = await start_generation(state, engine, jobs, t0, rid)
    created = int(time.time())
    echoes = [text if req.echo else "" for _, text in prompts for _ in range(n)]
    prompt_tokens = sum(len(toks) for toks, _ in prompts)
    if req.stream:
        return EventStream(
            _completion_stream(gen, req, rid, created, echoes, prompt_tokens),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results: list[ChoiceResult] = await run_unless_disconnected(request, gen.collect())
    choices = []
    for i, r in enumerate(results):
        lp = _completion_logprobs(r.events, len(echoes[i])) if req.logprobs is not None else None
        choices.append(
            p.CompletionChoice(
                index=i,
                text=echoes[i] + r.text,
                logprobs=lp,
                finish_reason="length" if r.finish.reason == "length" else "stop",
            )
        )
    usage = _usage(prompt_tokens, [r.finish for r in results])
    # The shared-prompt min() of chat does not apply across different prompts.
    usage.prompt_tokens_details = p.PromptTokensDetails(
        cached_tokens=sum(r.finish.usage.cached_tokens for r in results[::n])
    )
    return json_response(
        p.Completion(
            id=rid,
            choices=choices,
            created=created,
            model=req.model,
            system_fingerprint=FINGERPRINT,
            usage=usage,
        )
    )


async def _completion_stream(
    gen: Generation, req: p.CompletionRequest, rid: str, created: int, echoes: list[str], prompt_tokens: int
) -> AsyncIterator[str]:
    def chunk(i: int, text: str, lp=None, finish: str | None = None) -> str:
        c = p.Completion(
            id=rid,
            choices=[p.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)],
            created=created,
            model=req.model,
            system_fingerprint=FINGERPRINT,
        )
        return _sse(c.model_dump_json(exclude=None if req.include_usage else {"usage"}))

    offsets = [len(e) for e in echoes]
    finishes: list[FinishEvent] = []
    try:
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async for i, ev in gen.events():
            if isinstance(ev, TokenEvent):
                lp = _completion_logprobs([ev], offsets[i]) if req.logprobs is not None else None
                if ev.text or lp is not None:
                    yield chunk(i, ev.text, lp)
                offsets[i] += len(ev.bytes.decode("utf-8", errors="replace"))
                continue
            raise_for_finish(ev)
            finishes.append(ev)
            yield chunk(i, ev.text, None, "length" if ev.reason == "length" else "stop")
        if req.include_usage:
            completion = sum(f.usage.completion_tokens for f in finishes)
            usage = p.UsageInfo(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
                prompt_tokens_details=p.PromptTokensDetails(
                    cached_tokens=min((f.usage.cached_tokens for f in finishes), default=0)
                ),
            )
            c = p.Completion(
                id=rid,
                choices=[],
                created=created,
                model=req.model,
                system_fingerprint=FINGERPRINT,
                usage=usage,
            )
            yield _sse(c.model_dump_json())
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _sse(json.dumps(error_in_stream(e).to_openai()))
    finally:
        gen.cancel()


# ============================================================================
# Embeddings
# ============================================================================


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.EmbeddingRequest, await request.body())
    engine, _ = await state.engine(req.model)
    if req.dimensions is not None and req.dimensions != engine.info.n_embd:
        raise InvalidRequest(
            f"this model's embeddings have {engine.info.n_embd} dimensions; 'dimensions' cannot change that",
            param="dimensions",
        )

    def embed():
        texts = []
        for x in req.inputs():
            if isinstance(x, list):
                check_token_ids(engine, x, "input")
                texts.append(engine.detokenize(x))
            else:
                texts.append(x)
        return engine.embed(texts)

    vectors, n_tokens = await run_in_threadpool(embed)
    data = []
    for i, v in enumerate(vectors):
        if req.encoding_format == "base64":
            emb: list[float] | str = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
        else:
            emb = v
        data.append(p.EmbeddingData(index=i, embedding=emb))
    usage = p.EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens)
    return json_response(p.EmbeddingResponse(data=data, model=req.model, usage=usage))
