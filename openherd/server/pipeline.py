"""The one native serving pipeline: from "request parsed" to "choice deltas ready to render".

The OpenAI routes (``openai.py``) and the Ollama routes (``ollama.py``) map their
fields into a :class:`ChatRequest` (or, for a raw prompt, the sampling and limits
of one) and render what comes back; everything with consequences happens here,
once::

    prep = await prepare_chat(state, req, rid)       # persona turn and input shields, tools and
                                                     # grammar, the context policy, seeds and n
    gen = await start_generation(state, prep.engine, prep.jobs(), t0, rid)
    async for i, step in stream_choices(state, gen, prep.choices()):   # streamed
        render step.content / step.calls / step.token / step.finish
    whole = await finish_whole(state, turn, plan, result)               # or whole

``stream_choices`` runs, per choice: stop handling (the engine's), tool-call
parsing, the output shields (a block cancels that sequence and ends the choice
with ``content_filter``), a persona's citations footer and ``herd`` field, and
the audit record. ``finish_whole`` does the same for a finished answer, with
Llama Guard on the whole of it. Usage comes from the FinishEvents each step
carries.

Sampling is one rule for both front ends (:func:`sampling`): the API's
defaults where neither the persona nor the request sets a value, the persona's
defaults, then what the request set; ``top_p == 0`` means greedy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..context import ERROR, ContextPolicy, fit_messages, fit_prompt
from ..engine.backend import Backend, require
from ..engine.types import FinishEvent, GrammarSpec, SamplingParams, TokenEvent
from ..errors import InvalidRequest
from .personas import OutputScreen, Turn, begin_turn, screen_turn
from .serving import ChoiceResult, Generation, ServerState, check_token_ids, raise_for_finish, seeds
from .tools import (
    ParsedCall,
    ToolCallParser,
    ToolCallStreamer,
    ToolFormat,
    detect_format,
    forced_call_grammar,
    minimal_instance,
    prepare_messages,
    shortest_call,
)

__all__ = [
    "ChatRequest",
    "ChoiceStream",
    "PromptPlan",
    "PromptRequest",
    "Prepared",
    "Step",
    "ToolPlan",
    "Whole",
    "finish_whole",
    "persona_overrides",
    "prepare_chat",
    "prepare_prompts",
    "sampling",
    "stream_choices",
]


# ----------------------------------------------------------------------------
# Sampling: one rule
# ----------------------------------------------------------------------------


def sampling(defaults: dict[str, Any], sent: dict[str, Any], engine: Backend | None = None,
             grammar: GrammarSpec | None = None, logprobs: int | None = None) -> SamplingParams:
    """SamplingParams for a plain model: the API's `defaults`, then what the request `sent`
    (SamplingParams field names; None values do not count)."""
    values = {**defaults, **{k: v for k, v in sent.items() if v is not None}}
    values = greedy_top_p(values)
    params = SamplingParams(**values, logprobs=logprobs, grammar=grammar)
    if engine is not None:
        check_token_ids(engine, list(params.logit_bias), "logit_bias")
    return params


def greedy_top_p(values: dict[str, Any]) -> dict[str, Any]:
    """``top_p == 0`` is "only the most likely token" (OpenAI and Ollama alike): greedy, with
    the nucleus off (SamplingParams itself takes top_p in (0, 1])."""
    if values.get("top_p") == 0.0:
        values = {**values, "temperature": 0.0, "top_p": 1.0}
    return values


def persona_overrides(defaults: dict[str, Any], sent: dict[str, Any], persona,
                      grammar: GrammarSpec | None, logprobs: int | None) -> dict[str, Any]:
    """What a persona request runs with, as overrides of the persona's own defaults: the API's
    `defaults` where the persona sets nothing, then what the request `sent` (the same rule as
    :func:`sampling`, with the persona's defaults between the two)."""
    own = persona.sampling.values()
    out = {k: v for k, v in defaults.items() if k not in own}
    out.update({k: v for k, v in sent.items() if v is not None})
    out = greedy_top_p(out)
    out["logprobs"] = logprobs
    out["grammar"] = grammar
    return out


# ----------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------


@dataclass
class ToolPlan:
    fmt: ToolFormat
    names: set[str]
    parallel: bool
    parse: bool  # read tool calls out of the output
    grammar: GrammarSpec | None  # forced call (required / named)
    shortest: str = ""  # the shortest text a forced call can be ("" when no call is forced)

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.fmt, self.names, self.parallel) if self.parse else None

    def streamer(self) -> ToolCallStreamer | None:
        return ToolCallStreamer(self.fmt, self.names, self.parallel) if self.parse else None


