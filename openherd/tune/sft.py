"""`herd tune`: LoRA supervised fine-tuning, as one visible loop.

    run = setup(cfg)      load the base (GGUF dequantized, or HF safetensors), wrap its
                          linear layers with LoRA, read + tokenize the data, build AdamW,
                          and resume from the last good checkpoint when asked
    fit(run)              for step: lr <- schedule; grad-accumulate micro-batches;
                          clip; AdamW step; log; validate / checkpoint every so often
    validate(run)         mean loss per assistant token on the held-out split
    finish(run)           adapter GGUF -> [regression gate: base vs base + adapter on eval
                          tasks; a regression stops here, unregistered] -> store blob ->
                          manifest NAME (base + adapter)

No Trainer, no callbacks: what happens each step is what ``fit`` reads like.

Where time goes and why it is spent this way:
  * only assistant positions reach the output projection: the logits (tokens x vocab)
    are the largest tensor of a small model's step, and prompt positions carry no loss;
  * packed rows attend block-diagonally with positions restarting per example, so
    packing changes speed, not the maths;
  * the loss is summed over every target of the accumulated micro-batches and divided
    once by their total, so grad accumulation equals one big batch.

The step itself (forward and backward as fused autograd functions) is kernels.py;
checkpoints (written so that a crash or a full disk never costs the previous one)
are checkpoint.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..errors import GateFailed, InvalidRequest
from ..model import Transformer, load_torch_model

# Checkpointing and the model step's kernels are modules of their own; the names stay
# importable from here. _write_durably is looked up here at each checkpoint, so a test can
# replace it (a full disk) for the loop.
from .checkpoint import (
    TrainState,
    _clean_partial_checkpoints,
    _lock_run_dir,
    _write_durably,
    latest_checkpoint,
    load_checkpoint,
    plot_loss,
    save_checkpoint,
)
from .config import TuneConfig
from .data import (
    ChatRenderer,
    Row,
    batches,
    collate,
    file_sha256,
    pack_rows,
    read_jsonl,
    single_rows,
    split_eval,
    tokenize_all,
)
from .kernels import (
    BlockCausalAttention,
    LinearCrossEntropy,
    QKVRope,
    RMSNorm,
    SwiGLU,
    batch_loss,
    forward_hidden,
)
from .lora import (
    apply_lora,
    mark_only_lora_as_trainable,
)

log = logging.getLogger("openherd.tune")

__all__ = [
    "Run",
    "TrainState",
    "TuneConfig",
    "BlockCausalAttention",
    "LinearCrossEntropy",
    "RMSNorm",
    "QKVRope",
    "SwiGLU",
    "batch_loss",
    "finish",
    "fit",
    "forward_hidden",
    "gate_adapter",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "plot_loss",
    "save_checkpoint",
    "setup",
    "tune",
    "validate",
]



@dataclass
class Run:
    cfg: TuneConfig
    model: Transformer
    tokenizer: Any
    train_rows: list[Row]
    eval_rows: list[Row]
    optimizer: torch.optim.Optimizer
    state: TrainState
    total_steps: int
    warmup: int
    run_dir: Path
    base_path: Path  # what the torch model was loaded from (GGUF file or HF directory)
    data_sha256: str
    pad_id: int
    device: torch.device
    meta: dict[str, Any] = field(default_factory=dict)  # the settings a checkpoint must agree with
    _lock: Any = None
    gate: Any = None  # evals.gate.GateResult once finish() has gated the adapter

    @property
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def epochs_at(self, step: int) -> float:
        """Passes over the training rows after `step` optimizer steps."""
        micro_per_epoch = max(1, -(-len(self.train_rows) // self.cfg.batch_size))
        return step * self.cfg.grad_accum / micro_per_epoch

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


# --------------------------------------------------------------------------- setup


def setup(cfg: TuneConfig, base_path: Path | None = None) -> Run:
    """Everything `fit` needs. `base_path` is the resolved GGUF file / HF directory
    (default: resolve cfg.base through the store)."""
    from ..settings import get_settings

    # Data and base first: a typo on line 3 should cost neither a model load nor a run directory.
    examples = read_jsonl(cfg.data)
    base_path = base_path or resolve_base_path(cfg.base)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else get_settings().home / "runs" / cfg.out.replace(":", "@")
    lock = _lock_run_dir(run_dir)
    try:
        return _setup(cfg, examples, base_path, run_dir, lock)
    except BaseException:
        lock.close()
        raise


def _setup(cfg: TuneConfig, examples: list[Any], base_path: Path, run_dir: Path, lock: Any) -> Run:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data_sha = file_sha256(cfg.data)

    model, tok = load_torch_model(base_path, device=cfg.device, dtype=cfg.dtype)
    if tok is None:
        raise InvalidRequest(f"{cfg.base} has no tokenizer (tokenizer.json); herd tune needs one to read the data")
    device = model.output.weight.device
    if device.type == "cpu":
        _keep_freed_memory()
    seq_len = cfg.seq_len
    if seq_len > model.args.max_seq_len:
        log.warning("--seq-len %d exceeds the model's context; using %d", seq_len, model.args.max_seq_len)
        seq_len = model.args.max_seq_len

    renderer = ChatRenderer(tok)
    tokenized = tokenize_all(examples, renderer, seq_len)
    train, held_out = split_eval(tokenized, cfg.eval_split, cfg.seed)
    to_rows = (lambda xs: pack_rows(xs, seq_len)) if cfg.pack else single_rows
    train_rows, eval_rows = to_rows(train), to_rows(held_out)

    apply_lora(model, cfg.lora, generator=torch.Generator(device="cpu").manual_seed(cfg.seed))
    mark_only_lora_as_trainable(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
        foreach=device.type == "cpu", fused=device.type == "cuda" or None,
    )  # fmt: skip

    micro_per_epoch = -(-len(train_rows) // cfg.batch_size)
    if cfg.max_steps:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    warmup = cfg.warmup if cfg.warmup >= 0 else max(1, round(0.05 * total))
    pad_id = _pad_id(tok)

    meta = {
        "base": cfg.base, "data_sha256": data_sha, "rank": cfg.rank, "alpha": cfg.alpha,
        "dropout": cfg.dropout, "targets": list(cfg.targets), "seq_len": seq_len, "pack": cfg.pack,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
        "eval_split": cfg.eval_split,
    }  # fmt: skip
    run = Run(cfg, model, tok, train_rows, eval_rows, optimizer, TrainState(), total, warmup, run_dir,
              Path(base_path), data_sha, pad_id, device, meta, lock)  # fmt: skip

    ckpt_dir = run_dir / "checkpoints"
    _clean_partial_checkpoints(ckpt_dir)
    latest = latest_checkpoint(ckpt_dir)
    if cfg.resume:
        if latest is None:
            raise InvalidRequest(f"nothing to resume: no checkpoint in {run_dir}; start without --resume")
        load_checkpoint(run, latest)
        log.info("resumed from %s (step %d)", latest.name, run.state.step)
    elif latest is not None:
        if not cfg.overwrite:
            raise InvalidRequest(
                f"{run_dir} holds checkpoints of an earlier run ({latest.name}); "
                "pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(ckpt_dir)
    return run


def _keep_freed_memory() -> None:
    """Keep freed memory in the process instead of giving it back to the kernel (glibc).

    A training step allocates and frees the same multi-megabyte activations every time;
    glibc serves blocks that large with mmap and returns them on free, so each step
    faults every page of them in again (zero-filled by the kernel). Raising the mmap and
    trim thresholds keeps those blocks in the heap for the next step, what jemalloc or
    tcmalloc do for PyTorch on CPUs: ~4% of a step with the default model (bench/tune.py),
    at the price of a resident size that stays at its peak, which a training process
    reaches every step anyway. A no-op where the C library has no mallopt.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, (1 << 31) - 1)


