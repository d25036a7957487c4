"""Safety policy and the shield pipeline the server runs around a generation.

A persona (or the server's default) carries a :class:`SafetyPolicy`. For each
request the serving layer calls, in order:

1. ``apply_input(policy, messages, guard)`` (or ``aapply_input`` with an async
   guard) before templating: blocked topics, then PII (redact or block), then
   Llama Guard on the last user turn. It returns the messages to send on and
   the :class:`Decision` list; ``refusal(decisions)`` is the text to answer with
   when a shield blocked (finish_reason "content_filter").
2. ``apply_retrieved(policy, passages)`` on knowledge passages before they go
   into the context: prompt-injection flagging or quarantine.
3. ``OutputGuard(policy)`` around the token stream: ``feed(delta)`` returns the
   text safe to send now (PII redacted, blocked topics held back until they can
   be ruled out), ``finish()`` the rest. When ``guard.blocked`` turns true the
   server stops the generation and sends ``guard.refusal`` if nothing was sent.
4. ``check_output(policy, guard, messages, answer)`` for a Llama Guard verdict on
   a finished answer (non-streaming responses, or post hoc for the audit log).

Every decision goes to ``AuditLog.record`` (audit.py); decisions carry kinds,
categories and counts, never the raw values.

The server's global policy (HERD_SAFETY) is a floor: a persona's own policy runs
merged on top of it, ``merge_policies(global, persona)``, which keeps every global
shield on and takes the stricter of each setting.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import InvalidRequest, Unavailable
from . import injection as _injection
from .llama_guard import LlamaGuardShield, Verdict, build_categories
from .pii import Finding, StreamRedactor, apply_findings, find_pii, parse_kinds

__all__ = [
    "Decision",
    "OutputGuard",
    "SafetyPolicy",
    "TopicMatcher",
    "aapply_input",
    "apply_input",
    "apply_retrieved",
    "check_output",
    "merge_policies",
    "refusal",
]

PII_INPUT_MODES = ("off", "redact", "block")
PII_OUTPUT_MODES = ("off", "redact")
INJECTION_MODES = ("off", "flag", "quarantine")
DEFAULT_REFUSAL = "I can't help with that."
MAX_TOPIC_CHARS = 100


@dataclass
class SafetyPolicy:
    pii_input: str = "off"  # off | redact (placeholders go to the model) | block (refuse the request)
    pii_output: str = "off"  # off | redact (streamed output is redacted as it is generated)
    pii_kinds: list[str] = field(default_factory=list)  # PII kinds the two above act on; [] = all
    llama_guard: str | None = None  # store name of a Llama Guard 3 model; None = no model check
    llama_guard_categories: list[str] = field(default_factory=list)  # S-codes enforced; [] = S1-S14
    llama_guard_custom: list[dict[str, str]] = field(
        default_factory=list
    )  # extra categories S15+: name, description
    llama_guard_fail_closed: bool = True  # an unreadable verdict blocks
    blocked_topics: list[str] = field(default_factory=list)  # phrases; case-insensitive, whole words
    refusal_message: str = DEFAULT_REFUSAL  # the answer when a shield blocks
    injection: str = "off"  # retrieved passages: off | flag (keep, record) | quarantine (drop)

    def __post_init__(self):
        _choice("pii_input", self.pii_input, PII_INPUT_MODES)
        _choice("pii_output", self.pii_output, PII_OUTPUT_MODES)
        _choice("injection", self.injection, INJECTION_MODES)
        self.pii_kinds = sorted(parse_kinds(_str_list("pii_kinds", self.pii_kinds))) if self.pii_kinds else []
        if self.llama_guard is not None:
            if not isinstance(self.llama_guard, str) or not self.llama_guard.strip():
                raise InvalidRequest("llama_guard must be a model name or null", param="llama_guard")
            self.llama_guard = self.llama_guard.strip()
        self.llama_guard_categories = _str_list("llama_guard_categories", self.llama_guard_categories)
        if not isinstance(self.llama_guard_custom, list) or not all(
            isinstance(c, dict) for c in self.llama_guard_custom
        ):
            raise InvalidRequest(
                "llama_guard_custom must be a list of {name, description} objects", param="llama_guard_custom"
            )
        # Validates codes and custom names now, not at the first request.
        build_categories(self.llama_guard_categories or None, (), self.llama_guard_custom)
        self.llama_guard_categories = [c.strip().upper() for c in self.llama_guard_categories]
        if not isinstance(self.llama_guard_fail_closed, bool):
            raise InvalidRequest(
                "llama_guard_fail_closed must be true or false", param="llama_guard_fail_closed"
            )
        topics = []
        for t in _str_list("blocked_topics", self.blocked_topics):
            t = " ".join(t.split())
            if not t:
                continue
            if len(t) > MAX_TOPIC_CHARS:
                raise InvalidRequest(
                    f"blocked topic {t[:20]!r}... is longer than {MAX_TOPIC_CHARS} characters",
                    param="blocked_topics",
                )
            topics.append(t)
        self.blocked_topics = topics
        if not isinstance(self.refusal_message, str) or not self.refusal_message.strip():
            raise InvalidRequest("refusal_message must be a non-empty string", param="refusal_message")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SafetyPolicy:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidRequest("safety policy must be an object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidRequest(
                f"unknown safety policy field {unknown[0]!r}; known: {', '.join(sorted(names))}",
                param=unknown[0],
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def active(self) -> bool:
        return bool(
            self.pii_input != "off"
            or self.pii_output != "off"
            or self.llama_guard
            or self.blocked_topics
            or self.injection != "off"
        )

    def shield(self, **kwargs: Any) -> LlamaGuardShield | None:
        """The Llama Guard shield this policy asks for (resolved in the store), or None."""
        if not self.llama_guard:
            return None
        return LlamaGuardShield(
            self.llama_guard,
            categories=self.llama_guard_categories or None,
            custom=self.llama_guard_custom,
            fail_closed=self.llama_guard_fail_closed,
            **kwargs,
        )


def merge_policies(floor: SafetyPolicy | None, policy: SafetyPolicy | None) -> SafetyPolicy | None:
    """The policy a persona's request runs under: the server's global policy (``floor``,
    HERD_SAFETY) with the persona's own ``policy`` on top. The floor can only be raised:
    every shield either side enables is on, each at the stricter of the two settings, so a
    persona adds shields and categories but never turns off or loosens a global one.

    * modes take the stricter value: pii_input off < redact < block, pii_output off < redact,
      injection off < flag < quarantine; llama_guard_fail_closed is true if either side's is;
    * lists are unions: blocked_topics, and pii_kinds / llama_guard_categories, where [] means
      "all" and so absorbs the other side. A side's kinds count only if it screens PII at all,
      and its categories only if it names a guard (otherwise they are unused defaults, and []
      would widen the other side's list to everything). One kinds list serves both
      directions, so kinds one side redacts on output are also redacted on input;
    * llama_guard_custom: the floor's categories, then the persona's whose names are new;
    * llama_guard: the floor's model when it names one (the operator's choice of guard), else
      the persona's. A policy runs one guard model; the persona's categories join it;
    * refusal_message is the persona's own when it set one (it speaks in the persona's voice),
      else the floor's. It is the reply, not a shield.

    With either side None the other is returned as is (None: no policy at all).
    """
    if floor is None or policy is None:
        return policy if floor is None else floor
    sides = (floor, policy)
    pii_sides = [q for q in sides if q.pii_input != "off" or q.pii_output != "off"]
    guard_sides = [q for q in sides if q.llama_guard]
    custom = list(floor.llama_guard_custom) if floor.llama_guard else []
    seen = {_category_key(c) for c in custom}
    for c in policy.llama_guard_custom if policy.llama_guard else []:
        if _category_key(c) not in seen:
            seen.add(_category_key(c))
            custom.append(c)
    topics: dict[str, str] = {}
    for t in floor.blocked_topics + policy.blocked_topics:  # already whitespace-normalised
        topics.setdefault(t.casefold(), t)
    own_refusal = policy.refusal_message != DEFAULT_REFUSAL
    return SafetyPolicy(
        pii_input=_stricter(floor.pii_input, policy.pii_input, PII_INPUT_MODES),
        pii_output=_stricter(floor.pii_output, policy.pii_output, PII_OUTPUT_MODES),
        pii_kinds=_union_or_all([q.pii_kinds for q in pii_sides]),
        llama_guard=floor.llama_guard or policy.llama_guard,
        llama_guard_categories=sorted(
            _union_or_all([q.llama_guard_categories for q in guard_sides]), key=lambda c: int(c[1:])
        ),
        llama_guard_custom=custom,
        llama_guard_fail_closed=any(q.llama_guard_fail_closed for q in guard_sides) if guard_sides else True,
        blocked_topics=list(topics.values()),
        refusal_message=policy.refusal_message if own_refusal else floor.refusal_message,
        injection=_stricter(floor.injection, policy.injection, INJECTION_MODES),
    )


def _stricter(a: str, b: str, order: tuple[str, ...]) -> str:
    """The later of two modes in `order` (each tuple of modes is listed loosest first)."""
    return order[max(order.index(a), order.index(b))]


def _union_or_all(lists: list[list[str]]) -> list[str]:
    """Union of lists where an empty list means "all" (and so wins); [] when there are none."""
    if not lists or any(not x for x in lists):
        return []
    return sorted(set().union(*lists))


def _category_key(category: dict[str, str]) -> str:
    # build_categories appends the final '.', so 'Pets' and 'pets.' are one category.
    return str(category.get("name", "")).strip().rstrip(".").casefold()


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidRequest(f"{name} must be one of {', '.join(allowed)}, got {value!r}", param=name)


def _str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{name} must be a list of strings", param=name)
    return list(value)


@dataclass(frozen=True)
class Decision:
    direction: str  # "input" | "output"
    shield: str  # "topics" | "pii" | "llama_guard" | "injection"
    action: str  # "allow" | "redact" | "block" | "flag"
    categories: tuple[str, ...] = ()  # PII kinds, S-codes, topic phrases or injection signal codes
    counts: dict[str, int] = field(default_factory=dict)  # per category
    message: str | None = None  # for "block": what the client is told
    # Raw matched values, only so the audit log can store a keyed hash when asked to. Never
    # serialised, never in repr.
    values: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "shield": self.shield,
            "action": self.action,
            "categories": list(self.categories),
            "counts": dict(self.counts),
            "message": self.message,
        }


def refusal(decisions: Iterable[Decision]) -> str | None:
    """The message to answer with when a decision blocked the request, else None."""
    for d in decisions:
        if d.action == "block" and d.message:
            return d.message
    return None


# ---------------------------------------------------------------------------
# Blocked topics
# ---------------------------------------------------------------------------


_GAP = r"\s{1,16}"  # the space between words of a topic; bounded so a stream's hold-back is bounded


def _atoms(topic: str) -> list[str]:
    out: list[str] = []
    for ch in topic:
        if ch.isspace():
            if out and out[-1] != _GAP:
                out.append(_GAP)
        else:
            out.append(re.escape(ch))
    return out


def _nested_prefix(atoms: list[str]) -> str:
    """'a(?:b(?:c)?)?': matches every non-empty prefix of the atom sequence."""
    pattern = atoms[-1]
    for atom in reversed(atoms[:-1]):
        pattern = f"{atom}(?:{pattern})?"
    return pattern


class TopicMatcher:
    """Case-insensitive, whole-word phrase matching, in one pass and in streams."""

    def __init__(self, topics: Sequence[str]):
        self.topics = list(topics)
        parts = sorted(("".join(_atoms(t)) for t in self.topics), key=len, reverse=True)
        self._any = re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)
        self._each = [
            re.compile(r"(?<!\w)" + "".join(_atoms(t)) + r"(?!\w)", re.IGNORECASE) for t in self.topics
        ]
        # A suffix that could still grow into a match: hold it back in streams.
        self._prefix = re.compile(
            r"(?<!\w)(?:" + "|".join(_nested_prefix(_atoms(t)) for t in self.topics) + r")\Z", re.IGNORECASE
        )
        # Longest text a match can span (each gap up to 16 whitespace characters), plus one.
        self.max_len = max(sum(16 if a == _GAP else 1 for a in _atoms(t)) for t in self.topics) + 1

    def topic_of(self, matched: str) -> str:
        for topic, pattern in zip(self.topics, self._each, strict=True):
            if pattern.fullmatch(matched):
                return topic
        return matched

    def find(self, text: str) -> Counter[str]:
        return Counter(self.topic_of(m.group()) for m in self._any.finditer(text))

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return self._any.search(text, pos)

    def hold_from(self, text: str, pos: int) -> int:
        """Index from which text[pos:] could be the start of a topic still being written (or len(text))."""
        start = max(pos, len(text) - self.max_len)
        m = self._prefix.search(text, start)
        return m.start() if m else len(text)


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
    return []


def _map_content(content: Any, fn: Any) -> Any:
    if isinstance(content, str):
        return fn(content)
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                p = {**p, "text": fn(p["text"])}
            out.append(p)
        return out
    return content


# Roles whose content the client (or a tool) controls; the system prompt is the operator's.
_SCREENED_ROLES = ("user", "tool")


def _kind_summary(findings: list[Finding]) -> tuple[tuple[str, ...], dict[str, int]]:
    counts = Counter(f.kind for f in findings)
    return tuple(sorted(counts)), dict(sorted(counts.items()))


def _input_shields(
    policy: SafetyPolicy, messages: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[Decision], bool]:
    """Topics and PII. Returns (messages, decisions, blocked)."""
    decisions: list[Decision] = []
    messages = [m if isinstance(m, dict) else _bad_message() for m in messages]
    if policy.blocked_topics:
        matcher = TopicMatcher(policy.blocked_topics)
        hits: Counter[str] = Counter()
        for m in messages:
            if m.get("role") == "user":
                for text in _content_texts(m.get("content")):
                    hits += matcher.find(text)
        if hits:
            d = Decision(
                "input",
                "topics",
                "block",
                tuple(sorted(hits)),
                dict(sorted(hits.items())),
                policy.refusal_message,
            )
            return messages, [d], True
        decisions.append(Decision("input", "topics", "allow"))
    if policy.pii_input != "off":
        kinds = policy.pii_kinds or None
        findings: list[Finding] = []

        def redact_text(text: str) -> str:
            found = find_pii(text, kinds)
            findings.extend(found)
            return apply_findings(text, found)

        redacted = []
        for m in messages:
            if m.get("role") in _SCREENED_ROLES and "content" in m:
                m = {**m, "content": _map_content(m["content"], redact_text)}
            redacted.append(m)
        cats, counts = _kind_summary(findings)
        values = tuple(f.text for f in findings)
        if findings and policy.pii_input == "block":
            names = ", ".join(k.replace("_", " ") for k in cats)
            msg = f"Your message contains personal data or secrets ({names}); remove them and try again."
            return (
                list(messages),
                decisions + [Decision("input", "pii", "block", cats, counts, msg, values)],
                True,
            )
        if findings:
            messages = redacted
            decisions.append(Decision("input", "pii", "redact", cats, counts, None, values))
        else:
            decisions.append(Decision("input", "pii", "allow"))
    return list(messages), decisions, False


def _bad_message() -> dict[str, Any]:
    raise InvalidRequest("each message must be an object with a role and content", param="messages")


def _guard_decision(
    policy: SafetyPolicy, shield: LlamaGuardShield, verdict: Verdict, direction: str
) -> Decision:
    if verdict.safe is None:
        cats: tuple[str, ...] = ("unparsed",)
    else:
        cats = tuple(verdict.categories)
    counts = {c: 1 for c in cats}
    if shield.blocks(verdict):
        return Decision(direction, "llama_guard", "block", cats, counts, policy.refusal_message)
    if verdict.safe is None:  # failing open: let it through, but leave a trace
        return Decision(direction, "llama_guard", "flag", cats, counts)
    return Decision(direction, "llama_guard", "allow")


def _need_shield(policy: SafetyPolicy, shield: LlamaGuardShield | None) -> LlamaGuardShield:
    if shield is None:
        raise Unavailable(
            f"the safety policy needs the Llama Guard model '{policy.llama_guard}', which is not loaded"
        )
    return shield


def apply_input(
    policy: SafetyPolicy, messages: Sequence[dict[str, Any]], guard: LlamaGuardShield | None = None
) -> tuple[list[dict[str, Any]], list[Decision]]:
    """Run the input shields. The returned messages are copies where redacted; inputs are not mutated."""
    messages, decisions, blocked = _input_shields(policy, messages)
    if blocked or not policy.llama_guard:
        return messages, decisions
    shield = _need_shield(policy, guard)
    decisions.append(_guard_decision(policy, shield, shield.check(messages, "User"), "input"))
    return messages, decisions


async def aapply_input(
    policy: SafetyPolicy, messages: Sequence[dict[str, Any]], guard: LlamaGuardShield | None = None
) -> tuple[list[dict[str, Any]], list[Decision]]:
    """apply_input for a shield whose complete() is async (the server's engine handle)."""
    messages, decisions, blocked = _input_shields(policy, messages)
    if blocked or not policy.llama_guard:
        return messages, decisions
    shield = _need_shield(policy, guard)
    decisions.append(_guard_decision(policy, shield, await shield.acheck(messages, "User"), "input"))
    return messages, decisions


def check_output(
    policy: SafetyPolicy, guard: LlamaGuardShield | None, messages: Sequence[dict[str, Any]], answer: str
) -> Decision | None:
    """Llama Guard verdict on a finished answer (the Agent turn), or None when the policy has no guard."""
    if not policy.llama_guard:
        return None
    shield = _need_shield(policy, guard)
    convo = [*messages, {"role": "assistant", "content": answer}]
    return _guard_decision(policy, shield, shield.check(convo, "Agent"), "output")


def apply_retrieved(policy: SafetyPolicy, passages: Sequence[str]) -> tuple[list[str], list[Decision]]:
    """Screen knowledge passages for prompt injection: 'flag' keeps them and records a decision,
    'quarantine' drops flagged passages (decision 'block'), 'off' passes everything."""
    if policy.injection == "off":
        return list(passages), []
    kept: list[str] = []
    decisions: list[Decision] = []
    for passage in passages:
        report = _injection.scan(passage)
        if not report.flagged:
            kept.append(passage)
            continue
        codes = tuple(report.codes)
        counts = dict(Counter(s.code for s in report.signals))
        if policy.injection == "quarantine":
            decisions.append(Decision("input", "injection", "block", codes, counts))
        else:
            kept.append(passage)
            decisions.append(Decision("input", "injection", "flag", codes, counts))
    if not decisions:
        decisions.append(Decision("input", "injection", "allow"))
    return kept, decisions


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


class OutputGuard:
    """Streaming output shield: PII redaction, then blocked topics.

    ``feed(delta)`` returns what may be sent now; ``finish()`` the rest. Text that could be the start
    of a blocked topic or of a PII value is held back until it can be ruled out, so nothing of either
    is ever sent. Once a blocked topic appears, ``blocked`` is True, the held text is dropped, and
    ``feed``/``finish`` return "" from then on; the caller should cancel the generation and, if it has
    sent nothing yet, answer with ``refusal``.
    """

    def __init__(self, policy: SafetyPolicy):
        self.policy = policy
        kinds = policy.pii_kinds or None
        self._redactor = StreamRedactor(kinds) if policy.pii_output == "redact" else None
        self._topics = TopicMatcher(policy.blocked_topics) if policy.blocked_topics else None
        self._pending = ""  # redacted text held for the topic check
        self._ctx = ""  # tail of what was released, for the topic lookbehind
        self._topic_hit: str | None = None
        self._finished = False
        self.blocked = False
        self.refusal = policy.refusal_message

    def feed(self, delta: str) -> str:
        if self.blocked or not delta:
            return ""
        text = self._redactor.feed(delta) if self._redactor else delta
        return self._topic_stage(text, final=False)

    def finish(self) -> str:
        if self._finished:
            return ""
        self._finished = True
        if self.blocked:
            return ""
        text = self._redactor.finish() if self._redactor else ""
        return self._topic_stage(text, final=True)

    @property
    def decisions(self) -> list[Decision]:
        out: list[Decision] = []
        if self._topics is not None:
            if self._topic_hit is not None:
                out.append(
                    Decision(
                        "output", "topics", "block", (self._topic_hit,), {self._topic_hit: 1}, self.refusal
                    )
                )
            elif self._finished:
                out.append(Decision("output", "topics", "allow"))
        if self._redactor is not None and (self._finished or self.blocked):
            findings = self._redactor.findings
            if findings:
                cats, counts = _kind_summary(findings)
                out.append(
                    Decision("output", "pii", "redact", cats, counts, None, tuple(f.text for f in findings))
                )
            else:
                out.append(Decision("output", "pii", "allow"))
        return out

    def _topic_stage(self, text: str, final: bool) -> str:
        if self._topics is None:
            return text
        self._pending += text
        buf = self._ctx + self._pending
        off = len(self._ctx)
        m = self._topics.search(buf, off)
        # A match that ends at the very end may still grow ('meth' -> 'methods'): wait, unless final.
        if m and (m.end() < len(buf) or final):
            self.blocked = True
            self._topic_hit = self._topics.topic_of(m.group())
            self._pending = ""
            return ""
        if final:
            cut = len(buf)
        else:
            cut = self._topics.hold_from(buf, off)
            if m:
                cut = min(cut, m.start())
        out = buf[off:cut]
        self._ctx = (self._ctx + out)[-8:]
        self._pending = buf[cut:]
        return out