def tool_setup(engine: Backend, messages: list[dict], tools: list[dict] | None, choice: str | None,
               parallel: bool) -> tuple[list[dict], list[dict] | None, ToolPlan]:
    """Messages with the tools folded in as this model's format needs, the tools for its
    template, and the plan for reading (or forcing) calls in the output. `choice` is "auto",
    "none", "required" or a function name."""
    fmt = detect_format(engine.template.source)
    tools = tools or []
    choice = choice or ("auto" if tools else "none")
    offered = tools if tools and choice != "none" else None
    messages, template_tools = prepare_messages(messages, offered, fmt)
    grammar, shortest = None, ""
    if choice not in ("auto", "none"):
        name = None if choice == "required" else choice
        grammar, shortest = forced_call_grammar(tools, fmt, name, parallel), shortest_call(tools, fmt, name)
    names = {t["function"]["name"] for t in tools}
    plan = ToolPlan(fmt, names, parallel, parse=offered is not None, grammar=grammar, shortest=shortest)
    return messages, template_tools, plan


def shortest_output(grammar: GrammarSpec | None, plan: ToolPlan | None = None) -> str | None:
    """The shortest output a constrained request can have (None: unconstrained, or no bound)."""
    if plan is not None and plan.shortest:
        return plan.shortest
    if grammar is None:
        return None
    if grammar.kind == "json":
        return "{}"
    if grammar.kind == "json_schema":
        return json.dumps(minimal_instance(grammar.value), separators=(",", ":"), ensure_ascii=False)
    return None


def check_budget(engine: Backend, shortest: str | None, max_tokens: int | None) -> None:
    """A constrained output must be able to end validly: a max_tokens below the shortest valid
    output (as this model's tokenizer writes it) is a 400 up front, with both numbers, rather
    than JSON or a call cut off at the limit."""
    if shortest is None or max_tokens is None:
        return
    need = len(engine.tokenize(shortest, add_special=False, parse_special=True))
    if max_tokens < need:
        raise InvalidRequest(
            f"max_tokens is {max_tokens}, but the shortest valid output for this response_format or "
            f"tool_choice is {need} tokens ({shortest[:120]!r}); raise max_tokens to at least {need}",
            param="max_tokens",
        )


# ----------------------------------------------------------------------------
# The native chat request, prepared
# ----------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """One chat request in native terms, whichever API it came through."""

    model: str  # a store model or a persona id, as the client sent it
    messages: list[dict[str, Any]]  # native message dicts (role, content, tool_calls, ...)
    defaults: dict[str, Any]  # the API's sampling defaults (SamplingParams names)
    sent: dict[str, Any]  # the sampling the request set explicitly
    grammar: GrammarSpec | None = None  # response_format / format
    tools: list[dict] | None = None
    tool_choice: str | None = None  # "auto" | "none" | "required" | a function name; None: auto with tools
    parallel_tool_calls: bool = True
    n: int = 1
    logprobs: int | None = None  # None: off; k: the chosen token's and the top k
    context: ContextPolicy = ERROR  # what an over-long conversation meets (openherd.context)
    keep_alive: float | None = None
    num_ctx: int | None = None


@dataclass
class Prepared:
    """What to submit, and how to read it back."""

    turn: Turn
    engine: Backend | None = None  # None when an input shield refused (nothing was loaded)
    prompt: list[int] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)  # one per choice
    plan: ToolPlan | None = None
    load_s: float = 0.0  # seconds spent loading the model

    def jobs(self) -> list[tuple[list[int], SamplingParams]]:
        return [(self.prompt, sp) for sp in self.params]


def check_capabilities(engine: Backend, grammar: GrammarSpec | None, logprobs: int | None) -> None:
    """A clear 400 naming the backend, before anything is submitted, for what it cannot do."""
    if grammar is not None:
        require(engine, "grammar", "response_format")
    if logprobs is not None:
        require(engine, "logprobs", "logprobs")


