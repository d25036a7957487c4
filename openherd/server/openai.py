"""The OpenAI API (``/v1``) over the native engine.

Each handler parses its request (``protocol``), translates it into token
prompts and ``SamplingParams``, starts a ``Generation`` (``serving``) and
returns one of three things: a full JSON response, an SSE stream in OpenAI's
exact chunk format, or (by raising a ``HerdError``) an OpenAI error body.

SSE format, as OpenAI sends it: one ``data: {json}\\n\\n`` per chunk; the first
chunk of each choice carries ``delta.role``; the last carries ``finish_reason``
and an empty delta; with ``stream_options.include_usage`` every chunk has
``"usage": null`` and one more chunk with ``"choices": []`` carries the totals;
then ``data: [DONE]``. A tool call streams as OpenAI's do: one delta with its
index, id, type and function name (arguments ``""``), then deltas with fragments
of its arguments as the model writes them (``tools.ToolCallStreamer``).

Every generation route (chat and legacy completions) takes a persona id as
``model`` and runs the input and output shields (``personas.Turn``).
"""

from __future__ import annotations

import base64
import dataclasses
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
from .personas import Turn, begin_turn, find_persona, list_personas, screen_turn
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
    CallDelta,
    ToolCallParser,
    ToolCallStreamer,
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
    cards += [p.ModelCard(**c) for c in (x.model_card() for x in await list_personas(state))]
    return json_response(p.ModelList(data=cards))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Response:
    state = _state(request)
    if not is_valid_name(model_id):
        raise ModelNotFound(model_id, f"model '{model_id[:80]}' not found")
    manifest = await run_in_threadpool(state.store.get, model_id)
    if manifest is None:
        persona = await find_persona(state, model_id)
        if persona is None:
            raise ModelNotFound(model_id)
        return json_response(p.ModelCard(**persona.model_card()))
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

    def streamer(self) -> ToolCallStreamer | None:
        return ToolCallStreamer(self.fmt, self.names, self.parallel) if self.parse else None


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


def chat_prompt(
    engine, req: p.ChatCompletionRequest, messages: list[dict] | None = None
) -> tuple[list[int], ToolPlan]:
    """The prompt of a chat request on a store model; `messages` (the client's, after the
    input shields) default to the request's own."""
    messages, template_tools, plan = tool_setup(engine, req, messages)
    return engine.encode_chat(messages, tools=template_tools), plan


def tool_setup(
    engine, req: p.ChatCompletionRequest, messages: list[dict] | None = None
) -> tuple[list[dict], list[dict] | None, ToolPlan]:
    """Messages with the tools folded in as this model's format needs, the tools for its
    template, and the plan for reading (or forcing) calls in the output."""
    fmt = detect_format(engine.template.source)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice or ("auto" if tools else "none")
    offered = tools if tools and choice != "none" else None
    if messages is None:
        messages = [_message_dict(m) for m in req.messages]
    messages, template_tools = prepare_messages(messages, offered, fmt)
    parallel = req.parallel_tool_calls is not False
    grammar = None
    if choice == "required":
        grammar = forced_call_grammar(tools, fmt, None, parallel)
    elif isinstance(choice, p.NamedToolChoice):
        grammar = forced_call_grammar(tools, fmt, choice.function.name, parallel)
    names = {t["function"]["name"] for t in tools}
    return messages, template_tools, ToolPlan(fmt, names, parallel, parse=offered is not None, grammar=grammar)


# A persona's sampling: OpenAI's own defaults where the persona sets nothing, the persona's
# defaults, then whatever the request set explicitly (pydantic's defaults do not count).
OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
_OVERRIDES = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("repetition_penalty", "repeat_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("presence_penalty", "presence_penalty"),
    ("seed", "seed"),
)


