"""Two models on the same task, side by side, with a paired bootstrap interval on the difference.

    a = run_task(lm_a, task); b = run_task(lm_b, task)
    cmp = compare_results(a, b)            # B - A for every headline metric of the task
    print(comparison_table(cmp))

Both runs score the same items in the same order, so the difference is
resampled per item (``scoring.paired_bootstrap``): the interval reflects how
much the *difference* varies across items, which is far tighter than two
separate intervals when the models agree on most items. The resampling is
seeded, so the same runs always give the same interval.
"""

from __future__ import annotations

from . import scoring
from .results import CONFIDENCE, N_RESAMPLES, SEED, Comparison, MetricComparison, TaskResult

# Metrics where a lower value is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"bits_per_byte", "word_perplexity", "byte_perplexity", "token_perplexity"})


def headline_metrics(result: TaskResult) -> list[str]:
    """The metrics a comparison or gate looks at: those with per-item scores, in summary order."""
    return [m for m in result.summary.metrics if m in result.scores]


def compare_results(
    a: TaskResult,
    b: TaskResult,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Comparison:
    if a.summary.task != b.summary.task:
        raise ValueError(f"cannot compare different tasks ({a.summary.task} vs {b.summary.task})")
    out = []
    for metric in headline_metrics(a):
        xa, xb = a.scores[metric], b.scores.get(metric)
        if xb is None or len(xa) != len(xb):
            raise ValueError(
                f"{a.summary.task}: the two runs scored different items for {metric} "
                f"({len(xa)} vs {len(xb or [])}); run both with the same --limit"
            )
        weights = a.weights.get(metric)
        p = scoring.paired_bootstrap(
            xb, xa, weights=weights, n_resamples=n_resamples, seed=seed, confidence=confidence
        )
        va, vb = a.summary.metrics[metric], b.summary.metrics[metric]
        out.append(
            MetricComparison(
                metric, va, vb, vb - va, p.low, p.high, p.p_value, p.n, metric not in LOWER_IS_BETTER
            )
        )
    return Comparison(
        a.summary.task,
        a.summary.type,
        a.summary.subject,
        b.summary.subject,
        out,
        n_resamples,
        seed,
        confidence,
        {"a": a.summary.to_dict(), "b": b.summary.to_dict()},
    )


def comparison_table(cmp: Comparison) -> str:
    pct = round(cmp.confidence * 100)
    n = cmp.metrics[0].n if cmp.metrics else 0
    lines = [
        f"# {cmp.task}: A vs B",
        "",
        f"- A: `{cmp.a}`",
        f"- B: `{cmp.b}`",
        f"- task type: {cmp.task_type}",
        f"- paired items: {n}",
        f"- paired bootstrap: {cmp.n_resamples} resamples, seed {cmp.seed}, {pct}% interval of B − A",
        "",
        f"| metric | A | B | B − A | {pct}% CI | p |",
        "| --- | ---: | ---: | ---: | :---: | ---: |",
    ]
    for m in cmp.metrics:
        better = "" if m.diff == 0 else (" ↑" if m.improvement > 0 else " ↓")
        lines.append(
            f"| {m.metric} | {m.a:.4f} | {m.b:.4f} | {m.diff:+.4f}{better} | {m.low:+.4f} – {m.high:+.4f} | {m.p_value:.3f} |"
        )
    lines += ["", "↑/↓: B is better/worse than A (lower is better for perplexity and bits per byte)."]
    return "\n".join(lines) + "\n"
