"""Write an evaluation's results: per-item records (JSONL), a summary (JSON), a markdown table and a chart.

One directory per run, ``$HERD_HOME/evals/<timestamp>-<task>`` unless told
otherwise::

    results.json   the summary: task, what was evaluated, metrics, intervals, counts
    records.jsonl  one line per scored item (per sample for HumanEval)
    report.md      the summary as a markdown table
    chart.png      the metrics as a bar chart (needs matplotlib; skipped with a note if absent)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

from ..atomic import atomic_write
from .compare import comparison_table
from .results import Comparison, EvalSummary


def default_out_dir(home: Path, task: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = home / "evals" / f"{stamp}-{task}"
    out, n = base, 1
    while out.exists():  # two runs in the same second
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def markdown_table(summary: EvalSummary) -> str:
    lines = [f"# {summary.task}", "", f"- evaluated: `{summary.subject}`", f"- task type: {summary.type}"]
    lines += [f"- {k}: {v}" for k, v in summary.counts.items()]
    lines += [f"- {k}: {v}" for k, v in summary.settings.items()]
    lines += ["", "| metric | value | 95% CI |", "| --- | ---: | :---: |"]
    for name, value in summary.metrics.items():
        ci = summary.intervals.get(name)
        ci_text = f"{_fmt(ci[0])} – {_fmt(ci[1])}" if ci else ""
        lines.append(f"| {name} | {_fmt(value)} | {ci_text} |")
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}"


def write_chart(path: Path, summary: EvalSummary) -> None:
    """A bar per metric, with its interval when there is one. matplotlib is imported only here."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so no global backend state is touched.
    names = list(summary.metrics)
    values = [summary.metrics[n] for n in names]
    fig = Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    errs = None
    if any(n in summary.intervals for n in names):
        lo = [
            max(0.0, v - summary.intervals[n][0]) if n in summary.intervals else 0.0
            for n, v in zip(names, values, strict=True)
        ]
        hi = [
            max(0.0, summary.intervals[n][1] - v) if n in summary.intervals else 0.0
            for n, v in zip(names, values, strict=True)
        ]
        errs = [lo, hi]
    bars = ax.bar(names, values, yerr=errs, capsize=4, color="#4C72B0")
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{v:.3f}",
            (bar.get_x() + bar.get_width() / 2, v),
            ha="center",
            va="bottom",
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=9,
        )
    bounded = all(0.0 <= v <= 1.0 for v in values)
    if bounded:
        ax.set_ylim(0, 1.08)
    ax.set_title(f"{summary.task} — {summary.subject}", fontsize=10)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(out_dir: Path, summary: EvalSummary, records: Iterable[dict]) -> dict[str, Path]:
    """Write every output file; returns name -> path. The chart is skipped if matplotlib is missing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out_dir / "results.json",
        "records": out_dir / "records.jsonl",
        "report": out_dir / "report.md",
    }
    atomic_write(paths["records"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write(paths["results"], json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n")
    atomic_write(paths["report"], markdown_table(summary))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths
    chart = out_dir / "chart.png"
    write_chart(chart, summary)
    paths["chart"] = chart
    return paths


# ---------------------------------------------------------------- comparisons


def write_comparison(
    out_dir: Path, comparison: Comparison, results: dict[str, tuple[EvalSummary, Iterable[dict]]]
) -> dict[str, Path]:
    """A comparison's directory: comparison.json, report.md, chart.png, and each run's own files in a/ and b/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for side, (summary, records) in results.items():
        write_report(out_dir / side, summary, records)
    paths = {"comparison": out_dir / "comparison.json", "report": out_dir / "report.md"}
    atomic_write(paths["comparison"], json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False) + "\n")
    atomic_write(paths["report"], comparison_table(comparison))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths
    paths["chart"] = out_dir / "chart.png"
    write_comparison_chart(paths["chart"], comparison)
    return paths


def write_comparison_chart(path: Path, comparison) -> None:
    """Grouped bars, A and B per metric, with the difference and its interval as the label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = comparison.metrics
    fig = Figure(figsize=(max(4.5, 1.8 * len(metrics) + 2), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(metrics)))
    width = 0.38
    ax.bar(
        [x - width / 2 for x in xs],
        [m.a for m in metrics],
        width,
        label=f"A: {comparison.a}",
        color="#4C72B0",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [m.b for m in metrics],
        width,
        label=f"B: {comparison.b}",
        color="#DD8452",
    )
    top = max([m.a for m in metrics] + [m.b for m in metrics] + [0.0])
    for x, m in zip(xs, metrics, strict=True):
        ax.annotate(
            f"{m.diff:+.3f}\n[{m.low:+.3f}, {m.high:+.3f}]",
            (x, max(m.a, m.b)),
            ha="center",
            va="bottom",
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xticks(xs)
    ax.set_xticklabels([m.metric for m in metrics])
    ax.set_ylim(0, (1.25 if top <= 1.0 else top * 1.3))
    ax.set_title(
        f"{comparison.task}: B − A with {round(comparison.confidence * 100)}% paired bootstrap CI",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
