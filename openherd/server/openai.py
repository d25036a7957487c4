"""The OpenAI API (``/v1``): a translation over the native pipeline.

Each handler parses its request (``protocol``), maps its fields into the native
request (``pipeline.ChatRequest`` or ``pipeline.PromptRequest``), and renders
the pipeline's steps in one of three shapes: a full JSON response, an SSE stream
in OpenAI's exact chunk format, or (by raising a ``HerdError``) an OpenAI error
body. OpenAI's convention for an over-long conversation is the 400
``context_length_exceeded`` with the numbers (``openherd.context.ERROR``).

SSE format, as OpenAI sends it: one ``data: {json}\\n\\n`` per chunk; the first
chunk of each choice carries ``delta.role``; the last carries ``finish_reason``
and an empty delta; with ``stream_options.include_usage`` every chunk has
``"usage": null`` and one more chunk with ``"choices": []`` carries the totals;
then ``data: [DONE]``. A tool call streams as OpenAI's do: one delta with its
index, id, type and function name (arguments ``""``), then deltas with fragments
of its arguments as the model writes them (``tools.ToolCallStreamer``).

Every generation route (chat and legacy completions) takes a persona id as
``model``; the pipeline runs the persona turn and the input and output shields.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..context import ERROR
from ..engine.backend import Backend
from ..engine.types import FinishEvent, GrammarSpec, SamplingParams, TokenEvent
from ..errors import InvalidRequest
from . import protocol as p
from .personas import Turn, find_persona
from .pipeline import (
    ChatRequest,
    ChoiceStream,
    Prepared,
    PromptPlan,
    PromptRequest,
    Whole,
    finish_whole,
    prepare_chat,
    prepare_prompts,
    sampling,
    stream_choices,
)
from .serving import (
    ChoiceResult,
    EventStream,
    Generation,
    ServerState,
    check_dimensions,
    check_token_ids,
    error_in_stream,
    request_id,
    run_unless_disconnected,
    start_generation,
)
from .tools import CallDelta

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FINGERPRINT = "fp_openherd"


def _state(request: Request) -> ServerState:
    return request.app.state.herd


def json_response(model, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


# ============================================================================
# Field mapping
# ============================================================================


def _grammar(fmt: p.ResponseFormat | None) -> GrammarSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json")
    schema = fmt.json_schema.schema_ if fmt.json_schema else None
    return GrammarSpec("json_schema", schema if schema is not None else {"type": "object"})


# OpenAI's samplers are temperature and top_p only, so top_k and min_p are off unless the
# request sets the extensions. Legacy completions default to 16 tokens (OpenAI's API reference).
OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
OPENAI_COMPLETION_SAMPLING = {**OPENAI_SAMPLING, "max_tokens": 16}
_FIELDS = (  # OpenAI field -> SamplingParams field
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("repetition_penalty", "repeat_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("presence_penalty", "presence_penalty"),
    ("seed", "seed"),
    ("max_tokens", "max_tokens"),
)


def _sent(req: p.ChatCompletionRequest | p.CompletionRequest, max_tokens: int | None = None) -> dict:
    """The sampling the request set explicitly (pydantic's defaults do not count)."""
    out = {dst: getattr(req, src) for src, dst in _FIELDS if src in req.model_fields_set}
    if isinstance(req, p.ChatCompletionRequest):
        out["max_tokens"] = req.completion_limit
    elif max_tokens is not None:
        out["max_tokens"] = max_tokens
    if req.stop:
        out["stop"] = list(req.stop)
    if req.logit_bias:
        out["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
    return out


def sampling_params(req, engine: Backend, max_tokens: int | None, grammar: GrammarSpec | None, logprobs: int | None,
                    seed) -> SamplingParams:
    """OpenAI fields -> SamplingParams for a plain model (pipeline.sampling's one rule)."""
    sent = {**_sent(req), "max_tokens": max_tokens, "seed": seed}
    return sampling(OPENAI_SAMPLING, sent, engine, grammar, logprobs)


def _usage(prompt_tokens: int, finishes: list[FinishEvent], cached: int | None = None) -> p.UsageInfo:
    completion = sum(f.usage.completion_tokens for f in finishes)
    # n choices share one prompt: report it once, and as cached only what every
    # choice reused (the later choices usually reuse all of it from the first).
    if cached is None:
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


def native_chat(req: p.ChatCompletionRequest) -> ChatRequest:
    choice = req.tool_choice
    return ChatRequest(
        model=req.model,
        messages=[_message_dict(m) for m in req.messages],
        defaults=OPENAI_SAMPLING,
        sent=_sent(req),
        grammar=_grammar(req.response_format),
        tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
        tool_choice=choice.function.name if isinstance(choice, p.NamedToolChoice) else choice,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        n=req.n or 1,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        context=ERROR,  # OpenAI: 400 context_length_exceeded with the numbers
    )


def _sse(obj) -> str:
    return f"data: {obj}\n\n"


def _stream(body: AsyncIterator[str]) -> Response:
    return EventStream(body, media_type="text/event-stream", headers=SSE_HEADERS)


# ============================================================================
# Chat completions
# ============================================================================


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.ChatCompletionRequest, await request.body())
    rid = request_id("chatcmpl")
    created = int(time.time())
    prep = await prepare_chat(state, native_chat(req), rid)
    turn = prep.turn
    if turn.refusal is not None:
        return _refused(req, turn, created)
    gen = await start_generation(state, prep.engine, prep.jobs(), t0, rid)
    if req.stream:
        return _stream(_chat_stream(state, gen, req, prep, created))
    results: list[ChoiceResult] = await run_unless_disconnected(request, gen.collect())
    choices, decisions = [], []
    first: Whole | None = None
    for i, r in enumerate(results):
        w = await finish_whole(state, turn, prep.plan, r)
        first = first or w
        decisions += w.decisions
        message = p.ResponseMessage(
            content=w.text if (w.text or not w.calls) else None,
            refusal=w.text if w.finish == "content_filter" else None,
            tool_calls=[
                p.ResponseToolCall(id=c.id, function=p.ResponseFunctionCall(name=c.name, arguments=c.arguments_json))
                for c in w.calls
            ]
            or None,
        )
        lp = p.ChoiceLogprobs(content=[_logprob_entry(ev) for ev in r.events]) if req.logprobs and w.shown else None
        choices.append(p.ChatChoice(index=i, message=message, logprobs=lp, finish_reason=w.finish))
    await turn.finish(state, decisions)
    body = p.ChatCompletion(
        id=rid,
        choices=choices,
        created=created,
        model=req.model,
        system_fingerprint=FINGERPRINT,
        usage=_usage(len(prep.prompt), [r.finish for r in results]),
        herd=turn.herd(first.answer if first else None),
    )
    return json_response(body)


def _refused(req: p.ChatCompletionRequest, turn: Turn, created: int) -> Response:
    """An input shield blocked the request: the policy's refusal as the answer of every
    choice, finish_reason "content_filter", and no tokens spent."""
    text = turn.refusal or ""
    n = req.n or 1
    usage = _usage(0, [])
    herd = turn.herd()
    if not req.stream:
        choices = [
            p.ChatChoice(
                index=i, message=p.ResponseMessage(content=text, refusal=text), finish_reason="content_filter"
            )
            for i in range(n)
        ]
        return json_response(
            p.ChatCompletion(id=turn.rid, choices=choices, created=created, model=req.model,
                             system_fingerprint=FINGERPRINT, usage=usage, herd=herd)
        )

    def chunk(choices: list[p.ChunkChoice], **kw) -> str:
        c = p.ChatCompletionChunk(
            id=turn.rid, choices=choices, created=created, model=req.model, system_fingerprint=FINGERPRINT, **kw
        )
        return _sse(c.model_dump_json(exclude=None if req.include_usage else {"usage"}))

    async def stream() -> AsyncIterator[str]:
        for i in range(n):
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(content=text))])
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(), finish_reason="content_filter")], herd=herd)
        if req.include_usage:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return _stream(stream())


