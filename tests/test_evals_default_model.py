"""The whole evaluation path on the real default model (SmolLM2-135M-Instruct, Q4_1)."""

from __future__ import annotations

import pytest

from openherd.evals.lm import EvalModelConfig, open_model
from openherd.evals.runner import run_task
from openherd.evals.tasks import load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(default_model_path):
    model = open_model(str(default_model_path), EvalModelConfig(n_ctx=1024, n_parallel=8, n_threads=2))
    yield model.lm
    model.close()


def test_multiple_choice_is_well_above_chance(smol):
    task = load_task("basics-mc")
    res = run_task(smol, task)
    # Four choices: chance is 0.25. The model knows most of these; a tokenisation or
    # off-by-one error in scoring drops it to chance.
    assert res.summary.metrics["acc"] >= 0.45
    doc = task.docs[10]  # "What is the capital of France?"
    rec = res.records[10]
    for choice, ll in zip(task.choices(doc), rec["loglikelihoods"], strict=True):
        ctx, cont = smol.encode_pair(task.context(doc), " " + choice)
        # Batched vs alone: float rounding at most (amplified by Q4_1's re-quantized activations).
        assert ll == pytest.approx(smol.engine.loglikelihood(ctx, cont)[0], abs=0.1)
    assert rec["pred"] == task.gold(doc)


def test_generation_and_humaneval_run_end_to_end(smol):
    capitals = run_task(smol, load_task("capitals"))
    assert capitals.summary.metrics["exact_match"] >= 0.5
    task = load_task("humaneval", limit=3)
    task.spec.max_tokens = 128
    res = run_task(smol, task, workers=2)
    assert res.summary.counts == {"problems": 3, "samples": 3, "sandbox_errors": 0}
    assert all(r["completion"].strip() for r in res.records)
    assert all(r["status"] in ("passed", "failed", "timeout") for r in res.records)