def resolve_base_path(base: str) -> Path:
    """A Hugging Face directory as it is; anything else through the store (name or .gguf)."""
    p = Path(base).expanduser()
    if p.is_dir():
        return p
    from ..store import Store

    manifest = Store().resolve(base)
    if manifest.adapter:
        raise InvalidRequest(
            f"{base} is itself a LoRA-tuned model; tune its base ({manifest.base}) with your combined data, "
            f"or export it merged (herd export {base} --format gguf --out FILE) and tune that file"
        )
    return Path(manifest.path)


def _pad_id(tok: Any) -> int:
    # Padding positions get IGNORE targets and sit after every real token (right padding,
    # causal attention), so the id only has to be a valid one.
    for name in ("<|endoftext|>", "<pad>", "[PAD]"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return tok.eos_id if tok.eos_id is not None else 0


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine decay to lr * min_lr_ratio at the last step (nanoGPT)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if total <= warmup + 1:
        return lr
    progress = min(1.0, (step - warmup) / (total - 1 - warmup))
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# --------------------------------------------------------------------------- fit / validate


def fit(
    run: Run,
    on_step: Callable[[Run, dict[str, Any]], None] | None = None,
    on_eval: Callable[[Run, dict[str, Any]], None] | None = None,
) -> TrainState:
    """Train from run.state.step to run.total_steps. Ctrl-C saves a checkpoint first.

    on_step / on_eval see each history record ({"step", "loss", "lr", "tok_s"} /
    {"step", "eval_loss"}) as it is appended: `herd tune --progress-json` prints them.
    """
    cfg, model, opt, state = run.cfg, run.model, run.optimizer, run.state
    stream = batches(run.train_rows, cfg.batch_size, cfg.seed, start=state.step * cfg.grad_accum)
    bar = _progress_bar(run)
    last_saved = state.step
    in_update = False
    try:
        while state.step < run.total_steps:
            lr = lr_at(state.step, run.total_steps, run.warmup, cfg.lr, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            micro = [collate(next(stream), run.pad_id, cfg.pack, run.device) for _ in range(cfg.grad_accum)]
            n_targets = sum(b.n_targets for b in micro)
            loss_sum = 0.0
            for b in micro:
                loss = batch_loss(model, b) / max(1, n_targets)  # one mean over the whole accumulated batch
                loss.backward()
                loss_sum += loss.item()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for _, p in run.trainable], cfg.grad_clip)
            in_update = True
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            in_update = False
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            n_tok = sum(b.n_tokens for b in micro)
            state.tokens += n_tok
            state.train_seconds += dt
            rec = {"step": state.step, "loss": loss_sum, "lr": lr, "tok_s": n_tok / dt if dt > 0 else 0.0}
            state.history.append(rec)
            if bar is not None:
                bar.update(1)
                avg = state.tokens / state.train_seconds if state.train_seconds else 0.0  # steadier than one step
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{avg:.0f}", refresh=False)
            if on_step is not None:
                on_step(run, rec)
            done = state.step == run.total_steps
            if cfg.eval_every and state.step % cfg.eval_every == 0 and not done:
                _record_eval(run, on_eval)
            if state.step % cfg.save_every == 0 or done:
                if not cfg.eval_every or done:
                    _record_eval(run, on_eval)
                save_checkpoint(run, write=_write_durably)
                last_saved = state.step
                if bar is not None and state.last("eval_loss") is not None:
                    bar.set_postfix(loss=f"{loss_sum:.4f}", eval=f"{state.last('eval_loss'):.4f}", refresh=False)
    except KeyboardInterrupt:
        # Keep what was learned: the optimizer state is consistent unless Ctrl-C landed
        # inside opt.step() itself.
        if not in_update and state.step > last_saved:
            save_checkpoint(run, write=_write_durably)
            print(f"\ninterrupted at step {state.step}; continue with --resume", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    return state


def _record_eval(run: Run, on_eval: Callable[[Run, dict[str, Any]], None] | None = None) -> None:
    if not run.eval_rows:
        return
    rec = {"step": run.state.step, "eval_loss": validate(run)}
    run.state.history.append(rec)
    if on_eval is not None:
        on_eval(run, rec)


@torch.no_grad()
def validate(run: Run) -> float:
    """Mean loss per assistant token over the held-out rows (dropout off)."""
    model = run.model
    was_training = model.training
    model.eval()
    try:
        total, n = 0.0, 0
        bs = run.cfg.batch_size
        for i in range(0, len(run.eval_rows), bs):
            b = collate(run.eval_rows[i : i + bs], run.pad_id, run.cfg.pack, run.device)
            total += float(batch_loss(model, b))
            n += b.n_targets
        return total / max(1, n)
    finally:
        model.train(was_training)


def _progress_bar(run: Run):
    if not run.cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.state.step, desc=f"tune {run.cfg.out}", unit="step",
                file=sys.stderr, dynamic_ncols=True)  # fmt: skip