def _deltas(content: str, calls: list[CallDelta]) -> list[p.Delta]:
    """OpenAI's deltas for one step: the content, then one delta per tool-call piece
    (the first piece of a call has its id, type and name, with arguments "")."""
    out = [p.Delta(content=content)] if content else []
    for c in calls:
        fn = p.DeltaFunctionCall(name=c.name, arguments=c.arguments)
        call = p.DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None, function=fn)
        out.append(p.Delta(tool_calls=[call]))
    return out


async def _chat_stream(
    state: ServerState, gen: Generation, req: p.ChatCompletionRequest, prep: Prepared, created: int
) -> AsyncIterator[str]:
    """OpenAI's SSE chunks of the pipeline's steps: the role first, then content and tool-call
    deltas (a token's logprobs on its first piece), and a last chunk per choice with its
    finish_reason and the `herd` field; a usage chunk with include_usage, then [DONE]."""
    rid = prep.turn.rid
    exclude = None if req.include_usage else {"usage"}

    def chunk(choices: list[p.ChunkChoice], herd: dict | None = None, usage=None) -> str:
        c = p.ChatCompletionChunk(id=rid, choices=choices, created=created, model=req.model,
                                  system_fingerprint=FINGERPRINT, herd=herd, usage=usage)
        return _sse(c.model_dump_json(exclude=exclude if usage is None else None))

    choices = [ChoiceStream(prep.turn, prep.plan) for _ in gen.handles]
    try:
        for i in range(len(choices)):
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
        async for i, step in stream_choices(state, gen, choices):
            if step.refusal is not None:  # blocked before anything (but whitespace) went out
                yield chunk([p.ChunkChoice(index=i, delta=p.Delta(content=step.refusal))])
            lp = p.ChoiceLogprobs(content=[_logprob_entry(step.token)]) if req.logprobs and step.token else None
            pieces = _deltas(step.content, step.calls)
            if not pieces and lp is not None:
                pieces = [p.Delta(content="")]
            for k, delta in enumerate(pieces):  # the token's logprobs ride on its first piece
                yield chunk([p.ChunkChoice(index=i, delta=delta, logprobs=lp if k == 0 else None)])
            if step.last:
                yield chunk([p.ChunkChoice(index=i, delta=p.Delta(), finish_reason=step.finish)], herd=step.herd)
        if req.include_usage:
            finishes = [c.finish_event for c in choices if c.finish_event is not None]
            yield chunk([], usage=_usage(len(prep.prompt), finishes))
        yield "data: [DONE]\n\n"
    except Exception as e:  # after the 200 went out: report in-band, as OpenAI does
        yield _sse(json.dumps(error_in_stream(e).to_openai()))
    finally:
        gen.cancel()


