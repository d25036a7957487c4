"""The OpenAI API of a live `herd serve`, driven by the official `openai` SDK.

One server (tiny random model) serves the whole module; a random model says
nothing sensible, so the tests check structure, determinism and constraints:
what the SDK parses, seeds that reproduce, stop strings that cut, schemas that
validate, tool calls that are forced, errors that map to the SDK's exceptions.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from server_helpers import MODEL, N_CTX, NO_EOS, live_server, register_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_gguf):
    with live_server(tmp_path_factory.mktemp("serve-openai"), serve_gguf) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content="Say something.", **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# ---------------------------------------------------------------------------- models


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and m.owned_by == "openherd"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ---------------------------------------------------------------------------- chat


def test_chat_basic_shape_and_usage(client):
    r = chat(client, max_tokens=5, logit_bias=NO_EOS)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.tool_calls is None
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_max_completion_tokens_is_honoured(client):
    r = chat(client, max_tokens=None, max_completion_tokens=3, logit_bias=NO_EOS)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_prefix_cache_reported_as_cached_tokens(client):
    system = "You are a careful assistant. " * 8
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "first question"}]
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    msgs[1]["content"] = "second question"
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    # The shared system prompt is reused from the first request's KV cache.
    assert r.usage.prompt_tokens_details.cached_tokens >= 40
    assert r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens


def test_text_content_parts_and_roles(client):
    kw = dict(model=MODEL, max_tokens=6, temperature=0, logit_bias=NO_EOS)
    tail = [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again?"}]
    r = client.chat.completions.create(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there."}],
            },
            *tail,
        ],
        **kw,
    )
    assert r.choices[0].message.role == "assistant"
    # The parts are joined and "developer" is the system role: the very prompt of the plain
    # form, token for token, and so the same greedy answer.
    plain = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, there."}, *tail],
        **kw,
    )
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert r.choices[0].message.content == plain.choices[0].message.content
    # ... and neither the developer message nor a part is dropped on the way.
    shorter = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello, "}]}, *tail], **kw
    )
    assert shorter.usage.prompt_tokens < r.usage.prompt_tokens


def test_n_choices(client):
    r = chat(client, n=3, max_tokens=6, seed=11, logit_bias=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    # Choice i is seeded with seed+i: different samples of the same prompt.
    assert len({c.message.content for c in r.choices}) > 1


def test_seed_reproduces(client):
    kw = dict(seed=1234, temperature=1.0, max_tokens=16, logit_bias=NO_EOS)
    a = chat(client, **kw).choices[0].message.content
    b = chat(client, **kw).choices[0].message.content
    c = chat(client, **{**kw, "seed": 4321}).choices[0].message.content
    assert a == b
    assert a != c


def test_stop_string_cuts_and_is_excluded(client):
    full = chat(client, temperature=0, max_tokens=30, logit_bias=NO_EOS).choices[0].message.content
    assert len(full) > 8
    stop = full[4:7]
    r = chat(client, temperature=0, max_tokens=30, logit_bias=NO_EOS, stop=[stop, "\u2603never"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.find(stop)]


def test_logprobs(client):
    r = chat(client, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3, logit_bias=NO_EOS)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(e.logprob, max(t.logprob for t in e.top_logprobs), abs_tol=1e-4)
    assert (
        "".join(bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace"))
        == r.choices[0].message.content
    )


def test_logit_bias_forces_a_token(client):
    # +100 on one token makes it the only one ever sampled.
    r = chat(client, max_tokens=4, logit_bias={"97": 100}, temperature=1.0, logprobs=True)
    pieces = [bytes(e.bytes) for e in r.choices[0].logprobs.content]
    assert len(pieces) == 4 and len(set(pieces)) == 1
    assert r.choices[0].message.content == (pieces[0] * 4).decode("utf-8", "replace")


# ---------------------------------------------------------------------------- streaming


def test_stream_chunks_and_usage(client):
    stream = chat(
        client, max_tokens=6, stream=True, stream_options={"include_usage": True}, logit_bias=NO_EOS
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_matches_non_streamed(client):
    kw = dict(temperature=0, max_tokens=12, logit_bias=NO_EOS)
    full = chat(client, **kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True, **kw) if c.choices)
    assert streamed == full


def test_stream_exact_sse_format(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert all("usage" not in p for p in payloads)  # no include_usage: no usage key at all
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] == "length"
    )

    body["stream_options"] = {"include_usage": True}
    events = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).text.split("\n\n")
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3


def test_stream_n_choices(client):
    stream = chat(client, n=2, max_tokens=4, stream=True, logit_bias=NO_EOS)
    text = {0: "", 1: ""}
    finished = set()
    for c in stream:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}


def test_async_client_concurrent_streams(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        async def one(i):
            stream = await aclient.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=8,
                stream=True,
                logit_bias=NO_EOS,
            )
            n = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    n += 1
            return n

        results = await asyncio.gather(*(one(i) for i in range(6)))
        r = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        await aclient.close()
        return results, r

    results, r = asyncio.run(main())
    assert all(n >= 1 for n in results)
    assert r.choices[0].message.role == "assistant"


# ---------------------------------------------------------------------------- structured output

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["ok", "color", "tags"],
    "additionalProperties": False,
}


def test_json_schema_strict_always_validates(client):
    for seed in range(4):
        r = chat(
            client,
            max_tokens=60,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
            },
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object_mode_parses(client):
    r = chat(client, max_tokens=40, seed=3, response_format={"type": "json_object"}, logit_bias={"2": -100})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.startswith("{")


def test_json_schema_streamed(client):
    stream = chat(
        client,
        max_tokens=60,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
        },
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_sdk_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool
        color: Literal["red", "green"]
        count: int

    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer."}],
        response_format=Answer,
        max_tokens=60,
        seed=2,
    )
    assert isinstance(r.choices[0].message.parsed, Answer)


def test_sdk_stream_helper_accumulates(client):
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, logit_bias=NO_EOS
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        snapshot = stream.current_completion_snapshot
    # (get_final_completion() would raise here: the SDK refuses to parse a "length" finish)
    assert snapshot.choices[0].finish_reason == "length"
    assert snapshot.choices[0].message.content == "".join(deltas)


def test_invalid_schema_is_400(client):
    with pytest.raises(openai.BadRequestError):
        chat(
            client,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        )


# ---------------------------------------------------------------------------- tools

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Lima"]}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


def _check_call(call, allowed=("get_weather", "get_time")):
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in allowed
    args = json.loads(call.function.arguments)
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(args, schema)
    return args


def test_tool_choice_required_forces_a_valid_call(client):
    r = chat(
        client,
        "What's the weather?",
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        parallel_tool_calls=False,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])


def test_named_tool_choice(client):
    for seed in range(3):
        r = chat(
            client,
            "What time is it?",
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=200,
            seed=seed,
            parallel_tool_calls=False,
        )
        [call] = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        _check_call(call, ("get_time",))


def test_parallel_tool_calls(client):
    # With end-of-text biased away the model must keep calling until max_tokens:
    # every complete call is returned, and the cut-off is reported as "length".
    r = chat(
        client, "Weather and time?", tools=TOOLS, tool_choice="required", max_tokens=250, logit_bias=NO_EOS
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    for c in calls:
        _check_call(c)
    assert r.choices[0].finish_reason == "length"


def _accumulate(stream) -> tuple[list[dict], str | None]:
    """Tool calls as a client accumulates them from the chunks, checking OpenAI's shape on the way."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:  # a call's first delta: index, id, type and name; arguments ""
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    assert d.function.arguments == ""
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": "", "fragments": 0}
                else:  # then fragments of the arguments, and nothing else
                    assert d.id is None and d.type is None and d.function.name is None and d.function.arguments
                    calls[d.index]["arguments"] += d.function.arguments
                    calls[d.index]["fragments"] += 1
            finish = ch.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_arguments_stream_as_deltas(client, tool_choice):
    kw = dict(tools=TOOLS, tool_choice=tool_choice, max_tokens=200, seed=11, parallel_tool_calls=False)
    calls, finish = _accumulate(chat(client, "Weather?", stream=True, **kw))
    assert finish == "tool_calls" and len(calls) == 1
    [call] = calls
    assert call["fragments"] > 1  # the arguments came in pieces, as the model wrote them
    args = json.loads(call["arguments"])
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["name"])
    jsonschema.validate(args, schema)
    # The same request unstreamed (same seed): the same call, to the character.
    [whole] = chat(client, "Weather?", **kw).choices[0].message.tool_calls
    assert (whole.function.name, whole.function.arguments) == (call["name"], call["arguments"])
    # The SDK's own stream helper accumulates the deltas to the same arguments.
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], **kw
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [(e.name, e.arguments) for e in done] == [(call["name"], call["arguments"])]
    assert final.choices[0].message.tool_calls[0].function.arguments == call["arguments"]


