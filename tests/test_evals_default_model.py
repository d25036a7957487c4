"""The whole evaluation path on the real default model (SmolLM2-135M-Instruct, Q4_1)."""

from __future__ import annotations

import pytest

from openherd.engine import GenerationRequest, SamplingParams
from openherd.evals.humaneval import build_program, load_problems
from openherd.evals.lm import EvalModelConfig, open_model
from openherd.evals.runner import run_task
from openherd.evals.sandbox import check_program
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
    problems = load_problems()
    for rec in res.records:
        problem = problems[rec["task_id"]]
        # The completion is the model's own greedy continuation of the prompt (what the runner
        # sent, with its stop strings), not an empty or stale string ...
        prompt = smol.encode(problem["prompt"].rstrip())
        params = SamplingParams(temperature=0, max_tokens=128, stop=list(task.spec.stop))
        want, _ = smol.engine.submit(GenerationRequest(prompt, params)).result()
        assert rec["completion"] == want and want.strip()
        # ... and its verdict is what the sandbox says of prompt + completion + tests, run on
        # their own; the canonical solution of the same problem passes there, so a checker that
        # fails everything cannot hide behind a weak model.
        alone = check_program(build_program(problem, rec["completion"]), timeout=task.spec.timeout)
        assert rec["status"] == alone.status, (rec, alone.detail)
        assert rec["passed"] == (alone.status == "passed")
        assert check_program(build_program(problem, problem["canonical_solution"])).status == "passed"
