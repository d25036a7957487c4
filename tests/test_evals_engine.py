"""Model-driven evaluation on the real engine (llama.cpp) with tiny generated models:
multiple choice scored prefill-only and batched, generation with stop sequences and
exact-match/regex/F1, perplexity of a text file, HumanEval through the sandbox,
personas, tuned models (base + LoRA adapter), `--compare` and the regression gate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from openherd import cli
from openherd.evals import scoring
from openherd.evals.gate import GateFailed, check_gate
from openherd.evals.lm import EvalModelConfig, open_model, rolling_windows
from openherd.evals.runner import run_task
from openherd.evals.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
# One thread: the test machine is shared, and llama.cpp's OpenMP threads spin badly when oversubscribed.
CFG = EvalModelConfig(n_ctx=512, n_parallel=8, n_threads=1)


@pytest.fixture(scope="module")
def lm(tiny_gguf):
    model = open_model(str(tiny_gguf), CFG)
    yield model.lm
    model.close()


def _write_task(tmp_path: Path, spec: dict, rows: list[dict], name: str = "task") -> Path:
    import yaml

    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": data.name, **spec}, sort_keys=False))
    return path


MC_ROWS = [
    {"q": "What do llamas eat?", "choices": ["grass", "stones", "the wind", "small fish"], "gold": 0},
    {"q": "How many legs has a llama?", "choices": ["two", "four", "six"], "gold": 1},
    {
        "q": "Where does the herd rest?",
        "choices": ["in the shade of the old stone wall", "at sea"],
        "gold": 0,
    },
    {"q": "Who counts the herd?", "choices": ["the keeper", "nobody", "a llama", "the wind"], "gold": 0},
    {"q": "What is two plus two?", "choices": ["three", "four", "five"], "gold": 1},
    {"q": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin", "Madrid"], "gold": 0},
]
MC_SPEC = {
    "type": "multiple_choice",
    "prompt": "Question: {{ q }}\nAnswer:",
    "choices": "choices",
    "gold": "gold",
}


# ---------------------------------------------------------------- multiple choice


def test_multiple_choice_is_batched_prefill_only_and_equals_one_request_per_choice(lm, tmp_path):
    task = load_task(str(_write_task(tmp_path, MC_SPEC, MC_ROWS)))
    engine = lm.engine
    before = engine.stats()
    res = run_task(lm, task)
    after = engine.stats()
    n_choices = sum(len(r["choices"]) for r in MC_ROWS)
    assert after.requests - before.requests == n_choices  # one scoring request per choice ...
    assert after.generated_tokens == before.generated_tokens  # ... and not one generated token
    # Waves put each choice back in the slot holding its context: every choice after the first
    # of a document reuses the whole context from the prefix cache.
    ctx_lens = [len(lm.encode_pair(task.context(d), " x")[0]) for d in task.docs]
    reused = sum((len(r["choices"]) - 1) * n for r, n in zip(MC_ROWS, ctx_lens, strict=True))
    assert after.cached_tokens - before.cached_tokens >= reused

    for doc, rec in zip(task.docs, res.records, strict=True):
        # The same numbers one request at a time, tokenised by hand the lm-eval way.
        ctx = task.context(doc)
        for choice, ll in zip(task.choices(doc), rec["loglikelihoods"], strict=True):
            whole = engine.tokenize(ctx + " " + choice, add_special=True, parse_special=True)
            c = engine.tokenize(ctx, add_special=True, parse_special=True)
            single, _ = engine.loglikelihood(c, whole[len(c) :])
            assert ll == pytest.approx(single, abs=1e-3)  # f32 weights: batching moves only float rounding
        pred, pred_norm = scoring.mc_predictions(rec["loglikelihoods"], task.choices(doc))
        assert (rec["pred"], rec["pred_norm"]) == (pred, pred_norm)
        assert rec["acc"] == float(pred == rec["gold"]) and rec["acc_norm"] == float(pred_norm == rec["gold"])
    assert res.summary.metrics["acc"] == pytest.approx(np.mean(res.scores["acc"]))
    assert res.summary.counts == {"items": len(MC_ROWS), "requests": n_choices}


def test_a_shared_prefix_is_reused_across_blocks(lm, tmp_path):
    # A long description shared by every document (like few-shot examples shared by a
    # subject). The first block computes it in one slot and copies it to the others; sorted
    # contexts let each later block of n_parallel documents find it in the slots the previous
    # block left, so it is evaluated once in all; and a document's later choices cost only
    # their own tokens (waves keep each context, and its last distribution, in its slot).
    description = (
        "The following questions are about llamas, their herd and the keeper "
        "who counts them every morning before the gate opens.\n\n"
    )
    rows = [dict(r, q=f"{r['q']} (variant {i})") for i in range(4) for r in MC_ROWS]  # 24 documents, 3 blocks
    task = load_task(str(_write_task(tmp_path, {**MC_SPEC, "description": description}, rows)))
    reqs = [(task.context(d), " " + c) for d in task.docs for c in task.choices(d)]
    engine = lm.engine

    pairs = [lm.encode_pair(c, x) for c, x in reqs]
    _, batched, _ = _work(engine, lambda: lm.loglikelihood(reqs))
    prefix = len(engine.tokenize(description, add_special=True)) - 1  # its last token may merge on
    assert len(rows) > 2 * engine.config.n_parallel
    by_ctx: dict[tuple, list] = {}
    for c, x in pairs:
        by_ctx.setdefault(tuple(c), []).append(x)
    # Each context once, each choice's tokens but its last (prefill-only: its logits score
    # nothing), and the description once for all documents, whichever block they are in.
    bound = sum(len(c) + sum(len(x) - 1 for x in xs) for c, xs in by_ctx.items())
    assert batched <= bound - (len(rows) - 1) * prefix
    assert batched <= len(_needed(pairs)) + len(rows)  # about the minimum (see below)
    assert batched < sum(len(c) + len(x) for c, x in pairs) / 4  # versus evaluating every pair whole


def test_few_shot_waves_evaluate_no_more_than_one_request_per_choice(lm, tmp_path):
    # Few-shot contexts share the description, and sorted neighbours their first examples.
    # One request per choice reuses them through the prefix cache; the waves, admitted
    # 8 contexts at a time, must not evaluate more, in a fraction of the llama_decode calls.
    description = "The following are questions about llamas, with answers.\n\n"
    rows = [dict(r, q=f"{r['q']} (variant {i})") for i in range(3) for r in MC_ROWS]  # 18 documents, 3 blocks
    task = load_task(str(_write_task(tmp_path, {**MC_SPEC, "description": description, "fewshot": 2}, rows)))
    reqs = [(task.context(d), " " + c) for d in task.docs for c in task.choices(d)]
    pairs = [lm.encode_pair(c, x) for c, x in reqs]
    engine = lm.engine
    batched, b_tokens, b_calls = _work(engine, lambda: lm.loglikelihood(reqs))
    one_by_one, s_tokens, s_calls = _work(engine, lambda: [engine.loglikelihood(c, x) for c, x in pairs])
    assert b_tokens <= s_tokens
    assert 3 * b_calls <= s_calls
    assert b_tokens <= len(_needed(pairs)) + len(rows)
    # Few-shot prompts span several micro-batches, split differently in the two runs: float
    # rounding of the f16 KV cache, not a different computation.
    for (a, _), (b, _) in zip(batched, one_by_one, strict=True):
        assert a == pytest.approx(b, abs=5e-2)


def _work(engine, fn) -> tuple[object, int, int]:
    """fn's result from flushed slots, with the prompt tokens it evaluated and its llama_decode calls."""
    _flush_slots(engine)
    s0 = engine.stats()
    out = fn()
    s1 = engine.stats()
    return out, s1.evaluated_tokens - s0.evaluated_tokens, s1.steps - s0.steps


