"""The model step of `herd tune`: LoRA-aware forward and backward as fused autograd functions.

``forward_hidden(model, batch)`` runs the base Transformer's blocks on a batch with the
kernels below, and ``batch_loss(model, batch)`` is the summed cross-entropy over the
assistant positions only. The training loop (sft.py) calls these and nothing else of
this module; the functions match ``openherd.model``'s own forward to float tolerance
(tests/test_tune_sft.py), and each one's docstring says what it saves for its backward
and why.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import Transformer, rope_cos_sin
from .data import IGNORE, Batch
from .lora import LoRALinear, lora_dropout_mask, lora_projection

__all__ = [
    "BlockCausalAttention",
    "LinearCrossEntropy",
    "QKVRope",
    "RMSNorm",
    "SwiGLU",
    "batch_loss",
    "forward_hidden",
]


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
