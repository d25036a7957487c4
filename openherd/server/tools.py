"""Tool calling: how tools reach the prompt, how forced calls are enforced, and how
calls are read back out of the model's text.

A model's chat template decides the wire format of a call. We recognise the
three families that cover Llama-family fine-tunes:

  hermes   ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5,
           Hermes, SmolLM2 and most community fine-tunes)
  llama3   a bare ``{"name": ..., "parameters": {...}}`` object, optionally after
           ``<|python_tag|>`` (Meta's Llama 3.1+ templates)
  mistral  ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``

A template that does not mention tools at all gets the hermes format taught in
a system prompt (``TOOL_SYSTEM_PROMPT``), and earlier tool calls and results in
the conversation are rendered as text in that format, so any chat model can
take part in a tool loop.

``tool_choice`` "required" and a named function are enforced by constrained
decoding: ``forced_call_grammar`` builds an llguidance Lark grammar whose only
sentences are well-formed calls whose arguments validate against the tool's
JSON schema. "auto" leaves the model free and ``ToolCallParser`` separates
content from calls, incrementally.

Streams (``ToolCallStreamer``) go further, as OpenAI's do: a call is announced
(index, id, name, arguments "") as soon as its name and the opening brace of its
arguments are out, and the arguments follow as fragments while the model writes
them. Fragments are re-serialised as they come (``JsonLexer`` -> ``canonical``)
in exactly the form ``json.dumps`` gives the parsed arguments, so the
concatenated fragments equal the ``arguments`` of the same call unstreamed.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from ..engine.types import GrammarSpec

log = logging.getLogger("openherd.server")


@dataclass(frozen=True)
class ToolFormat:
    name: str  # "hermes" | "llama3" | "mistral"
    native: bool  # the template renders `tools` and tool messages itself
    open: str  # text that starts a call ("" for llama3: the output *is* the call)
    close: str  # text that ends one call ("" = the call runs to the end of the output)
    args_key: str  # "arguments" or "parameters"


HERMES = ToolFormat("hermes", True, "<tool_call>", "</tool_call>", "arguments")
HERMES_INJECTED = ToolFormat("hermes", False, "<tool_call>", "</tool_call>", "arguments")
LLAMA3 = ToolFormat("llama3", True, "", "", "parameters")
MISTRAL = ToolFormat("mistral", True, "[TOOL_CALLS]", "", "arguments")

PYTHON_TAG = "<|python_tag|>"

TOOL_SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def detect_format(template_source: str | None) -> ToolFormat:
    """Pick the call format the model was trained on, from its chat template."""
    src = template_source or ""
    if "tools" not in src:
        return HERMES_INJECTED
    if "[TOOL_CALLS]" in src:
        return MISTRAL
    if "<tool_call>" in src:
        return HERMES
    if PYTHON_TAG in src or "ipython" in src:
        return LLAMA3
    # The template knows tools but speaks a format we cannot parse: teach ours instead
    # rather than promise a format we would then fail to read back.
    return HERMES_INJECTED


def new_call_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


# ----------------------------------------------------------------------------
# Prompt side
# ----------------------------------------------------------------------------


def _args_dict(arguments: Any) -> Any:
    # OpenAI sends arguments as a JSON string; templates (HF convention) expect a dict.
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _call_text(fmt: ToolFormat, call: dict) -> str:
    fn = call.get("function", call)
    obj = {"name": fn.get("name", ""), fmt.args_key: _args_dict(fn.get("arguments", {}))}
    return f"{fmt.open}\n{json.dumps(obj, ensure_ascii=False)}\n{fmt.close}"


def prepare_messages(
    messages: list[dict], tools: list[dict] | None, fmt: ToolFormat
) -> tuple[list[dict], list[dict] | None]:
    """OpenAI-shaped message dicts -> (messages, tools) to hand to the chat template.

    ``tools`` are OpenAI tool dicts ({"type": "function", "function": {...}}) or None
    when the model must not see them (tool_choice "none")."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", {}))
                fn["arguments"] = _args_dict(fn.get("arguments", {}))
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    if fmt.native:
        return out, tools or None
    return _inject(out, tools, fmt), None


