"""The backend seam (openherd.engine.backend): the llama.cpp engine is a Backend, and a
capability a backend lacks is a 400 naming the backend and the capability."""

from __future__ import annotations

import dataclasses
import time

import pytest

from openherd.engine.backend import Backend, Capabilities, Unsupported, load_backend, require
from openherd.engine.types import EngineConfig, GenerationRequest, GrammarSpec, SamplingParams
from openherd.errors import InvalidRequest
from openherd.server.pipeline import check_capabilities


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    e = load_backend(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=2, n_threads=1), name="tiny")
    yield e
    e.close()


def test_the_llama_cpp_engine_is_a_backend(engine):
    assert isinstance(engine, Backend)
    assert engine.kind == "llama.cpp"
    assert engine.capabilities.names() == ["grammar", "logprobs", "embeddings", "lora", "score"]
    for cap in engine.capabilities.names():
        require(engine, cap)  # everything: nothing raised


def test_a_missing_capability_is_a_400_naming_backend_and_capability(engine, monkeypatch):
    monkeypatch.setattr(engine, "capabilities", dataclasses.replace(engine.capabilities, grammar=False))
    with pytest.raises(Unsupported) as e:
        check_capabilities(engine, GrammarSpec("json"), None)
    assert e.value.status == 400 and e.value.code == "unsupported_capability"
    assert "llama.cpp" in e.value.message and "grammar" in e.value.message and "'tiny'" in e.value.message
    assert e.value.param == "response_format"
    check_capabilities(engine, None, 2)  # logprobs are still there
    assert "grammar" not in Capabilities(grammar=False).names()


def test_submit_many_admits_all_or_none(engine):
    ok = GenerationRequest(prompt=[1, 2, 3], params=SamplingParams(temperature=0, max_tokens=2))
    handles = engine.submit_many([ok, ok])
    assert [h.result()[1].reason for h in handles] == ["length", "length"]
    long = GenerationRequest(prompt=[1, 2, 3], params=SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    bad = GenerationRequest(prompt=[10**6])  # outside the vocabulary
    before = engine.stats().generated_tokens
    with pytest.raises(InvalidRequest):
        engine.submit_many([long, bad])
    # The one queued before the bad one was cancelled: the scheduler drops it within a step.
    deadline = time.monotonic() + 30
    while (engine.stats().queue_depth or engine.stats().active) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().queue_depth == 0 and engine.stats().active == 0
    assert engine.stats().generated_tokens - before < 200
