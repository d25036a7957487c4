"""The engine on real llama.cpp with a tiny generated model: batching, caching,
sampling, constraints, cancellation and errors."""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest

from openherd.engine import Engine, EngineConfig, FinishEvent, GenerationRequest, GrammarSpec, SamplingParams
from openherd.engine.detok import StreamDecoder
from openherd.engine.runtime import ContextConfig, LlamaContext
from openherd.errors import ContextOverflow, InvalidRequest, QueueFull


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=4, n_threads=2, max_queue=16))
    yield e
    e.close()


def prompt(engine, text="hello there"):
    return engine.encode_chat([{"role": "user", "content": text}])


def run(engine, toks, **params):
    h = engine.submit(GenerationRequest(prompt=toks, params=SamplingParams(**params)))
    events = list(h)
    fin = events[-1]
    assert isinstance(fin, FinishEvent)
    return [e.token for e in events[:-1]], "".join(e.text for e in events), fin


def test_greedy_is_deterministic(engine):
    t1, s1, f1 = run(engine, prompt(engine), temperature=0, max_tokens=24, ignore_eos=True)
    t2, s2, f2 = run(engine, prompt(engine), temperature=0, max_tokens=24, ignore_eos=True)
    assert t1 == t2 and s1 == s2
    assert f1.reason == "length" and f1.usage.completion_tokens == 24
    assert s1 == engine.detokenize(t1)  # streamed text is the exact detokenisation


def test_ignore_eos_wins_over_a_bias_towards_eos(engine):
    eog = sorted(engine.info.eog_tokens)
    bias = {t: 100.0 for t in eog}
    # Without ignore_eos the bias makes end-of-generation the first token.
    toks, _, fin = run(engine, prompt(engine), temperature=0, max_tokens=12, logit_bias=bias)
    assert toks == [] and fin.reason == "stop"
    toks, _, fin = run(engine, prompt(engine), temperature=0.8, seed=3, max_tokens=12, logit_bias=bias, ignore_eos=True)
    assert len(toks) == 12 and fin.reason == "length" and not set(toks) & set(eog)


def test_seed_reproduces_and_differs(engine):
    a = run(engine, prompt(engine), temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7, max_tokens=20, ignore_eos=True)[0]
    b = run(engine, prompt(engine), temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7, max_tokens=20, ignore_eos=True)[0]
    c = run(engine, prompt(engine), temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=8, max_tokens=20, ignore_eos=True)[0]
    assert a == b
    assert a != c


def test_stop_string_is_excluded(engine):
    toks, text, _ = run(engine, prompt(engine), temperature=0, max_tokens=40, ignore_eos=True)
    assert len(text) > 6
    stop = text[3:6]
    _, text2, fin = run(engine, prompt(engine), temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    assert fin.reason == "stop"
    assert text2 == text[: text.find(stop)]
    assert stop not in text2


def test_concurrent_requests_match_sequential(engine):
    prompts = [prompt(engine, f"question number {i}") for i in range(7)]  # more than n_parallel=4
    sequential = [run(engine, p, temperature=0, max_tokens=16, ignore_eos=True)[0] for p in prompts]
    handles = [engine.submit(GenerationRequest(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)))
               for p in prompts]
    results = [[e.token for e in h if not isinstance(e, FinishEvent)] for h in handles]
    # Batched float maths may differ in the last bits from single-sequence maths;
    # greedy choices on this model must still agree on almost every token.
    agree = sum(a == b for s, r in zip(sequential, results, strict=False) for a, b in zip(s, r, strict=False))
    assert agree >= 0.95 * sum(len(s) for s in sequential)
    assert engine.stats().active == 0


def test_prefix_cache_reuses_and_reports(engine):
    p = prompt(engine, "a shared system prompt and a question")
    t1, _, f1 = run(engine, p, temperature=0, max_tokens=8, ignore_eos=True)
    t2, _, f2 = run(engine, p, temperature=0, max_tokens=8, ignore_eos=True)
    assert f2.usage.cached_tokens >= len(p) - 1
    assert t1 == t2
    longer = p + engine.tokenize(" and more", add_special=False)
    _, _, f3 = run(engine, longer, temperature=0, max_tokens=4, ignore_eos=True)
    assert f3.usage.cached_tokens >= len(p)