def _needed(pairs) -> set[tuple[int, ...]]:
    """The minimum work: every distinct prompt prefix whose last token some choice needs
    evaluated (all tokens of context + choice but the choice's last), counted once."""
    return {tuple((c + x)[:i]) for c, x in pairs for i in range(1, len(c) + len(x))}


def _flush_slots(engine) -> None:
    """Fill every slot with an unrelated one-token prompt, so nothing is cached from before."""
    from openherd.evals.lm import score_wave

    score_wave(engine, [([engine.info.bos, 300 + i], [301]) for i in range(engine.config.n_parallel)])


def test_gold_from_the_models_own_choice_scores_one(lm, tmp_path):
    # A task whose gold answers are the model's own picks: acc is exactly 1, and a task whose
    # gold answers are its least likely choice: acc is exactly 0. Real scores, not a fake model.
    task = load_task(str(_write_task(tmp_path, MC_SPEC, MC_ROWS)))
    lls = [r["loglikelihoods"] for r in run_task(lm, task).records]
    best = [dict(r, gold=int(np.argmax(x))) for r, x in zip(MC_ROWS, lls, strict=True)]
    worst = [dict(r, gold=int(np.argmin(x))) for r, x in zip(MC_ROWS, lls, strict=True)]
    assert (
        run_task(lm, load_task(str(_write_task(tmp_path, MC_SPEC, best, "best")))).summary.metrics["acc"]
        == 1.0
    )
    assert (
        run_task(lm, load_task(str(_write_task(tmp_path, MC_SPEC, worst, "worst")))).summary.metrics["acc"]
        == 0.0
    )


