"""The engine against the real default model and llama-cpp-python's own chat path.

These checks pin the whole chain a user relies on: the chat template from GGUF
metadata, tokenisation (BOS handling, special tokens) and the sampling path.
"""

from __future__ import annotations

import re

import pytest

from openherd.engine import Engine, EngineConfig, FinishEvent, GenerationRequest, GrammarSpec, SamplingParams

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
    # Forced, not hoped for: a grammar admits only this text, so the model must spell out
    # two-byte (é, ï) and four-byte (🦙) characters, some of them across several tokens.
    forced = "café 🦙 naïve 🦙🦙"
    p = engine.encode_chat([{"role": "user", "content": "Write the word 'café' and a llama emoji 🦙 three times."}])
    params = SamplingParams(temperature=0, max_tokens=48, grammar=GrammarSpec("regex", re.escape(forced)))
    events = list(engine.submit(GenerationRequest(p, params)))
    fin = events[-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "stop"
    tokens = events[:-1]
    for ev in events:
        assert "\ufffd" not in ev.text
    assert "".join(ev.text for ev in events) == forced
    # Not vacuous: some tokens end inside a character. After every token the text streamed so
    # far is exactly the complete characters of the bytes generated so far: a partial one is
    # held back, and sent as soon as its last byte arrives.
    raw, streamed, splits = b"", "", 0
    for ev in tokens:
        raw, streamed = raw + ev.bytes, streamed + ev.text
        complete = _complete_prefix(raw)
        splits += complete != raw
        assert streamed == complete.decode("utf-8"), (raw, streamed)
    assert splits >= 2


def _complete_prefix(data: bytes) -> bytes:
    """``data`` without a UTF-8 character cut off at its end."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        assert e.end == len(data) and e.reason == "unexpected end of data", e  # only a cut at the end
        return data[: e.start]
    return data


# (text, a paraphrase of it, an unrelated text); cosines measured on SmolLM2-135M Q4_1 with
# mean pooling: 0.95 / 0.78 / 0.81 and 0.90 / 0.68 / 0.73.
EMBED_TRIPLES = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", "Interest rates rose sharply last quarter."),
    ("How do I reset my password?", "I forgot my password and need to change it.", "The volcano erupted in 1883."),
]


@pytest.mark.parametrize("triple", EMBED_TRIPLES)
def test_embeddings_put_a_paraphrase_nearer_than_an_unrelated_text(engine, triple):
    import numpy as np

    vecs, _ = engine.embed(list(triple))
    cos = np.array(vecs) @ np.array(vecs).T
    # Both texts of the pair are nearer each other than either is to the unrelated one
    # (measured margins 0.14 and 0.17).
    assert cos[0, 1] > max(cos[0, 2], cos[1, 2]) + 0.05, cos
    assert cos[0, 2] < 0.95, cos  # and different texts are different vectors
