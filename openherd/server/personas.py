"""Personas and shields as a step in serving: what runs before and after the engine.

Every generation request becomes a :class:`Turn`: a chat request (OpenAI's
``/v1/chat/completions``, Ollama's ``/api/chat``) with its messages, and each
prompt of a completion request (``/v1/completions``, ``/api/generate``) as the
user's one message::

    turn = await begin_turn(state, model, messages, rid)   # persona lookup + input shields
    if turn.refusal: answer with it, finish_reason "content_filter"
    prep = await turn.prepare(state, overrides, tools)     # personas: prompt, passages, sampling
    ... generate; each choice's text goes through turn.output() (OutputGuard) as it streams,
        or turn.screen_answer() when whole (OutputGuard, then Llama Guard) ...
    text += turn.footer(answer); body["herd"] = turn.herd(answer)
    await turn.finish(state, decisions)                    # the rest of the audit trail

The policy is the server's global one with the persona's merged on top
(``Shields.policy_for``): the global policy is a floor no persona can lower.
Model ids resolve to store models first: a persona never shadows a model (the
persona layer also refuses to create one under a model's name). Personas run on
their served model (the tuned model when they have one, else the base),
acquired through the server's ModelManager like any request's model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..personas.bundle import Persona, PersonaStore
from ..personas.runtime import PersonaRuntime, PreparedChat
from ..safety.policy import Decision, OutputGuard, SafetyPolicy
from .moderation import check_answer, screen_input

__all__ = ["OutputScreen", "Turn", "begin_turn", "find_persona", "persona_cards", "screen_turn"]


async def find_persona(state, model: str) -> Persona | None:
    """The persona `model` names, or None (store models and catalog aliases win)."""
    store = PersonaStore(state.settings)
    return await run_in_threadpool(store.lookup, model)


async def list_personas(state) -> list[Persona]:
    """Personas served as model ids: those whose name no model has taken."""
    store = PersonaStore(state.settings)

    def served() -> list[Persona]:
        return [p for p in store.list() if not store._model_taken(p.name)]

    return await run_in_threadpool(served)


def persona_cards(personas: list[Persona]) -> list[dict[str, Any]]:
    return [p.model_card() for p in personas]


class OutputScreen:
    """One choice's output through the policy's OutputGuard (PII redaction, blocked topics),
    with what was released so far. A pass-through when the policy screens no output."""

    def __init__(self, policy: SafetyPolicy | None):
        wanted = policy is not None and (policy.pii_output != "off" or bool(policy.blocked_topics))
        self.guard = OutputGuard(policy) if wanted else None
        self.sent: list[str] = []

    @property
    def blocked(self) -> bool:
        return self.guard is not None and self.guard.blocked

    @property
    def refusal(self) -> str:
        return self.guard.refusal if self.guard is not None else ""

    def feed(self, text: str) -> str:
        out = self.guard.feed(text) if self.guard is not None else text
        if out:
            self.sent.append(out)
        return out

    def finish(self) -> str:
        out = self.guard.finish() if self.guard is not None else ""
        if out:
            self.sent.append(out)
        return out

    def text(self) -> str:
        return "".join(self.sent)

    def decisions(self) -> list[Decision]:
        return self.guard.decisions if self.guard is not None else []


@dataclass
class Turn:
    """One chat request after the persona and input-safety steps."""

    rid: str
    model: str  # the model id the client sent
    persona: Persona | None
    policy: SafetyPolicy | None
    messages: list[dict[str, Any]]  # the client's messages after the input shields
    refusal: str | None = None  # set when an input shield blocked
    prep: PreparedChat | None = None
    decisions: list[Decision] = field(default_factory=list)  # already recorded

    @property
    def served_model(self) -> str:
        return self.persona.served_model if self.persona is not None else self.model

    async def prepare(
        self,
        state,
        overrides: dict[str, Any],
        tools: list[dict] | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        keep_alive: float | None = None,
        num_ctx: int | None = None,
    ) -> PreparedChat:
        """The persona's prompt (system prompt, examples, retrieved passages with numbered
        citations, history fitted to the context) and sampling (its defaults under `overrides`)."""
        assert self.persona is not None

        async def acquire(name: str):
            engine, _ = await state.engine(name, keep_alive=keep_alive, num_ctx=num_ctx)
            return engine

        persona = self.persona
        if persona.safety is not None:
            # The runtime reads the injection mode off the persona's policy: give it the merged
            # one, so a global `injection` setting is a floor there too. (A persona without a
            # policy keeps the runtime's own default, quarantine, the strictest mode.)
            persona = dataclasses.replace(persona, safety=state.shields.effective(persona))
        runtime = PersonaRuntime(persona, acquire, state.settings)
        self.prep = await runtime.prepare(messages if messages is not None else self.messages, overrides, tools)
        await state.shields.record(self.prep.decisions, persona=self.persona.name, model=self.served_model,
                                   request_id=self.rid)
        return self.prep

    def output(self) -> OutputScreen:
        return OutputScreen(self.policy)

    async def screen_answer(self, state, text: str) -> tuple[str, bool, list[Decision]]:
        """A finished (non-streamed) answer through the output shields: the OutputGuard, then
        Llama Guard on the whole answer when the policy names one. Returns (text to send,
        blocked, decisions); a blocked answer's text is the refusal. The caller records the
        decisions with ``finish``."""
        if not text or self.policy is None:
            return text, False, []
        decisions: list[Decision] = []
        screen = self.output()
        if screen.guard is not None:
            text = screen.feed(text) + screen.finish()
            decisions += screen.decisions()
            if screen.blocked:
                return screen.refusal, True, decisions
        if text and self.policy.llama_guard:
            verdict = await check_answer(state.shields, self.policy, self.messages, text)
            if verdict is not None:
                decisions.append(verdict)
                if verdict.action == "block":
                    return self.policy.refusal_message, True, decisions
        return text, False, decisions

    def footer(self, answer: str) -> str:
        """The sources line a persona's answer ends with ('' without knowledge)."""
        return self.prep.footer(answer) if self.prep is not None else ""

    def herd(self, answer: str | None = None) -> dict[str, Any] | None:
        """The `herd` extension field: persona, sources, cited passages (None for plain models)."""
        if self.prep is not None:
            return self.prep.herd(answer)
        if self.persona is not None:  # refused before the persona ran
            return {"persona": self.persona.name, "model": self.persona.served_model, "sources": []}
        return None

    async def finish(self, state, decisions: list[Decision]) -> None:
        """Record the output decisions of the request."""
        await state.shields.record(decisions, persona=self.persona.name if self.persona else None,
                                   model=self.served_model, request_id=self.rid)


async def begin_turn(state, model: str, messages: list[dict[str, Any]], rid: str) -> Turn:
    """Resolve the persona and run the input shields (before anything is templated or logged)."""
    persona = await find_persona(state, model)
    return await screen_turn(state, model, persona, messages, rid)


async def screen_turn(state, model: str, persona: Persona | None, messages: list[dict[str, Any]],
                      rid: str) -> Turn:
    """A Turn for `messages` under the policy of `persona` (already looked up): the input shields
    run here. The completion routes call this once per prompt, each prompt being its own turn."""
    policy = state.shields.policy_for(persona)
    turn = Turn(rid=rid, model=model, persona=persona, policy=policy, messages=messages)
    if policy is None:
        return turn
    turn.messages, turn.decisions, turn.refusal = await screen_input(state.shields, policy, messages)
    await state.shields.record(turn.decisions, persona=persona.name if persona else None,
                               model=turn.served_model, request_id=rid)
    return turn