async def prepare_chat(state: ServerState, req: ChatRequest, rid: str) -> Prepared:
    """Persona lookup and input shields first (nothing the client sent is templated, logged or
    shown to a model before PII is redacted and blocked topics are refused), then the model,
    tools and grammar, the prompt under the context policy, and the sampling of each choice."""
    turn = await begin_turn(state, req.model, req.messages, rid)
    if turn.refusal is not None:
        return Prepared(turn)
    engine, load_s = await state.engine(turn.served_model, keep_alive=req.keep_alive, num_ctx=req.num_ctx)
    messages, template_tools, plan = await run_in_threadpool(
        tool_setup, engine, turn.messages, req.tools, req.tool_choice, req.parallel_tool_calls
    )
    grammar = plan.grammar or req.grammar
    check_capabilities(engine, grammar, req.logprobs)
    max_tokens = req.sent.get("max_tokens", req.defaults.get("max_tokens"))
    await run_in_threadpool(check_budget, engine, shortest_output(grammar, plan), max_tokens)
    if turn.persona is None:

        def encode(kept: list[dict]) -> list[int]:
            return engine.encode_chat(kept, tools=template_tools)

        fitted = await run_in_threadpool(fit_messages, encode, messages, engine.info.n_ctx, max_tokens, req.context)
        prompt = fitted.prompt
        base = sampling(req.defaults, req.sent, engine, grammar, req.logprobs)
    else:
        overrides = persona_overrides(req.defaults, req.sent, turn.persona, grammar, req.logprobs)
        prep = await turn.prepare(state, overrides, template_tools, messages=messages,
                                  keep_alive=req.keep_alive, num_ctx=req.num_ctx)
        engine, prompt, base = prep.engine, prep.prompt, prep.params
        check_token_ids(engine, list(base.logit_bias), "logit_bias")
    params = [dataclasses.replace(base, seed=s) for s in seeds(base.seed, req.n)]
    return Prepared(turn, engine, prompt, params, plan, load_s)


def raw_prompt(engine: Backend, tokens: list[int], params: SamplingParams) -> list[int]:
    """A raw prompt (completions, generate) under the context policy: it has no turns to drop."""
    if not tokens:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return fit_prompt(tokens, engine.info.n_ctx, params.max_tokens)


# ----------------------------------------------------------------------------
# The native prompt request (completions, generate), prepared
# ----------------------------------------------------------------------------


@dataclass
class PromptRequest:
    """Raw prompts in native terms: OpenAI's legacy completions (one or many prompts, text or
    tokens) and Ollama's generate (one prompt, maybe a system prompt and a token context)."""

    model: str
    prompts: list[str | list[int]]  # each prompt is its own turn, its choices n apart
    defaults: dict[str, Any]
    sent: dict[str, Any]
    grammar: GrammarSpec | None = None
    n: int = 1
    logprobs: int | None = None
    echo: bool = False  # the screened prompt goes before each completion
    template: bool = False  # render system + prompt as a one-turn chat (Ollama without raw)
    system: str | None = None
    context: list[int] = field(default_factory=list)  # token context the prompt continues (Ollama)
    keep_alive: float | None = None
    num_ctx: int | None = None


@dataclass
class PromptPlan:
    """One prompt after its turn (persona, shields): what to run, or the refusal."""

    turn: Turn
    tokens: list[int]  # the prompt for the engine ([] when an input shield refused it)
    echo: str  # what `echo` puts before the completion: the prompt as screened
    params: list[SamplingParams]  # one per choice


def _prompt_texts(engine: Backend, prompts: list[str | list[int]]) -> list[str]:
    """The text of each prompt (token prompts checked against the vocabulary and decoded)."""
    out = []
    for x in prompts:
        if isinstance(x, list):
            check_token_ids(engine, x, "prompt")
            out.append(engine.detokenize(x))
        else:
            out.append(x)
    return out


def _plain_tokens(engine: Backend, req: PromptRequest, original: str | list[int], text: str,
                  messages: list[dict], context_text: str | None) -> list[int]:
    """A plain model's prompt after the input shields: the client's own tokens unless a shield
    rewrote the text (PII redaction), in which case the rewritten text, tokenised; the token
    context (rewritten the same way) in front."""
    context = req.context
    check_token_ids(engine, context, "context")
    if context_text is not None and messages[-2]["content"] != context_text:
        context = engine.tokenize(messages[-2]["content"], False, True)
    screened = messages[-1]["content"]
    if req.template:
        system = [{"role": "system", "content": messages[0]["content"]}] if req.system else []
        toks = engine.encode_chat([*system, {"role": "user", "content": screened}])
        if context and toks and toks[0] == engine.info.bos and engine.info.add_bos:
            toks = toks[1:]  # the context already starts the sequence
    elif screened == text and isinstance(original, list):
        toks = original
    else:
        toks = engine.tokenize(screened, add_special=not context, parse_special=True) if screened else []
    return context + toks


