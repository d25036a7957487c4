"""`herd tune`, `herd export`, `herd distill`: customise a model and take it anywhere.

torch, matplotlib and the tune package are imported inside the handlers, so
`herd --help` never pays for them.
"""

from __future__ import annotations

import argparse
import sys

from ..tune.config import field_default, field_type  # dataclasses only: no torch at --help

# (group, [(TuneConfig field, help)]): the `herd tune` flags, in --help order.
TUNE_FLAGS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("LoRA", (
        ("rank", "rank r of the update"),
        ("alpha", "the update is scaled by alpha / rank"),
        ("dropout", "dropout on the LoRA input"),
    )),
    ("training", (
        ("epochs", "passes over the data (unless --max-steps)"),
        ("max_steps", "optimizer steps; 0 = decided by --epochs"),
        ("lr", "peak learning rate (cosine decay to lr/10)"),
        ("warmup", "linear warmup steps; -1 = 5%% of the run"),
        ("batch_size", "rows per micro-batch"),
        ("grad_accum", "micro-batches per optimizer step"),
        ("seq_len", "tokens per row; longer examples are truncated"),
        ("pack", "pack several examples per row (isolated attention)"),
        ("weight_decay", "AdamW weight decay"),
        ("grad_clip", "max gradient norm; 0 disables"),
        ("eval_split", "fraction of examples held out for validation"),
        ("eval_every", "steps between validations; 0 = at checkpoints"),
        ("save_every", "steps between checkpoints"),
        ("seed", "same seed, data and flags = same adapter"),
        ("device", "cpu or cuda (default: cuda when available)"),
    )),
)  # fmt: skip


def register(sub) -> None:
    t = sub.add_parser(
        "tune",
        help="LoRA fine-tune a model on your data (needs the `tune` extra: torch)",
        description="LoRA supervised fine-tuning. BASE is a store name, a .gguf file or a Hugging Face "
        "directory; DATA is JSONL with {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...} per line. "
        "The loss covers assistant tokens only, rendered with BASE's own chat template. The result is "
        "registered as NAME (BASE + adapter): `herd run NAME`, `herd serve` and `herd export NAME` use it. "
        "Checkpoints, loss.png and history.json go to $HERD_HOME/runs/NAME. With --gate, NAME is registered "
        "only if it does not score worse than BASE on the named eval tasks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("base", metavar="BASE", help="base model: store name, .gguf path or Hugging Face directory")
    t.add_argument("--data", required=True, metavar="FILE.jsonl", help="training data (chat or prompt/completion JSONL)")
    t.add_argument("--out", required=True, metavar="NAME", help="store name for the tuned model")
    # Every training knob is a TuneConfig field: its flag, type and default come from there;
    # only the help text (and the grouping) is the CLI's own.
    for title, knobs in TUNE_FLAGS:
        group = t.add_argument_group(title)
        for name, help_text in knobs:
            flag = "--" + name.replace("_", "-")
            kind = field_type(name)
            if kind is bool:
                group.add_argument(flag, action="store_true", help=help_text)
            else:
                group.add_argument(flag, type=kind, default=field_default(name), help=help_text)
    r = t.add_argument_group("run directory")
    r.add_argument("--run-dir", default=None, help="where checkpoints go (default $HERD_HOME/runs/NAME)")
    r.add_argument("--resume", action="store_true", help="continue from the last good checkpoint")
    r.add_argument("--overwrite", action="store_true", help="discard an earlier run's checkpoints")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--progress-json", action="store_true",
                   help="print one JSON object per line on stdout for every optimizer step ({step, total, epoch, "
                        "loss, lr, tok_s, ...}), every validation ({step, total, eval_loss}), the gate ({step, total, "
                        "gate}) and the end ({step, total, done, registered, model, ...}); the summary goes to "
                        "stderr and the progress bar is off")  # fmt: skip
    q = t.add_argument_group("regression gate")
    q.add_argument("--gate", action="append", metavar="TASK[,TASK...]",
                   help="after training, evaluate BASE and BASE + adapter on these eval tasks (built-in names or "
                        "task files, as `herd eval --task` takes) and refuse to register NAME if any headline "
                        "metric drops by more than --gate-threshold; the run directory and adapter stay")  # fmt: skip
    q.add_argument("--gate-threshold", type=float, default=argparse.SUPPRESS, metavar="DELTA",
                   help="largest allowed drop, in each metric's own units: 0.02 = two accuracy points, or "
                        "0.02 bits per byte (default: 0.02)")  # fmt: skip
    q.add_argument("--gate-limit", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="evaluate only the first N items of every gate task (default: all)")  # fmt: skip
    t.set_defaults(func=cmd_tune)

    e = sub.add_parser(
        "export",
        help="export a model as merged GGUF, merged safetensors or a PEFT adapter",
        description="Write NAME (a tuned model: base + adapter, or any store model) in an open format: "
        "gguf = a standalone merged file for llama.cpp; safetensors = a merged Hugging Face directory "
        "for transformers; peft = adapter_config.json + adapter_model.safetensors for peft.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("model", metavar="NAME", help="store name (or .gguf path)")
    e.add_argument("--format", required=True, choices=("gguf", "safetensors", "peft"), help="output format")
    e.add_argument("--out", required=True, metavar="PATH", help="output file (gguf) or directory")
    e.add_argument("--quant", choices=("f16", "q8_0", "q4_0", "f32"), default="f16", help="gguf weight type")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="safetensors weight type")  # fmt: skip
    e.add_argument("--base-model-id", default=None,
                   help="peft: base_model_name_or_path to record (default: the base's HF directory or name)")  # fmt: skip
    e.set_defaults(func=cmd_export)

    d = sub.add_parser(
        "distill",
        help="generate training data from a teacher model or OpenAI-compatible API",
        description="Ask a teacher for answers to PROMPTS and append them to OUT as chat JSONL that "
        "`herd tune --data` reads. The teacher is an OpenAI-compatible base URL (http://host:port/v1) or a "
        "local store model. Rerun the same command to resume; duplicate prompts and answers are dropped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--teacher", required=True, metavar="MODEL_OR_URL", help="store model name or API base URL")
    d.add_argument("--prompts", required=True, metavar="FILE", help=".txt (one per line) or .jsonl prompts")
    d.add_argument("--out", required=True, metavar="FILE.jsonl", help="output (appended to; resumable)")
    d.add_argument("--model", default=None, help="model id at the endpoint (default: the first it lists)")
    d.add_argument("--system", default=None, help="system prompt for every request")
    d.add_argument("--samples", type=int, default=1, help="answers per prompt")
    d.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    d.add_argument("--max-tokens", type=int, default=512, help="answer length limit")
    d.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    d.add_argument("--seed", type=int, default=None, help="sampling seed")
    d.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the endpoint's API key")  # fmt: skip
    d.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    d.add_argument("--keep-truncated", action="store_true", help="keep answers cut off by --max-tokens")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)