def test_tool_result_round_trip(client):
    r = chat(
        client,
        "Weather in Paris?",
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        parallel_tool_calls=False,
    )
    call = r.choices[0].message.tool_calls[0]

    def follow_up(result: str | None):
        history = [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        ]
        if result is not None:
            history.append({"role": "tool", "tool_call_id": call.id, "content": result})
        return client.chat.completions.create(
            model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5
        )

    follow = follow_up('{"temp": 21}')
    assert follow.choices[0].message.tool_calls is None
    assert follow.choices[0].finish_reason in ("stop", "length")
    # The call and its result are in the prompt: each one makes it longer, and a longer
    # result a longer prompt still.
    assert follow_up(None).usage.prompt_tokens < follow.usage.prompt_tokens
    longer = follow_up('{"temp": 21, "sky": "clear", "wind": "light from the west"}')
    assert longer.usage.prompt_tokens > follow.usage.prompt_tokens


def test_llama3_style_template_tools(server, client, llama3_gguf):
    # A template that renders tools itself and expects bare {"name", "parameters"} calls.
    register_model(server.home, llama3_gguf, name="tiny-l3")
    r = client.chat.completions.create(
        model="tiny-l3",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    _check_call(call)

    def follow_up(result: str):
        return client.chat.completions.create(
            model="tiny-l3",
            messages=[
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": result},
            ],
            tools=TOOLS,
            max_tokens=3,
        )

    follow = follow_up("sunny")
    assert follow.choices[0].message.role == "assistant"
    # The template renders the tools, the call and the (ipython) result: the result's words
    # reach the prompt.
    assert follow_up("sunny, 24 C, a light wind from the west").usage.prompt_tokens > follow.usage.prompt_tokens
    bare = client.chat.completions.create(
        model="tiny-l3", messages=[{"role": "user", "content": "Weather?"}], max_tokens=1
    )
    assert bare.usage.prompt_tokens < follow.usage.prompt_tokens


def test_tool_choice_auto_returns_content_or_calls(server, client, llama3_gguf):
    # Text under "auto": the random model's words come back as content, with no calls.
    r = chat(client, "Hi", tools=TOOLS, max_tokens=8, temperature=0, logit_bias=NO_EOS)
    msg = r.choices[0].message
    assert msg.tool_calls is None and msg.content and r.choices[0].finish_reason == "length"
    # A call under "auto": with a llama3-style template a call is a bare JSON object, so a
    # schema can make the model write one, and "auto" must hand it back as a call.
    register_model(server.home, llama3_gguf, name="tiny-l3-auto")
    call_schema = {
        "type": "object",
        "properties": {"name": {"const": "get_time"}, "parameters": TOOLS[1]["function"]["parameters"]},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    kw = dict(
        model="tiny-l3-auto",
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=TOOLS,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": call_schema}},
    )
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    [call] = r.choices[0].message.tool_calls
    _check_call(call, ("get_time",))
    # "none" reads no calls: the same kind of text stays content.
    r = client.chat.completions.create(**kw, tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert json.loads(r.choices[0].message.content)["name"] == "get_time"


# ---------------------------------------------------------------------------- completions, embeddings


def test_completions(client):
    r = client.completions.create(
        model=MODEL, prompt="The herd", max_tokens=4, logit_bias=NO_EOS, echo=True, logprobs=2, temperature=0
    )
    # Greedy: the legacy format keys top_logprobs by token *text*, so two byte-fallback tokens
    # that both render as "\ufffd" share one key; a fixed path keeps this check deterministic.
    [c] = r.choices
    assert r.object == "text_completion" and c.text.startswith("The herd") and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == 4 and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == len("The herd")
    r = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=2, logit_bias=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    kw = dict(model=MODEL, prompt="x", max_tokens=3, temperature=0, logit_bias=NO_EOS)
    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(**kw)
    assert text == whole.choices[0].text and whole.usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["a llama", "an alpaca"])  # the SDK asks for base64
    assert len(r.data) == 2 and [d.index for d in r.data] == [0, 1]
    for d in r.data:
        assert len(d.embedding) == 64
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-4)
    f = client.embeddings.create(model=MODEL, input="a llama", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(f.data[0].embedding, r.data[0].embedding, strict=True)) < 1e-5
    assert r.usage.prompt_tokens > 0
    # A constant or input-blind vector passes everything above. Mean pooling over the random
    # model puts texts that share most tokens near each other (cosine measured 0.97) and an
    # unrelated one far away (-0.40).
    v = client.embeddings.create(
        model=MODEL, input=["a llama", "a llama in the field", "quantum chromodynamics"], encoding_format="float"
    ).data
    cos = [sum(a * b for a, b in zip(v[0].embedding, o.embedding, strict=True)) for o in v[1:]]
    assert cos[1] < 0.9 and cos[0] > cos[1] + 0.5, cos
    assert max(abs(a - b) for a, b in zip(r.data[0].embedding, r.data[1].embedding, strict=True)) > 1e-2


# ---------------------------------------------------------------------------- errors


def test_errors_map_to_sdk_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, n=9)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, logit_bias={"999999": 5})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, top_logprobs=3)  # without logprobs=True
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_context_overflow_states_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "word " * 2500)
    assert e.value.body["code"] == "context_length_exceeded"
    assert str(N_CTX) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=10_000)
    assert str(N_CTX) in e.value.message and "10000" in e.value.message