async def prepare_prompts(state: ServerState, req: PromptRequest, persona,
                          rid: str) -> tuple[Backend | None, float, list[PromptPlan]]:
    """(engine, seconds loading, one plan per prompt). As for chat, the persona and the input
    shields come first: each prompt is screened as the user's message (its system prompt and
    token context beside it) before it is tokenised for generation; a persona answers it as a
    one-message conversation. Only token prompts or a token context need the model before the
    shields (they are screened as the text they stand for). The engine is None when every
    prompt was refused (nothing needed loading)."""
    policy = state.shields.policy_for(persona)
    engine: Backend | None = None
    load_s = 0.0
    prompts, texts = req.prompts, [x for x in req.prompts if isinstance(x, str)]
    if persona is None and (policy is None or len(texts) < len(prompts) or req.context):
        engine, load_s = await state.engine(req.model, keep_alive=req.keep_alive, num_ctx=req.num_ctx)
        texts = await run_in_threadpool(_prompt_texts, engine, prompts)
    context_text = None
    if policy is not None and req.context:
        check_token_ids(engine, req.context, "context")
        context_text = await run_in_threadpool(engine.detokenize, req.context)
    plans: list[PromptPlan] = []
    for original, text in zip(prompts, texts, strict=True):
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + (
            [{"role": "user", "content": context_text}] if context_text is not None else []
        ) + [{"role": "user", "content": text}]
        turn = await screen_turn(state, req.model, persona, messages, rid)
        plan = PromptPlan(turn, [], turn.messages[-1]["content"] if req.echo else "", [])
        plans.append(plan)
        if turn.refusal is not None:
            continue
        if persona is not None:
            engine, load_s = await state.engine(persona.served_model, keep_alive=req.keep_alive, num_ctx=req.num_ctx)
            overrides = persona_overrides(req.defaults, req.sent, persona, req.grammar, req.logprobs)
            prep = await turn.prepare(state, overrides, keep_alive=req.keep_alive, num_ctx=req.num_ctx)
            engine, plan.tokens, base = prep.engine, prep.prompt, prep.params
            check_token_ids(engine, list(base.logit_bias), "logit_bias")
        else:
            if engine is None:  # text prompts under a policy: loaded once one passed the shields
                engine, load_s = await state.engine(req.model, keep_alive=req.keep_alive, num_ctx=req.num_ctx)
            base = sampling(req.defaults, req.sent, engine, req.grammar, req.logprobs)
            tokens = await run_in_threadpool(_plain_tokens, engine, req, original, text, turn.messages, context_text)
            plan.tokens = raw_prompt(engine, tokens, base)
        check_capabilities(engine, req.grammar, req.logprobs)
        check_budget(engine, shortest_output(req.grammar), base.max_tokens)
        plan.params = [dataclasses.replace(base, seed=s) for s in seeds(base.seed, req.n)]
    return engine, load_s, plans


# ----------------------------------------------------------------------------
# Choices: streamed
# ----------------------------------------------------------------------------


@dataclass
class Step:
    """What one event of one choice comes to, after tool parsing and the output shields."""

    content: str = ""  # text to send
    calls: list = field(default_factory=list)  # CallDelta pieces (streamer) or whole ParsedCalls
    token: TokenEvent | None = None  # the token, when its logprobs may be shown
    finish: str | None = None  # "stop" | "length" | "tool_calls" | "content_filter" on the last step
    event: FinishEvent | None = None  # the engine's finish (None: a block cut the choice first)
    refusal: str | None = None  # a block before anything was sent: send this as the answer
    herd: dict | None = None  # the `herd` field for the last step
    answer: str = ""  # the answer as sent, on the last step

    @property
    def last(self) -> bool:
        return self.finish is not None