# --------------------------------------------------------------------------- finish: adapter -> store


def finish(
    run: Run,
    *,
    on_gate: Callable[[Run, Any], None] | None = None,
    gate_progress: Callable[[str], None] | None = None,
) -> Any:
    """Write the adapter GGUF next to the run, gate it when cfg.gate names tasks, and
    register cfg.out = base + adapter in the store. Returns the Manifest.

    A gate that fails raises GateFailed before anything reaches the store; the run
    directory (checkpoints, adapter.gguf, gate.json) stays, so `--resume` gets back
    here without training again. on_gate(run, result) sees the GateResult either way.
    """
    from .export import write_adapter_gguf

    cfg = run.cfg
    adapter = write_adapter_gguf(run.model, cfg.lora, run.run_dir / "adapter.gguf", name=cfg.out)
    details = {
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": list(cfg.targets)},
        "training": {"steps": run.state.step, "tokens": run.state.tokens, "seq_len": run.meta["seq_len"],
                     "train_loss": run.state.last("loss"), "eval_loss": run.state.last("eval_loss"),
                     "data_sha256": run.data_sha256, "seed": cfg.seed, "run_dir": str(run.run_dir)},
    }  # fmt: skip
    with _base_gguf(run.base_path) as base_gguf:
        if cfg.gate:
            result = gate_adapter(run, base_gguf, adapter, progress=gate_progress)
            if on_gate is not None:
                on_gate(run, result)
            if not result.passed:
                raise GateFailed(_gate_failed_message(run, result, adapter))
            details["gate"] = _gate_details(result)
        return register_tuned(cfg.out, cfg.base, run.base_path, adapter, details, base_gguf=base_gguf)


