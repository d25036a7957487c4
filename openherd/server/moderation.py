"""Safety shields as a step in serving.

The shields themselves live in ``openherd.safety``; this module binds them to
the server:

* **Which policy.** The server's global policy (``HERD_SAFETY``: a YAML or JSON
  file with the ``SafetyPolicy`` fields) is a floor for every request. A
  persona's own ``safety:`` policy is merged on top of it
  (``safety.policy.merge_policies``): it can add shields, topics and
  categories and tighten modes, never switch off or loosen a global shield.
* **Llama Guard.** ``LlamaGuardShield.complete`` is bound to greedy decoding
  on the guard model's engine, acquired through the ModelManager like any
  model (so it loads on demand, is shared, and is evicted under the budget).
* **Input.** ``screen_input`` runs topics, PII and Llama Guard on the client's
  messages before they are templated, logged or sent anywhere; a block becomes
  the policy's refusal with ``finish_reason: "content_filter"``.
* **Output.** The front ends wrap each choice's text in ``OutputGuard``; on a
  block they cancel that sequence. A non-streaming answer is also judged by
  Llama Guard as a whole (``check_answer``); streams are not, since a verdict
  on a whole answer cannot stop tokens already sent.
* **Audit.** Every decision goes to ``AuditLog`` ($HERD_HOME/audit.db): kinds,
  categories and counts, never what was said.

``moderate`` is one result of ``/v1/moderations`` (the route is ``moderations.py``),
in OpenAI's shape, with what OpenAI has no field for in the ``herd`` extension.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..errors import HerdError, InvalidRequest, Unavailable
from ..safety import injection as _injection
from ..safety.llama_guard import LlamaGuardShield, Verdict
from ..safety.pii import find_pii
from ..safety.policy import Decision, SafetyPolicy, TopicMatcher, aapply_input, merge_policies, refusal
from ..settings import Settings
from ..untrusted import load_yaml

log = logging.getLogger("openherd.server")

GuardComplete = Callable[[str, str, int], Awaitable[str]]  # (model, prompt, max_tokens) -> text

MAX_POLICY_BYTES = 1024 * 1024
GUARD_MAX_TOKENS = 32  # 'unsafe' and a line of codes; more is rambling

# OpenAI's moderation categories (omni-moderation), in the order of its API reference.
OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

# Llama Guard 3 hazard codes -> the OpenAI categories that cover them. S6 (specialized
# advice), S7 (privacy), S8 (intellectual property), S13 (elections), S14 (code
# interpreter abuse) and custom categories have no OpenAI counterpart: they appear only
# in the `herd` extension (and still flag the input).
S_CODE_TO_OPENAI: dict[str, tuple[str, ...]] = {
    "S1": ("violence", "illicit/violent"),
    "S2": ("illicit",),
    "S3": ("sexual", "illicit"),
    "S4": ("sexual/minors",),
    "S5": ("harassment",),
    "S9": ("violence", "illicit/violent"),
    "S10": ("hate",),
    "S11": ("self-harm",),
    "S12": ("sexual",),
}


# ----------------------------------------------------------------------------
# The global policy
# ----------------------------------------------------------------------------


def load_policy_file(path: str | Path) -> SafetyPolicy:
    """A SafetyPolicy from a YAML or JSON file (JSON is YAML). YAML aliases are refused:
    a policy never needs them and an alias bomb is tiny on disk, exponential in memory."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise InvalidRequest(f"HERD_SAFETY: cannot read the safety policy file ({e.strerror or e})") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise InvalidRequest(f"HERD_SAFETY: the safety policy file is larger than {MAX_POLICY_BYTES} bytes")
    data = load_yaml(raw, "HERD_SAFETY: the safety policy")  # not UTF-8, aliases, too deep: one 400
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidRequest("HERD_SAFETY: the safety policy must be a mapping of SafetyPolicy fields")
    try:
        return SafetyPolicy.from_dict(data)
    except HerdError as e:
        raise InvalidRequest(f"HERD_SAFETY: {e.message}") from None


@dataclass
class Shields:
    """The server's safety state, on ``ServerState.shields``."""

    settings: Settings
    policy: SafetyPolicy | None = None  # the global policy (HERD_SAFETY), None = none
    # Greedy decoding on a guard model: (model, prompt, max_tokens) -> text. Injected by the
    # server (ServerState), which owns the engines; the shields never import serving.
    complete: GuardComplete | None = field(default=None, repr=False)
    _store_of: Callable[[], Any] | None = field(default=None, repr=False)  # -> the server's Store
    _audit: Any = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Shields:
        policy = load_policy_file(settings.safety_policy) if settings.safety_policy else None
        if policy is not None and policy.llama_guard:
            # Fails now, naming what to pull, rather than at the first request.
            LlamaGuardShield(policy.llama_guard, categories=policy.llama_guard_categories or None,
                             custom=policy.llama_guard_custom, store=_store(settings))
        return cls(settings=settings, policy=policy)

    def effective(self, persona) -> SafetyPolicy | None:
        """The global policy with the persona's own merged on top (the global one is a floor)."""
        return merge_policies(self.policy, persona.safety if persona is not None else None)

    def policy_for(self, persona) -> SafetyPolicy | None:
        """The policy a request runs under (``effective``); None when it asks for nothing
        (the request then takes the plain path)."""
        policy = self.effective(persona)
        return policy if policy is not None and policy.active else None

    def bind(self, complete: GuardComplete, store_of: Callable[[], Any]) -> None:
        """Give the shields the server's guard completion and (a getter of) its model store."""
        self.complete = complete
        self._store_of = store_of

    def store(self):
        return self._store_of() if self._store_of is not None else _store(self.settings)

    def audit(self):
        if self._audit is None:
            from ..safety.audit import AuditLog

            self._audit = AuditLog(self.settings.audit_db_path)
        return self._audit

    async def record(self, decisions: Sequence[Decision], *, persona: str | None, model: str | None,
                     request_id: str) -> None:
        """Append decisions to the audit log. A failing audit log is logged, not fatal:
        the shields have already acted, and refusing every request over it helps nobody."""
        if not decisions:
            return
        try:
            await run_in_threadpool(
                self.audit().record_many, list(decisions), persona=persona, model=model, request_id=request_id
            )
        except HerdError as e:
            log.error("safety audit log: %s", e.message)

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
            self._audit = None