def persona_overrides(
    req: p.ChatCompletionRequest | p.CompletionRequest,
    persona,
    grammar: GrammarSpec | None,
    logprobs: int | None,
    max_tokens: int | None,
    defaults: dict = OPENAI_SAMPLING,
) -> dict:
    """The sampling a persona request runs with, as overrides of the persona's defaults:
    `defaults` (OpenAI's) where the persona sets nothing, then what the request set."""
    sent = req.model_fields_set
    out: dict = {k: v for k, v in defaults.items() if k not in persona.sampling.values()}
    for name, key in _OVERRIDES:
        if name in sent and getattr(req, name) is not None:
            out[key] = getattr(req, name)
    if out.get("top_p") == 0.0:  # "only the most likely token", as sampling_params()
        out["temperature"], out["top_p"] = 0.0, 1.0
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if req.stop:
        out["stop"] = list(req.stop)
    if req.logit_bias:
        out["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
    out["logprobs"] = logprobs
    out["grammar"] = grammar
    return out


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.ChatCompletionRequest, await request.body())
    rid = request_id("chatcmpl")
    created = int(time.time())
    # Persona lookup and input shields come first: nothing the client sent is templated,
    # logged or shown to a model before PII is redacted and blocked topics are refused.
    turn = await begin_turn(state, req.model, [_message_dict(m) for m in req.messages], rid)
    if turn.refusal is not None:
        return _refused(req, turn, created)
    n = req.n or 1
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if turn.persona is None:
        engine, _ = await state.engine(req.model)
        prompt, plan = await run_in_threadpool(chat_prompt, engine, req, turn.messages)
        grammar = plan.grammar or _grammar(req.response_format)
        params = [
            sampling_params(req, engine, req.completion_limit, grammar, logprobs, s) for s in seeds(req.seed, n)
        ]
    else:
        engine, _ = await state.engine(turn.persona.served_model)
        messages, template_tools, plan = await run_in_threadpool(tool_setup, engine, req, turn.messages)
        grammar = plan.grammar or _grammar(req.response_format)
        overrides = persona_overrides(req, turn.persona, grammar, logprobs, req.completion_limit)
        prep = await turn.prepare(state, overrides, template_tools, messages=messages)
        engine, prompt = prep.engine, prep.prompt
        check_token_ids(engine, list(prep.params.logit_bias), "logit_bias")
        params = [dataclasses.replace(prep.params, seed=s) for s in seeds(prep.params.seed, n)]
    gen = await start_generation(state, engine, [(prompt, sp) for sp in params], t0, rid)
    if req.stream:
        return EventStream(
            _chat_stream(state, gen, req, plan, turn, created, len(prompt)),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results: list[ChoiceResult] = await run_unless_disconnected(request, gen.collect())
    choices = []
    answers: list[str] = []
    decisions = []
    for i, r in enumerate(results):
        content, calls = r.text, []
        parser = plan.parser()
        if parser is not None:
            c1, k1 = parser.feed(r.text)
            c2, k2 = parser.finish()
            content, calls = c1 + c2, k1 + k2
            if calls:
                content = content.strip()
        finish = _finish_reason(r.finish, len(calls))
        unscreened = content
        content, blocked, screened = await turn.screen_answer(state, content)
        decisions += screened
        if blocked:
            calls, finish = [], "content_filter"
        # Logprobs carry the tokens themselves: not when a shield changed or withheld the text.
        shown = req.logprobs and not blocked and content == unscreened
        answers.append(content or "")
        if content and not calls and finish != "content_filter":
            content += turn.footer(content)
        message = p.ResponseMessage(
            content=content if (content or not calls) else None,
            refusal=content if finish == "content_filter" else None,
            tool_calls=[
                p.ResponseToolCall(
                    id=c.id, function=p.ResponseFunctionCall(name=c.name, arguments=c.arguments_json)
                )
                for c in calls
            ]
            or None,
        )
        lp = p.ChoiceLogprobs(content=[_logprob_entry(ev) for ev in r.events]) if shown else None
        choices.append(p.ChatChoice(index=i, message=message, logprobs=lp, finish_reason=finish))
    await turn.finish(state, decisions)
    body = p.ChatCompletion(
        id=rid,
        choices=choices,
        created=created,
        model=req.model,
        system_fingerprint=FINGERPRINT,
        usage=_usage(len(prompt), [r.finish for r in results]),
        herd=turn.herd(answers[0] if answers else None),
    )
    return json_response(body)


def _refused(req: p.ChatCompletionRequest, turn: Turn, created: int) -> Response:
    """An input shield blocked the request: the policy's refusal as the answer of every
    choice, finish_reason "content_filter", and no tokens spent."""
    text = turn.refusal or ""
    n = req.n or 1
    usage = p.UsageInfo(
        prompt_tokens=0, completion_tokens=0, total_tokens=0, prompt_tokens_details=p.PromptTokensDetails()
    )
    herd = turn.herd()
    if not req.stream:
        choices = [
            p.ChatChoice(
                index=i, message=p.ResponseMessage(content=text, refusal=text), finish_reason="content_filter"
            )
            for i in range(n)
        ]
        return json_response(
            p.ChatCompletion(
                id=turn.rid,
                choices=choices,
                created=created,
                model=req.model,
                system_fingerprint=FINGERPRINT,
                usage=usage,
                herd=herd,
            )
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

    return EventStream(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def _screened(screen, ev: TokenEvent | FinishEvent, text: str) -> str:
    """One event's text through a choice's output shield; the finish event flushes what
    the shield held back (after raising for a failed generation)."""
    if isinstance(ev, FinishEvent):
        raise_for_finish(ev)
    out = screen.feed(text) if text else ""
    if isinstance(ev, FinishEvent):
        out += screen.finish()
    return out


def _end_blocked(gen, k: int, ev: TokenEvent | FinishEvent, finishes: list[FinishEvent]) -> None:
    """A shield blocked choice k: keep its finish for usage, or cancel its sequence now."""
    if isinstance(ev, FinishEvent):
        finishes.append(ev)
    else:
        gen.cancel_one(k)


def _sse(obj) -> str:
    return f"data: {obj}\n\n"


async def _chat_stream(
    state: ServerState,
    gen: Generation,
    req: p.ChatCompletionRequest,
    plan: ToolPlan,
    turn: Turn,
    created: int,
    prompt_tokens: int,
) -> AsyncIterator[str]:
    """OpenAI's SSE chunks. Each choice's text passes its output shield as it streams
    (holding back only what could still become a blocked topic or a PII value); on a
    block the sequence is cancelled and the choice ends with finish_reason
    "content_filter". A persona's sources footer and `herd` field ride on the last
    chunks of each choice."""
    rid = turn.rid
    include_usage = req.include_usage
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[p.ChunkChoice], herd: dict | None = None) -> str:
        c = p.ChatCompletionChunk(
            id=rid, choices=choices, created=created, model=req.model, system_fingerprint=FINGERPRINT, herd=herd
        )
        return _sse(c.model_dump_json(exclude=exclude))

    def deltas(content: str, calls: list[CallDelta]) -> list[p.Delta]:
        """OpenAI's deltas for one step: the content, then one delta per tool-call piece
        (the first piece of a call has its id, type and name, with arguments "")."""
        out = [p.Delta(content=content)] if content else []
        for c in calls:
            fn = p.DeltaFunctionCall(name=c.name, arguments=c.arguments)
            call = p.DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None, function=fn)
            out.append(p.Delta(tool_calls=[call]))
        return out

    n = len(gen.handles)
    parsers = [plan.streamer() for _ in range(n)]
    screens = [turn.output() for _ in range(n)]
    stopped = [False] * n  # an output shield ended this choice
    finishes: list[FinishEvent] = []
    decisions = []
    try:
        for i in range(n):
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
        async for i, ev in gen.events():
            if stopped[i]:  # the abort of a sequence its shield cancelled
                if isinstance(ev, FinishEvent):
                    finishes.append(ev)
                continue
            parser = parsers[i]
            text = ev.text
            calls: list[CallDelta] = []
            if parser is not None:
                content, calls = parser.push(text)
                if isinstance(ev, FinishEvent):
                    c2, k2 = parser.close()
                    content, calls = content + c2, calls + k2
            else:
                content = text
            screen = screens[i]
            content = _screened(screen, ev, content)
            if screen.blocked:
                stopped[i] = True
                _end_blocked(gen, i, ev, finishes)
                if not screen.text().strip():  # nothing (but whitespace) went out yet: answer with the refusal
                    yield chunk([p.ChunkChoice(index=i, delta=p.Delta(content=screen.refusal))])
                yield chunk(
                    [p.ChunkChoice(index=i, delta=p.Delta(), finish_reason="content_filter")],
                    herd=turn.herd(screen.text()),
                )
                await turn.finish(state, screen.decisions())
                continue
            if isinstance(ev, TokenEvent):
                # Logprobs carry the tokens themselves: none while an output shield screens the text.
                shown = req.logprobs and screen.guard is None
                lp = p.ChoiceLogprobs(content=[_logprob_entry(ev)]) if shown else None
                pieces = deltas(content, calls)
                if not pieces and lp is not None:
                    pieces = [p.Delta(content="")]
                for k, delta in enumerate(pieces):  # the token's logprobs ride on its first piece
                    yield chunk([p.ChunkChoice(index=i, delta=delta, logprobs=lp if k == 0 else None)])
                continue
            n_calls = parser.n_calls if parser is not None else 0
            answer = screen.text()
            if not n_calls:
                content += turn.footer(answer)
            for delta in deltas(content, calls):
                yield chunk([p.ChunkChoice(index=i, delta=delta)])
            finishes.append(ev)
            decisions += screen.decisions()
            yield chunk(
                [p.ChunkChoice(index=i, delta=p.Delta(), finish_reason=_finish_reason(ev, n_calls))],
                herd=turn.herd(answer),
            )
        await turn.finish(state, decisions)
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


# Legacy completions default to 16 tokens (OpenAI's API reference); a persona's own
# max_tokens, when it sets one, comes first.
OPENAI_COMPLETION_SAMPLING = {**OPENAI_SAMPLING, "max_tokens": 16}


@dataclass
class PromptPlan:
    """One prompt of a completions request: its turn (persona, shields) and what to run."""

    turn: Turn
    tokens: list[int]  # the prompt for the engine ([] when an input shield refused it)
    echo: str  # what `echo` puts before the completion: the prompt as screened
    params: list[SamplingParams]  # one per choice


def _persona_text_prompts(req: p.CompletionRequest, persona) -> list[str]:
    prompts = req.prompts()
    if any(not isinstance(x, str) for x in prompts):
        raise InvalidRequest(
            f"persona '{persona.name}' takes text prompts: send 'prompt' as a string or a list of strings",
            param="prompt",
        )
    if any(not x.strip() for x in prompts):
        raise InvalidRequest("the prompt is empty", param="prompt")
    return prompts  # type: ignore[return-value]


def _screened_tokens(engine, original: str | list[int], text: str, screened: str) -> list[int]:
    """The prompt's tokens after the input shields: the client's own tokens unless a shield
    rewrote the text (PII redaction), in which case the rewritten text, tokenised."""
    if screened == text:
        if isinstance(original, list):
            return original
        return engine.tokenize(original, add_special=True, parse_special=True)
    return engine.tokenize(screened, add_special=True, parse_special=True)


def _prompt_texts(engine, prompts: list[str | list[int]]) -> list[str]:
    """The text of each prompt (token prompts checked against the vocabulary and decoded)."""
    out = []
    for x in prompts:
        if isinstance(x, list):
            check_token_ids(engine, x, "prompt")
            out.append(engine.detokenize(x))
        else:
            out.append(x)
    return out


async def completion_plans(
    state: ServerState, req: p.CompletionRequest, persona, rid: str
) -> tuple[object | None, list[PromptPlan]]:
    """(engine, one plan per prompt). Each prompt is its own turn: the input shields run on it
    as the user's message before it is tokenised for generation; a persona answers it as a
    one-message conversation (its system prompt, examples and knowledge around it). The
    engine is None when every prompt was refused (nothing needed loading)."""
    n = req.n or 1
    grammar = _grammar(req.response_format)
    engine = None
    if persona is not None:
        prompts: list[str | list[int]] = list(_persona_text_prompts(req, persona))
        texts = list(prompts)
    else:
        prompts = req.prompts()
        texts = [x for x in prompts if isinstance(x, str)]
        if len(texts) < len(prompts) or state.shields.policy_for(None) is None:
            engine, _ = await state.engine(req.model)
            texts = await run_in_threadpool(_prompt_texts, engine, prompts)
    plans: list[PromptPlan] = []
    for prompt, text in zip(prompts, texts, strict=True):
        turn = await screen_turn(state, req.model, persona, [{"role": "user", "content": text}], rid)
        screened = turn.messages[0]["content"]  # PII redacted, when the policy says so
        plan = PromptPlan(turn, [], screened if req.echo else "", [])
        plans.append(plan)
        if turn.refusal is not None:
            continue
        if persona is not None:
            max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set else None
            overrides = persona_overrides(
                req, persona, grammar, req.logprobs, max_tokens, defaults=OPENAI_COMPLETION_SAMPLING
            )
            prep = await turn.prepare(state, overrides)
            engine, plan.tokens = prep.engine, prep.prompt
            check_token_ids(engine, list(prep.params.logit_bias), "logit_bias")
            plan.params = [dataclasses.replace(prep.params, seed=s) for s in seeds(prep.params.seed, n)]
            continue
        if engine is None:  # text prompts under a policy: loaded once one passed the shields
            engine, _ = await state.engine(req.model)
        plan.tokens = await run_in_threadpool(_screened_tokens, engine, prompt, text, screened)
        if not plan.tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        plan.params = [
            sampling_params(req, engine, req.max_tokens, grammar, req.logprobs, s) for s in seeds(req.seed, n)
        ]
    return engine, plans


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    t0 = time.perf_counter()
    state = _state(request)
    req = p.parse_request(p.CompletionRequest, await request.body())
    rid = request_id("cmpl")
    created = int(time.time())
    n = req.n or 1
    # As for chat: the persona and the input shields come first, so nothing the client sent
    # is tokenised for generation or shown to a model before PII is redacted and blocked
    # topics are refused. Choice i*n+j is choice j of prompt i, refused or generated.
    persona = await find_persona(state, req.model)
    engine, plans = await completion_plans(state, req, persona, rid)
    jobs: list[tuple[list[int], SamplingParams]] = []
    choice_of: list[int] = []  # job -> choice index
    for i, plan in enumerate(plans):
        for j, sp in enumerate(plan.params):
            jobs.append((plan.tokens, sp))
            choice_of.append(i * n + j)
    gen = await start_generation(state, engine, jobs, t0, rid) if jobs else None
    prompt_tokens = sum(len(plan.tokens) for plan in plans)
    if req.stream:
        return EventStream(
            _completion_stream(state, gen, req, rid, created, plans, choice_of, prompt_tokens),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
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
        turn = plans[index // n].turn
        echo = plans[index // n].echo
        text, blocked, decisions = await turn.screen_answer(state, r.text)
        await turn.finish(state, decisions)
        finish = "content_filter" if blocked else ("length" if r.finish.reason == "length" else "stop")
        answer = text
        if text and not blocked:
            text += turn.footer(text)
        # Logprobs carry the tokens themselves: not when a shield changed or withheld the text.
        shown = req.logprobs is not None and text == r.text
        lp = _completion_logprobs(r.events, len(echo)) if shown else None
        choices[index] = p.CompletionChoice(index=index, text=echo + text, logprobs=lp, finish_reason=finish)
        herds[index] = turn.herd(answer)
    usage = _usage(prompt_tokens, [r.finish for r in results])
    # The shared-prompt min() of chat does not apply across different prompts.
    usage.prompt_tokens_details = p.PromptTokensDetails(
        cached_tokens=sum(r.finish.usage.cached_tokens for r in results[::n])
    )
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
    """OpenAI's completion chunks; each choice's text passes its prompt's output shields as it
    streams, as in chat: on a block the sequence is cancelled, the refusal is sent if nothing
    was, and the choice ends with finish_reason "content_filter". Refused prompts answer with
    the refusal first. A persona's sources footer and `herd` field ride on each choice's
    last chunk."""
    n = req.n or 1

    def chunk(i: int, text: str, lp=None, finish: str | None = None, herd: dict | None = None) -> str:
        c = p.Completion(
            id=rid,
            choices=[p.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)],
            created=created,
            model=req.model,
            system_fingerprint=FINGERPRINT,
            herd=herd,
        )
        return _sse(c.model_dump_json(exclude=None if req.include_usage else {"usage"}))

    screens = [plans[index // n].turn.output() for index in choice_of]
    stopped = [False] * len(choice_of)
    offsets = [len(plans[index // n].echo) for index in choice_of]
    finishes: list[FinishEvent] = []
    try:
        for i, plan in enumerate(plans):
            for j in range(n):
                if plan.turn.refusal is not None:
                    yield chunk(i * n + j, plan.turn.refusal)
                    yield chunk(i * n + j, "", None, "content_filter", plan.turn.herd())
                elif plan.echo:
                    yield chunk(i * n + j, plan.echo)
        async for k, ev in gen.events() if gen is not None else _no_events():
            index = choice_of[k]
            turn, screen = plans[index // n].turn, screens[k]
            if stopped[k]:  # the abort of a sequence its shield cancelled
                if isinstance(ev, FinishEvent):
                    finishes.append(ev)
                continue
            text = _screened(screen, ev, ev.text)
            if screen.blocked:
                stopped[k] = True
                _end_blocked(gen, k, ev, finishes)
                if not screen.text().strip():
                    yield chunk(index, screen.refusal)
                yield chunk(index, "", None, "content_filter", turn.herd(screen.text()))
                await turn.finish(state, screen.decisions())
                continue
            if isinstance(ev, TokenEvent):
                # Logprobs carry the tokens themselves: none while an output shield screens the text.
                shown = req.logprobs is not None and screen.guard is None
                lp = _completion_logprobs([ev], offsets[k]) if shown else None
                if text or lp is not None:
                    yield chunk(index, text, lp)
                offsets[k] += len(ev.bytes.decode("utf-8", errors="replace"))
                continue
            answer = screen.text()
            finishes.append(ev)
            await turn.finish(state, screen.decisions())
            yield chunk(
                index, text + turn.footer(answer), None, "length" if ev.reason == "length" else "stop",
                turn.herd(answer),
            )  # fmt: skip
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
        if gen is not None:
            gen.cancel()


async def _no_events() -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
    return
    yield


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