def _inject(messages: list[dict], tools: list[dict] | None, fmt: ToolFormat) -> list[dict]:
    """For templates without tool support: tools go into the system prompt, calls and
    results into plain text, so the template only ever sees system/user/assistant."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(fmt, c) for c in m["tool_calls"])
            text = m.get("content") or ""
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        elif role == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        else:
            out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = TOOL_SYSTEM_PROMPT.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ----------------------------------------------------------------------------
# Forced calls: a grammar whose sentences are exactly the valid calls
# ----------------------------------------------------------------------------


def _call_schema(tool: dict, args_key: str) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def forced_call_grammar(
    tools: list[dict], fmt: ToolFormat, name: str | None = None, parallel: bool = True
) -> GrammarSpec:
    """tool_choice "required" (name=None) or a named function -> a Lark grammar
    (llguidance dialect, ``%json`` embeds a JSON schema) that admits only calls."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    schemas = [_call_schema(t, fmt.args_key) for t in chosen]
    call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if fmt.name == "mistral":
        call = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    # Compact JSON only: with flexible whitespace a model may pad a call with
    # newlines until max_tokens (the grammar would allow that forever).
    call = {**call, "x-guidance": {"whitespace_flexible": False}}
    if fmt.name == "mistral":
        lark = f"start: {json.dumps(fmt.open)} %json {json.dumps(call)}\n"
    elif fmt.name == "llama3":
        lark = f"start: %json {json.dumps(call)}\n"
    else:
        repeat = ' ("\\n" call)*' if parallel else ""
        lark = (
            f"start: call{repeat}\n"
            f"call: {json.dumps(fmt.open + chr(10))} body {json.dumps(chr(10) + fmt.close)}\n"
            f"body: %json {json.dumps(call)}\n"
        )
    return GrammarSpec("lark", lark)


# ----------------------------------------------------------------------------
# Reading calls back out of the output
# ----------------------------------------------------------------------------


def _calls_from_json(value: Any, names: set[str]) -> list[ParsedCall] | None:
    """A decoded call object (or list of them) -> calls, or None if it is not one."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for obj in items:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ParsedCall(obj["name"], args))
    return calls or None


def _decode_calls(body: str, names: set[str]) -> list[ParsedCall] | None:
    body = body.strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        # llama3 models sometimes chain calls with ';'; take what decodes.
        try:
            value, end = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            return None
        if body[end:].strip(" ;\n"):
            return None
    except RecursionError:
        return None
    return _calls_from_json(value, names)


def _held_prefix(buf: str, marker: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of marker."""
    for k in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-k:]):
            return k
    return 0


