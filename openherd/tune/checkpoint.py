"""Checkpoints of `herd tune`: the run's progress on disk, written so a crash never costs it.

A checkpoint is a directory ``step-NNNNNNN`` holding safetensors (adapter, optimizer
moments, RNG state) and ``state.json``. Each is written to a temporary directory, every
file fsynced, then renamed into place: a run killed or out of disk mid-write leaves the
previous checkpoint as it was, and nothing is ever unpickled. Resuming checks that the
settings which decide what the adapter is (``RESUME_MUST_MATCH``) did not change. Next
to the checkpoints: ``history.json`` and ``loss.png``, and the ``.lock`` that keeps one
`herd tune` per run directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..atomic import atomic_write, fsync_dir
from ..errors import InvalidRequest, StoreError
from .lora import load_lora_state_dict, lora_state_dict

if TYPE_CHECKING:
    from .sft import Run

log = logging.getLogger("openherd.tune")

__all__ = ["CHECKPOINT_PREFIX", "RESUME_MUST_MATCH", "TrainState", "latest_checkpoint", "load_checkpoint",
           "plot_loss", "save_checkpoint"]

CHECKPOINT_PREFIX = "step-"
# Settings that decide which rows a step sees and what the adapter is: resuming with
# different ones would silently train something else.
RESUME_MUST_MATCH = ("base", "data_sha256", "rank", "alpha", "dropout", "targets", "seq_len", "pack",
                     "batch_size", "grad_accum", "seed", "eval_split")  # fmt: skip


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # real (non-padding) tokens trained on
    train_seconds: float = 0.0  # time inside training steps (no eval, no checkpoints)
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "lr", "tok_s"} / {"step", "eval_loss"}

    def last(self, key: str) -> float | None:
        for h in reversed(self.history):
            if key in h:
                return h[key]
        return None


def _write_durably(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (tests replace this to simulate a full disk)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _ckpt_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def save_checkpoint(run: Run, write: Callable[[Path, bytes], None] = _write_durably) -> Path:
    """Write checkpoints/step-NNNNNNN atomically; prune old ones. Raises StoreError (disk full...)
    with the previous checkpoint intact."""
    from safetensors.torch import save

    ckpt_dir = run.run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / _ckpt_name(run.state.step)
    tmp = ckpt_dir / f".tmp-{_ckpt_name(run.state.step)}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    adapter = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(run.model).items()}
    moments: dict[str, Tensor] = {}
    names = {id(p): n for n, p in run.trainable}
    for p, st in run.optimizer.state.items():
        name = names[id(p)]
        for key, value in st.items():  # AdamW: step, exp_avg, exp_avg_sq
            moments[f"{name}.{key}"] = torch.as_tensor(value).detach().float().cpu().contiguous()
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    state = {
        "format": 1,
        "step": run.state.step,
        "tokens": run.state.tokens,
        "train_seconds": run.state.train_seconds,
        "history": run.state.history,
        "meta": run.meta,
        "optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]},
        "python_random": _jsonable_random_state(),
    }
    try:
        tmp.mkdir()
        write(tmp / "adapter.safetensors", save(adapter, metadata={"lora": json.dumps(asdict(run.cfg.lora))}))
        write(tmp / "optimizer.safetensors", save(moments) if moments else save({"__empty__": torch.zeros(0)}))
        write(tmp / "rng.safetensors", save(rng))
        write(tmp / "state.json", (json.dumps(state, indent=1) + "\n").encode())
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(ckpt_dir)
        keep = f"the previous checkpoint ({prev.name}) is intact" if prev else "no earlier checkpoint exists"
        hint = "free some space and" if e.errno == errno.ENOSPC else "fix that and"
        raise StoreError(
            f"could not write checkpoint {final.name}: {e.strerror or e}; {keep}; {hint} rerun with --resume"
        ) from None
    _prune(ckpt_dir, run.cfg.keep_checkpoints)
    _write_run_files(run)
    return final


def _write_run_files(run: Run) -> None:
    """history.json and loss.png next to the checkpoints (best effort: they are views)."""
    try:
        atomic_write(run.run_dir / "history.json", (json.dumps(run.state.history) + "\n").encode())
        plot_loss(run.state.history, run.run_dir / "loss.png", title=f"herd tune {run.cfg.out}")
    except OSError as e:
        log.warning("could not write the loss curve: %s", e.strerror or e)


def _jsonable_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _prune(ckpt_dir: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _clean_partial_checkpoints(ckpt_dir: Path) -> None:
    """Temporary directories of a run that died mid-checkpoint (the run dir is locked, so
    no live writer owns them)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint directory (they only ever appear complete: rename)."""
    if not ckpt_dir.is_dir():
        return None
    done = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                  and (p / "state.json").is_file())  # fmt: skip
    return done[-1] if done else None


def load_checkpoint(run: Run, path: Path) -> None:
    """Restore adapter, optimizer moments, RNG and progress from a checkpoint directory.

    Only safetensors and JSON are read: a checkpoint is data, never code (no pickle).
    """
    from safetensors.torch import load_file

    def bad(problem: str) -> StoreError:
        return StoreError(f"checkpoint {path} is unusable ({problem}); start over with --overwrite")

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        adapter = load_file(str(path / "adapter.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise bad(str(e)) from None
    except Exception as e:  # safetensors' SafetensorError for a corrupt header
        raise bad(f"corrupt safetensors: {e}") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise bad("unknown format")
    saved = state.get("meta", {})
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != run.meta.get(key):
            what = "the data file changed" if key == "data_sha256" else f"{key} was {saved.get(key)!r}, now {run.meta.get(key)!r}"
            raise InvalidRequest(
                f"cannot resume {path.parent.parent.name}: {what}; resume with the same settings or start over with --overwrite"
            )
    load_lora_state_dict(run.model, {k: v.to(run.device) for k, v in adapter.items()})
    opt_state: dict[int, dict[str, Tensor]] = {}
    for i, (name, p) in enumerate(run.trainable):
        if f"{name}.exp_avg" not in moments:
            continue
        opt_state[i] = {
            "step": moments[f"{name}.step"].reshape(()).float(),
            "exp_avg": moments[f"{name}.exp_avg"].to(p.device, p.dtype),
            "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(p.device, p.dtype),
        }
    groups = run.optimizer.state_dict()["param_groups"]
    for g, saved_g in zip(groups, state["optimizer"]["param_groups"], strict=False):
        g.update({k: v for k, v in saved_g.items() if k in g and k != "params"})
    run.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    run.state = TrainState(step=int(state["step"]), tokens=int(state["tokens"]),
                           train_seconds=float(state["train_seconds"]), history=list(state["history"]))  # fmt: skip


class _RunLock:
    def __init__(self, f):
        self.f = f

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _lock_run_dir(run_dir: Path) -> _RunLock:
    """One `herd tune` per run directory: two writers would interleave checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - Windows: no lock
        pass
    except OSError:
        f.close()
        raise InvalidRequest(f"another `herd tune` is using {run_dir}; wait for it or pick another --out") from None
    return _RunLock(f)


# --------------------------------------------------------------------------- loss curve


def plot_loss(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training (and eval) loss per step as a PNG. matplotlib is imported only here."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history if "loss" in h]
    if not steps:
        return
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train", lw=1.2)
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval", lw=1.2, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per assistant token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