def test_prefix_cache_off_evaluates_every_prompt_whole(tiny_gguf):
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=2, n_threads=1, prefix_cache=False))
    try:
        p = prompt(e, "a shared system prompt and a question")
        first = run(e, p, temperature=0, max_tokens=6, ignore_eos=True)
        before = e.stats().evaluated_tokens
        again = run(e, p, temperature=0, max_tokens=6, ignore_eos=True)
        assert again[2].usage.cached_tokens == 0
        assert e.stats().evaluated_tokens - before == len(p)  # nothing reused from the first run
        assert again[0] == first[0]
        # Requests admitted together share nothing either: each evaluates its own prompt.
        context, cont = p[:-3], p[-3:]
        before = e.stats().evaluated_tokens
        scores = e.score_many([(context, cont), (context, cont[:2])])
        assert e.stats().evaluated_tokens - before == (len(p) - 1) + (len(p) - 2)
        assert scores[0][0] < scores[1][0] <= 0
    finally:
        e.close()


def test_max_tokens_zero_and_context_errors(engine):
    _, text, fin = run(engine, prompt(engine), max_tokens=0)
    assert text == "" and fin.reason == "length"
    with pytest.raises(ContextOverflow, match="256"):
        engine.submit(GenerationRequest(list(range(5, 300)), SamplingParams()))
    with pytest.raises(ContextOverflow, match=r"\d+ in the prompt"):
        engine.submit(GenerationRequest(prompt(engine), SamplingParams(max_tokens=500)))
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest([], SamplingParams()))
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.submit(GenerationRequest([10**7], SamplingParams()))


@pytest.mark.timeout(60)  # a cancel that is never honoured must fail, not hang
def test_cancel_frees_the_slot_within_a_step(engine):
    budget = engine.n_ctx_seq - len(prompt(engine)) - 1  # all the context allows: it cannot end on its own
    h = engine.submit(GenerationRequest(prompt(engine), SamplingParams(max_tokens=budget, ignore_eos=True)))
    it = iter(h)
    next(it)
    # Holding the scheduler's (re-entrant) lock stops it at its next step, so the cancel lands
    # long before the budget is spent however fast the tiny model decodes.
    with engine._cond:
        steps = engine.stats().steps
        it.close()  # leaving the iteration cancels
    rest = list(h)  # what the scheduler pushed until it saw the cancel, and the FinishEvent
    fin = rest[-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "abort"
    assert fin.usage.completion_tokens == 1 + len(rest) - 1 < budget
    # At most the step in flight when the cancel came finished; no step ran after it.
    assert engine.stats().steps - steps <= 1
    deadline = time.monotonic() + 2
    while engine.stats().active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().active == 0
    # and the engine still serves
    assert run(engine, prompt(engine), max_tokens=3, ignore_eos=True)[2].reason == "length"


def test_queue_is_bounded(tiny_gguf):
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=128, n_parallel=1, n_threads=1, max_queue=1))
    try:
        p = e.encode_chat([{"role": "user", "content": "hi"}])
        long = SamplingParams(max_tokens=100, ignore_eos=True)
        handles = [e.submit(GenerationRequest(p, long))]
        with pytest.raises(QueueFull) as info:
            for _ in range(5):
                handles.append(e.submit(GenerationRequest(p, long)))
        assert info.value.status == 429 and info.value.retry_after >= 1
        for h in handles:
            h.cancel()
    finally:
        e.close()


def test_json_schema_constraint_always_parses(engine):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "age", "pet"],
        "additionalProperties": False,
    }
    for seed in range(3):
        _, text, fin = run(engine, prompt(engine), temperature=1.0, seed=seed, max_tokens=120,
                           grammar=GrammarSpec("json_schema", schema))
        assert fin.reason == "stop", text
        obj = json.loads(text)
        assert set(obj) == {"name", "age", "pet"} and obj["pet"] in ("cat", "dog") and 0 <= obj["age"] <= 120


def test_invalid_grammar_is_a_400(engine):
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest(prompt(engine), SamplingParams(grammar=GrammarSpec("regex", "(unclosed"))))


def test_logprobs_are_consistent_with_scoring(engine):
    p = prompt(engine)
    h = engine.submit(GenerationRequest(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)))
    toks = [ev for ev in h if not isinstance(ev, FinishEvent)]
    for ev in toks:
        assert ev.logprob <= 0 and len(ev.top_logprobs) == 3
        assert ev.top_logprobs[0].token == ev.token  # greedy picks the most likely token
        assert [t.logprob for t in ev.top_logprobs] == sorted((t.logprob for t in ev.top_logprobs), reverse=True)
    total, greedy = engine.loglikelihood(p, [ev.token for ev in toks])
    assert greedy
    assert math.isclose(total, sum(ev.logprob for ev in toks), abs_tol=1e-3)
    # a non-greedy continuation is reported as such
    other = (toks[0].top_logprobs[1].token,)
    _, g2 = engine.loglikelihood(p, list(other))
    assert not g2