@contextlib.contextmanager
def _base_gguf(base_path: Path):
    """The GGUF file llama.cpp applies the adapter to: the base itself, or, for a Hugging
    Face directory, its f16 conversion in a scratch directory beside the blobs (gated
    and then stored from there, so it is converted once)."""
    if not base_path.is_dir():
        yield base_path
        return
    from ..store import Store
    from ..store.convert import convert_hf_dir

    with Store().blobs.tempdir() as tmp:
        convert_hf_dir(base_path, tmp / "base.gguf", quant="f16")
        yield tmp / "base.gguf"


def gate_adapter(run: Run, base_gguf: Path, adapter: Path, progress: Callable[[str], None] | None = None) -> Any:
    """Base vs base + adapter on cfg.gate in llama.cpp (what `herd run NAME` will serve);
    the result goes to RUN_DIR/gate.json and to run.gate."""
    from ..evals.gate import check_gate

    cfg = run.cfg
    # A path (never a bare name) for both sides: the tuned model is not in the store yet,
    # and a persona that happens to share the base's name must not be evaluated instead.
    result = check_gate(str(base_gguf), str(base_gguf), list(cfg.gate), cfg.gate_threshold, cfg.gate_limit,
                        candidate_adapter=str(adapter), progress=progress, names=(cfg.base, cfg.out))  # fmt: skip
    run.gate = result
    try:
        atomic_write(run.run_dir / "gate.json", (json.dumps(result.to_dict(), indent=1) + "\n").encode())
    except OSError as e:  # the verdict still stands; the file is a record of it
        log.warning("could not write gate.json: %s", e.strerror or e)
    return result


def _gate_details(result: Any) -> dict[str, Any]:
    """What the manifest keeps of a passed gate: per task and metric, base vs tuned."""
    return {
        "threshold": result.threshold,
        "tasks": {task: {d.metric: {"base": d.base, "tuned": d.candidate, "delta": d.delta} for d in deltas}
                  for task, deltas in result.per_task.items()},
    }  # fmt: skip