def _log_to_stderr() -> None:
    """Warnings from the tune package (truncated examples, ...) as `herd: warning: ...` lines."""
    import logging

    class StderrHandler(logging.StreamHandler):
        # sys.stderr as it is when a record is emitted, not when the handler was made: an
        # in-process caller (tests, a host app) may swap or close the stream in between.
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _value) -> None:
            pass

    logger = logging.getLogger("openherd.tune")
    if not any(getattr(h, "_herd_cli", False) for h in logger.handlers):
        h = StderrHandler()
        h._herd_cli = True
        h.setFormatter(logging.Formatter("herd: %(levelname)s: %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        # Records still propagate: the CLI's root logger has no handlers (no duplicates),
        # and an embedding app's or pytest's root handlers see them too.


def _torch_threads() -> None:
    from ..settings import get_settings

    threads = get_settings().threads
    if threads:
        import torch

        torch.set_num_threads(threads)


def _gate_args(args) -> tuple[tuple[str, ...], dict]:
    """--gate a,b --gate c -> ("a", "b", "c") and the TuneConfig gate settings given."""
    from ..errors import InvalidRequest

    tasks = tuple(t.strip() for group in args.gate or () for t in group.split(","))
    extra = {}
    for flag, key in (("--gate-threshold", "gate_threshold"), ("--gate-limit", "gate_limit")):
        if hasattr(args, key):  # SUPPRESSed default: present only when given
            if not tasks:
                raise InvalidRequest(f"{flag} applies to the regression gate: add --gate TASKS", param=key)
            extra[key] = getattr(args, key)
    if args.gate is not None and not all(tasks):
        raise InvalidRequest("--gate takes task names separated by commas, e.g. --gate basics-mc,capitals",
                             param="gate")  # fmt: skip
    return tasks, extra


class _ProgressJSON:
    """`--progress-json`: one JSON object per line on stdout, each with an int "step" (and
    "total"), which is what openherd.web.jobs.parse_progress_json reads."""

    def __init__(self) -> None:
        self.step = 0
        self.total = 0

    def emit(self, obj: dict) -> None:
        import json

        # Flushed per line: a reader follows the run live through a pipe. Non-finite floats
        # (a diverged loss) come out as NaN/Infinity, as Python's json (and the web UI) reads them.
        print(json.dumps({"step": self.step, "total": self.total, **obj}), flush=True)

    def at(self, run) -> None:
        self.step, self.total = run.state.step, run.total_steps

    def on_step(self, run, rec: dict) -> None:
        self.at(run)
        st = run.state
        self.emit({"epoch": round(run.epochs_at(rec["step"]), 4), "loss": rec["loss"], "lr": rec["lr"],
                   "tok_s": rec["tok_s"], "tokens": st.tokens, "elapsed_s": round(st.train_seconds, 3)})  # fmt: skip

    def on_eval(self, run, rec: dict) -> None:
        self.at(run)
        self.emit({"eval_loss": rec["eval_loss"]})

    def on_gate(self, run, result) -> None:
        self.at(run)
        self.emit({"gate": result.to_dict()})


def cmd_tune(args) -> int:
    _log_to_stderr()
    _torch_threads()
    from ..errors import GateFailed
    from ..tune.sft import TuneConfig, tune

    gate, gate_extra = _gate_args(args)
    knobs = {name: getattr(args, name) for _, group in TUNE_FLAGS for name, _ in group}
    cfg = TuneConfig(
        base=args.base, data=args.data, out=args.out, **knobs, run_dir=args.run_dir,
        resume=args.resume, overwrite=args.overwrite, progress=not (args.quiet or args.progress_json),
        gate=gate, **gate_extra,
    )  # fmt: skip
    # With --progress-json, stdout carries JSON lines only; everything for people goes to stderr.
    say_out = sys.stderr if args.progress_json else sys.stdout
    pj = _ProgressJSON() if args.progress_json else None

    def gate_progress(line: str) -> None:
        if not args.quiet:
            print(f"herd: {line}", file=sys.stderr, flush=True)

    hooks = {"on_step": pj.on_step, "on_eval": pj.on_eval, "on_gate": pj.on_gate} if pj is not None else {}
    try:
        run, manifest = tune(cfg, gate_progress=gate_progress, **hooks)
    except GateFailed as e:
        if pj is not None:
            pj.emit({"done": True, "registered": False, "model": cfg.out,
                     "error": {"code": e.code, "message": e.message}})  # fmt: skip
        raise
    st = run.state
    eval_loss = st.last("eval_loss")
    tok_s = st.tokens / st.train_seconds if st.train_seconds else 0.0
    if run.gate is not None:
        print(run.gate.message, file=say_out)
    print(
        f"tuned {manifest.name}: {st.step} steps, train loss {st.last('loss'):.4f}"
        + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
        + f", {tok_s:.0f} tok/s",
        file=say_out,
    )
    print(f"loss curve: {run.run_dir / 'loss.png'}", file=say_out)
    print(f'try it: herd run {manifest.name} "..."   export it: herd export {manifest.name} --format gguf --out FILE.gguf',
          file=say_out)  # fmt: skip
    if pj is not None:
        pj.at(run)
        # final_*: not "loss"/"eval_loss", which a reader takes for one more step or validation.
        pj.emit({"done": True, "registered": True, "model": manifest.name, "final_loss": st.last("loss"),
                 "final_eval_loss": eval_loss, "tok_s": round(tok_s, 1), "run_dir": str(run.run_dir)})  # fmt: skip
    return 0


def cmd_export(args) -> int:
    _log_to_stderr()
    _torch_threads()
    from ..tune.export import export_model

    out = export_model(args.model, args.format, args.out, quant=args.quant, dtype=args.dtype,
                       base_model_id=args.base_model_id)  # fmt: skip
    print(f"wrote {out}")
    return 0


def cmd_distill(args) -> int:
    import os

    _log_to_stderr()
    from ..tune.distill import DistillConfig, distill

    cfg = DistillConfig(
        teacher=args.teacher, prompts=args.prompts, out=args.out, model=args.model, system=args.system,
        samples=args.samples, concurrency=args.concurrency, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, api_key=os.environ.get(args.api_key_env) or None,
        timeout=args.timeout, keep_truncated=args.keep_truncated, progress=not args.quiet,
    )  # fmt: skip
    s = distill(cfg)
    print(
        f"{args.out}: {s.written} new answers ({s.already_done} already there); "
        f"dropped {s.duplicates} duplicate, {s.truncated if not args.keep_truncated else 0} truncated, "
        f"{s.empty} empty; {s.failed} failed; {s.duplicate_prompts} duplicate prompts skipped"
    )
    return 0