def test_embeddings_are_normalised(engine):
    texts = ["the cat sat", "the cat sat", "the cat sat on the mat", "quantum chromodynamics"]
    vecs, n = engine.embed(texts)
    assert n > 0 and len(vecs) == 4 and len(vecs[0]) == engine.info.n_embd
    for v in vecs:
        assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5)
    assert vecs[0] == pytest.approx(vecs[1], abs=1e-6)
    # A constant (or input-blind) vector passes the checks above; these it cannot.
    cos = np.array(vecs) @ np.array(vecs).T
    assert cos[0, 3] < 0.9, cos  # different texts, different vectors (measured 0.61)
    # Mean pooling over a random model: texts that share most of their tokens are nearer
    # (measured 0.97 against 0.61).
    assert cos[0, 2] > cos[0, 3] + 0.2, cos


def test_async_iteration(engine):
    import asyncio

    async def main():
        h = engine.submit(GenerationRequest(prompt(engine), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)))
        return [ev async for ev in h]

    evs = asyncio.run(main())
    assert isinstance(evs[-1], FinishEvent) and len(evs) == 6


def test_many_threads_share_one_engine(engine):
    out = []

    def worker(i):
        out.append(run(engine, prompt(engine, str(i)), temperature=0.5, seed=i, max_tokens=8, ignore_eos=True)[2].reason)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == ["length"] * 10


# --------------------------------------------------------------------------- prefix sharing and scoring
def _submit_together(e, reqs):
    """Submit so that the scheduler admits all of them in one step (its lock is re-entrant)."""
    with e._cond:
        return [e.submit(r) for r in reqs]


def _flush(e):
    """An unrelated two-token prompt in every slot: nothing useful stays cached."""
    unrelated = [[e.info.bos, 300 + i] for i in range(e.config.n_parallel)]
    for h in _submit_together(e, [GenerationRequest(p, SamplingParams(max_tokens=0)) for p in unrelated]):
        h.result()


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _tokens(handle):
    events = list(handle)
    return [ev.token for ev in events[:-1]], events[-1]


@pytest.mark.parametrize("unified", [False, True])
def test_requests_admitted_together_compute_their_shared_prefix_once(tiny_gguf, unified):
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=4, n_threads=1, kv_unified=unified))
    try:
        system = e.tokenize("You keep the herd on the high plain and count every llama twice. " * 2)
        ends = [e.tokenize(f" Question {i}: where is llama {i}?", add_special=False) for i in range(4)]
        prompts = [system + end for end in ends]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        alone = []
        for p in prompts:
            _flush(e)
            alone.append(_tokens(e.submit(GenerationRequest(p, params)))[0])
        _flush(e)
        before = e.stats()
        results = [_tokens(h) for h in _submit_together(e, [GenerationRequest(p, params) for p in prompts])]
        after = e.stats()
        # The first computes its whole prompt; the others wait one step, copy what they share
        # with it (the system prompt and more) and compute only their own ends.
        shared = [_common_prefix(prompts[0], p) for p in prompts[1:]]
        assert all(n > len(system) for n in shared)
        evaluated = after.evaluated_tokens - before.evaluated_tokens
        own = [len(p) - n for p, n in zip(prompts[1:], shared, strict=True)]
        assert evaluated == len(prompts[0]) + sum(own)
        assert [fin.usage.cached_tokens for _, fin in results] == [0, *shared]
        # Copied cells hold the very values each slot would have computed: the same answers.
        assert [toks for toks, _ in results] == alone
        assert after.active == 0
    finally:
        e.close()


def test_split_kv_prefix_copy_is_bit_identical(tiny_gguf):
    # llama.cpp's seq_cp across split-KV streams copies whole streams (and asserts on a
    # partial range); copy_prefix moves the used cells instead, and nothing changes.
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=4, n_threads=1))
    split = ContextConfig(n_ctx=4 * 128, n_seq_max=4, n_batch=128, n_threads=1, kv_unified=False)
    ctx = LlamaContext(e.model, split)
    try:
        prefix, own, other = [e.info.bos, *range(50, 90)], [91, 92, 93], [94, 95]

        def run(seq, toks, start):
            ctx.batch.clear()
            for i, t in enumerate(toks):
                idx = ctx.batch.add(t, start + i, seq, i == len(toks) - 1)
            assert ctx.decode() == 0
            return ctx.logits(idx).copy()

        computed = run(2, prefix + own, 0)
        run(0, prefix + other, 0)
        run(1, [7, 8, 9, 10], 0)  # the destination's old cells are replaced
        assert ctx.copy_prefix(0, 1, len(prefix))
        assert np.array_equal(run(1, own, len(prefix)), computed)
        assert ctx.seq_rm(3) and ctx.copy_prefix(0, 3, 5)  # a shorter prefix of the source
        assert np.array_equal(run(3, prefix[5:] + own, 5), computed)
    finally:
        ctx.close()
        e.close()


