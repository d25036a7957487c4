"""The engine against the real default model and llama-cpp-python's own chat path.

These checks pin the whole chain a user relies on: the chat template from GGUF
metadata, tokenisation (BOS handling, special tokens) and the sampling path.
"""

from __future__ import annotations

import pytest

from openherd.engine import Engine, EngineConfig, FinishEvent, GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [
    [{"role": "user", "content": "What is open-source AI?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Translate 'good morning' to French."},
     {"role": "assistant", "content": "Bonjour."},
     {"role": "user", "content": "And to Spanish?"}],
]


@pytest.fixture(scope="module")
def engine(default_model_path):
    e = Engine.load(str(default_model_path), EngineConfig(n_ctx=1024, n_parallel=2, n_threads=2))
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference(default_model_path):
    from llama_cpp import Llama

    # flash_attn=True: llama.cpp's own default ("auto" enables it on CPU), which the engine keeps;
    # llama-cpp-python turns it off by default, and the kernels round differently.
    llm = Llama(model_path=str(default_model_path), n_ctx=1024, n_threads=2, verbose=False, seed=0, flash_attn=True)
    yield llm
    llm.close()


@pytest.mark.parametrize("i", range(len(MESSAGES)))
def test_greedy_chat_equals_llama_cpp_python(engine, reference, i):
    ref = reference.create_chat_completion(messages=MESSAGES[i], temperature=0.0, max_tokens=48, seed=0)
    want = ref["choices"][0]["message"]["content"]
    h = engine.submit(GenerationRequest(engine.encode_chat(MESSAGES[i]), SamplingParams(temperature=0, max_tokens=48)))
    got, fin = h.result()
    assert got == want
    assert fin.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert fin.usage.completion_tokens == ref["usage"]["completion_tokens"]


def test_seeded_sampling_is_reproducible(engine):
    p = engine.encode_chat(MESSAGES[0])
    outs = [engine.submit(GenerationRequest(p, SamplingParams(temperature=0.9, seed=s, max_tokens=32))).result()[0]
            for s in (1, 1, 2)]
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_template_comes_from_the_gguf(engine):
    text = engine.template.render(MESSAGES[0])
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt
    assert text.endswith("<|im_start|>assistant\n")


def test_utf8_streaming_never_breaks_characters(engine):
    p = engine.encode_chat([{"role": "user", "content": "Write the word 'café' and a llama emoji 🦙 three times."}])
    events = list(engine.submit(GenerationRequest(p, SamplingParams(temperature=0, max_tokens=48))))
    assert isinstance(events[-1], FinishEvent)
    for ev in events:
        assert "\ufffd" not in ev.text