# ---------------------------------------------------------------------------- disconnects, metrics


def _drop_stream_midway(url: str, i: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"long answer {i}"}],
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break  # leaving the block closes the connection mid-stream


CANCELLED = 'herd_sequences_total{model="tiny",finish_reason="cancelled"}'


def _wait_idle(server, timeout=5.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        active = server.metric("herd_active_sequences_total")
        if active == 0 or time.monotonic() > deadline:
            return active
        time.sleep(0.05)


def test_dropped_streams_free_their_sequences(server, client):
    cancelled = server.metric(CANCELLED, default=0)
    threads = [threading.Thread(target=_drop_stream_midway, args=(server.url, i)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _wait_idle(server) == 0
    assert server.metric("herd_queue_depth_total") == 0
    # Each was cancelled by the server (not run to its 1500 tokens).
    assert server.metric(CANCELLED) - cancelled == 20
    t0 = time.monotonic()
    stream = chat(client, max_tokens=2, stream=True)
    next(iter(stream))
    assert time.monotonic() - t0 < 5.0  # a fresh request starts promptly
    list(stream)


def test_dropped_non_streaming_request_is_cancelled(server):
    cancelled = server.metric(CANCELLED, default=0)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1500,
        "logit_bias": NO_EOS,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    assert _wait_idle(server) == 0
    assert server.metric(CANCELLED) - cancelled == 1


def test_metrics(server, client):
    chat(client, max_tokens=3, stream=True).close()
    chat(client, max_tokens=3)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'herd_http_requests_total{route="/v1/chat/completions",method="POST",status="200"}' in text
    assert "# TYPE herd_time_to_first_token_seconds histogram" in text
    assert 'herd_time_to_first_token_seconds_count{model="tiny"}' in text
    assert 'herd_inter_token_latency_seconds_bucket{model="tiny",le="+Inf"}' in text
    assert 'herd_completion_tokens_total{model="tiny"}' in text
    assert 'herd_cached_prompt_tokens_total{model="tiny"}' in text
    assert "herd_queue_depth_total 0" in text and "herd_active_sequences_total" in text


# ---------------------------------------------------------------------------- queue full, shutdown


def test_busy_server_answers_429_and_503_with_retry_after(tmp_path, serve_gguf):
    # One sequence slot, no waiting room, room for one loaded model.
    env = {"HERD_MAX_QUEUE": "0", "HERD_MAX_LOADED_MODELS": "1"}
    with live_server(tmp_path, serve_gguf, env=env, args=("--parallel", "1", "--ctx", "256")) as s:
        register_model(s.home, serve_gguf, name="tiny-other")
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        busy = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=200,
            stream=True,
            logit_bias=NO_EOS,
        )
        next(iter(busy))  # the only slot is taken
        # A second request while the first streams: the queue is full (429).
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y"}], max_tokens=2)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full"
        # Another model cannot be loaded while the loaded one is busy: a transient 503, with
        # Retry-After like the 429, on both APIs.
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="tiny-other", messages=[{"role": "user", "content": "y"}], max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "unavailable"
        assert int(e.value.response.headers["retry-after"]) >= 1
        r = httpx.post(f"{s.url}/api/generate", json={"model": "tiny-other", "prompt": "y", "stream": False}, timeout=30)
        assert r.status_code == 503 and "busy" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        busy.close()
        [loaded] = httpx.get(f"{s.url}/api/ps", timeout=10).json()["models"]
        assert loaded["context_length"] == 256  # --ctx


def test_sigterm_finishes_in_flight_streams_and_exits_0(tmp_path, serve_gguf):
    import socket

    budget = 1500  # no end-of-text: the stream runs its whole budget
    with live_server(tmp_path, serve_gguf, args=("--model", MODEL)) as s:
        # --model preloads before the server reports healthy
        assert [m["name"] for m in httpx.get(f"{s.url}/api/ps", timeout=10).json()["models"]] == [MODEL]
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": budget,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": NO_EOS,
        }
        # A small receive window and nothing read until the server has begun shutting down:
        # the ~200 KB stream cannot have been sent in full by then, however fast the tiny
        # model generates, so it is in flight while the server shuts down.
        small = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
        lines = []
        with httpx.Client(transport=small, timeout=60) as slow, slow.stream(
            "POST", f"{s.url}/v1/chat/completions", json=body
        ) as r:
            it = r.iter_lines()
            lines.append(next(it))
            code = {}
            stopper = threading.Thread(target=lambda: code.setdefault("rc", s.stop()))
            stopper.start()
            deadline = time.monotonic() + 30
            while True:  # the listening socket closes as soon as the SIGTERM is handled
                try:
                    httpx.get(f"{s.url}/health", timeout=2)
                except httpx.ConnectError:
                    break
                assert time.monotonic() < deadline, "still accepting connections 30 s after SIGTERM"
                time.sleep(0.01)
            assert s.proc.poll() is None  # waiting for the stream, not gone
            lines.extend(it)
        stopper.join(60)
        assert code["rc"] == 0
    lines = [ln for ln in lines if ln]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads([ln for ln in lines if ln.startswith("data: {")][-1][len("data: ") :])["usage"]
    assert usage["completion_tokens"] == budget
    assert sum(1 for ln in lines if '"content":' in ln) >= budget // 2  # and its tokens all came
