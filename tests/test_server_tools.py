"""server/tools.py on its own: how tools reach the prompt, what a forced call may be, how calls
are read back. (The parser's streamed-equals-whole properties are in test_server_protocol.py.)"""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher

from openherd.server.tools import (
    HERMES,
    HERMES_INJECTED,
    LLAMA3,
    MISTRAL,
    TOOL_SYSTEM_PROMPT,
    ParsedCall,
    ToolCallParser,
    ToolCallStreamer,
    detect_format,
    forced_call_grammar,
    minimal_instance,
    new_call_id,
    prepare_messages,
    shortest_call,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
NAMES = {"get_weather", "get_time"}

LOOP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3C, snow"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("source, fmt", [
    (None, HERMES_INJECTED),
    ("{{ messages }}", HERMES_INJECTED),  # no tools in the template: ours is taught
    ("{% if tools %}<tool_call>{% endif %}", HERMES),
    ("{% if tools %}[TOOL_CALLS]{% endif %}", MISTRAL),
    ("{% if tools %}<|python_tag|>{% endif %}", LLAMA3),
    ("{% if tools %}{{ tools }}{% endif %}", HERMES_INJECTED),  # tools, but a format we cannot read
])  # fmt: skip
def test_the_format_comes_from_the_template(source, fmt):
    assert detect_format(source) == fmt


def test_call_ids_are_openai_shaped_and_unique():
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)
    assert ParsedCall("f", {"a": "é"}).arguments_json == '{"a": "é"}'  # as json.dumps writes it, unescaped


# ---------------------------------------------------------------------------- prompt side


