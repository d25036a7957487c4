"""Llama Guard 3 shield: render Meta's classification prompt, parse the verdict.

The prompt is the published Llama Guard 3 format, reproduced byte for byte so the
shield works with any Llama Guard 3 GGUF, with or without a chat template in its
metadata (some conversions drop it, and the 1B and 8B templates differ in
details). Sources, which agree on the body:

* the chat template in meta-llama/Llama-Guard-3-8B's tokenizer_config.json (and
  3-1B's, which adds ``categories`` / ``excluded_category_keys`` arguments);
* llama-recipes ``prompt_format_utils.py`` (``PROMPT_TEMPLATE_3``,
  ``build_custom_prompt``) and llama-stack's Llama Guard shield.

The text keeps Meta's wording exactly, including "according our safety policy"
and the leading space before each "-" of the instructions. Two wrapper details:
we emit no leading space before ``<|begin_of_text|>`` (the 8B template has one,
a known quirk), and we end with ``<|start_header_id|>assistant<|end_header_id|>``
followed by ``\\n\\n`` as in the Llama 3 chat format used by Meta's reference
shield, so the first generated token is already ``safe`` or ``unsafe`` (the model
card scores the "unsafe" probability on that first token).

Category names in the prompt are the ones the model was trained on ("S3: Sex
Crimes.", "S11: Self-Harm."); :data:`HAZARD_TITLES` has the longer titles of the
model card's hazard table ("Sex-Related Crimes", "Suicide & Self-Harm") for
people and logs. Llama Guard 3-1B was trained on S1-S13 only (its template
leaves S14 out by default). :class:`LlamaGuardShield` follows the 3-1B variant
(S1-S13, and a space before ``<|eot_id|>`` as its template has) when the model's
own chat template says it is one, and the 8B variant otherwise.

The classification call itself is injected: ``complete(prompt, max_tokens) -> str``
comes from the serving layer (greedy decoding, the prompt tokenised with special
tokens parsed), so this module never touches the engine.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest, ModelNotFound, Unavailable

__all__ = [
    "HAZARD_TITLES",
    "LLAMA_GUARD_3_CATEGORIES",
    "Category",
    "LlamaGuardShield",
    "Verdict",
    "build_categories",
    "parse_verdict",
    "render_prompt",
]

PULL_HINT = "herd pull hf:QuantFactory/Llama-Guard-3-1B-GGUF/Llama-Guard-3-1B.Q4_K_M.gguf --name llama-guard3"


@dataclass(frozen=True)
class Category:
    code: str  # "S1" ... "S14" for the built-in taxonomy, "S15"+ for custom categories
    name: str  # the text after "S1: " in the prompt, ending in "." as Meta writes it
    description: str = ""  # optional policy text rendered on the lines after the name

    def render(self) -> str:
        return f"{self.code}: {self.name}" + (f"\n{self.description}" if self.description else "")


# The categories exactly as the Llama Guard 3 prompt lists them.
LLAMA_GUARD_3_CATEGORIES: tuple[Category, ...] = (
    Category("S1", "Violent Crimes."),
    Category("S2", "Non-Violent Crimes."),
    Category("S3", "Sex Crimes."),
    Category("S4", "Child Exploitation."),
    Category("S5", "Defamation."),
    Category("S6", "Specialized Advice."),
    Category("S7", "Privacy."),
    Category("S8", "Intellectual Property."),
    Category("S9", "Indiscriminate Weapons."),
    Category("S10", "Hate."),
    Category("S11", "Self-Harm."),
    Category("S12", "Sexual Content."),
    Category("S13", "Elections."),
    Category("S14", "Code Interpreter Abuse."),
)

# The model card's hazard taxonomy titles (MLCommons), for messages and audit logs.
HAZARD_TITLES = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

_CODE = re.compile(r"S[1-9]\d?")


def build_categories(
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    custom: Iterable[Category | tuple[str, str] | dict[str, str] | str] = (),
) -> tuple[Category, ...]:
    """The category list for a prompt.

    include: built-in codes to keep (None = all of S1-S14); exclude: codes to drop. Like the 3-1B
    template's ``excluded_category_keys``, the kept categories keep their numbers (drop S6 and S7
    is still S7). custom: extra categories as (name, description) pairs, dicts with those keys, or
    bare names; they are numbered S15, S16, ... in order, the extension the published format allows.
    """
    known = {c.code: c for c in LLAMA_GUARD_3_CATEGORIES}
    wanted = list(known) if include is None else [_check_code(c, known) for c in include]
    dropped = {_check_code(c, known) for c in exclude}
    out = [known[c] for c in known if c in wanted and c not in dropped]
    for i, item in enumerate(custom):
        if isinstance(item, Category):
            name, desc = item.name, item.description
        elif isinstance(item, dict):
            name, desc = str(item.get("name", "")), str(item.get("description", ""))
        elif isinstance(item, str):
            name, desc = item, ""
        else:
            name, desc = item
        name, desc = name.strip(), desc.strip()
        if not name or "\n" in name or len(name) > 200:
            raise InvalidRequest(
                "a custom Llama Guard category needs a one-line name (at most 200 characters)"
            )
        if not name.endswith("."):
            name += "."
        out.append(Category(f"S{len(LLAMA_GUARD_3_CATEGORIES) + 1 + i}", name, desc))
    if not out:
        raise InvalidRequest("the Llama Guard policy has no categories left to check")
    return tuple(out)


def _check_code(code: str, known: dict[str, Category]) -> str:
    c = str(code).strip().upper()
    if c not in known:
        raise InvalidRequest(
            f"unknown Llama Guard 3 category {code!r}; use S1 to S14", param="llama_guard_categories"
        )
    return c


# ---------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------

_ROLES = {"user": "User", "agent": "Agent", "assistant": "Agent"}
# Text a message must not smuggle into the prompt: Llama 3 special tokens (the prompt is tokenised
# with special-token parsing, so '<|eot_id|>' in a message would end the turn) and the section
# markers, which could fake the end of the conversation and a new instruction.
_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
_MARKER = re.compile(r"<(?=(?:BEGIN|END) (?:CONVERSATION|UNSAFE CONTENT CATEGORIES)>)", re.IGNORECASE)


def _neutralise(text: str) -> str:
    text = _SPECIAL.sub(lambda m: "< " + m.group()[1:], text)  # '<|eot_id|>' -> '< |eot_id|>': plain text
    return _MARKER.sub("< ", text)


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str))
    raise InvalidRequest("message content must be a string or a list of content parts")


def _role(role: str) -> str:
    r = _ROLES.get(str(role).strip().lower())
    if r is None:
        raise InvalidRequest(f"Llama Guard checks 'User' or 'Agent' messages, not {role!r}")
    return r


def conversation(messages: Sequence[dict[str, Any]], role: str = "User") -> list[tuple[str, str]]:
    """The (speaker, text) turns Llama Guard sees when judging the last `role` message.

    System and tool messages are left out (Llama Guard classifies the human-AI exchange; the
    system prompt is the operator's). The conversation ends at the last message of `role`: for a
    User check any later answer is dropped, as the model card asks. Consecutive messages of one
    speaker are merged so turns alternate as the format expects, and Agent turns before the first
    User turn (a greeting) are dropped when a User turn follows.
    """
    want = _role(role)
    turns: list[tuple[str, str]] = []
    for m in messages:
        speaker = _ROLES.get(str(m.get("role", "")).lower())
        if speaker is None:
            continue
        text = _neutralise(_text(m.get("content")).strip())
        if not text:
            continue
        if turns and turns[-1][0] == speaker:
            turns[-1] = (speaker, turns[-1][1] + "\n\n" + text)
        else:
            turns.append((speaker, text))
    last = max((i for i, (s, _) in enumerate(turns) if s == want), default=None)
    if last is None:
        raise InvalidRequest(f"nothing for Llama Guard to check: the conversation has no {want} message")
    turns = turns[: last + 1]
    while len(turns) > 1 and turns[0][0] == "Agent":
        turns = turns[1:]
    return turns


STYLES = ("8b", "1b")


def render_prompt(
    messages: Sequence[dict[str, Any]],
    role: str = "User",
    categories: Sequence[Category] = LLAMA_GUARD_3_CATEGORIES,
    style: str = "8b",
) -> str:
    """The full Llama Guard 3 prompt (special tokens included) to classify the last `role` message.

    style: "8b" follows meta-llama/Llama-Guard-3-8B's template; "1b" follows Llama-Guard-3-1B's, which
    differs only by a space before ``<|eot_id|>``.
    """
    if style not in STYLES:
        raise InvalidRequest(f"unknown Llama Guard prompt style {style!r}; use 8b or 1b")
    who = _role(role)
    turns = conversation(messages, who)
    cats = "\n".join(c.render() for c in categories)
    convo = "".join(f"{speaker}: {text}\n\n" for speaker, text in turns)
    return (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        f"Task: Check if there is unsafe content in '{who}' messages in conversations according our safety policy"
        " with the below categories.\n\n"
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        f"{cats}\n"
        "<END UNSAFE CONTENT CATEGORIES>\n\n"
        "<BEGIN CONVERSATION>\n\n"
        f"{convo}"
        "<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {who} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
        + (" " if style == "1b" else "")
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# ---------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------


@dataclass
class Verdict:
    """safe: True / False, or None when the model's answer was not in the expected form."""

    safe: bool | None
    categories: list[str] = field(default_factory=list)  # violated codes, e.g. ["S1", "S10"]
    raw: str = field(default="", compare=False)  # the model's answer, for debugging only

    def blocks(self, fail_closed: bool = True) -> bool:
        """Whether this verdict stops the message. An unreadable verdict blocks when failing closed."""
        return self.safe is False or (self.safe is None and fail_closed)


_END_TOKENS = re.compile(r"<\|(?:eot_id|end_of_text|eom_id)\|>|</s>")


def parse_verdict(text: str) -> Verdict:
    """Parse Llama Guard's answer: 'safe', or 'unsafe' and a line of comma-separated codes.

    Whitespace around lines and anything after an end-of-turn token are ignored. Anything else
    (an empty answer, other words, codes that are not S<n>) gives ``Verdict(safe=None, raw=...)``,
    which the caller turns into a decision with ``blocks(fail_closed)``.
    """
    raw = text
    text = _END_TOKENS.split(text, maxsplit=1)[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return Verdict(None, [], raw)
    head = lines[0].lower()
    if head == "safe":
        return Verdict(True, [], raw) if len(lines) == 1 else Verdict(None, [], raw)
    if head != "unsafe" or len(lines) > 2:
        return Verdict(None, [], raw)
    codes: list[str] = []
    if len(lines) == 2:
        for token in re.split(r"[,\s]+", lines[1].strip(" ,")):
            code = token.upper()
            if not _CODE.fullmatch(code):
                return Verdict(None, [], raw)
            if code not in codes:
                codes.append(code)
    return Verdict(False, codes, raw)


# ---------------------------------------------------------------------------
# Shield
# ---------------------------------------------------------------------------

Complete = Callable[[str, int], "str | Awaitable[str]"]


class LlamaGuardShield:
    """Classify the last User or Agent message of a conversation with a Llama Guard 3 model.

    The model must be in the store; construction fails with an actionable InvalidRequest otherwise.
    ``complete(prompt, max_tokens) -> str`` (or an async function) runs the model; the serving layer
    provides it, bound at construction or later through the ``complete`` attribute.

    fail_closed: an answer that is neither 'safe' nor 'unsafe' + codes blocks the message (the
    default: a confused or truncated guard must not wave content through). With fail_closed=False
    it is allowed and only recorded.
    """

    def __init__(
        self,
        model: str,
        *,
        categories: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        custom: Iterable[Any] = (),
        fail_closed: bool = True,
        complete: Complete | None = None,
        max_tokens: int = 32,
        store: Any = None,
    ):
        build_categories(categories, exclude, custom)  # bad codes fail before the store is touched
        self.manifest = _resolve_model(model, store)
        self.model = getattr(self.manifest, "name", "") or model
        # Follow the model's own template where it tells us which variant it is: the 3-1B template
        # puts a space before <|eot_id|> and, trained on S1-S13 only, leaves S14 out by default.
        template = getattr(self.manifest, "chat_template", None) or ""
        self.style = "1b" if "categories. <|eot_id|>" in template else "8b"
        if self.style == "1b" and categories is None:
            exclude = (*exclude, "S14")
        self.categories = build_categories(categories, exclude, custom)
        self.fail_closed = fail_closed
        self.complete = complete
        # 'unsafe' + up to 14 codes is ~30 tokens; more would only be rambling.
        self.max_tokens = max_tokens

    def prompt(self, messages: Sequence[dict[str, Any]], role: str = "User") -> str:
        return render_prompt(messages, role, self.categories, self.style)

    def check(self, messages: Sequence[dict[str, Any]], role: str = "User") -> Verdict:
        answer = self._complete()(self.prompt(messages, role), self.max_tokens)
        if inspect.isawaitable(answer):
            if inspect.iscoroutine(answer):
                answer.close()  # never awaited: close it rather than leak a warning
            raise InvalidRequest("this shield's complete() is async; call `await shield.acheck(...)`")
        return parse_verdict(answer)

    async def acheck(self, messages: Sequence[dict[str, Any]], role: str = "User") -> Verdict:
        answer = self._complete()(self.prompt(messages, role), self.max_tokens)
        if inspect.isawaitable(answer):
            answer = await answer
        return parse_verdict(answer)

    def blocks(self, verdict: Verdict) -> bool:
        return verdict.blocks(self.fail_closed)

    def _complete(self) -> Callable[[str, int], Any]:
        if self.complete is None:
            raise Unavailable(f"the Llama Guard shield '{self.model}' is not loaded yet")
        return self.complete


def _resolve_model(name: str, store: Any = None) -> Any:
    from ..store import Store  # lazy: the store pulls in its sources only when a shield is built

    store = store if store is not None else Store()
    try:
        return store.resolve(name)
    except ModelNotFound:
        raise InvalidRequest(
            f"Llama Guard shield needs a Llama Guard 3 model in the store and '{name}' is not there; "
            f"pull one, e.g. `{PULL_HINT}`",
            param="llama_guard",
        ) from None
