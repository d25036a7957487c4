"""Evaluation: tasks (YAML + JSONL), scoring, a sandbox for model-written code, reports.

    from openherd.evals import load_task, run_task, run_program

See docs/evals.md for the task format and the sandbox's guarantees.
"""

from __future__ import annotations

from .humaneval import build_program, evaluate_samples, load_problems, read_samples
from .report import EvalSummary, write_report
from .runner import EngineLM, GenRequest, LanguageModel, TaskResult, run_task
from .sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, check_program, run_program
from .scoring import estimate_pass_at_k, pass_at_k
from .tasks import Task, TaskError, TaskSpec, builtin_tasks, load_task

__all__ = [
    "EngineLM",
    "EvalSummary",
    "GenRequest",
    "LanguageModel",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "Task",
    "TaskError",
    "TaskResult",
    "TaskSpec",
    "build_program",
    "builtin_tasks",
    "check_program",
    "estimate_pass_at_k",
    "evaluate_samples",
    "load_problems",
    "load_task",
    "pass_at_k",
    "read_samples",
    "run_program",
    "run_task",
    "write_report",
]