class ToolCallParser:
    """Splits model output into content and tool calls, as it streams.

    ``feed(text)`` returns (content safe to emit now, calls completed now);
    ``finish()`` flushes at the end of generation. Text that merely *might* be the
    start of a call marker is held back until it is decided. Feeding the whole
    output at once gives the non-streaming result, so both paths agree."""

    def __init__(self, fmt: ToolFormat, names: set[str], parallel: bool = True):
        self.fmt = fmt
        self.names = names
        self.parallel = parallel
        self.calls: list[ParsedCall] = []
        self._buf = ""
        self._in_call = False
        self._decided = fmt.name != "llama3"  # llama3: is the output a bare JSON call?
        self._ws = ""  # trailing whitespace held back (see _content)

    def _take(self, calls: list[ParsedCall]) -> list[ParsedCall]:
        if not self.parallel:
            calls = calls[: max(0, 1 - len(self.calls))]
        self.calls.extend(calls)
        return calls

    def _content(self, text: str) -> str:
        # Trailing whitespace is held until more content follows: if the output turns
        # out to end (or continue) with calls, it only separated them and is dropped.
        # Holding it whatever the chunking keeps streamed and whole parses identical.
        if not text:
            return ""
        buf = self._ws + text
        body = buf.rstrip()
        self._ws = buf[len(body) :]
        return body

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buf += text
        if self.fmt.name == "llama3":
            return self._feed_llama3()
        content, calls = "", []
        while True:
            if not self._in_call:
                i = self._buf.find(self.fmt.open)
                if i >= 0:
                    content += self._content(self._buf[:i])
                    self._buf = self._buf[i + len(self.fmt.open) :]
                    self._in_call = True
                    continue
                keep = _held_prefix(self._buf, self.fmt.open)
                content += self._content(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            # In a call, _buf is the body so far: it only grows until the close marker.
            j = self._buf.find(self.fmt.close) if self.fmt.close else -1
            if j < 0:  # no close yet (mistral has none: the call list runs to the end)
                self._grow(self._buf)
                break
            body, self._buf = self._buf[:j], self._buf[j + len(self.fmt.close) :]
            self._in_call = False
            self._grow(body)
            c, k = self._close(body, self.fmt.open + body + self.fmt.close)
            content += c
            calls += k
        return content, calls

    def _feed_llama3(self) -> tuple[str, list[ParsedCall]]:
        if not self._decided:
            head = self._buf.lstrip()
            if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
                return "", []
            self._decided = True
            self._in_call = head.startswith("{") or head.startswith(PYTHON_TAG)
        if self._in_call:
            self._grow(_llama3_body(self._buf))
            return "", []  # a candidate call: decided at finish()
        out, self._buf = self._buf, ""
        return self._content(out), []

    def finish(self, truncated: bool = False) -> tuple[str, list[ParsedCall]]:
        """Flush at the end of generation. `truncated`: max_tokens cut the output, so a call
        still open is a call the model did not get to finish, never content: its markup
        (``<tool_call>{"name": ..., "argu``) is dropped rather than shown as text."""
        buf, self._buf = self._buf, ""
        content, calls = "", []
        if self._in_call:
            body = _llama3_body(buf) if self.fmt.name == "llama3" else buf
            self._grow(body)
            content, calls = self._close(body, (self.fmt.open if self.fmt.name != "llama3" else "") + buf)
            if truncated and not calls:
                content = ""
        else:
            content = self._content(buf)
        if not self._any_calls():
            content += self._ws  # no calls: the text is returned exactly as generated
        self._ws = ""
        self._in_call = False
        return content, calls

    # Hooks for ToolCallStreamer: a call body grew; a call body ended.

    def _grow(self, body: str) -> None:
        pass

    def _close(self, body: str, raw: str) -> tuple[str, list[ParsedCall]]:
        """A complete call body -> (content, calls): its calls, or `raw` as content when the
        body is not a call after all."""
        parsed = _decode_calls(body, self.names)
        if parsed:
            return "", self._take(parsed)
        return self._content(raw), []

    def _any_calls(self) -> bool:
        return bool(self.calls)


def _llama3_body(buf: str) -> str:
    """The JSON part of a llama3 candidate call: the output without <|python_tag|> and the
    surrounding whitespace. Only grows as the output does, as ToolCallStreamer needs."""
    body = buf.lstrip()
    return body[len(PYTHON_TAG) :] if body.startswith(PYTHON_TAG) else body


def parse_tool_calls(
    text: str, fmt: ToolFormat, names: set[str], parallel: bool = True
) -> tuple[str | None, list[ParsedCall]]:
    """Whole output -> (content or None, calls)."""
    p = ToolCallParser(fmt, names, parallel)
    c1, calls1 = p.feed(text)
    c2, calls2 = p.finish()
    content = c1 + c2
    calls = calls1 + calls2
    if calls:
        content = content.strip()
    return (content or None), calls


# ----------------------------------------------------------------------------
# Streaming calls: announce each call early, then its arguments as fragments
# ----------------------------------------------------------------------------

_WS = " \t\n\r"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_ENDS_SCALAR = _WS + ',:]}"[{'


class JsonLexer:
    """An incremental lexer and validator for one JSON value, strict as ``json.loads``
    (which also takes NaN and Infinity). ``feed(text)`` returns the events the text
    completes, each ``(kind, text, depth)``:

      ``{ } [ ] : ,``        structure (text "")
      ``key``, ``str``       a string starts (as an object key / as a value)
      ``chars``              decoded characters of the open string, as they arrive
      ``end``                the open string ends
      ``scalar``             a number, true, false, null (NaN, Infinity) as written

    ``depth`` is the nesting level of the token (0 for the outermost value and its own
    brackets). A surrogate pair escape is decoded as one character, as json.loads does.
    On the first character json.loads would reject, ``broken`` becomes true and the lexer
    stops; once the value is complete (``done``), the rest is ignored (it is the caller's
    to judge: a close marker, a ';' between llama3 calls)."""

    def __init__(self):
        self.stack: list[str] = []  # open containers, "{" or "["
        self.expect = "value"  # value | value_or_close | key | key_or_close | colon | comma_or_close
        self.done = False
        self.broken = False
        self._string: str | None = None  # "key" | "str" while inside a string
        self._escape: str | None = None  # the escape being read, from the backslash
        self._high = ""  # a decoded high surrogate waiting for its low half
        self._scalar = ""  # the literal being read

    def feed(self, text: str) -> list[tuple[str, str, int]]:
        events: list[tuple[str, str, int]] = []
        chars: list[str] = []  # decoded string characters not yet reported
        for ch in text:
            if self.done or self.broken:
                break
            if self._string is not None:
                self._string_char(ch, chars, events)
            elif self._scalar:
                if ch in _ENDS_SCALAR:
                    self._end_scalar(events)
                    if not self.broken:
                        self._char(ch, events)
                else:
                    self._scalar += ch
            else:
                self._char(ch, events)
        if chars:
            events.append(("chars", "".join(chars), len(self.stack)))
        return events

    def _fail(self) -> None:
        self.broken = True

    def _value_done(self) -> None:
        if self.stack:
            self.expect = "comma_or_close"
        else:
            self.done = True

    def _char(self, ch: str, events: list) -> None:
        if ch in _WS:
            return
        depth = len(self.stack)
        expect = self.expect
        if ch == '"' and expect in ("key", "key_or_close"):
            self._string = "key"
            events.append(("key", "", depth))
        elif expect in ("value", "value_or_close") and ch != "]":
            if ch == '"':
                self._string = "str"
                events.append(("str", "", depth))
            elif ch in "{[":
                events.append((ch, "", depth))
                self.stack.append(ch)
                self.expect = "key_or_close" if ch == "{" else "value_or_close"
            elif ch in ",:}":
                self._fail()
            else:
                self._scalar = ch
        elif ch in "}]" and (expect in ("comma_or_close", "key_or_close", "value_or_close")):
            if not self.stack or self.stack[-1] != ("{" if ch == "}" else "["):
                return self._fail()
            if (expect == "key_or_close" and ch != "}") or (expect == "value_or_close" and ch != "]"):
                return self._fail()
            self.stack.pop()
            events.append((ch, "", len(self.stack)))
            self._value_done()
        elif ch == ":" and expect == "colon":
            events.append((":", "", depth))
            self.expect = "value"
        elif ch == "," and expect == "comma_or_close":
            events.append((",", "", depth))
            self.expect = "key" if self.stack[-1] == "{" else "value"
        else:
            self._fail()

    def _end_scalar(self, events: list) -> None:
        literal, self._scalar = self._scalar, ""
        try:
            json.loads(literal)
        except (json.JSONDecodeError, RecursionError, ValueError):
            return self._fail()
        events.append(("scalar", literal, len(self.stack)))
        self._value_done()

    def _string_char(self, ch: str, chars: list[str], events: list) -> None:
        if self._escape is not None:
            esc = self._escape + ch
            if len(esc) == 2:  # the character after the backslash
                if ch == "u":
                    self._escape = esc
                    return
                self._escape = None
                if ch not in _ESCAPES:
                    return self._fail()
                return self._decoded(_ESCAPES[ch], chars)
            if ch not in string.hexdigits:
                return self._fail()
            if len(esc) < 6:  # \uXXXX
                self._escape = esc
                return
            self._escape = None
            return self._decoded(chr(int(esc[2:], 16)), chars)
        if ch == "\\":
            self._escape = "\\"
            return
        if self._high:  # a high surrogate not followed by an escape stays alone (as json.loads)
            chars.append(self._high)
            self._high = ""
        if ch == '"':
            if chars:
                events.append(("chars", "".join(chars), len(self.stack)))
                chars.clear()
            events.append(("end", "", len(self.stack)))
            is_key, self._string = self._string == "key", None
            if is_key:
                self.expect = "colon"
            else:
                self._value_done()
        elif ch < " ":  # json.loads (strict) refuses raw control characters in strings
            self._fail()
        else:
            chars.append(ch)

    def _decoded(self, ch: str, chars: list[str]) -> None:
        if self._high:
            high, self._high = self._high, ""
            if "\udc00" <= ch <= "\udfff":
                chars.append(chr(0x10000 + ((ord(high) - 0xD800) << 10) + (ord(ch) - 0xDC00)))
                return
            chars.append(high)
        if "\ud800" <= ch <= "\udbff":
            self._high = ch
        else:
            chars.append(ch)


def canonical(kind: str, text: str) -> str:
    """One lexer event in json.dumps' own form (separators ', ' and ': ', ensure_ascii=False,
    numbers as Python reads and writes them), so a stream of events spells exactly
    json.dumps(json.loads(the text they came from), ensure_ascii=False)."""
    if kind in ("key", "str", "end"):
        return '"'
    if kind == "chars":
        return json.dumps(text, ensure_ascii=False)[1:-1]
    if kind == "scalar":
        return json.dumps(json.loads(text))
    if kind == ":":
        return ": "
    if kind == ",":
        return ", "
    return kind  # { } [ ]


@dataclass
class _PartialCall:
    """One call object of a body while it streams."""

    name: str | None = None
    name_done: bool = False  # the name string is complete ('get' may yet become 'get_weather')
    args: str = ""  # canonical arguments text so far
    args_key: str | None = None  # "arguments" or "parameters", whichever came first
    args_open: bool = False  # the arguments are an object and its "{" is out: safe to announce
    index: int | None = None  # the call's index among the choice's calls, once announced
    id: str = ""
    sent: int = 0  # characters of `args` already sent


class _BodyTracker:
    """Follows one call body (a call object, or a list of them as mistral writes) as it
    streams: each call's name, and its arguments re-serialised canonically. Arguments
    written as a JSON string ('"arguments": "{\\"city\\": ...}"') are decoded and lexed
    again, as _calls_from_json reads them."""

    def __init__(self):
        self.lexer = JsonLexer()
        self.seen = 0  # characters of the body fed so far
        self.calls: list[_PartialCall] = []
        self._level = 0  # depth of call objects' keys: 1 for a call object, 2 for a list of them
        self._key: str | None = None  # the key being read (at call level)
        # Where we are in the current call's members: None (before a key), "key", "colon",
        # then the value: "name", "args", or "skip" (any other key), "done" (args read).
        self._value: str | None = None
        self._inner: JsonLexer | None = None  # arguments given as a string
        self.broken = False

    def feed(self, body: str) -> None:
        new, self.seen = body[self.seen :], len(body)
        if not new or self.broken:
            return
        for kind, text, depth in self.lexer.feed(new):
            self._event(kind, text, depth)
        if self.lexer.broken:
            self.broken = True

    def _event(self, kind: str, text: str, depth: int) -> None:
        if not self._level:  # the first token says what the body is
            self._level = {"{": 1, "[": 2}.get(kind, 0)
            if not self._level:
                self.broken = True
                return
        level = self._level
        if kind == "{" and depth == level - 1:
            self.calls.append(_PartialCall())
            self._value, self._key, self._inner = None, None, None
            return
        if not self.calls or depth < level:
            return
        call = self.calls[-1]
        if self._value == "args":
            self._args_event(call, kind, text, depth)
            return
        if depth != level:
            return  # inside the value of a key we do not read
        if kind == ",":  # the next member
            self._value, self._key = None, None
        elif self._value is None:
            if kind == "key":
                self._value, self._key = "key", ""
        elif self._value == "key":
            if kind == "chars":
                self._key = (self._key or "") + text
            elif kind == "end":
                self._value = "colon"
        elif self._value == "colon":  # the ':' after the key
            if self._key == "name":
                self._value = "name"
            elif self._key in ("arguments", "parameters") and call.args_key is None:
                self._value, call.args_key = "args", self._key
            else:
                self._value = "skip"
        elif self._value == "name":  # json.loads keeps the last of duplicate keys; so do we
            if kind == "str":
                call.name, call.name_done = "", False
            elif kind == "chars" and call.name is not None:
                call.name += text
            elif kind == "end":
                call.name_done = True

    def _args_event(self, call: _PartialCall, kind: str, text: str, depth: int) -> None:
        level = self._level
        if self._inner is not None:  # arguments as a JSON string: its decoded text is JSON
            if kind == "chars":
                for k, t, _ in self._inner.feed(text):
                    if self._inner is not None:
                        self._emit(call, k, t)
                if self._inner is not None and self._inner.broken:
                    self._value, self._inner = "done", None
            elif kind == "end":
                self._value, self._inner = "done", None
            return
        if depth == level and not call.args:
            if kind == "str":
                self._inner = JsonLexer()
                return
            if kind != "{":  # a list or a scalar is no call's arguments
                self._value = "done"
                return
        self._emit(call, kind, text)
        if kind == "}" and depth == level:
            self._value = "done"

    def _emit(self, call: _PartialCall, kind: str, text: str) -> None:
        if not call.args and kind != "{":  # the arguments inside the string are no object
            self._value, self._inner = "done", None
            return
        call.args += canonical(kind, text)
        call.args_open = True


@dataclass
class CallDelta:
    """A piece of a streamed tool call: the first one of a call carries its id and name
    (with arguments ""), the following ones fragments of its arguments."""

    index: int  # the call's position among the calls of this choice
    arguments: str
    id: str | None = None
    name: str | None = None


class ToolCallStreamer(ToolCallParser):
    """ToolCallParser for streams: the content is the same, and calls come out as
    ``CallDelta``s while they are written (``push(text)``, then ``close()``).

    A call is announced once its name is a known tool and its arguments have opened
    with "{" (so a stray '<tool_call>' in prose, or an unknown name, never becomes a
    call). When a body ends, the parsed call is checked against what was streamed: the
    rest of its arguments (normally "") is sent, and a call that completed without being
    announced (e.g. its "name" came after the arguments) is sent whole. An announced call
    stays a call even if its JSON then breaks or is cut off by max_tokens: like OpenAI's,
    its arguments are then what the model wrote, and they need not parse."""

    def __init__(self, fmt: ToolFormat, names: set[str], parallel: bool = True):
        super().__init__(fmt, names, parallel)
        self.n_calls = 0  # calls announced so far
        self._tracker: _BodyTracker | None = None
        self._deltas: list[CallDelta] = []

    def push(self, text: str) -> tuple[str, list[CallDelta]]:
        content, _ = self.feed(text)
        return content, self._take_deltas()

    def close(self, truncated: bool = False) -> tuple[str, list[CallDelta]]:
        content, _ = self.finish(truncated)
        return content, self._take_deltas()

    def _take_deltas(self) -> list[CallDelta]:
        out, self._deltas = self._deltas, []
        return out

    def _may_announce(self) -> bool:
        return self.parallel or (self.n_calls == 0 and not self.calls)

    def _announce(self, call: _PartialCall, name: str) -> None:
        call.index, call.id = self.n_calls, new_call_id()
        self.n_calls += 1
        self._deltas.append(CallDelta(call.index, "", call.id, name))

    def _send_args(self, call: _PartialCall) -> None:
        if call.index is not None and call.sent < len(call.args):
            self._deltas.append(CallDelta(call.index, call.args[call.sent :]))
            call.sent = len(call.args)

    def _grow(self, body: str) -> None:
        if self._tracker is None:
            self._tracker = _BodyTracker()
        self._tracker.feed(body)
        for call in self._tracker.calls:
            ready = call.args_open and call.name_done and call.name in self.names
            if call.index is None and ready and self._may_announce():
                self._announce(call, call.name)
            self._send_args(call)

    def _close(self, body: str, raw: str) -> tuple[str, list[ParsedCall]]:
        tracker, self._tracker = self._tracker or _BodyTracker(), None
        announced = [c for c in tracker.calls if c.index is not None]
        parsed = _decode_calls(body, self.names)
        if not parsed:
            if announced:  # already sent as calls: they stay calls, not content
                return "", []
            return self._content(raw), []
        sent: list[ParsedCall] = []
        for k, call in enumerate(self._take(parsed)):
            partial = tracker.calls[k] if k < len(tracker.calls) else None
            final = call.arguments_json
            if partial is None or partial.index is None:
                if not self.parallel and self.n_calls:  # the one call allowed was announced,
                    self.calls.remove(call)  # and its body then broke
                    continue
                partial = _PartialCall(args=final)
                self._announce(partial, call.name)
            elif final.startswith(partial.args):
                partial.args = final  # the rest, normally nothing but a closing brace or two
            else:  # duplicate keys and the like: what was sent cannot be taken back
                log.debug("streamed arguments of %s differ from the parsed call", call.name)
            self._send_args(partial)
            call.id = partial.id
            sent.append(call)
        return "", sent

    def _any_calls(self) -> bool:
        return bool(self.calls) or self.n_calls > 0


# ----------------------------------------------------------------------------
# The shortest valid output: what max_tokens must leave room for
# ----------------------------------------------------------------------------


def minimal_instance(schema: Any) -> Any:
    """The shortest JSON value a schema accepts, as compact JSON writes it: required
    properties only, each at its shortest (the shortest enum member or const, "" , 0,
    false, [] or the minimum items, {}, null). Used to refuse, up front, a max_tokens too
    small for any valid constrained output; a schema it cannot read gives {} (no bound)."""
    if not isinstance(schema, dict):
        return {}
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return min(schema["enum"], key=lambda v: len(json.dumps(v, separators=(",", ":"))))
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            options = [minimal_instance(s) for s in schema[key]]
            return min(options, key=lambda v: len(json.dumps(v, separators=(",", ":"))))
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = "null" if "null" in kind else (kind[0] if kind else None)
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {k: minimal_instance(props.get(k, {})) for k in schema.get("required") or []}
    if kind == "array":
        return [minimal_instance(schema.get("items", {})) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "string":
        return "x" * int(schema.get("minLength", 0))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return int(low) + (1 if "exclusiveMinimum" in schema else 0) if isinstance(low, int | float) and low > 0 else 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return {}


def shortest_call(tools: list[dict], fmt: ToolFormat, name: str | None) -> str:
    """The shortest text a forced call (tool_choice "required", or the named function) can be."""
    texts = []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        body = {"name": fn["name"], fmt.args_key: minimal_instance(fn.get("parameters") or {"type": "object"})}
        call = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        if fmt.name == "mistral":
            texts.append(f"{fmt.open}[{call}]")
        elif fmt.name == "llama3":
            texts.append(call)
        else:
            texts.append(f"{fmt.open}\n{call}\n{fmt.close}")
    return min(texts, key=len) if texts else ""