def test_a_native_template_gets_the_tools_and_dict_arguments():
    messages, tools = prepare_messages(LOOP, TOOLS, HERMES)
    assert tools == TOOLS
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # HF templates want dicts
    assert LOOP[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # the input is not changed
    assert [m["role"] for m in messages] == [m["role"] for m in LOOP]


def test_without_template_support_tools_and_calls_become_text():
    messages, tools = prepare_messages(LOOP, TOOLS, HERMES_INJECTED)
    assert tools is None  # the template never sees them
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools") and json.dumps(WEATHER) in system
    assert messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    # Consecutive tool results are one user turn, each in its own tags.
    assert messages[3]["content"] == "<tool_response>\n-3C, snow\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"
    assert all("_tool_results" not in m for m in messages)


def test_no_system_message_gets_one_for_the_tools():
    messages, _ = prepare_messages([{"role": "user", "content": "hi"}], [TIME], HERMES_INJECTED)
    assert messages[0] == {"role": "system", "content": TOOL_SYSTEM_PROMPT.format(tools=json.dumps(TIME))}


def test_tool_choice_none_shows_no_tools():
    messages, tools = prepare_messages([{"role": "user", "content": "hi"}], None, HERMES_INJECTED)
    assert tools is None and messages == [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------------- forced calls


def _accepts(spec, text: str) -> bool:
    """Whether the Lark grammar's language contains `text` (llguidance, on raw bytes)."""
    import llguidance

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    m = LLMatcher(tok, spec.value)
    ok = all(m.consume_token(b) for b in text.encode("utf-8"))
    return ok and m.is_accepting() and not m.is_error()


class _ByteTokenizer:
    """256 single-byte tokens and an EOS: every string is a token sequence."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"</s>"]
    special_token_ids = [256]

    def __call__(self, s):
        return list(s.encode("utf-8") if isinstance(s, str) else s)


@pytest.fixture(scope="module")
def byte_grammar_support():
    try:
        import llguidance

        llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    except Exception as e:  # the wrapper's duck type differs across llguidance versions
        pytest.fail(f"llguidance cannot build a byte tokenizer here: {e}")


@pytest.mark.parametrize("name", [None, "get_weather"])
def test_a_forced_call_grammar_admits_only_valid_calls(byte_grammar_support, name):
    spec = forced_call_grammar(TOOLS, HERMES, name, parallel=False)
    good = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>'
    assert _accepts(spec, good)
    assert not _accepts(spec, '<tool_call>\n{"name":"get_weather","arguments":{}}\n</tool_call>')  # city required
    assert not _accepts(spec, '<tool_call>\n{"name":"nope","arguments":{}}\n</tool_call>')
    assert not _accepts(spec, "Sure, let me check.")
    assert not _accepts(spec, good + "\n" + good)  # parallel_tool_calls false: one call
    time_call = '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    assert _accepts(spec, time_call) == (name is None)  # a named choice forces that one function


def test_parallel_forced_calls_repeat(byte_grammar_support):
    spec = forced_call_grammar(TOOLS, HERMES, None, parallel=True)
    one = '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    assert _accepts(spec, one + "\n" + one)


def test_mistral_and_llama3_forced_calls(byte_grammar_support):
    assert _accepts(forced_call_grammar(TOOLS, MISTRAL, "get_time"), '[TOOL_CALLS][{"name":"get_time","arguments":{}}]')
    assert _accepts(forced_call_grammar(TOOLS, LLAMA3, "get_time"), '{"name":"get_time","parameters":{}}')
    assert not _accepts(forced_call_grammar(TOOLS, LLAMA3, "get_time"), '{"name":"get_time","arguments":{}}')


# ---------------------------------------------------------------------------- reading calls back


def test_an_unknown_name_stays_content():
    p = ToolCallParser(HERMES, NAMES)
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    content, calls = p.feed(text)
    c2, k2 = p.finish()
    assert calls + k2 == [] and content + c2 == text


def test_the_streamer_announces_then_streams_arguments():
    s = ToolCallStreamer(HERMES, NAMES)
    deltas = []
    for ch in '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>':
        content, d = s.push(ch)
        assert content == ""
        deltas += d
    _, d = s.close()
    deltas += d
    first, rest = deltas[0], deltas[1:]
    assert first.name == "get_weather" and first.id.startswith("call_") and first.arguments == ""
    assert all(d.id is None and d.name is None and d.index == 0 for d in rest)
    assert json.loads("".join(d.arguments for d in rest)) == {"city": "Oslo"}
    assert s.n_calls == 1


# ---------------------------------------------------------------------------- cut by max_tokens


@pytest.mark.parametrize("cut", ['<tool_call>\n{"name": "get_wea', '<tool_call>\n{"name": "get_weather", "argu',
                                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os'])
def test_a_call_cut_by_max_tokens_never_becomes_content(cut):
    for streamer in (False, True):
        p = ToolCallStreamer(HERMES, NAMES) if streamer else ToolCallParser(HERMES, NAMES)
        content, _ = p.push(cut) if streamer else p.feed(cut)
        tail, _ = p.close(truncated=True) if streamer else p.finish(truncated=True)
        assert content + tail == ""
    # Not cut (the model stopped there): the unfinished markup is what it wrote, kept as text.
    p = ToolCallParser(HERMES, NAMES)
    content, _ = p.feed(cut)
    tail, calls = p.finish()
    assert calls == [] and content + tail == cut


def test_content_before_a_cut_call_stays():
    p = ToolCallParser(HERMES, NAMES)
    content, _ = p.feed('Let me check.\n<tool_call>\n{"name": "get_ti')
    tail, calls = p.finish(truncated=True)
    assert calls == [] and (content + tail).strip() == "Let me check."


# ---------------------------------------------------------------------------- the shortest valid output


@pytest.mark.parametrize("schema, shortest", [
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]},
     {"a": ""}),
    ({"type": "object", "properties": {"e": {"enum": ["north", "s", "west"]}}, "required": ["e"]}, {"e": "s"}),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 2}, [False, False]),
    ({"type": "object", "required": ["n"], "properties": {"n": {"type": "object", "required": ["x"],
      "properties": {"x": {"type": "number", "minimum": 3}}}}}, {"n": {"x": 3}}),
    ({"anyOf": [{"type": "string", "minLength": 4}, {"type": "null"}]}, None),
    ({"type": "string", "minLength": 2}, "xx"),
    ("not a schema", {}),
])  # fmt: skip
def test_minimal_instance(schema, shortest):
    assert minimal_instance(schema) == shortest


def test_the_shortest_forced_call(byte_grammar_support):
    call = shortest_call(TOOLS, HERMES, None)
    assert call == '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'  # the cheaper tool
    named = shortest_call(TOOLS, HERMES, "get_weather")
    assert named == '<tool_call>\n{"name":"get_weather","arguments":{"city":""}}\n</tool_call>'
    # Each is a sentence of the forced-call grammar: the bound is reachable.
    assert _accepts(forced_call_grammar(TOOLS, HERMES, None), call)
    assert _accepts(forced_call_grammar(TOOLS, HERMES, "get_weather"), named)
    assert shortest_call(TOOLS, MISTRAL, "get_time") == '[TOOL_CALLS][{"name":"get_time","arguments":{}}]'