class ChoiceStream:
    """One choice's events through its tool-call parser and output shield."""

    def __init__(self, turn: Turn, plan: ToolPlan | None, incremental: bool = True):
        # OpenAI streams a call's arguments as they are written (CallDelta); Ollama sends
        # each call whole once it is complete (ParsedCall).
        self.parser = None if plan is None else (plan.streamer() if incremental else plan.parser())
        self.incremental = incremental
        self.turn = turn
        self.screen: OutputScreen = turn.output()
        self.n_calls = 0
        self.done = False  # the choice has had its last step (finish or block)
        self.finish_event: FinishEvent | None = None

    def _parse(self, text: str, final: bool, truncated: bool) -> tuple[str, list]:
        p = self.parser
        if p is None:
            return text, []
        content, calls = p.push(text) if self.incremental else p.feed(text)
        if final:
            c2, k2 = p.close(truncated) if self.incremental else p.finish(truncated)
            content, calls = content + c2, calls + k2
        return content, calls

    def step(self, ev: TokenEvent | FinishEvent) -> Step:
        final = isinstance(ev, FinishEvent)
        if final:
            self.finish_event = ev
            raise_for_finish(ev)
        content, calls = self._parse(ev.text, final, final and ev.reason == "length")
        screen = self.screen
        content = screen.feed(content) if content else ""
        if final:
            content += screen.finish()
        if screen.blocked:
            self.done = True
            sent = screen.text()
            return Step(finish="content_filter", event=ev if final else None,
                        refusal=screen.refusal if not sent.strip() else None,
                        herd=self.turn.herd(sent), answer=sent)
        self.n_calls = self.parser.n_calls if self.incremental and self.parser else self.n_calls + len(calls)
        if not final:
            # Logprobs carry the tokens themselves: none while an output shield screens the text.
            return Step(content, calls, token=ev if screen.guard is None else None)
        self.done = True
        answer = screen.text()
        if not self.n_calls:
            content += self.turn.footer(answer)
        reason = "length" if ev.reason == "length" else ("tool_calls" if self.n_calls else "stop")
        return Step(content, calls, finish=reason, event=ev, herd=self.turn.herd(answer), answer=answer)


async def stream_choices(state: ServerState, gen: Generation,
                         choices: list[ChoiceStream]) -> AsyncIterator[tuple[int, Step]]:
    """Every choice's steps in arrival order. A block cancels that choice's sequence (the others
    go on); each choice's output decisions go to the audit log when it ends. The engine's
    FinishEvent of a blocked choice still arrives, for usage (``ChoiceStream.finish_event``)."""
    async for i, ev in gen.events():
        c = choices[i]
        if c.done:  # the abort of a sequence its shield cancelled
            if isinstance(ev, FinishEvent):
                c.finish_event = ev
            continue
        step = c.step(ev)
        if step.finish == "content_filter" and step.event is None:
            gen.cancel_one(i)
        if step.last:
            await c.turn.finish(state, c.screen.decisions())
        yield i, step


# ----------------------------------------------------------------------------
# Choices: whole
# ----------------------------------------------------------------------------


@dataclass
class Whole:
    """A finished choice after tool parsing and the output shields (Llama Guard included)."""

    text: str  # to send: the screened answer and a persona's sources footer (the refusal when blocked)
    answer: str  # the screened answer alone (for `herd`)
    calls: list[ParsedCall]
    finish: str  # "stop" | "length" | "tool_calls" | "content_filter"
    shown: bool  # the text is the model's own tokens: logprobs (and token context) may be returned
    herd: dict | None
    decisions: list


async def finish_whole(state: ServerState, turn: Turn, plan: ToolPlan | None, r: ChoiceResult) -> Whole:
    """A choice generated to its end, as the non-streaming responses send it. The caller records
    the decisions with ``turn.finish``."""
    content, calls = r.text, []
    parser = plan.parser() if plan is not None else None
    if parser is not None:
        c1, k1 = parser.feed(r.text)
        c2, k2 = parser.finish(truncated=r.finish.reason == "length")  # a cut call is no content
        content, calls = c1 + c2, k1 + k2
        if calls:
            content = content.strip()
    # As OpenAI: a cut-off output is "length" even if complete calls precede the cut.
    finish = "length" if r.finish.reason == "length" else ("tool_calls" if calls else "stop")
    text, blocked, decisions = await turn.screen_answer(state, content)
    if blocked:
        calls, finish = [], "content_filter"
    shown = not blocked and text == content
    answer = text
    if text and not calls and not blocked:
        text += turn.footer(text)
    return Whole(text, answer, calls, finish, shown, turn.herd(answer), decisions)