def _gate_failed_message(run: Run, result: Any, adapter: Path) -> str:
    """GateFailed's one line: what regressed (gate_message), then what was kept and how
    to go on without training again."""
    import shlex

    cfg = run.cfg
    # per_task is in cfg.gate order: map the regressed task back to how the user named it.
    spec = dict(zip(result.per_task, cfg.gate, strict=True))[result.regressions[0].task]
    limit = f" --limit {cfg.gate_limit}" if cfg.gate_limit else ""
    ad = shlex.quote(str(adapter))
    if run.base_path.is_dir():
        check = (f"import the base with `herd pull {shlex.quote(cfg.base)} --name BASE` and compare "
                 f"`herd eval BASE --task {shlex.quote(spec)}{limit}` with the same plus `--adapter {ad}`")  # fmt: skip
    else:
        b = shlex.quote(cfg.base)
        check = (f"compare `herd eval {b} --task {shlex.quote(spec)}{limit}` with the same plus "
                 f"`--adapter {ad}`")  # fmt: skip
    return (
        f"{result.message}; '{cfg.out}' was not registered; its run directory {run.run_dir} keeps "
        f"adapter.gguf and gate.json: {check}; to go on without training again, rerun this command with "
        "--resume and a larger --gate-threshold, or with --resume and no --gate to register it anyway"
    )


def register_tuned(name: str, base: str, base_path: Path, adapter: Path, details: dict[str, Any],
                   base_gguf: Path | None = None) -> Any:  # fmt: skip
    """Register `name` as base GGUF + adapter GGUF (both as store blobs) and return its Manifest.

    A base given as a .gguf path is copied into the store so the tuned model does not
    depend on a file elsewhere; a Hugging Face directory is converted to GGUF (f16),
    because llama.cpp serves the result (`base_gguf`: that conversion, already made).
    """
    from ..store import Manifest, Store
    from ..store.manifest import utcnow
    from ..store.store import manifest_from_gguf

    store = Store()
    if base_path.is_dir():
        if base_gguf is not None:
            blob = store.add_blob(base_gguf)
        else:
            with _base_gguf(base_path) as converted:
                blob = store.add_blob(converted)
        base_m = manifest_from_gguf(blob.path, name="", source=f"hf-dir:{base_path}", sha256=blob.sha256)
    else:
        base_m = store.resolve(base)
        if not base_m.registered:
            blob = store.add_blob(base_m.path)
            base_m.sha256, base_m.path = blob.sha256, str(blob.path)
    ad_blob = store.add_blob(adapter)
    manifest = Manifest(
        name=name,
        source=f"tune:{base}",
        sha256=base_m.sha256,
        size=base_m.size,
        path=base_m.path,
        architecture=base_m.architecture,
        parameters=base_m.parameters,
        quantization=base_m.quantization,
        context_length=base_m.context_length,
        chat_template=base_m.chat_template,
        created_at=utcnow(),
        base=base,
        adapter=str(ad_blob.path),
        details={**base_m.details, "base_source": base_m.source, "adapter_sha256": ad_blob.sha256,
                 "adapter_size": ad_blob.size, **details},  # fmt: skip
    )
    return store.register(manifest)


def tune(
    cfg: TuneConfig,
    *,
    on_step: Callable[[Run, dict[str, Any]], None] | None = None,
    on_eval: Callable[[Run, dict[str, Any]], None] | None = None,
    on_gate: Callable[[Run, Any], None] | None = None,
    gate_progress: Callable[[str], None] | None = None,
) -> tuple[Run, Any]:
    """setup -> fit -> finish (gate, register): what `herd tune` runs. Returns the run and
    the new Manifest; raises GateFailed, with nothing registered, when the gate fails."""
    from ..store.manifest import validate_name

    validate_name(cfg.out)  # before hours of training, not after
    if cfg.out == cfg.base:
        raise InvalidRequest(f"--out {cfg.out} would replace the base model; choose a new name", param="out")
    if Path(cfg.base).expanduser().is_dir():
        from ..store.convert import read_hf_config

        read_hf_config(Path(cfg.base).expanduser())  # it is converted to GGUF at the end: fail now, not then
    if cfg.gate:
        from ..evals.gate import load_gate_tasks

        load_gate_tasks(list(cfg.gate), cfg.gate_limit)  # a typo in a task name costs nothing yet
    run = setup(cfg)
    try:
        fit(run, on_step=on_step, on_eval=on_eval)
        return run, finish(run, on_gate=on_gate, gate_progress=gate_progress)
    finally:
        run.close()
