"""Evaluation: tasks (YAML + JSONL), models, scoring, comparison and the regression gate,
a sandbox for model-written code, reports.

    from openherd.evals import load_task, open_model, run_task, compare_results, check_gate

See docs/evals.md for the task format and the sandbox's guarantees.
"""

from __future__ import annotations

from .compare import Comparison, compare_results, comparison_table
from .gate import GateFailed, GateResult, check_gate
from .humaneval import build_program, evaluate_samples, load_problems, read_samples
from .lm import EngineLM, EvalModelConfig, PersonaLM, open_model
from .report import write_comparison, write_report
from .results import EvalSummary, TaskResult
from .runner import GenRequest, LanguageModel, run_task
from .sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, check_program, run_program
from .scoring import estimate_pass_at_k, pass_at_k
from .tasks import Task, TaskError, TaskSpec, builtin_tasks, load_task

__all__ = [
    "Comparison",
    "EngineLM",
    "EvalModelConfig",
    "EvalSummary",
    "GateFailed",
    "GateResult",
    "PersonaLM",
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
    "check_gate",
    "check_program",
    "compare_results",
    "comparison_table",
    "estimate_pass_at_k",
    "evaluate_samples",
    "load_problems",
    "load_task",
    "open_model",
    "pass_at_k",
    "read_samples",
    "run_program",
    "run_task",
    "write_comparison",
    "write_report",
]
