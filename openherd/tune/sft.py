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

Checkpoints are directories ``step-NNNNNNN`` holding safetensors (adapter, optimizer
moments, RNG state) and a JSON file. Each is written to a temporary directory,
every file fsynced, then renamed into place: a run killed or out of disk mid-write
leaves the previous checkpoint as it was, and nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import atomic_write, fsync_dir
from ..errors import GateFailed, InvalidRequest, StoreError
from ..model import Transformer, load_torch_model, rope_cos_sin
from .config import TuneConfig
from .data import (
    IGNORE,
    Batch,
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
from .lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_dropout_mask,
    lora_projection,
    lora_state_dict,
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


# --------------------------------------------------------------------------- the model step


def forward_hidden(model: Transformer, batch: Batch) -> Tensor:
    """The final hidden states (B, T, dim) for training and validation.

    The same maths as ``Transformer.forward`` without the output projection (the loss
    projects only trained positions), laid out for a training step:
      * q/k/v and gate/up run as one GEMM each over weights fused once (the module
        weights become views into them: no extra memory), their LoRA A's as one GEMM on
        one dropout of the shared input (litgpt's LoRAQKVLinear does the same), each B
        on its own block of outputs, in one autograd function (``lora_projection``);
      * RMSNorm, RoPE, SwiGLU and, when training on plain causal rows, attention are the
        autograd functions below; other attention goes to SDPA with ``enable_gqa``
        instead of copying K/V;
      * packed rows get per-row positions and block-diagonal masks.
    tests/test_tune_sft.py checks it against ``model(input_ids)``.
    """
    ids = batch.input_ids
    B, T = ids.shape
    x = model.tok_embeddings(ids)  # (B, T, dim)
    inv_freq = model.inv_freq(ids.device)
    if batch.positions is None:
        cos, sin = rope_cos_sin(inv_freq, torch.arange(T, device=ids.device), x.dtype)  # (T, hd)
    else:
        cos, sin = rope_cos_sin(inv_freq, batch.positions.reshape(-1), x.dtype)  # (B*T, hd)
        cos, sin = cos.view(B, 1, T, -1), sin.view(B, 1, T, -1)  # (B, 1, T, hd): broadcast over heads
    masks = _train_masks(model, batch)
    # Plain causal rows attend through BlockCausalAttention when training (it pays in memory).
    blocks = torch.is_grad_enabled() and BlockCausalAttention.fits(T, model.args.n_heads, model.args.hidden_dim)
    for i, block in enumerate(model.layers):
        attn = _attention(block.attention, _rms_norm(block.attention_norm, x), cos, sin, masks[model.args.window(i)], blocks)
        h = x + attn
        x = h + _feed_forward(block.feed_forward, _rms_norm(block.ffn_norm, h))
    return _rms_norm(model.norm, x)


def _rms_norm(norm: Any, x: Tensor) -> Tensor:
    return RMSNorm.apply(x, norm.weight, norm.eps)


class RMSNorm(torch.autograd.Function):
    """``openherd.model.RMSNorm`` (statistics in fp32, cast back before the gain) in few passes.

    On the CPU ``F.rms_norm`` is composed of pow / mean / add / rsqrt / mul / mul, and
    autograd walks each of them back: 3.4-6 CPU-ms forward and backward for 1024 tokens of
    576, against 1.6-1.8 here, where the mean of squares is one reduction and backward is
    dx = rstd (g w) - x rstd^3 mean(g w x), two passes and a dot product. Twice a layer,
    about 2% of a CPU step with the default model. tests/test_tune_sft.py checks it
    against F.rms_norm.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).pow_(2)  # (..., 1)
        rstd = sq.div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        gw = (grad * weight).float()
        dot = torch.linalg.vecdot(gw, xf, dim=-1).unsqueeze(-1)  # sum(g w x) per row, (..., 1)
        coef = dot.mul_(rstd.pow(3)).div_(-x.shape[-1])
        dx = gw.mul_(rstd).addcmul_(xf, coef).to(x.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad * (xf * rstd).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None


def _attention(a: Any, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, blocks: bool) -> Tensor:
    B, T, _ = x.shape
    qkv = _fused_proj(a, ("wq", "wk", "wv"), x)  # (B, T, nq + 2 nkv)
    q, k, v = QKVRope.apply(qkv, cos, sin, a.n_heads, a.n_kv_heads)  # (B, nh | n_kv, T, hd), contiguous
    if mask is None and blocks:
        y = BlockCausalAttention.apply(q, k, v)  # (B, nh, T, hd)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=a.n_kv_heads != a.n_heads)  # (B, nh, T, hd)  # fmt: skip
    return _fused_proj(a, ("wo",), y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))


def _rope_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """out = x * cos + rotate_half(x) * sin (``openherd.model.apply_rope``), per half of a
    head out1 = x1 cos1 - x2 sin1 and out2 = x2 cos2 + x1 sin2; with ``inverse``, the
    transposed rotation (its backward), out1 = x1 cos1 + x2 sin2 and out2 = x2 cos2 - x1 sin1.
    Two fused multiply-adds into ``out``, where autograd's version negates, concatenates,
    and multiplies and adds whole heads (about five passes each way)."""
    h = x.shape[-1] // 2
    sign = 1 if inverse else -1
    # Forward pairs x2 with sin's first half and x1 with its second; the transpose swaps them.
    sin1, sin2 = (sin[..., h:], sin[..., :h]) if inverse else (sin[..., :h], sin[..., h:])
    torch.mul(x[..., :h], cos[..., :h], out=out[..., :h]).addcmul_(x[..., h:], sin1, value=sign)
    torch.mul(x[..., h:], cos[..., h:], out=out[..., h:]).addcmul_(x[..., :h], sin2, value=-sign)
    return out


class QKVRope(torch.autograd.Function):
    """The fused q/k/v projection (B, T, (nh + 2 n_kv) hd) -> RoPE'd q (B, nh, T, hd), RoPE'd
    k and v (B, n_kv, T, hd), each contiguous, for attention.

    Splitting with views and rotating q and k separately leaves autograd to concatenate the
    three head gradients back into one (B, T, ...) tensor, a full copy of the projection
    output each layer, and hands attention strided heads it copies again. Here the rotations
    write contiguous heads, and backward writes dq, dk and dv straight into one gradient of
    the projection. cos and sin broadcast to the heads: (T, hd), or (B, 1, T, hd) for packed
    rows. tests/test_tune_sft.py checks it against apply_rope.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int):
        q_in, k_in, v_in = _heads(qkv, n_heads, n_kv_heads)  # (B, heads, T, hd) views
        B, _, T, hd = q_in.shape
        q = _rope_into(torch.empty(B, n_heads, T, hd, dtype=qkv.dtype, device=qkv.device), q_in, cos, sin)
        k = _rope_into(torch.empty(B, n_kv_heads, T, hd, dtype=qkv.dtype, device=qkv.device), k_in, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_heads, n_kv_heads)
        return q, k, v_in.contiguous()

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        cos, sin = ctx.saved_tensors
        ref = next(g for g in (dq, dk, dv) if g is not None)
        B, _, T, hd = ref.shape
        n_heads, n_kv_heads = ctx.heads
        dqkv = torch.empty(B, T, (n_heads + 2 * n_kv_heads) * hd, dtype=ref.dtype, device=ref.device)
        dq_in, dk_in, dv_in = _heads(dqkv, n_heads, n_kv_heads)
        for out, g, rotated in ((dq_in, dq, True), (dk_in, dk, True), (dv_in, dv, False)):
            if g is None:
                out.zero_()
            elif rotated:
                _rope_into(out, g, cos, sin, inverse=True)
            else:
                out.copy_(g)
        return dqkv, None, None, None, None


