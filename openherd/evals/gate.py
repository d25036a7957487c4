"""The regression gate: a tuned model must not get worse than its base on the tasks you name.

    result = check_gate("smollm2", "smollm2-tuned", ["basics-mc", "capitals"], threshold=0.02)
    if not result.passed:
        raise GateFailed(result.message)        # `herd tune --gate` does this before registering

    # A candidate that is not registered yet: the base model plus a LoRA adapter file.
    check_gate("smollm2", "smollm2", tasks, candidate_adapter="/tmp/run/adapter.gguf")

Both models run every task with the same settings (same items, same order);
each headline metric of each task (``compare.headline_metrics``: acc and
acc_norm, the generation metric, pass@k, bits per byte) is compared with a
paired bootstrap. The candidate fails if any of them is worse than the base
by more than ``threshold``, in the metric's own units (0.02 = two accuracy
points, or 0.02 bits per byte). The point estimate decides, so the outcome
does not depend on the resampling; the interval is reported so a reader can
tell a real regression from noise on a small task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import GateFailed, InvalidRequest
from .compare import Comparison, compare_results
from .lm import EvalModelConfig, open_model

if TYPE_CHECKING:
    from .tasks import Task


@dataclass
class TaskDelta:
    task: str
    metric: str
    base: float
    candidate: float
    delta: float  # candidate - base, in the metric's units
    improvement: float  # delta signed so that positive is better (bits per byte: base - candidate)
    low: float  # paired bootstrap interval of delta
    high: float
    n: int  # paired items
    regressed: bool


@dataclass
class GateResult:
    passed: bool
    per_task: dict[str, list[TaskDelta]]  # task -> one delta per headline metric
    message: str
    threshold: float
    base: str = ""
    candidate: str = ""
    comparisons: list[Comparison] = field(default_factory=list, repr=False)

    @property
    def regressions(self) -> list[TaskDelta]:
        return [d for deltas in self.per_task.values() for d in deltas if d.regressed]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "threshold": self.threshold,
            "base": self.base,
            "candidate": self.candidate,
            "message": self.message,
            "per_task": {t: [asdict(d) for d in ds] for t, ds in self.per_task.items()},
        }

    def raise_for_regression(self) -> None:
        if not self.passed:
            raise GateFailed(self.message)


def check_gate(
    base: str,
    candidate: str,
    tasks: list[str],
    threshold: float = 0.02,
    limit: int | None = None,
    *,
    candidate_adapter: str | None = None,
    config: EvalModelConfig | None = None,
    fewshot: int | None = None,
    progress: Callable[[str], None] | None = None,
    names: tuple[str, str] | None = None,
) -> GateResult:
    """Evaluate `base` and `candidate` on every task and fail on any regression > `threshold`.

    base, candidate: store names, catalog aliases or .gguf paths (a tuned store
    model carries its adapter). candidate_adapter: a LoRA GGUF applied on top of
    `candidate`, to gate a tuned model before it is registered. limit: first N
    items of every task (the same N for both). progress: called with a line of
    text before each run. names: what to call base and candidate in progress lines
    and the result (default: the loaded models' own names); `herd tune --gate` passes
    the base as the user named it and the name the tuned model is to get.
    """
    from .runner import run_task

    if not threshold >= 0:
        raise InvalidRequest("the gate threshold must be >= 0")
    loaded = load_gate_tasks(tasks, limit)  # every task file checked before any model work
    config = config or EvalModelConfig()
    base_config = EvalModelConfig(**{**asdict(config), "adapter": None})
    cand_config = EvalModelConfig(**{**asdict(config), "adapter": candidate_adapter})

    results = {}
    base_name = cand_name = ""
    sides = (("base", base, base_config), ("candidate", candidate, cand_config))
    for i, (role, name, cfg) in enumerate(sides):
        with open_model(name, cfg) as lm:
            label = names[i] if names else lm.name
            for task in loaded:
                if progress:
                    progress(f"gate: {role} {label} on {task.name}")
                results[(role, task.name)] = run_task(lm, task, fewshot=fewshot)
                if role == "base":
                    base_name = label
                else:
                    cand_name = label

    per_task: dict[str, list[TaskDelta]] = {}
    comparisons = []
    for task in loaded:
        cmp = compare_results(results[("base", task.name)], results[("candidate", task.name)])
        comparisons.append(cmp)
        per_task[task.name] = [
            TaskDelta(
                task.name,
                m.metric,
                m.a,
                m.b,
                m.diff,
                m.improvement,
                m.low,
                m.high,
                m.n,
                regressed=m.improvement < -threshold,
            )
            for m in cmp.metrics
        ]
    result = GateResult(True, per_task, "", threshold, base_name, cand_name, comparisons)
    result.passed = not result.regressions
    result.message = gate_message(result)
    return result


def load_gate_tasks(tasks: list[str], limit: int | None = None) -> list[Task]:
    """Load and validate every gate task (names, files, sandbox) without touching a model.

    `herd tune --gate` calls this before training, so a typo in a task name costs
    nothing instead of the whole run; check_gate calls it again with the same rules.
    """
    from .tasks import load_task

    if not tasks:
        raise InvalidRequest("the gate needs at least one task (e.g. --gate basics-mc)")
    loaded = [load_task(t, limit=limit) for t in tasks]
    names = [t.name for t in loaded]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InvalidRequest(f"two gate tasks are both named '{dup}'; give each task file its own name")
    if any(t.type == "humaneval" for t in loaded):
        from .sandbox import SandboxUnavailable, sandbox_status

        why = sandbox_status("namespaces")
        if why:
            raise SandboxUnavailable(why)
    return loaded


def gate_message(result: GateResult) -> str:
    """One line: what regressed and by how much, or that every task held up."""
    if result.passed:
        worst = min(
            (d for ds in result.per_task.values() for d in ds), key=lambda d: d.improvement, default=None
        )
        tail = f"; smallest change {worst.task} {worst.metric} {worst.delta:+.4f}" if worst else ""
        return (
            f"gate passed: '{result.candidate}' stays within {result.threshold:g} of '{result.base}' "
            f"on {', '.join(result.per_task)}{tail}"
        )
    parts = [
        f"{d.task} {d.metric} {d.base:.4f} -> {d.candidate:.4f} ({d.delta:+.4f}, "
        f"95% CI {d.low:+.4f}..{d.high:+.4f}, n={d.n})"
        for d in result.regressions
    ]
    return (
        f"gate failed: '{result.candidate}' regresses by more than {result.threshold:g} against "
        f"'{result.base}': " + "; ".join(parts)
    )
