"""Request schemas and the translation layer, property-based: any out-of-range value
is a 400 naming the parameter, and no input at all is ever a 500.

The app runs in-process (Starlette's TestClient, lifespan included) over a real
ModelManager and store holding the tiny model, so requests that validate really
generate (2 tokens). Pure-function tests cover the tool-call parser, forced-call
grammars, keep_alive parsing, option mapping and the metrics text format.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher
from server_helpers import MODEL, REPO, register_model
from starlette.testclient import TestClient

from openherd.errors import InvalidRequest
from openherd.server import protocol as p
from openherd.server.metrics import Metrics
from openherd.server.tools import (
    HERMES,
    HERMES_INJECTED,
    LLAMA3,
    MISTRAL,
    JsonLexer,
    ToolCallParser,
    ToolCallStreamer,
    canonical,
    detect_format,
    forced_call_grammar,
    parse_tool_calls,
    prepare_messages,
)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, serve_gguf):
    from openherd.server.app import build_app
    from openherd.settings import Settings

    home = tmp_path_factory.mktemp("protocol") / "home"
    register_model(home, serve_gguf)
    app = build_app(Settings(home=home, threads=1, num_parallel=4))
    with TestClient(app, base_url="http://127.0.0.1:11435", raise_server_exceptions=False) as c:
        c.herd_home = home  # what assert_clean_error looks for in every error message
        yield c


def post(client, path: str, body) -> tuple[int, dict | None]:
    raw = json.dumps(body, allow_nan=True)  # NaN/Infinity go out as the invalid JSON some clients send
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    try:
        data = r.json() if "json" in r.headers.get("content-type", "") else None
    except ValueError:
        data = None
    return r.status_code, data


def _machine_paths(home_hint: str | Path = "") -> list[str]:
    """Where this machine keeps things an error message must never name: the server's
    HERD_HOME, the user's home, the virtualenv, the checkout and the temporary directory
    (wherever each of them is on this machine, not only under /tmp)."""
    paths = {str(home_hint), str(Path.home()), sys.prefix, sys.base_prefix, str(REPO), tempfile.gettempdir()}
    # "/" (HOME=/ in some containers) would match every message that contains a slash.
    return sorted(p.rstrip("/") for p in paths if len(p.rstrip("/")) > 1)


def assert_clean_error(status: int, data: dict | None, home_hint: str | Path = "") -> None:
    assert status < 500, data
    if status >= 400:
        err = data["error"]
        msg = err if isinstance(err, str) else err["message"]
        assert "Traceback" not in msg and ".py" not in msg, msg
        leaked = [path for path in _machine_paths(home_hint) if path in msg]
        assert not leaked, (leaked, msg)


BASE_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# field -> strategy of values that are out of range (or the wrong kind) for it
BAD_CHAT = {
    "temperature": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=2.0000001), st.text(max_size=5)),
    "top_p": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0000001)),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=9)),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=2**31)),
    "max_completion_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=2**31)),
    "presence_penalty": st.one_of(st.floats(max_value=-2.0000001), st.floats(min_value=2.0000001)),
    "frequency_penalty": st.one_of(st.floats(max_value=-2.0000001), st.floats(min_value=2.0000001)),
    "top_logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=21)),
    "logit_bias": st.one_of(
        st.dictionaries(
            st.integers(0, 100).map(str),
            st.floats(min_value=100.0001) | st.floats(max_value=-100.0001),
            min_size=1,
        ),
        st.dictionaries(st.text(min_size=1).filter(lambda k: not k.isdigit()), st.just(1), min_size=1),
        st.dictionaries(st.integers(min_value=10**6, max_value=10**8).map(str), st.just(1), min_size=1),
    ),
    "stop": st.one_of(
        st.lists(st.text(max_size=3), min_size=5, max_size=8), st.lists(st.integers(), min_size=1)
    ),
    "seed": st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)),
    "messages": st.one_of(
        st.just([]),
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["robot", "", "function"]), "content": st.just("x")}
            ),
            min_size=1,
        ),
        st.just([{"role": "user"}]),
        st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
    ),
    "response_format": st.one_of(st.just({"type": "xml"}), st.just({"type": "json_schema"}), st.text()),
    "tool_choice": st.one_of(
        st.just("sometimes"), st.just({"type": "function", "function": {"name": "missing"}})
    ),
    "model": st.one_of(st.just(""), st.integers()),
    "stream_options": st.one_of(st.integers(), st.text(min_size=1)),
    "tools": st.just([{"type": "function", "function": {"name": "bad name!"}}]),
}


@FUZZ
@given(data=st.data())
def test_out_of_range_chat_fields_are_400_naming_the_param(app_client, data):
    field = data.draw(st.sampled_from(sorted(BAD_CHAT)))
    value = data.draw(BAD_CHAT[field])
    body = {**BASE_CHAT, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    status, err = post(app_client, "/v1/chat/completions", body)
    assert status == 400, (field, value, err)
    assert err["error"]["type"] == "invalid_request_error"
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return  # NaN/Infinity fail as JSON, before any field is looked at
    assert (err["error"]["param"] or "").startswith(field), (field, err)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
CHAT_FIELDS = [
    "messages",
    "model",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "stream",
    "stream_options",
    "parallel_tool_calls",
    "top_k",
    "min_p",
    "repetition_penalty",
    "user",
]


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(CHAT_FIELDS), json_values, min_size=1, max_size=4))
def test_any_chat_body_is_never_a_500(app_client, fields):
    status, data = post(app_client, "/v1/chat/completions", {**BASE_CHAT, **fields})
    assert_clean_error(status, data, app_client.herd_home)


COMPLETION_FIELDS = [
    "prompt",
    "echo",
    "logprobs",
    "suffix",
    "best_of",
    "n",
    "stop",
    "temperature",
    "seed",
    "logit_bias",
    "stream",
]


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(COMPLETION_FIELDS), json_values, min_size=1, max_size=4))
def test_any_completion_body_is_never_a_500(app_client, fields):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}
    status, data = post(app_client, "/v1/completions", body)
    assert_clean_error(status, data, app_client.herd_home)


@FUZZ
@given(value=json_values)
def test_any_embedding_input_is_never_a_500(app_client, value):
    status, data = post(app_client, "/v1/embeddings", {"model": MODEL, "input": value})
    assert_clean_error(status, data, app_client.herd_home)


OLLAMA_OPTIONS = [
    "num_ctx",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "stop",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "num_gpu",
    "mirostat",
]


@FUZZ
@given(
    options=st.dictionaries(st.sampled_from(OLLAMA_OPTIONS), json_values, max_size=4),
    extra=st.dictionaries(
        st.sampled_from(["format", "keep_alive", "stream", "messages", "tools", "think"]),
        json_values,
        max_size=2,
    ),
)
def test_any_ollama_chat_is_never_a_500(app_client, options, extra):
    # keep_alive 0 would unload the model after each example: slow, not wrong.
    assume(extra.get("keep_alive") not in (0, 0.0, False, "0", "0s"))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "options": {**options, "num_predict": 2},
        **extra,
    }
    status, data = post(app_client, "/api/chat", body)
    assert_clean_error(status, data, app_client.herd_home)
    if status >= 400:
        assert isinstance(data["error"], str)


@FUZZ
@given(body=json_values)
def test_any_json_body_anywhere_is_never_a_500(app_client, body):
    for path in ("/v1/chat/completions", "/api/generate", "/api/show", "/api/embed", "/api/pull"):
        if path == "/api/pull" and isinstance(body, dict) and "model" in body:
            continue  # a valid catalog name would start a real download
        status, data = post(app_client, path, body)
        assert_clean_error(status, data, app_client.herd_home)


def test_malformed_bodies(app_client):
    for raw in (
        b"",
        b"{",
        b"[]",
        b"nul",
        b"[" * 100_000,
        '{"model": "\udcff"}'.encode("utf-8", "surrogatepass"),
        b"\xff\xfe",
    ):
        r = app_client.post("/v1/chat/completions", content=raw)
        assert r.status_code == 400, raw[:20]
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_path_like_names_are_400(app_client):
    status, data = post(app_client, "/v1/chat/completions", {**BASE_CHAT, "model": "not-pulled"})
    assert status == 404 and data["error"]["code"] == "model_not_found" and data["error"]["param"] == "model"
    for name in ("../x", "/etc/passwd", "a/b", "sha256:../x", "x.gguf/.."):
        status, data = post(app_client, "/v1/chat/completions", {**BASE_CHAT, "model": name})
        assert status == 400 and data["error"]["code"] == "invalid_name", name


# ---------------------------------------------------------------------------- protocol units


def test_validation_message_names_nested_params():
    with pytest.raises(InvalidRequest) as e:
        p.parse_request(
            p.ChatCompletionRequest,
            json.dumps({**BASE_CHAT, "messages": [{"role": "user", "content": 5}]}).encode(),
        )
    assert e.value.param == "messages[0].content"
    with pytest.raises(InvalidRequest) as e:
        p.parse_request(p.ChatCompletionRequest, json.dumps({"messages": BASE_CHAT["messages"]}).encode())
    assert e.value.param == "model" and "required" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        p.parse_request(p.ChatCompletionRequest, json.dumps({**BASE_CHAT, "stop": ["a"] * 5}).encode())
    assert e.value.message == "stop: at most 4 stop sequences are allowed"


def test_stop_and_logit_bias_normalised():
    r = p.parse_request(
        p.ChatCompletionRequest, json.dumps({**BASE_CHAT, "stop": "END", "logit_bias": {"5": 3}}).encode()
    )
    assert r.stop == ["END"] and r.logit_bias == {"5": 3.0}
    r = p.parse_request(p.CompletionRequest, json.dumps({"model": "m", "prompt": [1, 2, 3]}).encode())
    assert r.prompts() == [[1, 2, 3]]
    r = p.parse_request(p.CompletionRequest, json.dumps({"model": "m", "prompt": ["a", "b"]}).encode())
    assert r.prompts() == ["a", "b"]


@pytest.mark.parametrize(
    "value, seconds",
    [
        (None, None),
        ("", None),
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        ("30", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("1.5h", 5400.0),
        (-1, p.KEEP_FOREVER),
        ("-1m", p.KEEP_FOREVER),
        ("-1", p.KEEP_FOREVER),
        (1e300, p.KEEP_FOREVER),
    ],
)
def test_keep_alive(value, seconds):
    assert p.parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", "5x", True, [1], float("nan")])
def test_bad_keep_alive(value):
    with pytest.raises(ValueError):
        p.parse_keep_alive(value)


def test_sampling_translation():
    from openherd.server.ollama import sampling_params as ollama_params
    from openherd.server.openai import sampling_params as openai_params

    class FakeInfo:  # only the vocabulary size is consulted
        n_vocab = 512

    class E:
        info = FakeInfo()

    req = p.parse_request(
        p.ChatCompletionRequest, json.dumps({**BASE_CHAT, "top_p": 0, "temperature": 0.7}).encode()
    )
    sp = openai_params(req, E(), 5, None, None, 3)
    assert sp.temperature == 0 and sp.top_p == 1.0 and sp.top_k == 0 and sp.min_p == 0.0 and sp.seed == 3
    opts = p.OllamaOptions(temperature=0.2, top_k=7, num_predict=-1, seed=-1, stop=["x"], repeat_penalty=1.1)
    sp = ollama_params(opts, "json", None, E())
    assert (sp.temperature, sp.top_k, sp.max_tokens, sp.seed, sp.stop, sp.repeat_penalty) == (
        0.2,
        7,
        None,
        None,
        ["x"],
        1.1,
    )
    assert sp.grammar.kind == "json"
    assert (
        ollama_params(p.OllamaOptions(num_predict=9), {"type": "object"}, None, E()).grammar.kind
        == "json_schema"
    )


# ---------------------------------------------------------------------------- tools

NAMES = {"get_weather", "get_time"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


@pytest.mark.parametrize(
    "fmt, text, content, calls",
    [
        (
            HERMES,
            'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            "Sure.",
            [("get_time", {})],
        ),
        (
            HERMES,
            '<tool_call>{"name":"get_weather","arguments":{"city":"Lima"}}</tool_call>\n'
            '<tool_call>{"name":"get_time","arguments":"{}"}</tool_call>',
            None,
            [("get_weather", {"city": "Lima"}), ("get_time", {})],
        ),
        (
            HERMES,
            '<tool_call>\n{"name": "get_time", "arguments": {}}',
            None,
            [("get_time", {})],
        ),  # EOS before </tool_call>
        (
            HERMES,
            '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
            [],
        ),  # unknown tool: left as text
        (HERMES, "no calls <tool here", "no calls <tool here", []),
        (
            LLAMA3,
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
            None,
            [("get_weather", {"city": "Oslo"})],
        ),
        (LLAMA3, '<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
        (LLAMA3, '{"not": "a call"}', '{"not": "a call"}', []),
        (LLAMA3, "Plain answer.", "Plain answer.", []),
        (MISTRAL, '[TOOL_CALLS][{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
    ],
)
def test_parse_tool_calls(fmt, text, content, calls):
    got_content, got = parse_tool_calls(text, fmt, NAMES)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in got)


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 200), max_size=8),
    fmt=st.sampled_from([HERMES, LLAMA3, MISTRAL]),
    prefix=st.sampled_from(["", "Ok. ", "<tool", "{"]),
)
def test_streamed_parsing_equals_whole(cuts, fmt, prefix):
    call = {"name": "get_weather", fmt.args_key: {"city": "Lima"}}
    if fmt.name == "hermes":
        text = f"{prefix}<tool_call>\n{json.dumps(call)}\n</tool_call>\n<tool_call>{json.dumps(call)}</tool_call> bye"
    elif fmt.name == "mistral":
        text = f"{prefix}[TOOL_CALLS][{json.dumps(call)}]"
    else:
        text = json.dumps(call) if not prefix else prefix + "text"
    whole_content, whole_calls = parse_tool_calls(text, fmt, NAMES)
    parser = ToolCallParser(fmt, NAMES)
    pieces, calls = [], []
    last = 0
    for cut in sorted(set(c for c in cuts if c <= len(text))) + [len(text)]:
        c, k = parser.feed(text[last:cut])
        pieces.append(c)
        calls += k
        last = cut
    c, k = parser.finish()
    pieces.append(c)
    calls += k
    streamed = "".join(pieces)
    if calls:
        streamed = streamed.strip()
    assert (streamed or None) == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


def test_detect_format():
    assert detect_format(None) is HERMES_INJECTED
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}") is HERMES_INJECTED
    assert detect_format("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert detect_format("{% if tools %}<|python_tag|>{% endif %}") is LLAMA3
    assert detect_format("{% if tools %}[TOOL_CALLS]{% endif %}") is MISTRAL


def test_prepare_messages_injects_for_plain_templates():
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "22C"},
    ]
    msgs, tools = prepare_messages(history, TOOLS, HERMES_INJECTED)
    assert tools is None
    assert (
        msgs[0]["role"] == "system"
        and "<tools>" in msgs[0]["content"]
        and "get_weather" in msgs[0]["content"]
    )
    assert msgs[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>',
    }
    assert msgs[3]["role"] == "user" and msgs[3]["content"].count("<tool_response>") == 2
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    native, tools = prepare_messages(history, TOOLS, HERMES)
    assert tools == TOOLS and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Lima"}


# ---------------------------------------------------------------------------- streamed tool calls

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
_style = st.sampled_from(
    [{}, {"ensure_ascii": False}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t", "ensure_ascii": False}]
)


def _pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(value=_json, style=_style, cuts=st.lists(st.integers(0, 400), max_size=12))
def test_json_lexer_rewrites_any_chunking_to_json_dumps(value, style, cuts):
    # However the model spaced and escaped it, and however it was cut into tokens, the
    # re-serialised stream is exactly json.dumps of what json.loads reads.
    text = json.dumps(value, **style)
    lexer, out = JsonLexer(), []
    for piece in _pieces(text, cuts):
        out += [canonical(kind, t) for kind, t, _ in lexer.feed(piece)]
    if not isinstance(value, (dict, list, str)):  # a bare scalar ends only with the input: end it
        out += [canonical(kind, t) for kind, t, _ in lexer.feed(" ")]
    assert lexer.done and not lexer.broken
    assert "".join(out) == json.dumps(json.loads(text), ensure_ascii=False)


def test_json_lexer_edge_cases():
    def rewrite(text: str) -> str:
        lexer = JsonLexer()
        return "".join(canonical(k, t) for ch in text for k, t, _ in lexer.feed(ch))

    assert rewrite('{"a":1E2,"b":NaN,"c":-Infinity,"d":-0}') == '{"a": 100.0, "b": NaN, "c": -Infinity, "d": 0}'
    # A surrogate pair, written as two escapes and fed one character at a time, is one character.
    assert rewrite('["\\ud83d\\ude00", "\\u00e9\\n\\/"]') == '["\U0001f600", "\u00e9\\n/"]'
    assert rewrite('{"a": "b"} </tool_call>') == '{"a": "b"}'  # what follows the value is ignored


@pytest.mark.parametrize(
    "text", ['{"a" 1}', '{"a":1,}', "[1,]", '{"a":01}', '{"a":"\\x"}', '{"a":"\\u12g4"}', '{"a":tru}', "{'a':1}",
             '{"a":"line\nbreak"}', "[1}", '{"a":1]']  # fmt: skip
)
def test_json_lexer_stops_where_json_loads_would_fail(text):
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    lexer = JsonLexer()
    lexer.feed(text)
    assert lexer.broken and not lexer.done


def _stream(fmt, text: str, cuts: list[int], names=NAMES, parallel: bool = True):
    streamer = ToolCallStreamer(fmt, names, parallel)
    content, deltas = [], []
    for piece in _pieces(text, cuts):
        c, d = streamer.push(piece)
        content.append(c)
        deltas += d
    c, d = streamer.close()
    return "".join(content) + c, deltas + d, streamer


def _assemble(deltas) -> list[dict]:
    """What a client accumulates, checking OpenAI's shape: a call's first piece has its id and
    name with arguments "", the rest only argument fragments."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.id.startswith("call_") and d.name and d.arguments == ""
            assert d.index == len(calls)  # indices count up from 0
            calls[d.index] = {"id": d.id, "name": d.name, "arguments": "", "pieces": 0}
        else:
            assert d.id is None and d.name is None and d.arguments
            calls[d.index]["arguments"] += d.arguments
            calls[d.index]["pieces"] += 1
    return [calls[i] for i in sorted(calls)]


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 300), max_size=30),
    fmt=st.sampled_from([HERMES, LLAMA3, MISTRAL]),
    args=st.dictionaries(st.sampled_from(["city", "unit", "day"]), _json, max_size=3),
    spacing=st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 1}]),
)
def test_streamed_call_arguments_concatenate_to_the_parsed_ones(cuts, fmt, args, spacing):
    call = json.dumps({"name": "get_weather", fmt.args_key: args}, **spacing)
    text = {
        "hermes": f"Let me check.<tool_call>\n{call}\n</tool_call><tool_call>{json.dumps({'name': 'get_time'})}</tool_call>",
        "mistral": f"[TOOL_CALLS][{call}, {json.dumps({'name': 'get_time', 'arguments': {}})}]",
        "llama3": f"<|python_tag|>{call}",
    }[fmt.name]
    whole_content, whole_calls = parse_tool_calls(text, fmt, NAMES)
    content, deltas, streamer = _stream(fmt, text, cuts)
    assert (content.strip() or None) == whole_content
    calls = _assemble(deltas)
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments_json) for c in whole_calls]
    assert streamer.n_calls == len(whole_calls)
    # The ids the parser settled on are the ones that were streamed.
    assert [c.id for c in streamer.calls] == [c["id"] for c in calls]