def _heads(qkv: Tensor, n_heads: int, n_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, nh, T, hd), (B, n_kv, T, hd), (B, n_kv, T, hd) strided views of a fused q/k/v tensor."""
    B, T, width = qkv.shape
    hd = width // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    return (q.view(B, T, n_heads, hd).transpose(1, 2), k.view(B, T, n_kv_heads, hd).transpose(1, 2),
            v.view(B, T, n_kv_heads, hd).transpose(1, 2))  # fmt: skip


class BlockCausalAttention(torch.autograd.Function):
    """Causal grouped-query attention, (B, nh, T, hd) queries and (B, n_kv, T, hd) keys and
    values, the same maths as SDPA with ``is_causal`` and ``enable_gqa``, for training.

    torch's CPU flash-attention kernel computes every query block against all keys (its
    key block, 512, is longer than a short row), so causal attention costs what full
    attention does, and backward recomputes the probabilities. Here queries go in blocks
    of 32 against only the keys they see (the diagonal block masked), the heads that share
    a K/V head batched into one GEMM, and the probabilities are kept for backward: a third
    less CPU time for a SmolLM2 layer at 256 tokens (10 ms of 33, bench/tune.py's shape),
    about 4% of a step. The kept probabilities cost memory that flash attention does not
    spend, so ``fits`` takes this path only while they stay under two MLP activations
    (B x T x hidden each) per layer; longer rows go to SDPA.
    """

    BLOCK = 32  # query rows per block; 16-64 measure within noise, 128 loses the causal saving

    @staticmethod
    def fits(seq_len: int, n_heads: int, hidden_dim: int) -> bool:
        # Kept per token: n_heads x (T + BLOCK) / 2 probabilities on average, against 2 x hidden_dim.
        return n_heads * (seq_len + BlockCausalAttention.BLOCK) <= 4 * hidden_dim

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, T, D = q.shape
        G, BK, c = H // k.shape[1], B * k.shape[1], BlockCausalAttention.BLOCK
        scale = 1.0 / math.sqrt(D)
        qg = q.reshape(BK, G, T, D)  # the G query heads of one K/V head together
        kf, vf = k.reshape(BK, T, D), v.reshape(BK, T, D)
        future = torch.full((c, c), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        out = torch.empty_like(qg)
        blocks, probs = [], []
        for s in range(0, T, c):
            e = min(T, s + c)
            q_s = qg[:, :, s:e].reshape(BK, -1, D)  # (BK, G n, D), kept for backward (no copy to redo)
            scores = torch.bmm(q_s, kf[:, :e].transpose(1, 2)).mul_(scale)  # (BK, G n, e)
            scores.view(BK, G, e - s, e)[..., s:e].add_(future[: e - s, : e - s])  # the diagonal block
            p = torch.softmax(scores, dim=-1)
            out[:, :, s:e] = torch.bmm(p, vf[:, :e]).view(BK, G, e - s, D)
            blocks.append(q_s)
            probs.append(p)
        ctx.n_blocks = len(blocks)
        ctx.save_for_backward(kf, vf, *blocks, *probs)
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kf, vf, *kept = ctx.saved_tensors
        blocks, probs = kept[: ctx.n_blocks], kept[ctx.n_blocks :]
        B, H, T, D = grad.shape
        BK = kf.shape[0]
        G = H // (BK // B)  # query heads per K/V head
        c, scale = BlockCausalAttention.BLOCK, 1.0 / math.sqrt(D)
        go = grad.reshape(BK, G, T, D)
        dq, dk, dv = torch.empty_like(go), torch.zeros_like(kf), torch.zeros_like(vf)
        for s, q_s, p in zip(range(0, T, c), blocks, probs, strict=True):
            e = min(T, s + c)
            go_s = go[:, :, s:e].reshape(BK, -1, D)  # (BK, G n, D)
            # bmm then add: a baddbmm_ into the strided dk/dv[:, :e] runs as one small addmm_ per batch.
            dv[:, :e] += torch.bmm(p.transpose(1, 2), go_s)
            dp = torch.bmm(go_s, vf[:, :e].transpose(1, 2))  # (BK, G n, e)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq[:, :, s:e] = torch.bmm(ds, kf[:, :e]).mul_(scale).view(BK, G, e - s, D)
            dk[:, :e] += torch.bmm(ds.transpose(1, 2), q_s).mul_(scale)
        return dq.view(B, H, T, D), dk.view(B, -1, T, D), dv.view(B, -1, T, D)


def _feed_forward(f: Any, x: Tensor) -> Tensor:
    gate_up = _fused_proj(f, ("w1", "w3"), x)  # (B, T, 2 hidden): [x W1^T, x W3^T]
    return _fused_proj(f, ("w2",), SwiGLU.apply(gate_up))


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of the fused [gate, up] projection, (..., 2 hidden) -> (..., hidden).

    Autograd's version chunks the input, so its backward concatenates the two halves'
    gradients into a new tensor (a full copy of the widest activation), and it multiplies
    through separate temporaries. Here forward also keeps up * silu'(gate) next to
    silu(gate), interleaved as (..., 2, hidden) in the order of [gate, up]: backward is
    then one broadcast product, d [gate, up] = d out * [up silu'(gate), silu(gate)], that
    reads d out once and writes the gradient whole. Four elementwise passes instead of five,
    and one activation less kept. tests/test_tune_sft.py checks it against autograd.
    """

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        kept = torch.empty(*gate.shape[:-1], 2, gate.shape[-1], dtype=gate.dtype, device=gate.device)
        d_act, act = kept.unbind(-2)  # views: up * silu'(gate), silu(gate)
        torch.ops.aten.silu.out(gate, out=act)
        torch.ops.aten.silu_backward.grad_input(up, gate, grad_input=d_act)  # up * silu'(gate)
        ctx.save_for_backward(kept)
        return act * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (kept,) = ctx.saved_tensors
        return (grad.unsqueeze(-2) * kept).flatten(-2)


def _fused_proj(parent: Any, names: tuple[str, ...], x: Tensor) -> Tensor:
    """x through several projections of the same input: [x W1^T + x A1^T B1^T s1, ...] concatenated."""
    mods = [getattr(parent, n) for n in names]
    weight, bias = _fused_weight(parent, names, mods)
    loras = [m for m in mods if isinstance(m, LoRALinear) and not m.merged]
    if not loras:
        return F.linear(x, weight, bias)
    if len(loras) != len(mods):
        raise RuntimeError(f"LoRA on only some of {names} is not supported by the fused training path")
    p = max(m.dropout_p for m in mods)
    keep, keep_scale = lora_dropout_mask(x, p, parent.training)  # one mask for the shared input
    a = torch.cat([m.lora_a for m in mods]) if len(mods) > 1 else mods[0].lora_a  # (k r, in)
    bs = [m.lora_b.to(x.dtype) for m in mods]
    return lora_projection(x, weight, bias, keep, a.to(x.dtype), bs, [m.scaling * keep_scale for m in mods])


def _fused_weight(parent: Any, names: tuple[str, ...], mods: list[Any]) -> tuple[Tensor, Tensor | None]:
    """One (sum out, in) weight whose row blocks the modules' own weights become views of."""
    if any(m.weight.requires_grad for m in mods):
        raise RuntimeError("the fused training path needs frozen base weights: call mark_only_lora_as_trainable")
    if len(mods) == 1:
        return mods[0].weight, mods[0].bias
    key = "_herd_fused_" + "".join(names)
    cached = getattr(parent, key, None)
    if cached is not None and all(m.weight.data_ptr() == v.data_ptr() for m, v in zip(mods, cached[2], strict=True)):
        return cached[0], cached[1]
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in mods])
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        views, row = [], 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = weight[row : row + n]
            if bias is not None:
                m.bias.data = bias[row : row + n]
            views.append(m.weight.data)
            row += n
    # A plain attribute, not a buffer: it must stay out of state_dict and .to() (the
    # module weights alias it; after a .to() the data_ptr check above rebuilds it).
    object.__setattr__(parent, key, (weight, bias, views))
    return weight, bias


