"""The settings of `herd tune`, without torch: LoRAConfig and TuneConfig.

Kept apart from the training code (sft.py, lora.py: torch) so that the CLI builds the
`herd tune` flags and the web app checks a tune job's parameters from these fields,
their types and their defaults, at `herd --help` speed. One definition, three readers:
the training loop, `herd tune` (commands/tune.py) and ``POST /v1/jobs/tune`` (web/jobs.py).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields

from ..errors import InvalidRequest

__all__ = ["ALL_LINEAR", "LoRAConfig", "TuneConfig", "field_default", "field_type"]

# The seven projections of a Llama block, in openherd.model's names.
ALL_LINEAR = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    rank: int = 8  # r: rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / rank (so changing r keeps the lr meaningful)
    dropout: float = 0.05  # dropout on the LoRA branch's input only (the frozen path never drops)
    targets: tuple[str, ...] = ALL_LINEAR  # which projections get an adapter

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidRequest(f"--rank must be a positive integer, got {self.rank!r}", param="rank")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InvalidRequest(f"--alpha must be a positive number, got {self.alpha!r}", param="alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidRequest(f"--dropout must be in [0, 1), got {self.dropout!r}", param="dropout")
        self.targets = tuple(self.targets)
        unknown = sorted(set(self.targets) - set(ALL_LINEAR))
        if unknown or not self.targets:
            raise InvalidRequest(
                f"LoRA targets must be among {', '.join(ALL_LINEAR)}; got {', '.join(unknown) or 'none'}",
                param="targets",
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class TuneConfig:
    base: str  # store name, .gguf path or Hugging Face directory
    data: str  # chat or prompt/completion JSONL
    out: str  # store name the tuned model is registered as
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha (update scaled by alpha / rank)
    dropout: float = 0.05  # dropout on the LoRA branch input
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # adapted projections
    epochs: float = 3.0  # passes over the training rows (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0 = as many as `epochs` take
    lr: float = 2e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup: int = -1  # linear warmup steps; -1 = 5% of the run (at least 1)
    weight_decay: float = 0.0  # decoupled weight decay on the LoRA factors
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 1024  # tokens per row; longer examples are truncated (clamped to the model's context)
    pack: bool = False  # pack several examples per row (block-diagonal attention)
    eval_split: float = 0.1  # fraction of examples held out for validation
    eval_every: int = 0  # steps between validations; 0 = at each checkpoint and at the end
    save_every: int = 100  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # how many recent checkpoints stay on disk
    seed: int = 1337  # same seed + data + settings = same adapter
    resume: bool = False  # continue from the last good checkpoint in run_dir
    overwrite: bool = False  # delete the checkpoints of a previous run in run_dir first
    device: str | None = None  # None: CUDA when available, else CPU
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    run_dir: str | None = None  # checkpoints, loss.png, history.json; None = $HERD_HOME/runs/NAME
    progress: bool = True  # tqdm progress bar on stderr
    # The regression gate (`--gate`): before `out` is registered, base and base + adapter run
    # these eval tasks; a headline metric worse by more than gate_threshold stops the run.
    gate: tuple[str, ...] = ()  # built-in task names or task files, as `herd eval --task` takes
    gate_threshold: float = 0.02  # allowed drop, in each metric's own units (0.02 = 2 accuracy points)
    gate_limit: int | None = None  # first N items of every gate task; None = all

    def __post_init__(self):
        def need(ok: bool, msg: str, param: str) -> None:
            if not ok:
                raise InvalidRequest(msg, param=param)

        self.targets = tuple(self.targets)
        need(self.epochs > 0 or self.max_steps > 0, "--epochs must be > 0 (or give --max-steps)", "epochs")
        need(self.max_steps >= 0, "--max-steps must be >= 0", "max_steps")
        need(math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number", "lr")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]", "min_lr_ratio")
        need(self.warmup >= -1, "--warmup must be >= 0", "warmup")
        need(self.weight_decay >= 0, "--weight-decay must be >= 0", "weight_decay")
        need(self.grad_clip >= 0, "--grad-clip must be >= 0", "grad_clip")
        need(self.batch_size >= 1, "--batch-size must be >= 1", "batch_size")
        need(self.grad_accum >= 1, "--grad-accum must be >= 1", "grad_accum")
        need(self.seq_len >= 8, "--seq-len must be at least 8 tokens", "seq_len")
        need(0.0 <= self.eval_split < 1.0, "--eval-split must be in [0, 1)", "eval_split")
        need(self.eval_every >= 0 and self.save_every >= 1, "--eval-every must be >= 0, --save-every >= 1", "save_every")
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1", "keep_checkpoints")
        need(not (self.resume and self.overwrite), "--resume and --overwrite contradict each other", "resume")
        self.gate = tuple(self.gate)
        need(all(isinstance(t, str) and t.strip() for t in self.gate), "--gate takes task names, e.g. basics-mc", "gate")
        need(math.isfinite(self.gate_threshold) and self.gate_threshold >= 0, "--gate-threshold must be >= 0",
             "gate_threshold")  # fmt: skip
        need(self.gate_limit is None or self.gate_limit >= 1, "--gate-limit must be >= 1", "gate_limit")
        LoRAConfig(self.rank, self.alpha, self.dropout, self.targets)  # validates the LoRA settings

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.rank, self.alpha, self.dropout, self.targets)


def field_default(name: str):
    """TuneConfig's default for `name` (what `herd tune` shows, what a web job starts from)."""
    f = next(f for f in fields(TuneConfig) if f.name == name)
    if f.default is MISSING:
        raise KeyError(f"TuneConfig.{name} has no default")
    return f.default


def field_type(name: str) -> type:
    """int, float, bool or str: the type of `name`, read off its default."""
    default = field_default(name)
    return type(default) if default is not None else str