def test_arguments_stream_while_the_model_writes_them():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": [1, 2]}}\n</tool_call>'
    streamer = ToolCallStreamer(HERMES, NAMES)
    events = []  # (position in the text, delta)
    for pos, ch in enumerate(text):
        events += [(pos, d) for d in streamer.push(ch)[1]]
    assert streamer.close()[1] == []
    opened = text.index('"arguments": {') + len('"arguments": {') - 1
    assert events[0][0] == opened and events[0][1].id  # announced the moment its arguments open
    assert events[-1][0] == text.index("}}")  # the last fragment, its "}", as soon as it is written
    [call] = _assemble([d for _, d in events])
    assert call["pieces"] > 10 and call["arguments"] == '{"city": "Lima", "days": [1, 2]}'


@pytest.mark.parametrize(
    "text, expect",
    [
        # "name" after the arguments: announced once the name is known, arguments sent whole.
        ('<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>',
         [("get_weather", '{"city": "Oslo"}')]),
        # Arguments as a JSON string are decoded and streamed as the object they hold.
        ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
         [("get_weather", '{"city": "Oslo"}')]),
        # No arguments at all: {} (as the parser reads it).
        ('<tool_call>{"name": "get_time"}</tool_call>', [("get_time", "{}")]),
        # An unknown tool is never announced; it stays text.
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
        # "get" is a tool too, but only a prefix of the name being written.
        ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', [("get_time", "{}")]),
    ],
)  # fmt: skip
def test_streamed_call_shapes(text, expect):
    for cuts in ([], list(range(len(text)))):
        content, deltas, _ = _stream(HERMES, text, cuts, names=NAMES | {"get"})
        calls = _assemble(deltas)
        assert [(c["name"], c["arguments"]) for c in calls] == expect
        assert (content == "") == bool(expect)


