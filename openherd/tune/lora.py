"""Low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685), litgpt style.

A frozen linear layer W (out, in) learns an update of rank r:

    y = x W^T + b + (dropout(x) A^T B^T) * alpha / r        A: (r, in), B: (out, r)

B starts at zero, so training starts from exactly the base model. ``LoRALinear``
keeps the base layer's ``weight`` and ``bias`` under their own names, which keeps
the model's state dict (``layers.0.attention.wq.weight``) what the loaders and
exporters expect, and adds ``lora_a`` / ``lora_b`` next to them.

    apply_lora(model, LoRAConfig(rank=8, alpha=16))   # swap nn.Linear -> LoRALinear in place
    mark_only_lora_as_trainable(model)
    ...train...
    lora_state_dict(model)                             # {"layers.0.attention.wq.lora_a": ...}
    merge_lora_weights(model)                          # W += B A * alpha / r, for export

The LoRA factors stay in float32 even when the base runs in bf16 (CUDA): they are
what the optimizer updates, and bf16 would round away small Adam steps. They are
cast to the activations' dtype inside ``forward`` so autograd sees one graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidRequest
from .config import ALL_LINEAR, LoRAConfig

__all__ = [
    "ALL_LINEAR",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "load_lora_state_dict",
    "lora_addmm",
    "lora_dropout",
    "lora_dropout_mask",
    "lora_modules",
    "lora_projection",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora_weights",
    "unwrap_lora",
]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-r update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen; same Parameter object, so ties survive
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))  # (r, in)
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=torch.float32))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        # A as nn.Linear initialises its weight (what PEFT and litgpt do), B = 0: the
        # update starts at exactly zero and the first steps only move B.
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) reduces to this
        with torch.no_grad():
            # Drawn on the CPU and copied: the same seed gives the same start on any device.
            a = torch.empty(self.lora_a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            self.lora_a.copy_(a)
            self.lora_b.zero_()

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return y
        xd, keep_scale = lora_dropout(x, self.dropout_p, self.training)
        u = F.linear(xd, self.lora_a.to(x.dtype))  # (..., r)
        return lora_addmm(y, u, self.lora_b * (self.scaling * keep_scale))

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def delta_weight(self) -> Tensor:
        """The update B A * alpha / r as one (out, in) matrix, in float32."""
        return (self.lora_b @ self.lora_a) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the frozen weight (W += B A * alpha / r); forward then skips the branch."""
        if self.merged:
            return
        self.weight.data = (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        self.merged = True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


_DROP_STEPS = 1 << 16  # dropout probabilities in steps of 1/65536 on the CPU (see lora_dropout)


def lora_dropout(x: Tensor, p: float, training: bool) -> tuple[Tensor, float]:
    """Inverted dropout of the LoRA branch's input, with the 1/(1-p) rescaling returned
    instead of applied: the caller folds it into B (r columns), which saves a full-size
    elementwise pass forward and backward.

    On the CPU the mask comes from numpy's SFC64, p rounded to a multiple of 1/65536
    (``_keep_mask``): torch's ``bernoulli_`` costs about 6 ns an element there, as much as
    the rank-r GEMMs the mask feeds, these draws about 1 ns. The
    generator is seeded from torch's, so ``--seed`` and ``--resume`` (which restore
    torch's RNG state) still reproduce a run. Elsewhere torch's own dropout is cheap.
    """
    if x.device.type != "cpu":
        return F.dropout(x, p, training), 1.0
    keep, scale = lora_dropout_mask(x, p, training)
    return (x, 1.0) if keep is None else (x * keep, scale)


def lora_dropout_mask(x: Tensor, p: float, training: bool) -> tuple[Tensor | None, float]:
    """The mask ``lora_dropout`` multiplies x with (None: keep everything) and its 1/(1-p),
    for callers that apply both themselves (``lora_projection``). Draws as ``lora_dropout``."""
    if not training or p <= 0:
        return None, 1.0
    if x.device.type != "cpu":
        return torch.empty_like(x).bernoulli_(1.0 - p), 1.0 / (1.0 - p)
    drop = round(p * _DROP_STEPS)
    if drop == 0:
        return None, 1.0
    seed = int(torch.randint(0, 2**62, (1,)).item())
    keep = torch.from_numpy(_keep_mask(np.random.SFC64(seed), x.numel(), drop).reshape(x.shape))
    # As x's dtype, because a float-times-bool product costs twice a float-times-float one.
    return keep.to(x.dtype), _DROP_STEPS / (_DROP_STEPS - drop)


def _keep_mask(bits: np.random.BitGenerator, n: int, drop: int) -> np.ndarray:
    """n float32 ones and zeros, each zero with probability drop / 65536, from about one
    random byte each.

    A 16-bit draw d drops when d < drop. Its high byte decides alone unless it equals
    drop's high byte (one element in 256); only those elements draw their low byte: half
    the random bits of 16-bit draws for the same distribution, and the comparison writes
    float32 directly instead of a bool array torch converts in a pass of its own. With
    warm buffers that is 1.1 ms against 1.7 for a 1.5M-element mask; inside a training
    step, where each mask is memory the step's activations just left, the two measured
    the same (bench/tune.py's step: ~170 ms of masks either way).
    """
    hi, lo = divmod(drop, 256)
    draws = bits.random_raw((n + 7) // 8).view(np.uint8)[:n]  # each raw 64-bit output is 8 draws
    keep = np.empty(n, dtype=np.float32)
    np.greater(draws, hi, out=keep, casting="unsafe")
    tie = np.flatnonzero(draws == hi)
    keep[tie] = bits.random_raw((len(tie) + 7) // 8).view(np.uint8)[: len(tie)] >= lo
    return keep


def lora_addmm(y: Tensor, u: Tensor, b: Tensor) -> Tensor:
    """y + u b^T as one GEMM that accumulates into y: y (..., out), u (..., r), b (out, r).

    Scaling b (out x r, tiny) instead of the update (tokens x out) and letting addmm do
    the addition saves two full-size elementwise passes per adapted layer, forward and
    backward; on a CPU those passes cost about as much as the rank-r matmuls themselves.
    """
    out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.to(y.dtype).t())
    return out.view(y.shape)


def lora_projection(x: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor | None, a: Tensor,
                    bs: list[Tensor], scales: list[float]) -> Tensor:  # fmt: skip
    """x W^T + bias, plus for each row block i of the frozen W (B_i's rows, in order) the
    update (x * keep) A_i^T B_i^T * scales[i], where A (k r, in) stacks the A_i.

    What ``LoRALinear`` computes, for k layers that share their input (q/k/v, gate/up),
    written out forward and backward as one autograd function (``_LoRAProjection``).
    """
    return _LoRAProjection.apply(x, weight, bias, keep, a, tuple(scales), *bs)


class _LoRAProjection(torch.autograd.Function):
    """The rank-r GEMMs of LoRA are thin (an r = 8 side), and for thin GEMMs the CPU's BLAS
    speed depends on operand layout by up to 7x: g^T u, what autograd runs for dB here,
    is 3.5 ms where (u^T g)^T is 0.5 (1024 tokens x 1536 outputs, bench/tune.py). Written
    out, each product takes its fast layout; each B_i meets only its own block of outputs
    (a block-diagonal B does k times the work); the updates accumulate into the base
    output in place (addmm copies it first), and the dropout mask is applied to the LoRA
    part of dx in the same pass that adds it. W and bias must be frozen.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, keep, a, scales, *bs):  # x (..., in); bs[i] (out_i, r)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise RuntimeError("lora_projection needs frozen base weights: call mark_only_lora_as_trainable")
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = F.linear(x2, weight, bias)  # (N, sum out)
        xd = x2 * keep.reshape(x2.shape) if keep is not None else x2
        u = F.linear(xd, a)  # (N, k r)
        r = a.shape[0] // len(bs)
        for y_i, u_i, b_i, s in zip(y.split([b.shape[0] for b in bs], 1), u.split(r, 1), bs, scales, strict=True):
            y_i.addmm_(u_i, b_i.t(), alpha=s)
        ctx.scales = scales
        ctx.save_for_backward(xd, keep, weight, a, u, *bs)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        xd, keep, weight, a, u, *bs = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, sum out)
        r = a.shape[0] // len(bs)
        dut = torch.empty(a.shape[0], g2.shape[0], dtype=g2.dtype, device=g2.device)  # (k r, N): du^T
        dbs = []
        for g_i, u_i, du_i, b_i, s in zip(g2.split([b.shape[0] for b in bs], 1), u.split(r, 1), dut.split(r),
                                          bs, ctx.scales, strict=True):  # fmt: skip
            torch.mm(b_i.t(), g_i.t(), out=du_i).mul_(s)  # (r, N)
            dbs.append(torch.mm(u_i.t(), g_i).t().mul_(s))  # (out_i, r)
        da = dut @ xd  # (k r, in)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g2 @ weight  # (N, in)
            du = dut.t().contiguous()  # (N, k r): du^T would be a slow operand here (4 ms vs 0.7)
            if keep is None:
                dx.addmm_(du, a)
            else:
                dx.addcmul_(du @ a, keep.reshape(dx.shape))
            dx = dx.view(*g.shape[:-1], -1)
        return dx, None, None, None, da, None, *dbs


def apply_lora(model: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None) -> nn.Module:
    """Replace every targeted ``nn.Linear`` of `model` with a ``LoRALinear``, in place.

    `generator` seeds the A matrices (in module order), so a seed fixes the start.
    """
    replaced = 0
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in config.targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, config.rank, config.alpha, config.dropout)
                lora.reset_lora_parameters(generator)
                lora.train(child.training)  # an eval-mode model must not start dropping out
                setattr(parent, child_name, lora)
                replaced += 1
    if not replaced:
        raise InvalidRequest(f"the model has no linear layers named {', '.join(config.targets)} to adapt")
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(module name, module) of every LoRALinear, in model order: 'layers.0.attention.wq', ..."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything except the LoRA factors."""
    for name, p in model.named_parameters():
        p.requires_grad = name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LoRA factors: {'layers.0.attention.wq.lora_a': (r, in), '...lora_b': (out, r)}."""
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_a"] = m.lora_a.detach()
        out[f"{name}.lora_b"] = m.lora_b.detach()
    return out


def load_lora_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy LoRA factors into an adapted model; every adapter must be present with its shape."""
    modules = dict(lora_modules(model))
    expected = {f"{n}.lora_{ab}" for n in modules for ab in "ab"}
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[0]}" if missing else f"unexpected {sorted(unexpected)[0]}"
        raise InvalidRequest(f"the adapter does not fit this model ({what}); was it trained on another base?")
    with torch.no_grad():
        for key, t in sd.items():
            name, _, ab = key.rpartition(".")
            p = getattr(modules[name], ab)
            if tuple(t.shape) != tuple(p.shape):
                raise InvalidRequest(
                    f"the adapter does not fit this model: {key} is {tuple(t.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))


def merge_lora_weights(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (litgpt's ``merge_lora_weights``)."""
    for _, m in lora_modules(model):
        m.merge()


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain ``nn.Linear`` modules back, in place: the state dict
    is then exactly the base model's names (what exporters write)."""
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                linear.train(child.training)
                setattr(parent, child_name, linear)
    return model
