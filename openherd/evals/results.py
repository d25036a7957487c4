"""What an evaluation produces: a run's summary and per-item scores, and a comparison of two runs.

The runner makes these, the comparison reads them, the report writes them; keeping the types
here lets each of those depend on the types alone, never on one another.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

# The paired bootstrap of a comparison (compare.compare_results): resamples, seed, interval.
N_RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95


@dataclass
class EvalSummary:
    task: str
    type: str  # the task type
    subject: str  # what was evaluated: a model name, or "samples:FILE"
    metrics: dict[str, float]  # e.g. {"acc": 0.7, "acc_norm": 0.75} or {"pass@1": 0.5}
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> 95% CI (low, high)
    counts: dict[str, int] = field(default_factory=dict)  # items, problems, samples, errors...
    settings: dict = field(default_factory=dict)  # fewshot, limit, timeout...: what reproduces the run
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return d


@dataclass
class TaskResult:
    summary: EvalSummary
    records: list[dict]  # one per item (per sample for humaneval)
    scores: dict[str, list[float]]  # per-item scores per metric, in item order: input to paired_bootstrap
    # metric -> per-item weights when the metric is a weighted mean (perplexity: bytes per document)
    weights: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class MetricComparison:
    metric: str
    a: float  # the metric of A (as in A's summary)
    b: float
    diff: float  # b - a
    low: float  # confidence interval of b - a
    high: float
    p_value: float  # two-sided paired bootstrap p-value for "no difference"
    n: int  # paired items (problems for HumanEval, documents for perplexity)
    higher_is_better: bool = True

    @property
    def improvement(self) -> float:
        """How much better B is than A in this metric's units (negative: B is worse)."""
        return self.diff if self.higher_is_better else -self.diff


@dataclass
class Comparison:
    task: str
    task_type: str
    a: str  # what was evaluated as A
    b: str
    metrics: list[MetricComparison]
    n_resamples: int = N_RESAMPLES
    seed: int = SEED
    confidence: float = CONFIDENCE
    summaries: dict = field(default_factory=dict)  # "a"/"b" -> EvalSummary.to_dict()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = {m.metric: {k: v for k, v in asdict(m).items() if k != "metric"} for m in self.metrics}
        return d