def test_encoding_follows_lm_eval(lm):
    engine = lm.engine
    enc = lambda s: engine.tokenize(s, add_special=True, parse_special=True)  # noqa: E731
    # Trailing context spaces move to the continuation; the whole is encoded, then split.
    ctx, cont = lm.encode_pair("Answer: ", "yes")
    assert ctx == enc("Answer:") and ctx + cont == enc("Answer: yes")
    # An empty context is the BOS (prefix) token alone.
    ctx, cont = lm.encode_pair("", "hello")
    assert ctx == [engine.info.bos] and cont == engine.tokenize("hello", add_special=False)
    assert lm.loglikelihood([("Answer:", "")]) == [(0.0, True)]


def test_long_contexts_are_left_truncated(tiny_gguf):
    with open_model(str(tiny_gguf), replace(CFG, n_ctx=32, n_parallel=2)) as small:
        long_ctx = "The herd moved slowly across the high plain. " * 20
        ((ll, _),) = small.loglikelihood([(long_ctx, " and the wind")])
        ctx, cont = small.encode_pair(long_ctx, " and the wind")
        ref, _ = small.engine.loglikelihood(ctx[-(31 - len(cont)) :], cont)
        assert ll == pytest.approx(ref, abs=1e-4)


# ---------------------------------------------------------------- generation


