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
content from calls, incrementally, so calls can be streamed as deltas.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from ..engine.types import GrammarSpec


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
            if not self.fmt.close:  # mistral: the call list runs to the end
                break
            j = self._buf.find(self.fmt.close)
            if j < 0:
                break
            body, self._buf = self._buf[:j], self._buf[j + len(self.fmt.close) :]
            self._in_call = False
            parsed = _decode_calls(body, self.names)
            if parsed:
                calls += self._take(parsed)
            else:
                content += self._content(self.fmt.open + body + self.fmt.close)
        return content, calls

    def _feed_llama3(self) -> tuple[str, list[ParsedCall]]:
        if not self._decided:
            head = self._buf.lstrip()
            if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
                return "", []
            self._decided = True
            self._in_call = head.startswith("{") or head.startswith(PYTHON_TAG)
        if self._in_call:
            return "", []  # a candidate call: decided at finish()
        out, self._buf = self._buf, ""
        return self._content(out), []

    def finish(self) -> tuple[str, list[ParsedCall]]:
        buf, self._buf = self._buf, ""
        content, calls = "", []
        if self._in_call:
            body = buf
            if self.fmt.name == "llama3":
                body = buf.strip()
                body = body[len(PYTHON_TAG) :] if body.startswith(PYTHON_TAG) else body
            parsed = _decode_calls(body, self.names)
            if parsed:
                calls = self._take(parsed)
            else:  # not a call after all: it was content
                content = self._content((self.fmt.open if self.fmt.name != "llama3" else "") + buf)
        else:
            content = self._content(buf)
        if not self.calls:
            content += self._ws  # no calls: the text is returned exactly as generated
        self._ws = ""
        self._in_call = False
        return content, calls


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