def test_later_choices_after_one_context_evaluate_only_their_own_tokens(tiny_gguf):
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=4, n_threads=1))
    fresh = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=4, n_threads=1))
    try:
        context = e.tokenize("The keeper counts the herd at dawn, and the answer is")
        texts = (" four llamas", " four herd", " herd", " a great many of them")
        choices = [e.tokenize(c, add_special=False) for c in texts]
        assert [len(c) for c in choices[:3]] == [3, 2, 1] and choices[1][0] == choices[0][0]

        def work(c):
            s0 = e.stats()
            score = e.loglikelihood(context, c)
            s1 = e.stats()
            return score, (s1.evaluated_tokens - s0.evaluated_tokens, s1.steps - s0.steps)

        scores, work_done = zip(*(work(c) for c in choices), strict=True)
        assert work_done == (
            # Prefill-only: the context and the choice but its last token, whose logits score nothing.
            (len(context) + len(choices[0]) - 1, 1),
            # The distributions at the context's end and after " four" stayed with the slot:
            # " four herd" and " herd" read every log-probability from them, without a decode ...
            (0, 0),
            (0, 0),
            # ... and a choice that begins differently evaluates only its own tokens (but the last).
            (len(choices[3]) - 1, 1),
        )
        for (ll, greedy), c in zip(scores, choices, strict=True):
            ref_ll, ref_greedy = fresh.loglikelihood(context, c)  # each on an empty cache
            assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
        # Scoring never samples, and a generation request after it still evaluates its last token.
        assert e.stats().generated_tokens == 0
        _, fin = _tokens(e.submit(GenerationRequest(context, SamplingParams(temperature=0, max_tokens=2))))
        assert fin.usage.cached_tokens == len(context) - 1
    finally:
        fresh.close()
        e.close()


@pytest.mark.timeout(60)
def test_followers_of_a_cancelled_leader_still_finish_correctly(tiny_gguf):
    # Small batches: the first request's long prompt takes several steps, so the others stay
    # parked on it while it is cancelled half-way.
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=256, n_parallel=4, n_threads=1, n_batch=16))
    try:
        shared = e.tokenize("The herd moved slowly across the high plain, and the llamas kept close. " * 8)
        prompts = [shared + e.tokenize(f" Llama {i} rests.", add_special=False) for i in range(3)]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        alone = []
        for p in prompts[1:]:
            _flush(e)
            alone.append(_tokens(e.submit(GenerationRequest(p, params)))[0])
        _flush(e)
        before = e.stats().evaluated_tokens
        # The leader could not finish on its own: no end-of-generation, the whole context to fill.
        endless = SamplingParams(temperature=0, max_tokens=e.n_ctx_seq - len(prompts[0]) - 1, ignore_eos=True)
        leader, *followers = _submit_together(
            e, [GenerationRequest(prompts[0], endless)] + [GenerationRequest(p, params) for p in prompts[1:]]
        )
        prefilled, deadline = 0, time.monotonic() + 10
        while not prefilled and time.monotonic() < deadline:
            with e._cond:  # the scheduler stops at its next step while this is held
                prefilled = e.stats().evaluated_tokens - before
                if prefilled:
                    leader.cancel()  # after its first chunk: the others are parked on it
            time.sleep(0)  # a poll of a few steps' length: no sleep that could outlast the prefill
        # Cancelled part-way through its prompt (n_batch tokens a step), before any token:
        assert 0 < prefilled < len(prompts[0])
        tokens, fin = _tokens(leader)
        assert fin.reason == "abort" and tokens == [] and fin.usage.completion_tokens == 0
        results = [_tokens(h) for h in followers]
        assert [toks for toks, _ in results] == alone
        assert all(f.reason == "length" for _, f in results)
        assert e.stats().active == 0
    finally:
        e.close()


# --------------------------------------------------------------------------- detok
@pytest.mark.parametrize("text", ["héllo wörld", "🦙 llama", "中文字符", "a\u200bb"])
def test_stream_decoder_never_splits_characters(text):
    data = text.encode()
    for split in range(1, len(data)):
        d = StreamDecoder()
        out = [d.feed(data[:split]), d.feed(data[split:]), d.flush()]
        assert "".join(out) == text
        assert all("\ufffd" not in o for o in out)


def test_stream_decoder_holds_back_stop_prefixes():
    d = StreamDecoder(stop=["</end>"])
    pieces = ["Hello", " wor", "ld</", "en", "d> more"]
    out = [d.feed(p.encode()) for p in pieces]
    assert "".join(out) + d.flush() == "Hello world"
    assert d.stopped
    d = StreamDecoder(stop=["</end>"])
    out = [d.feed(p.encode()) for p in ["a</", "b"]]
    assert "".join(out) + d.flush() == "a</b"
