"""Run a task against a language model and score it.

``run_task(model, task)`` is the one entry point. ``model`` is anything with the
three request types of lm-evaluation-harness (``LanguageModel`` below), so the
scoring here never touches llama.cpp: ``EngineLM`` adapts an
``openherd.engine.Engine`` to it, and tests can pass any other implementation.

Request semantics follow lm-eval so numbers are comparable:

* multiple_choice: one ``loglikelihood(context, target_delimiter + choice)``
  request per choice; acc / acc_norm from ``scoring.mc_predictions``;
* generation: ``generate(context, stop, max_tokens)`` at temperature 0, scored
  with the task's metric against every reference (best one counts);
* perplexity: ``loglikelihood_rolling(text)``, aggregated into word/byte
  perplexity and bits per byte;
* humaneval: ``samples`` completions of each problem's prompt, run in the
  sandbox, pass@k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from . import scoring
from .report import EvalSummary
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
    name: str

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log P(continuation tokens | context), is_greedy)."""
        ...

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """For each text: its total log-probability, scored in windows of the context size."""
        ...

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """For each request: the generated text, without the stop sequence that ended it."""
        ...


@dataclass
class TaskResult:
    summary: EvalSummary
    records: list[dict]  # one per item (per sample for humaneval)
    scores: dict[str, list[float]]  # per-item scores per metric, in item order: input to paired_bootstrap


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
    delim = task.spec.target_delimiter
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
        {"items": len(task.docs)},
        _settings(task, fewshot),
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
    texts = [task.text(doc) for doc in task.docs]
    lls = model.loglikelihood_rolling(texts)
    words = [scoring.count_words(t) for t in texts]
    nbytes = [scoring.count_bytes(t) for t in texts]
    metrics = {
        "word_perplexity": scoring.weighted_perplexity(lls, words),
        "byte_perplexity": scoring.weighted_perplexity(lls, nbytes),
        "bits_per_byte": scoring.bits_per_byte(lls, nbytes),
    }
    records = [
        {"index": d.index, "source": d.source, "loglikelihood": ll, "words": w, "bytes": b}
        for d, ll, w, b in zip(task.docs, lls, words, nbytes, strict=True)
    ]
    summary = EvalSummary(
        task.name, task.type, model.name, metrics, {}, {"items": len(texts)}, _settings(task, 0)
    )
    return TaskResult(summary, records, {"loglikelihood": list(lls)})


def _run_humaneval(model: LanguageModel, task: Task, *, workers, limits, isolation, progress) -> TaskResult:
    from .humaneval import Sample, evaluate_samples, load_problems

    spec = task.spec
    problems = load_problems(spec.data or None)
    ids = list(problems)[: task.limit]
    problems = {i: problems[i] for i in ids}
    reqs, samples = [], []
    for tid in ids:
        for n in range(spec.samples):
            reqs.append(
                GenRequest(
                    problems[tid]["prompt"],
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
        model.name,
        samples,
        report,
        {"samples_per_problem": spec.samples, "temperature": spec.temperature, "timeout": spec.timeout},
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


# ---------------------------------------------------------------- the engine adapter


class EngineLM:
    """`LanguageModel` over an ``openherd.engine.Engine`` (the native API in docs/ARCHITECTURE.md).

    Tokenisation follows lm-eval's HF models: context and continuation are
    encoded together and split at the context's length, with trailing spaces
    of the context moved to the continuation, so BPE merges across the
    boundary match what the model saw in training.
    """

    def __init__(self, engine, name: str, *, parallel: int | None = None):
        self.engine = engine
        self.name = name
        self.parallel = parallel or max(1, getattr(getattr(engine, "config", None), "n_parallel", 4) or 4)

    # -- helpers

    def _encode(self, text: str, bos: bool) -> list[int]:
        return self.engine.tokenize(text, add_special=bos, parse_special=False)

    def _bos(self) -> list[int]:
        bos = getattr(self.engine.info, "bos", None)
        return [bos] if bos is not None and bos >= 0 else []

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation, bos=True)
        ctx = self._encode(context, bos=True)
        return ctx, whole[len(ctx) :]

    # -- LanguageModel

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        n_ctx = self.engine.info.n_ctx
        out = []
        for context, continuation in requests:
            if context:
                ctx, cont = self._encode_pair(context, continuation)
            else:  # lm-eval: an empty context is the BOS/EOT token alone
                ctx, cont = self._bos(), self._encode(continuation, bos=False)
            if not cont:
                out.append((0.0, True))
                continue
            keep = max(1, n_ctx - len(cont))
            ll, greedy = self.engine.loglikelihood(ctx[-keep:], cont[-(n_ctx - 1) :])
            out.append((float(ll), bool(greedy)))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        # lm-eval's get_rolling_token_windows with context_len=1: disjoint predicted
        # spans, each with as much preceding text as fits in the context window.
        max_len = self.engine.info.n_ctx - 1
        out = []
        for text in texts:
            tokens = self._encode(text, bos=False)
            total, predicted = 0.0, 0
            while predicted < len(tokens):
                n = min(max_len, len(tokens) - predicted)
                end = predicted + n
                ctx = self._bos() if predicted == 0 else tokens[max(0, end - max_len - 1) : predicted]
                ll, _ = self.engine.loglikelihood(ctx, tokens[predicted:end])
                total += float(ll)
                predicted = end
            out.append(total)
        return out

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        from ..engine.types import FinishEvent, GenerationRequest, SamplingParams, TokenEvent

        def one(req: GenRequest) -> str:
            params = SamplingParams(
                temperature=req.temperature,
                top_p=1.0,
                top_k=0,
                min_p=0.0,
                max_tokens=req.max_tokens,
                stop=list(req.stop),
                seed=req.seed,
            )
            text = []
            for ev in self.engine.generate(
                GenerationRequest(prompt=self._encode(req.prompt, bos=True), params=params)
            ):
                if isinstance(ev, TokenEvent):
                    text.append(ev.text)
                elif isinstance(ev, FinishEvent):
                    if ev.reason == "error":
                        raise RuntimeError(f"generation failed: {ev.error}")
                    text.append(ev.text)
            return "".join(text)

        # The engine batches concurrent sequences into one decode step; keep it fed.
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            return list(pool.map(one, requests))