def _store(settings: Settings):
    from ..store import Store

    return Store(settings)


# ----------------------------------------------------------------------------
# Llama Guard on the server's engines
# ----------------------------------------------------------------------------


async def guard_for(shields: Shields, policy: SafetyPolicy) -> LlamaGuardShield | None:
    """The policy's Llama Guard shield, bound to the server's engines through
    ``shields.complete``; None without one."""
    if not policy.llama_guard:
        return None
    if shields.complete is None:
        raise Unavailable("the safety policy names a Llama Guard model but no engine is bound to the shields")

    def build() -> LlamaGuardShield:
        return policy.shield(store=shields.store())

    shield = await run_in_threadpool(build)
    model, complete = shield.model, shields.complete

    async def bound(prompt: str, max_tokens: int) -> str:
        return await complete(model, prompt, max_tokens)

    shield.complete = bound
    return shield


async def screen_input(
    shields: Shields, policy: SafetyPolicy, messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[Decision], str | None]:
    """Input shields on the client's messages: (messages to use, decisions, refusal or None)."""
    guard = await guard_for(shields, policy)
    messages, decisions = await aapply_input(policy, messages, guard)
    return messages, decisions, refusal(decisions)


async def check_answer(shields: Shields, policy: SafetyPolicy, messages: list[dict[str, Any]],
                       answer: str) -> Decision | None:
    """Llama Guard on a finished answer (the Agent turn); None when the policy has no guard."""
    guard = await guard_for(shields, policy)
    if guard is None:
        return None
    verdict = await guard.acheck([*messages, {"role": "assistant", "content": answer}], "Agent")
    return _guard_decision(policy, guard, verdict, "output")


def _guard_decision(policy: SafetyPolicy, guard: LlamaGuardShield, verdict: Verdict, direction: str) -> Decision:
    cats = tuple(verdict.categories) if verdict.safe is not None else ("unparsed",)
    counts = {c: 1 for c in cats}
    if guard.blocks(verdict):
        return Decision(direction, "llama_guard", "block", cats, counts, policy.refusal_message)
    if verdict.safe is None:
        return Decision(direction, "llama_guard", "flag", cats, counts)
    return Decision(direction, "llama_guard", "allow")


# ----------------------------------------------------------------------------
# /v1/moderations
# ----------------------------------------------------------------------------


async def moderate(shields: Shields, policy: SafetyPolicy, text: str) -> dict[str, Any]:
    """One result of OpenAI's shape for `text`. Every shield runs: PII (the policy's kinds),
    the policy's blocked topics, the injection scan, and Llama Guard when the policy names
    one. `flagged` is true when any of them found something; scores are 1.0 or 0.0 (the
    shields decide, they do not estimate probabilities)."""
    pii = Counter(f.kind for f in await run_in_threadpool(find_pii, text, policy.pii_kinds or None))
    topics = TopicMatcher(policy.blocked_topics).find(text) if policy.blocked_topics else Counter()
    report = await run_in_threadpool(_injection.scan, text)
    guard = await guard_for(shields, policy)
    verdict: Verdict | None = None
    if guard is not None:
        verdict = await guard.acheck([{"role": "user", "content": text}], "User")
    categories = dict.fromkeys(OPENAI_CATEGORIES, False)
    for code in verdict.categories if verdict is not None else ():
        for name in S_CODE_TO_OPENAI.get(code, ()):
            categories[name] = True
    guard_flag = verdict is not None and guard is not None and guard.blocks(verdict)
    flagged = any(categories.values()) or bool(pii) or bool(topics) or report.flagged or guard_flag
    herd: dict[str, Any] = {
        "pii": dict(sorted(pii.items())),
        "topics": sorted(topics),
        "injection": {"flagged": report.flagged, "score": report.score, "codes": report.codes},
        "llama_guard": None
        if verdict is None
        else {"model": guard.model, "safe": verdict.safe, "categories": list(verdict.categories)},
    }
    return {
        "flagged": flagged,
        "categories": categories,
        "category_scores": {k: 1.0 if v else 0.0 for k, v in categories.items()},
        "category_applied_input_types": {k: ["text"] for k in categories},
        "herd": herd,
    }