def _train_masks(model: Transformer, batch: Batch) -> dict[int | None, Tensor | None]:
    """Boolean (B, 1, T, T) masks per attention window; None = plain causal (SDPA is_causal)."""
    T = batch.input_ids.shape[1]
    device = batch.input_ids.device
    masks: dict[int | None, Tensor | None] = {}
    for w in {model.args.window(i) for i in range(model.args.n_layers)}:
        if batch.doc_ids is None and (w is None or w >= T):
            masks[w] = None
            continue
        q = torch.arange(T, device=device).view(-1, 1)  # (T, 1)
        k = torch.arange(T, device=device).view(1, -1)  # (1, T)
        allowed = (k <= q).view(1, 1, T, T)
        if w is not None:
            allowed = allowed & (k > q - w)
        if batch.doc_ids is not None:
            same = batch.doc_ids[:, None, :, None] == batch.doc_ids[:, None, None, :]  # (B, 1, T, T)
            # Padding (doc -1) attends to itself so no softmax row is empty (NaN); its output is unused.
            allowed = allowed & same
        masks[w] = allowed
    return masks


def batch_loss(model: Transformer, batch: Batch) -> Tensor:
    """Summed cross-entropy over the batch's trained targets (divide by the count yourself)."""
    h = forward_hidden(model, batch)  # (B, T, dim)
    sel = batch.targets != IGNORE  # (B, T)
    out = model.output  # only positions that carry a loss are projected
    if getattr(out, "bias", None) is None and isinstance(getattr(out, "weight", None), Tensor):
        return LinearCrossEntropy.apply(h[sel], out.weight, batch.targets[sel])
    return F.cross_entropy(out(h[sel]).float(), batch.targets[sel], reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(h @ weight.T, targets, reduction="sum")`` in fewer passes over the logits.

    The logits (trained positions x a vocabulary of 50-150k) are the largest tensor of a
    step, and torch's cross-entropy walks them some seven times: log_softmax forward, a
    zero-filled gradient, the NLL scatter, log_softmax backward. Here the projection is
    part of the function, so its logits belong to nobody else and are reused in place.

    They are computed in blocks of VOCAB_BLOCK vocabulary columns, each block its own
    contiguous (N, block) slab of one buffer: one GEMM writing all N x V logits at once
    streams them through memory two or three times (once per pass over the hidden size),
    while a slab stays in the cache, so the projection runs at the cores' GEMM speed (on
    2 AVX2 cores, 857 x 576 x 49152: 270 ms against 333). While a slab is in the cache it
    becomes exp(logit - the slab's row max) and gives its row sums; the row's
    log-sum-exp combines the slabs (as flash attention combines key blocks). Backward
    scales each slab into the gradient softmax * g in place, subtracts g at the targets,
    and accumulates the slab's share of dh. tests/test_tune_sft.py checks value and
    gradients against F.cross_entropy.
    """

    VOCAB_BLOCK = 1024  # the GEMM alone: 270 ms in slabs of 1024, 287 in slabs of 4096, 333 whole

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # (N, dim), (V, dim), (N,)
        n, vocab = h.shape[0], weight.shape[0]
        buf = torch.empty(n * vocab, dtype=torch.float32, device=h.device)  # fp32 statistics whatever the dtype
        slabs = LinearCrossEntropy._slabs(buf, n, vocab, targets)
        tops = torch.empty(len(slabs), n, dtype=torch.float32, device=h.device)  # (blocks, N) slab row maxes
        sums = torch.empty_like(tops)  # (blocks, N): sum of exp(logit - slab max)
        picked = torch.empty(n, dtype=torch.float32, device=h.device)  # the targets' logits
        for j, (s, e, slab, rows) in enumerate(slabs):
            if h.dtype == torch.float32:
                torch.mm(h, weight[s:e].t(), out=slab)
            else:
                slab.copy_(F.linear(h, weight[s:e]))
            picked[rows] = slab[rows, targets[rows] - s]
            torch.amax(slab, dim=-1, out=tops[j])
            torch.sum(slab.sub_(tops[j][:, None]).exp_(), dim=-1, out=sums[j])
        top = tops.amax(dim=0)  # (N,)
        scale = (tops - top).exp_()  # (blocks, N): exp(slab max - row max)
        total = (sums * scale).sum(dim=0)  # (N,): sum of exp(logit - row max)
        ctx.save_for_backward(h, weight, targets, buf, scale / total)
        return (total.log() + top - picked).sum()

    @staticmethod
    def _slabs(buf: Tensor, n: int, vocab: int, targets: Tensor) -> list[tuple[int, int, Tensor, Tensor]]:
        """(first column, end column, the (n, end - first) slab of `buf`, the rows whose target
        falls in it) for each VOCAB_BLOCK columns of the vocabulary."""
        b = LinearCrossEntropy.VOCAB_BLOCK
        block = targets // b
        return [(s, e, buf[n * s : n * e].view(n, e - s), (block == j).nonzero().squeeze(1))
                for j, (s, e) in enumerate(pairwise([*range(0, vocab, b), vocab]))]

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, targets, buf, factor = ctx.saved_tensors  # factor (blocks, N): exp(m_j - M) / sum
        g = grad.to(buf.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        for j, (s, e, slab, rows) in enumerate(LinearCrossEntropy._slabs(buf, h.shape[0], weight.shape[0], targets)):
            slab.mul_((factor[j] * g)[:, None])  # softmax * g, in place of exp(logit - slab max)
            slab[rows, targets[rows] - s] -= g  # minus g at the targets
            d = slab if slab.dtype == h.dtype else slab.to(h.dtype)
            if need_h:
                dh.addmm_(d, weight[s:e])
            if need_w:  # a trainable head
                dw[s:e] = d.t() @ h
        return dh, dw, None


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
                save_checkpoint(run)
                last_saved = state.step
                if bar is not None and state.last("eval_loss") is not None:
                    bar.set_postfix(loss=f"{loss_sum:.4f}", eval=f"{state.last('eval_loss'):.4f}", refresh=False)
    except KeyboardInterrupt:
        # Keep what was learned: the optimizer state is consistent unless Ctrl-C landed
        # inside opt.step() itself.
        if not in_update and state.step > last_saved:
            save_checkpoint(run)
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


# --------------------------------------------------------------------------- checkpoints


def _write_durably(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (tests replace this to simulate a full disk)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _ckpt_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def save_checkpoint(run: Run) -> Path:
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
        _write_durably(tmp / "adapter.safetensors", save(adapter, metadata={"lora": json.dumps(asdict(run.cfg.lora))}))
        _write_durably(tmp / "optimizer.safetensors", save(moments) if moments else save({"__empty__": torch.zeros(0)}))
        _write_durably(tmp / "rng.safetensors", save(rng))
        _write_durably(tmp / "state.json", (json.dumps(state, indent=1) + "\n").encode())
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