def test_generation_exact_match_regex_f1_and_stop(lm, tmp_path):
    rows = [{"country": c, "answer": "x"} for c in ("France", "Peru", "Chile", "Japan", "Kenya", "Nepal")]
    spec = {
        "type": "generation",
        "prompt": "Q: capital of {{ country }}?\nA:",
        "target": "answer",
        "max_tokens": 8,
    }
    first = run_task(lm, load_task(str(_write_task(tmp_path, spec, rows, "free"))))
    outputs = [r["output"] for r in first.records]
    assert lm.engine.stats().generated_tokens > 0 and all(outputs)
    # Targets taken from the model's own greedy outputs: exact match is 1 where they were kept.
    gold = [
        dict(r, answer=o if i % 2 == 0 else "definitely not this")
        for i, (r, o) in enumerate(zip(rows, outputs, strict=True))
    ]
    em = run_task(lm, load_task(str(_write_task(tmp_path, spec, gold, "em"))))
    assert [r["output"] for r in em.records] == outputs
    assert em.scores["exact_match"] == [1.0, 0.0] * 3 and em.summary.metrics == {"exact_match": 0.5}
    # F1 against a reference that shares words with the output.
    f1 = run_task(lm, load_task(str(_write_task(tmp_path, {**spec, "metric": "f1"}, gold, "f1"))))
    assert f1.scores["f1"] == [scoring.f1(o, g["answer"]) for o, g in zip(outputs, gold, strict=True)]
    # Regex: the pattern pulls out the first three characters, which must equal the reference.
    rx = [dict(r, answer=o.strip()[:3]) for r, o in zip(rows, outputs, strict=True)]
    regex = run_task(
        lm,
        load_task(str(_write_task(tmp_path, {**spec, "metric": "regex", "regex": r"^\s*(.{3})"}, rx, "rx"))),
    )
    assert regex.summary.metrics == {"regex": 1.0}
    # A stop sequence taken from inside the first output ends the generation just before it.
    text = outputs[0]
    stop = next(
        text[i : i + 2]
        for i in range(2, len(text) - 1)
        if text[i : i + 2].strip() and text.find(text[i : i + 2]) == i
    )
    stopped = run_task(lm, load_task(str(_write_task(tmp_path, {**spec, "stop": [stop]}, rows, "stopped"))))
    assert stopped.records[0]["output"] == text[: text.index(stop)]


def test_generation_batched_equals_one_at_a_time(lm):
    from openherd.engine.types import GenerationRequest, SamplingParams
    from openherd.evals.runner import GenRequest

    reqs = [GenRequest(f"The herd number {i} walks", ["\n"], 6) for i in range(10)]
    batched = lm.generate(reqs)
    for req, out in zip(reqs, batched, strict=True):
        params = SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=6, stop=["\n"])
        single, _ = lm.engine.submit(GenerationRequest(prompt=lm.encode(req.prompt), params=params)).result()
        assert out == single


# ---------------------------------------------------------------- perplexity


def test_rolling_windows_match_lm_eval():
    import lm_eval.utils as lm_eval_utils  # the reference (test extra), imported without torch

    tokens = list(range(100, 137))
    for max_len in (1, 5, 8, 36, 37, 50):
        ref = [
            lm_eval_utils.make_disjoint_window(w)
            for w in lm_eval_utils.get_rolling_token_windows(tokens, 1, max_len, 1)
        ]
        assert rolling_windows(tokens, 1, max_len) == [(list(a), list(b)) for a, b in ref]
        assert [t for _, c in rolling_windows(tokens, 1, max_len) for t in c] == tokens


def test_perplexity_of_a_text_file(tiny_gguf, tmp_path, herd_home, capsys):
    text = (
        "The herd moved slowly across the high plain, and the llamas kept close to one another. " * 6
    ).strip()
    path = tmp_path / "notes.txt"
    path.write_text(text)
    with open_model(str(tiny_gguf), replace(CFG, n_ctx=48)) as small:  # 46-token windows: several of them
        res = run_task(small, load_task(str(path)))
        tokens = small.engine.tokenize(text, add_special=False)
        windows = rolling_windows(tokens, small.engine.info.bos, 46)
        assert len(windows) > 2
        total = sum(small.engine.loglikelihood(c, x)[0] for c, x in windows)
    m = res.summary.metrics
    assert res.records[0]["loglikelihood"] == pytest.approx(total, abs=5e-2)
    assert res.summary.counts["tokens"] == len(tokens) and res.summary.counts["bytes"] == len(text.encode())
    ll = res.records[0]["loglikelihood"]
    assert m["token_perplexity"] == pytest.approx(math.exp(-ll / len(tokens)))
    assert m["byte_perplexity"] == pytest.approx(math.exp(-ll / len(text.encode())))
    assert m["word_perplexity"] == pytest.approx(math.exp(-ll / len(text.split())))
    assert m["bits_per_byte"] == pytest.approx(-ll / len(text.encode()) / math.log(2))
    # The CLI takes the text file as the task.
    rc = cli.main(
        ["eval", str(tiny_gguf), "--task", str(path), "--ctx", "48", "--json", "--out", str(tmp_path / "out")]
    )
    out = capsys.readouterr().out
    assert rc == 0 and set(json.loads(out)) == set(m)