# ============================================================================
# Completions (legacy): the pipeline with raw prompts
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


def _persona_text_prompts(req: p.CompletionRequest, persona) -> None:
    prompts = req.prompts()
    if any(not isinstance(x, str) for x in prompts):
        raise InvalidRequest(
            f"persona '{persona.name}' takes text prompts: send 'prompt' as a string or a list of strings",
            param="prompt",
        )
    if any(not x.strip() for x in prompts):
        raise InvalidRequest("the prompt is empty", param="prompt")


def native_prompts(req: p.CompletionRequest) -> PromptRequest:
    return PromptRequest(
        model=req.model,
        prompts=req.prompts(),
        defaults=OPENAI_COMPLETION_SAMPLING,
        sent=_sent(req, req.max_tokens if "max_tokens" in req.model_fields_set else None),
        grammar=_grammar(req.response_format),
        n=req.n or 1,
        logprobs=req.logprobs,
        echo=bool(req.echo),
    )


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.CompletionRequest, await request.body())
    rid = request_id("cmpl")
    created = int(time.time())
    n = req.n or 1
    # As for chat: the persona and the input shields come first. Choice i*n+j is choice j of
    # prompt i, refused or generated.
    persona = await find_persona(state, req.model)
    if persona is not None:
        _persona_text_prompts(req, persona)
    engine, _, plans = await prepare_prompts(state, native_prompts(req), persona, rid)
    jobs: list[tuple[list[int], SamplingParams]] = []
    choice_of: list[int] = []  # job -> choice index
    for i, plan in enumerate(plans):
        for j, sp in enumerate(plan.params):
            jobs.append((plan.tokens, sp))
            choice_of.append(i * n + j)
    gen = await start_generation(state, engine, jobs, t0, rid) if jobs else None
    prompt_tokens = sum(len(plan.tokens) for plan in plans)
    if req.stream:
        return _stream(_completion_stream(state, gen, req, rid, created, plans, choice_of, prompt_tokens))
    results: list[ChoiceResult] = await run_unless_disconnected(request, gen.collect()) if gen else []
    choices: dict[int, p.CompletionChoice] = {}
    herds: dict[int, dict | None] = {}
    for i, plan in enumerate(plans):
        if plan.turn.refusal is not None:  # as chat: the refusal is the answer, nothing echoed
            for j in range(n):
                choices[i * n + j] = p.CompletionChoice(
                    index=i * n + j, text=plan.turn.refusal, finish_reason="content_filter"
                )
                herds[i * n + j] = plan.turn.herd()
    for k, r in enumerate(results):
        index = choice_of[k]
        plan = plans[index // n]
        w = await finish_whole(state, plan.turn, None, r)
        await plan.turn.finish(state, w.decisions)
        # Logprobs carry the tokens themselves: not when a shield changed or withheld the text.
        lp = _completion_logprobs(r.events, len(plan.echo)) if req.logprobs is not None and w.shown else None
        choices[index] = p.CompletionChoice(index=index, text=plan.echo + w.text, logprobs=lp,
                                            finish_reason=w.finish)
        herds[index] = w.herd
    # The shared-prompt min() of chat does not apply across different prompts.
    usage = _usage(prompt_tokens, [r.finish for r in results],
                   cached=sum(r.finish.usage.cached_tokens for r in results[::n]))
    return json_response(
        p.Completion(
            id=rid,
            choices=[choices[i] for i in sorted(choices)],
            created=created,
            model=req.model,
            system_fingerprint=FINGERPRINT,
            usage=usage,
            herd=herds.get(0),
        )
    )


async def _completion_stream(
    state: ServerState,
    gen: Generation | None,
    req: p.CompletionRequest,
    rid: str,
    created: int,
    plans: list[PromptPlan],
    choice_of: list[int],
    prompt_tokens: int,
) -> AsyncIterator[str]:
    """OpenAI's completion chunks of the pipeline's steps. Refused prompts answer with the
    refusal first; a persona's sources footer and `herd` field ride on each choice's last chunk."""
    n = req.n or 1

    def chunk(i: int, text: str, lp=None, finish: str | None = None, herd: dict | None = None, usage=None) -> str:
        c = p.Completion(
            id=rid,
            choices=[] if i < 0 else [p.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)],
            created=created,
            model=req.model,
            system_fingerprint=FINGERPRINT,
            herd=herd,
            usage=usage,
        )
        return _sse(c.model_dump_json(exclude=None if req.include_usage or usage else {"usage"}))

    streams = [ChoiceStream(plans[index // n].turn, None) for index in choice_of]
    offsets = [len(plans[index // n].echo) for index in choice_of]
    try:
        for i, plan in enumerate(plans):
            for j in range(n):
                if plan.turn.refusal is not None:
                    yield chunk(i * n + j, plan.turn.refusal)
                    yield chunk(i * n + j, "", None, "content_filter", plan.turn.herd())
                elif plan.echo:
                    yield chunk(i * n + j, plan.echo)
        if gen is not None:
            async for k, step in stream_choices(state, gen, streams):
                index = choice_of[k]
                if step.refusal is not None:
                    yield chunk(index, step.refusal)
                lp = None
                if step.token is not None and req.logprobs is not None:
                    lp = _completion_logprobs([step.token], offsets[k])
                if step.token is not None:
                    offsets[k] += len(step.token.bytes.decode("utf-8", errors="replace"))
                if step.last:
                    finish = "stop" if step.finish == "tool_calls" else step.finish
                    yield chunk(index, step.content, None, finish, step.herd)
                elif step.content or lp is not None:
                    yield chunk(index, step.content, lp)
        if req.include_usage:
            finishes = [s.finish_event for s in streams if s.finish_event is not None]
            yield chunk(-1, "", usage=_usage(prompt_tokens, finishes))
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _sse(json.dumps(error_in_stream(e).to_openai()))
    finally:
        if gen is not None:
            gen.cancel()


# ============================================================================
# Embeddings
# ============================================================================


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.EmbeddingRequest, await request.body())
    engine, _ = await state.engine(req.model)
    check_dimensions(engine, req.dimensions)

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
