"""Personas served by a live `herd serve`: listed as models, answered with their
knowledge and sources (the `herd` extension and a footer in the text), over the
OpenAI API (official client) and the Ollama API.

The tiny random model's words mean nothing, so with it these tests check the
wiring (retrieval ran, the sources travel); the slow test checks with the real
default model that an unusual fact from the persona's documents comes back
with its citation, also after an export/import round trip under a new name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from server_helpers import MODEL, live_server, register_model, serve_gguf  # noqa: F401  (fixture)

KEEPER = (
    "The Glimmerfen lighthouse keeper lives alone on the rock. The Glimmerfen lighthouse keeper's cat "
    "is named Bartholomew Quince. The cat sleeps beside the great lamp every night."
)
DISTRACTORS = {
    "tides.md": "Tides at Glimmerfen rise twice a day. Spring tides come with the full moon and flood the causeway.",
    "history.txt": "The lighthouse was built in 1871 from granite quarried on the mainland and lit by oil lamps.",
    "visits.md": "Visitors may climb the 212 steps on weekends. Tickets are sold at the harbour kiosk.",
}
QUESTION = "What is the name of the Glimmerfen lighthouse keeper's cat?"


def make_persona(home: Path, name: str, model: str, **fields) -> None:
    """Create a persona in the store at `home` with KEEPER and the distractors as knowledge."""
    from openherd.personas.bundle import Persona, PersonaStore
    from openherd.settings import Settings

    data = {"name": name, "model": model, **fields}
    docs = [("keeper.md", KEEPER.encode()), *((f, t.encode()) for f, t in DISTRACTORS.items())]
    PersonaStore(Settings(home=home)).create(Persona.from_dict(data), documents=docs)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_gguf):  # noqa: F811
    work = tmp_path_factory.mktemp("personas-serve")
    home = work / "home"
    register_model(home, serve_gguf)
    make_persona(
        home,
        "glim",
        MODEL,
        system="You are the Glimmerfen lighthouse guide.",
        sampling={"temperature": 0.0, "max_tokens": 8},
    )
    with live_server(work, serve_gguf) as s:
        yield s


def client(s) -> OpenAI:
    return OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_personas_are_listed_as_models(server):
    ids = {m.id: m for m in client(server).models.list().data}
    assert MODEL in ids and "glim" in ids
    assert ids["glim"].owned_by == "persona" and ids[MODEL].owned_by == "openherd"
    card = httpx.get(f"{server.url}/v1/models/glim", timeout=30).json()
    assert card["herd"]["persona"] is True and card["herd"]["model"] == MODEL and card["herd"]["documents"] == 4
    tags = httpx.get(f"{server.url}/api/tags", timeout=30).json()["models"]
    assert {"glim", MODEL} <= {m["name"] for m in tags}
    assert next(m for m in tags if m["name"] == "glim")["details"]["parent_model"] == MODEL


def test_persona_chat_carries_sources_and_citations(server):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "glim", "messages": [{"role": "user", "content": QUESTION}]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    herd = body["herd"]
    assert herd["persona"] == "glim" and herd["model"] == MODEL
    documents = [s["document"] for s in herd["sources"]]
    assert documents and documents[0] == "keeper.md"  # BM25 ranks the passage with the answer first
    assert "Bartholomew Quince" in herd["sources"][0]["text"]
    assert [s["index"] for s in herd["sources"]] == list(range(1, len(documents) + 1))
    content = body["choices"][0]["message"]["content"]
    # The sources travel in the text too: the footer names the passages by number.
    assert re.search(r"\n\nSources: \[\d\] \S+", content), content
    # The persona's sampling defaults apply (max_tokens 8); the request's own override them.
    assert body["usage"]["completion_tokens"] <= 8
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "glim", "max_tokens": 12, "messages": [{"role": "user", "content": QUESTION}],
              "logit_bias": {"0": -100, "2": -100}},
        timeout=120,
    )  # fmt: skip
    assert r.json()["usage"]["completion_tokens"] == 12


def test_persona_stream_puts_sources_on_the_final_chunk(server):
    stream = client(server).chat.completions.create(
        model="glim",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    herd = finals[0].model_extra["herd"]
    assert herd["persona"] == "glim" and herd["sources"][0]["document"] == "keeper.md"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Sources: [" in text
    assert chunks[-1].usage is not None and not chunks[-1].choices


def test_persona_over_the_ollama_api(server):
    r = httpx.post(
        f"{server.url}/api/chat",
        json={"model": "glim", "stream": False, "messages": [{"role": "user", "content": QUESTION}]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["herd"]["sources"][0]["document"] == "keeper.md" and body["done"] is True
    assert "Sources: [" in body["message"]["content"]
    with httpx.stream(
        "POST",
        f"{server.url}/api/chat",
        json={"model": "glim:latest", "messages": [{"role": "user", "content": QUESTION}]},
        timeout=120,
    ) as r:
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] is True and lines[-1]["herd"]["persona"] == "glim"


def test_persona_on_the_completion_routes(server):
    # /v1/completions: the prompt is the user's message to the persona, answered with its
    # knowledge; sources in the `herd` field and in the text, its sampling defaults applied.
    oai = client(server)
    r = oai.completions.create(model="glim", prompt=QUESTION, echo=True)
    herd = r.model_extra["herd"]
    assert herd["persona"] == "glim" and herd["sources"][0]["document"] == "keeper.md"
    assert r.choices[0].text.startswith(QUESTION) and "\n\nSources: [" in r.choices[0].text
    assert r.usage.completion_tokens <= 8  # the persona's max_tokens, not OpenAI's 16
    chunks = list(oai.completions.create(model="glim", prompt=QUESTION, stream=True))
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["herd"]["sources"][0]["document"] == "keeper.md"
    assert "Sources: [" in "".join(c.choices[0].text for c in chunks if c.choices)
    # Ollama's /api/generate, streamed and not; `keep_alive` alone loads the persona's model.
    body = httpx.post(f"{server.url}/api/generate", json={"model": "glim", "prompt": QUESTION, "stream": False},
                      timeout=120).json()  # fmt: skip
    assert body["herd"]["sources"][0]["document"] == "keeper.md" and "Sources: [" in body["response"]
    with httpx.stream("POST", f"{server.url}/api/generate", json={"model": "glim:latest", "prompt": QUESTION},
                      timeout=120) as r:  # fmt: skip
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] is True and lines[-1]["herd"]["persona"] == "glim"
    assert "Sources: [" in "".join(line["response"] for line in lines)
    body = httpx.post(f"{server.url}/api/generate", json={"model": "glim", "keep_alive": "5m"}, timeout=60).json()
    assert body["done_reason"] == "load" and body["model"] == "glim"


def test_unknown_model_is_still_404(server):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "nobody", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_persona_crud_is_served(server):
    r = httpx.get(f"{server.url}/v1/personas", timeout=30)
    assert r.status_code == 200 and [p["id"] for p in r.json()["data"]] == ["glim"]
    # A persona cannot take a model's name, so it can never shadow it.
    r = httpx.post(f"{server.url}/v1/personas", json={"name": MODEL, "model": MODEL}, timeout=30)
    assert r.status_code == 409, r.text


# ----------------------------------------------------------------------------- the default model


def _ask(oai: OpenAI, persona: str) -> tuple[str, dict]:
    resp = oai.chat.completions.create(
        model=persona, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=48
    )
    return resp.choices[0].message.content or "", resp.model_extra["herd"]


@pytest.mark.slow
def test_unusual_fact_with_citation_after_export_and_import(tmp_path, serve_gguf, default_model_path):  # noqa: F811
    home = tmp_path / "home"
    register_model(home, serve_gguf)
    register_model(home, default_model_path, "smollm2")
    make_persona(
        home,
        "glimmerfen",
        "smollm2",
        system="You are the Glimmerfen lighthouse guide. Answer briefly from the passages.",
    )
    with live_server(tmp_path, serve_gguf) as s:
        oai = client(s)
        answer, herd = _ask(oai, "glimmerfen")
        assert "Bartholomew Quince" in answer, answer
        keeper = next(src["index"] for src in herd["sources"] if src["document"] == "keeper.md")
        # Cited in the text (the footer lists what the answer rests on) and in the herd field.
        assert re.search(rf"Sources: .*\[{keeper}\] keeper\.md", answer), answer

        exported = httpx.get(f"{s.url}/v1/personas/glimmerfen/export", timeout=60)
        assert exported.status_code == 200
        r = httpx.post(f"{s.url}/v1/personas/import", params={"name": "lamplight"}, content=exported.content,
                       timeout=120)  # fmt: skip
        assert r.status_code == 201, r.text
        assert "lamplight" in {m.id for m in oai.models.list().data}
        answer, herd = _ask(oai, "lamplight")
        assert "Bartholomew Quince" in answer, answer
        assert herd["persona"] == "lamplight"
        keeper = next(src["index"] for src in herd["sources"] if src["document"] == "keeper.md")
        assert re.search(rf"Sources: .*\[{keeper}\] keeper\.md", answer), answer