# ---------------------------------------------------------------- HumanEval


def test_humaneval_generation_runs_in_the_sandbox(lm):
    task = load_task("humaneval", limit=2)
    task.spec.max_tokens = 24
    res = run_task(lm, task, workers=2)
    assert res.summary.counts == {"problems": 2, "samples": 2, "sandbox_errors": 0}
    assert res.summary.metrics == {"pass@1": 0.0}  # random weights write no working code
    assert [r["task_id"] for r in res.records] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["completion"] and r["status"] == "failed" for r in res.records)
    # n samples with temperature: pass@k over them, and the samples differ.
    task.spec.samples, task.spec.temperature, task.spec.k = 3, 1.0, [1, 3]
    res = run_task(lm, task, workers=2)
    assert set(res.summary.metrics) == {"pass@1", "pass@3"} and res.summary.counts["samples"] == 6
    assert len({r["completion"] for r in res.records[:3]}) > 1


# ---------------------------------------------------------------- personas and tuned models


def _register(tiny_gguf) -> None:
    from openherd.store import Store

    Store().pull(str(tiny_gguf), name="tiny")


def test_persona_is_scored_through_its_prompt(tiny_gguf, herd_home, tmp_path):
    from openherd.personas.bundle import Persona, PersonaStore
    from openherd.personas.runtime import PersonaRuntime

    _register(tiny_gguf)
    PersonaStore().create(Persona(name="keeper", model="tiny", system="You keep the herd. Answer briefly."))
    task = load_task(str(_write_task(tmp_path, MC_SPEC, MC_ROWS[:3])))
    with open_model("keeper", CFG) as plm:
        assert plm.chat and plm.name == "keeper"
        res = run_task(plm, task)
        assert res.summary.settings["target_delimiter"] == ""  # lm-eval: no delimiter after a chat prompt
        rt = PersonaRuntime(PersonaStore().get("keeper"), lambda name: plm.engine)
        for doc, rec in zip(task.docs, res.records, strict=True):
            prep = rt.prepare_sync([{"role": "user", "content": task.context(doc)}])
            assert "You keep the herd." in plm.engine.detokenize(prep.prompt)
            for choice, ll in zip(task.choices(doc), rec["loglikelihoods"], strict=True):
                ref, _ = plm.engine.loglikelihood(prep.prompt, plm.engine.tokenize(choice, add_special=False))
                assert ll == pytest.approx(ref, abs=2e-2)
        from openherd.evals.runner import GenRequest

        (answer,) = plm.generate([GenRequest("Who counts the herd?", ["\n"], 8)])
        prep = rt.prepare_sync(
            [{"role": "user", "content": "Who counts the herd?"}], {"temperature": 0, "max_tokens": 8}
        )
        from openherd.engine.types import GenerationRequest, SamplingParams

        params = SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=8, stop=["\n"])
        assert answer == plm.engine.submit(GenerationRequest(prompt=prep.prompt, params=params)).result()[0]