def test_a_call_cut_off_by_max_tokens_stays_a_call():
    # As OpenAI: once announced, a call is a call; its arguments are what was written.
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Li'
    content, deltas, streamer = _stream(HERMES, text, list(range(len(text))))
    [call] = _assemble(deltas)
    assert content == "" and call["arguments"] == '{"city": "Li' and streamer.n_calls == 1


def test_one_call_only_without_parallel_tool_calls():
    text = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')  # fmt: skip
    content, deltas, streamer = _stream(HERMES, text, list(range(0, len(text), 3)), parallel=False)
    assert [c["name"] for c in _assemble(deltas)] == ["get_time"] and streamer.n_calls == 1


def test_retry_after_on_transient_503s():
    from openherd.errors import OfflineError, QueueFull, SandboxUnavailable, Unavailable
    from openherd.server.app import UNAVAILABLE_RETRY_AFTER, error_headers

    assert error_headers(Unavailable("the model is unloading; retry"))["Retry-After"] == str(UNAVAILABLE_RETRY_AFTER)
    assert error_headers(QueueFull(retry_after=3))["Retry-After"] == "3"
    # Not transient: no promise that a retry in seconds helps.
    assert "Retry-After" not in error_headers(SandboxUnavailable("no sandbox on this host"))
    assert "Retry-After" not in error_headers(OfflineError("offline"))
    assert "Retry-After" not in error_headers(InvalidRequest("bad"))


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL])
@pytest.mark.parametrize("name", [None, "get_weather"])
def test_forced_call_grammars_compile(fmt, name):
    spec = forced_call_grammar(TOOLS, fmt, name, parallel=True)
    assert spec.kind == "lark"
    grammar = LLMatcher.grammar_from_lark(spec.value)
    is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, None)
    assert not is_error, msgs


# ---------------------------------------------------------------------------- metrics


def test_metrics_text_format():
    m = Metrics()
    m.requests.inc("/v1/models", "GET", "200")
    m.requests.inc("/v1/models", "GET", "200")
    m.ttft.observe(0.3, "tiny")
    m.ttft.observe(100.0, "tiny")
    m.itl.observe(0.01, 'we"ird\nname')
    text = m.render({})
    lines = text.splitlines()
    assert 'herd_http_requests_total{route="/v1/models",method="GET",status="200"} 2' in lines
    assert 'herd_time_to_first_token_seconds_bucket{model="tiny",le="0.25"} 0' in lines
    assert 'herd_time_to_first_token_seconds_bucket{model="tiny",le="0.5"} 1' in lines
    assert 'herd_time_to_first_token_seconds_bucket{model="tiny",le="+Inf"} 2' in lines
    assert 'herd_time_to_first_token_seconds_count{model="tiny"} 2' in lines
    assert 'herd_inter_token_latency_seconds_count{model="we\\"ird\\nname"} 1' in lines
    assert "herd_active_sequences_total 0" in lines
    for line in lines:  # every sample line is NAME{labels} VALUE with a parseable value
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