def _write_adapter(path: Path, seed: int = 7, scale: float = 3.0) -> Path:
    """A random LoRA adapter GGUF for the tiny model (llama.cpp's layout, see tune/export.py)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    r, d, ff = 4, 64, 128
    for layer in range(2):
        for name, n_in, n_out in (("attn_output", d, d), ("ffn_down", ff, d), ("ffn_up", d, ff)):
            w.add_tensor(
                f"blk.{layer}.{name}.weight.lora_a",
                (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float32),
            )
            w.add_tensor(
                f"blk.{layer}.{name}.weight.lora_b",
                (scale * rng.standard_normal((n_out, r))).astype(np.float32),
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _register_tuned(tiny_gguf, tmp_path) -> None:
    from openherd.store import Manifest, Store

    store = Store()
    base = store.pull(str(tiny_gguf), name="tiny")
    blob = store.add_blob(_write_adapter(tmp_path / "adapter.gguf"))
    store.register(
        Manifest(
            name="tiny-tuned",
            source="tune:tiny",
            sha256=base.sha256,
            size=base.size,
            path="",
            architecture=base.architecture,
            base="tiny",
            adapter=str(blob.path),
        )
    )


def _self_gold_task(tmp_path, tiny_gguf) -> Path:
    """20 items whose gold answers are the base model's own picks: the base scores acc = 1."""
    rows = [
        {
            "q": f"Item {i}: which word follows the herd?",
            "choices": ["grass", "water", "stone", "sky"],
            "gold": 0,
        }
        for i in range(20)
    ]
    path = _write_task(tmp_path, MC_SPEC, rows, "selfgold")
    with open_model(str(tiny_gguf), CFG) as base:
        lls = [r["loglikelihoods"] for r in run_task(base, load_task(str(path))).records]
    rows = [dict(r, gold=int(np.argmax(x))) for r, x in zip(rows, lls, strict=True)]
    return _write_task(tmp_path, MC_SPEC, rows, "selfgold")


def test_tuned_store_model_applies_its_adapter_and_the_gate_refuses_it(tiny_gguf, herd_home, tmp_path):
    _register_tuned(tiny_gguf, tmp_path)
    task = _self_gold_task(tmp_path, tiny_gguf)
    with open_model("tiny-tuned", CFG) as tuned, open_model("tiny", CFG) as base:
        a = run_task(base, load_task(str(task)))
        b = run_task(tuned, load_task(str(task)))
    assert a.summary.metrics["acc"] == 1.0
    assert b.summary.metrics["acc"] < 0.8  # the adapter changed the model

    gate = check_gate("tiny", "tiny-tuned", [str(task)], threshold=0.02, limit=20, config=CFG)
    assert not gate.passed
    (acc,) = [d for d in gate.per_task["selfgold"] if d.metric == "acc"]
    assert acc.regressed and acc.base == 1.0 and acc.candidate == b.summary.metrics["acc"]
    assert acc.delta == pytest.approx(b.summary.metrics["acc"] - 1.0) and acc.low <= acc.delta <= acc.high < 0
    assert gate.message.startswith("gate failed: 'tiny-tuned' regresses by more than 0.02 against 'tiny': ")
    assert f"selfgold acc 1.0000 -> {acc.candidate:.4f} ({acc.delta:+.4f}" in gate.message
    with pytest.raises(GateFailed) as e:
        gate.raise_for_regression()
    assert e.value.message == gate.message

    # The same adapter as a file on top of the base (a candidate not yet registered) fails the same way.
    unregistered = check_gate(
        "tiny", "tiny", [str(task)], candidate_adapter=str(tmp_path / "adapter.gguf"), config=CFG
    )
    assert not unregistered.passed and unregistered.per_task["selfgold"][0].delta == acc.delta
    # The base against itself passes, with no change at all; a huge threshold lets the tuned model through.
    same = check_gate("tiny", "tiny", [str(task)], config=CFG)
    assert same.passed and all(d.delta == 0 for d in same.per_task["selfgold"])
    assert same.message.startswith("gate passed: 'tiny' stays within 0.02 of 'tiny' on selfgold")
    assert check_gate("tiny", "tiny-tuned", [str(task)], threshold=1.0, config=CFG).passed


def test_gate_checks_every_task_before_loading_a_model(herd_home):
    from openherd.errors import NotFound

    with pytest.raises(NotFound, match="unknown task 'nosuch'"):
        check_gate("no-such-model", "no-such-model", ["basics-mc", "nosuch"])


# ---------------------------------------------------------------- CLI


def test_cli_evaluates_a_gguf_and_writes_every_output(tiny_gguf, herd_home, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "eval",
            str(tiny_gguf),
            "--task",
            "basics-mc",
            "--limit",
            "5",
            "--json",
            "--out",
            str(out),
            "--parallel",
            "4",
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads(stdout)  # stdout is exactly one JSON object
    assert set(metrics) == {"acc", "acc_norm"}
    assert sorted(p.name for p in out.iterdir()) == [
        "chart.png",
        "records.jsonl",
        "report.md",
        "results.json",
    ]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(r["loglikelihoods"]) == 4 for r in records)
    summary = json.loads((out / "results.json").read_text())
    assert summary["metrics"] == metrics and summary["subject"] == tiny_gguf.name
    assert "| acc |" in (out / "report.md").read_text()


def test_cli_compare_gives_a_paired_bootstrap_interval(tiny_gguf, herd_home, tmp_path, capsys):
    _register_tuned(tiny_gguf, tmp_path)
    args = ["--compare", "tiny", "tiny-tuned", "--task", "basics-mc", "--limit", "12", "--parallel", "4"]
    assert cli.main(["eval", *args, "--json", "--out", str(tmp_path / "c1")]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert (cmp["a"], cmp["b"], cmp["n_resamples"], cmp["seed"]) == ("tiny", "tiny-tuned", 1000, 0)
    acc = cmp["metrics"]["acc"]
    assert acc["diff"] == pytest.approx(acc["b"] - acc["a"]) and acc["low"] <= acc["diff"] <= acc["high"]
    assert acc["n"] == 12
    # Recompute the interval from the per-item records the run wrote: same seed, same numbers.
    a = [json.loads(x)["acc"] for x in (tmp_path / "c1" / "a" / "records.jsonl").read_text().splitlines()]
    b = [json.loads(x)["acc"] for x in (tmp_path / "c1" / "b" / "records.jsonl").read_text().splitlines()]
    ref = scoring.paired_bootstrap(b, a, n_resamples=1000, seed=0)
    assert (acc["low"], acc["high"], acc["p_value"]) == (ref.low, ref.high, ref.p_value)
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == [
        "a",
        "b",
        "chart.png",
        "comparison.json",
        "report.md",
    ]
    # The table form.
    assert cli.main(["eval", *args, "--out", str(tmp_path / "c2")]) == 0
    table = capsys.readouterr().out
    assert "| metric | A | B | B − A | 95% CI | p |" in table and "| acc |" in table
    assert "- A: `tiny`" in table and "- B: `tiny-tuned`" in table


def test_cli_bad_input_is_one_line(tiny_gguf, herd_home, tmp_path):
    def herd(*args):
        return subprocess.run(
            [sys.executable, "-m", "openherd", "eval", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC_ROWS[0]) + "\n{not json\n")
    (tmp_path / "bad.yaml").write_text(
        "name: bad\ntype: multiple_choice\ndata: bad.jsonl\nprompt: '{{ q }}'\nchoices: choices\ngold: gold\n"
    )
    samples = tmp_path / "s.jsonl"
    samples.write_text(
        '{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n{"task_id": "HumanEval/999", "completion": ""}\n'
    )
    cases = [
        ((str(tiny_gguf), "--task", str(tmp_path / "bad.yaml")), f"{bad}:2: invalid JSON"),
        ((str(tiny_gguf), "--task", "nosuch"), "unknown task 'nosuch'"),
        (("no-such-model", "--task", "basics-mc"), "model 'no-such-model' not found"),
        (("--task", "humaneval", "--samples", str(samples)), f"{samples}:2: unknown task_id 'HumanEval/999'"),
        (
            (str(tiny_gguf), "--task", "basics-mc", "--num-samples", "3"),
            "--num-samples and --temperature apply to humaneval",
        ),
        ((str(tiny_gguf), "--task", str(tmp_path / "empty.txt")), "does not exist"),
    ]
    for args, expected in cases:
        r = herd(*args)
        assert r.returncode != 0 and r.stdout == "", (args, r.stderr)
        assert r.stderr.startswith("herd: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert expected in r.stderr, r.stderr
