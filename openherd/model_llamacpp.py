"""llama.cpp's CPU numerics for openherd's PyTorch model (opt-in, inference only).

`openherd.model.load_gguf(path, emulate="llama.cpp")` swaps a loaded model's kernels for
the ones here, so it computes what llama.cpp's CPU backend computes from the same GGUF,
bit for bit on the 32-element block types. Kept out of model.py so that file stays the
readable Llama family; model.py re-exports these names.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InvalidModelFile, InvalidRequest

if TYPE_CHECKING:  # openherd.model imports this module at its end: no import cycle at run time
    from .model import RMSNorm, Transformer

# --------------------------------------------------------------------------- llama.cpp numerics (opt-in)
#
# llama.cpp's CPU backend does not compute what a float32 torch model computes from the same
# dequantized weights. Each matmul converts its input to the weight type's `vec_dot_type`
# (ggml-cpu.c, type_traits_cpu): Q8_1 blocks for Q4_1/Q5_1 weights, Q8_0 for Q4_0/Q5_0/Q8_0,
# Q8_K for the K-quants, F16 for F16; attention reads K and V from an F16 cache and its two
# matmuls convert Q and the softmax probabilities to F16. Rounding activations to 8 bits makes
# the network chaotic at the last bit: a one-ulp difference anywhere flips a later Q8 rounding,
# and after a few layers two implementations that differ only in fp32 summation order differ
# as much as fp32 and Q8_1 do. Measured on SmolLM2-135M Q4_1: reproducing the roundings alone
# left the mean |logit diff| at 0.22 and greedy agreement at 67% of 320 tokens, as plain fp32.
#
# So emulate_llama_cpp is bit-exact with ggml's x86 kernels, op by op (checked against
# llama.cpp's own intermediate tensors through its eval callback): block dot products in the
# kernels' lane order, fused multiply-adds as FMAs, sqrt through float64 (torch's float32 sqrt
# is not correctly rounded), ggml's expf polynomial for silu and softmax, libm's cosf/sinf/powf
# for RoPE, and q.k summed in the GGUF's head-dim order. With it the same model agrees with
# llama.cpp on 320 of 320 greedy tokens. It models llama.cpp without flash attention
# (llama-cpp-python's default; the flash kernel accumulates V in fp16 online, not emulated).
#
# Which kernels llama.cpp runs depends on the ISA it was compiled for (GGML_NATIVE builds use
# -march=native), so the emulation takes an `isa` (LLAMA_CPP_ISAS), by default the one the
# installed llama.cpp reports (llama_cpp_isa, from llama_print_system_info). "avx2" (AVX2 +
# FMA + F16C) and "avx512" (AVX512F + DQ: AVX512 = 1) differ only in float kernels; read in
# ggml-cpu of llama-cpp-python 0.3.36:
#   - ggml_vec_dot_f16/f32 (one-row F16/F32 matmuls, attention of one token): 4 accumulators
#     of 8 lanes over steps of 32 (AVX2), of 16 lanes over steps of 64 (AVX512); AVX512
#     reduces them with _mm512_reduce_add_ps (halving tree), AVX2 with two _mm_hadd_ps.
#   - tinyBLAS (F16/F32 matmuls of 2+ rows): 8 or 16 lanes (KN), so K % 8 or K % 16 == 0.
#   - ggml_v_expf (silu, softmax): the AVX512 version adds the 1 inside its polynomial and
#     scales by 2^n with _mm512_scalef_ps (one rounding), not the AVX2 fma(j, k, k).
#   - silu/swiglu and softmax run groups of 16 (AVX512) or 8 (AVX2), the rest in libm expf.
# Identical on both: quantize_row_q8_0/q8_1 and the Q4_1/Q5_0/Q5_1/Q8_0 dot products (their
# x86 code has AVX2 branches only; AVX512-VNNI's vpdpbusd sums the same 4 bytes per int32
# lane, exactly, as maddubs + madd), tinyBLAS_Q0_AVX (8 float lanes on both), RMS norm, RoPE
# (scalar C), the F16 conversions (round to nearest even either way). Not emulated: AMX
# (llama.cpp built with AMX_INT8 runs Q4_1/Q8_0 on tiles) and builds without LLAMAFILE;
# llama_cpp_isa refuses both with InvalidRequest. Both families are checked bit for bit
# against llama.cpp (its GGML_NATIVE build on an AVX512 EPYC, and the same source built with
# GGML_AVX2 only, run on that machine), tiny models and SmolLM2 alike; ggml_v_expf of each
# against the C kernel compiled for each ISA. Sums that ggml does in order (rms_norm,
# softmax) are taken in order here too (_sum_in_order), so that torch's own ISA (its
# AVX2 or AVX512 kernels) cannot change a result.

# Weight ggml type -> the format ggml-cpu converts the other matmul operand to.
GGML_VEC_DOT_TYPE: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K",
    "IQ1_S": "Q8_K", "IQ1_M": "Q8_K", "IQ4_XS": "Q8_K", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
}  # fmt: skip

# Weight types whose matmuls are bit-exact (measured against llama.cpp on tiny llama and qwen2
# models): the 32-element integer blocks (one kernel shape: integer lane sums, one FMA per
# block and lane, hsum, + m * s for Q4_1/Q5_1) and the float types. Q4_0 runs the same
# vec_dot kernel, but on AVX2 and AVX512 llama.cpp repacks Q4_0 matrices (ggml-cpu/repack.cpp) into
# interleaved rows whose GEMM sums in another order, so it is close, not exact. K-quants, IQ
# and BF16 get their input rounding (Q8_K, bf16) and a torch matmul.
GGML_EXACT_TYPES = ("Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32")

_EMULATE = (None, "llama.cpp")
LLAMA_CPP_ISAS = ("avx2", "avx512")  # the x86 kernel families emulated (see the section comment)
_LANES = {"avx2": 8, "avx512": 16}  # float32 lanes of the ISA's vectors: GGML_F32_EPR, tinyBLAS KN
_ELEMENT_BUDGET = 1 << 23  # elements of one emulation intermediate; rows are chunked to stay under it


def _check_emulate(emulate: str | None, isa: str | None = None) -> None:
    if emulate not in _EMULATE:
        raise InvalidRequest(f"unknown numerics emulation {emulate!r}; supported: 'llama.cpp' (or None)")
    if isa is not None:
        if emulate is None:
            raise InvalidRequest("isa only applies with emulate='llama.cpp'")
        _check_isa(isa)


def _check_isa(isa: str) -> None:
    if isa not in LLAMA_CPP_ISAS:
        raise InvalidRequest(
            f"llama.cpp numerics: no emulation of llama.cpp's {isa!r} kernels; emulated: {', '.join(LLAMA_CPP_ISAS)}"
        )


def _lanes(isa: str) -> int:
    _check_isa(isa)
    return _LANES[isa]


def llama_cpp_isa(system_info: str | None = None) -> str:
    """The kernel family ("avx2" | "avx512") of a llama.cpp build, from its
    llama_print_system_info() text (by default the installed llama-cpp-python's, which
    reports the features the CPU backend was compiled with, not merely what the CPU has).

    Raises InvalidRequest for builds whose kernels are not emulated: no AVX2 + FMA + F16C
    (ARM, older x86), AMX_INT8 (tile matmuls for the block types), no LLAMAFILE (batched
    F16/F32 matmuls by ggml's own loop instead of tinyBLAS)."""
    if system_info is None:
        try:
            import llama_cpp  # lazily: importing it loads llama.cpp's shared library
        except ImportError as e:
            raise InvalidRequest(
                f"llama.cpp numerics: cannot ask llama.cpp which kernels it runs ({e}); pass isa= one of "
                f"{', '.join(LLAMA_CPP_ISAS)}"
            ) from None
        system_info = llama_cpp.llama_print_system_info().decode()
    cpu = system_info.split("CPU :", 1)[-1]  # other backends list their features first
    flags = {k.strip() for k, _, v in (f.partition("=") for f in cpu.split("|")) if v.strip() == "1"}
    if "AMX_INT8" in flags:
        raise InvalidRequest(
            "llama.cpp numerics: this llama.cpp uses AMX_INT8 matmuls, which are not emulated"
        )
    if not {"AVX2", "FMA", "F16C"} <= flags:
        raise InvalidRequest(
            f"llama.cpp numerics: emulated kernels are x86 {' and '.join(LLAMA_CPP_ISAS)}; this llama.cpp reports "
            f"{' '.join(sorted(flags)) or 'no CPU features'}"
        )
    if "LLAMAFILE" not in flags:
        raise InvalidRequest(
            "llama.cpp numerics: this llama.cpp is built without LLAMAFILE (tinyBLAS), not emulated"
        )
    return "avx512" if "AVX512" in flags else "avx2"


def _fp16(x: Tensor) -> Tensor:
    """Round to fp16 (nearest even, as F16C's vcvtps2ph) and back to x's dtype."""
    return x.half().to(x.dtype)


@functools.cache
def _addcmul_fuses(device_type: str) -> bool:
    """Whether torch.addcmul rounds once, as an FMA, on this device (ATen's CPU kernel uses
    the FMA instruction on AVX2 builds). Probed on (1 + 2^-12)^2 - (1 + 2^-11) = 2^-24, which
    a separate multiply loses, over a vector body, a scalar tail and a broadcast."""
    a = torch.full((11,), 1 + 2**-12, device=device_type)
    c = torch.full((3, 11), -(1 + 2**-11), device=device_type)
    return bool(
        (torch.addcmul(c, a, a) == 2**-24).all() and (torch.addcmul(c[0, :1], a[:1], a[:1]) == 2**-24).all()
    )


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 fl(a * b + c) with one rounding, as _mm256_fmadd_ps. Where addcmul is not fused:
    the product of two float32 is exact in float64, whose sum then rounds as the FMA does
    except exactly on a float32 midpoint (about 2^-29 of cases)."""
    if _addcmul_fuses(c.device.type):
        return torch.addcmul(c, a, b)
    return (a.double() * b.double() + c.double()).float()


def _fma_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc <- fl(a * b + acc), in place (the hot loops' accumulators)."""
    if _addcmul_fuses(acc.device.type):
        return acc.addcmul_(a, b)
    return acc.copy_(a.double() * b.double() + acc.double())


def _hsum(x: Tensor, dim: int = -1) -> Tensor:
    """A horizontal sum over `dim` (8 or 16 lanes) by halving: lane i + lane i + n/2, until one
    is left. That is hsum_float_8 (AVX2: ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))) and
    _mm512_reduce_add_ps (GCC and clang split the 512-bit vector in halves the same way)."""
    x = x.movedim(dim, 0)
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = x[:half] + x[half:]  # _mm_add_ps(high half, low half), _mm_movehl_ps, _mm_movehdup_ps
    return x[0]


def _sum_in_order(x: Tensor) -> Tensor:
    """x (..., n) summed left to right over its last dim, as C's `for (...) sum += x[i]`, kept
    as (..., 1). torch's sum() vectorizes with partial sums whose order follows the CPU's
    vector width (ATen's AVX2 and AVX512 kernels differ); its CPU cumsum is one sequential scan."""
    return x.cumsum(-1)[..., -1:]


def _f32(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _to_f32(value: float) -> float:
    """A Python float rounded to float32, as C's `(float)value`."""
    return float(torch.tensor(value, dtype=torch.float32))


@dataclass
class Q8Blocks:
    """Activations quantized to ggml's Q8_0 / Q8_1 / Q8_K blocks, held as float32 tensors."""

    qs: Tensor  # (..., n_blocks, block) integer values in [-127, 127]
    d: Tensor  # (..., n_blocks) the scale as the dot products read it (fp16-rounded for Q8_0/Q8_1)
    s: Tensor | None = None  # (..., n_blocks) Q8_1 only: fp16(d * sum(qs)), d before its fp16 rounding

    def dequantize(self) -> Tensor:
        return (self.qs * self.d.unsqueeze(-1)).flatten(-2)  # (..., K)


def _blocks(x: Tensor, block: int) -> Tensor:
    if x.shape[-1] % block:
        raise InvalidRequest(f"cannot quantize rows of {x.shape[-1]} values into blocks of {block}")
    return x.float().unflatten(-1, (-1, block))  # (..., n_blocks, block)


def _q8_round(x: Tensor) -> tuple[Tensor, Tensor]:
    """(qs, d) of ggml-cpu's x86 quantize_row_q8_0 / quantize_row_q8_1 (AVX2 path), before
    fp16 storage of d: per block of 32, d = amax / 127 and q = round-half-even(x * (127 / amax)).

    The scalar reference (quantize_row_q8_0_ref, and gguf-py) multiplies by 1 / d and rounds
    halves away from zero; the two agree except at exact .5 ties and where 1 / d and
    127 / amax differ in their last bit. The x86 kernel is the one llama.cpp runs here.
    """
    blocks = _blocks(x, 32)  # (..., nb, 32)
    amax = blocks.abs().amax(-1)  # (..., nb)
    # Tensor / tensor divisions: torch computes `127.0 / t` as reciprocal(t) * 127, rounding twice.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    qs = torch.round(blocks * inv.unsqueeze(-1))  # torch.round is half-to-even, as _MM_ROUND_NEAREST
    return qs, amax / torch.full_like(amax, 127.0)


def quantize_q8_0(x: Tensor) -> Q8Blocks:
    """x (..., K) as ggml-cpu's x86 `quantize_row_q8_0` writes it (blocks of 32, fp16 d)."""
    qs, d = _q8_round(x)
    return Q8Blocks(qs, _fp16(d))


def quantize_q8_1(x: Tensor) -> Q8Blocks:
    """x (..., K) as ggml-cpu's x86 `quantize_row_q8_1` writes it: Q8_0's blocks plus
    s = fp16(d * sum(qs)), the block sum that Q4_1/Q5_1 dot products multiply by their minimum."""
    qs, d = _q8_round(x)
    return Q8Blocks(qs, _fp16(d), _fp16(d * qs.sum(-1)))


def quantize_q8_K(x: Tensor) -> Q8Blocks:
    """x (..., K) as ggml's `quantize_row_q8_K_ref` writes it (ggml-cpu's x86 build calls the
    reference): per block of 256, the signed value `max` of largest magnitude gives
    iscale = -127 / max, q = nearest_int(iscale * x) capped at 127, and d = 1 / iscale in fp32."""
    blocks = _blocks(x, 256)  # (..., nb, 256)
    first = blocks.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as the C loop's `>`
    mx = blocks.gather(-1, first).squeeze(-1)  # (..., nb)
    nonzero = mx != 0
    zero = torch.zeros_like(mx)
    iscale = torch.where(nonzero, torch.full_like(mx, -127.0) / torch.where(nonzero, mx, 1.0), zero)
    qs = torch.round(blocks * iscale.unsqueeze(-1)).clamp(max=127.0)  # nearest_int rounds half to even
    d = torch.where(nonzero, torch.ones_like(mx) / torch.where(nonzero, iscale, 1.0), zero)
    return Q8Blocks(qs, d)


_QUANTIZE_ACTIVATIONS = {"Q8_0": quantize_q8_0, "Q8_1": quantize_q8_1, "Q8_K": quantize_q8_K}


# -- elementwise ops: ggml's vectorized expf, silu, rms_norm, and libm for what calls it


@functools.cache
def _libm() -> Any:
    """The C math library, whose cosf/sinf/powf/expf ggml calls for RoPE and leftovers.
    None where it cannot be loaded; callers then round float64 results (almost always equal)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        for fn in ("cosf", "sinf", "expf"):
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = ctypes.c_float, [ctypes.c_float]
        lib.powf.restype, lib.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    except (OSError, AttributeError, TypeError):
        return None
    return lib


def _libm_map(fn: str, x: Tensor) -> Tensor:
    """libm's float function `fn` applied to each element of a float32 tensor (host loop:
    used for small tables and remainders only)."""
    lib = _libm()
    flat = x.detach().float().cpu().reshape(-1).tolist()
    if lib is None:
        ref = getattr(math, fn.removesuffix("f"))
        out = [ref(v) for v in flat]
    else:
        f = getattr(lib, fn)
        out = [f(v) for v in flat]
    return torch.tensor(out, dtype=torch.float32).view(x.shape).to(x.device)


def ggml_expf(x: Tensor, isa: str = "avx2") -> Tensor:
    """ggml_v_expf of ggml-cpu/vec.h (ARM's optimized-routines expf) for `isa`, float32 step
    by step, including its under/overflow path: exp(x) = 2^n * (1 + poly(b)).

    AVX2+FMA scales by k = 2^n built in the exponent bits: fma(j, k, k), j = poly(b) - 1.
    AVX512F+DQ computes j = poly(b) with its 1 and _mm512_scalef_ps(j, n), one rounding of
    j * 2^n (gradual underflow included); |n| > 192 gives 0 or inf."""
    _check_isa(isa)
    x = x.float()
    c = lambda h: _f32(float.fromhex(h), x)  # noqa: E731
    r = c("0x1.8p23")
    z = _fma(x, c("0x1.715476p+0"), r)
    n = z - r
    b = _fma(-n, c("0x1.7f7d1cp-20"), _fma(-n, c("0x1.62e4p-1"), x))
    u = b * b
    j = _fma(c("0x1.0e4020p-7"), b, c("0x1.573e2ep-5"))
    j = _fma(j, u, _fma(c("0x1.555e66p-3"), b, c("0x1.fffdb6p-2")))
    if isa == "avx512":
        j = _fma(j, u, _fma(c("0x1.ffffecp-1"), b, _f32(1.0, x)))
        big = n.abs() > 192
        # j * 2^n is exact in float64 for |n| <= 192 (2^n built from its exponent bits), so
        # rounding it to float32 rounds once, as scalef does.
        e = ((n.clamp(-192, 192).to(torch.int64) + 1023) << 52).view(torch.float64)
        out = (j.double() * e).float()
        if not bool(big.any()):
            return out
        return torch.where(big, torch.where(n <= 0, 0.0, float("inf")), out)
    j = _fma(j, u, c("0x1.ffffecp-1") * b)
    e = z.view(torch.int32) << 23
    k = (e + _f32(1.0, x).view(torch.int32)).view(torch.float32)
    fast = _fma(j, k, k)
    big = n.abs() > 126
    if not bool(big.any()):
        return fast
    # |n| > 126: scale in two steps (s1 * s2) so 2^n neither overflows nor flushes early.
    g = torch.where(n <= 0, torch.tensor(0x82000000 - (1 << 32), dtype=torch.int32, device=x.device),
                    torch.zeros((), dtype=torch.int32, device=x.device))  # fmt: skip
    s1 = (g + 0x7F000000).view(torch.float32)
    s2 = (e - g).view(torch.float32)
    out = torch.where(big, _fma(s2, j, s2) * s1, fast)
    return torch.where(n.abs() > 192, s1 * s1, out)


def ggml_swiglu(gate: Tensor, up: Tensor, isa: str = "avx2") -> Tensor:
    """ggml_vec_swiglu_f32: silu(gate) * up, silu = x / (1 + expf(-x)) with ggml_v_expf on
    whole vectors (8 lanes on AVX2, 16 on AVX512) and libm's expf on the remainder, as the
    kernel's loops do (the AVX512 loop leaves its remainder to the scalar loop, not to AVX2)."""
    n = gate.shape[-1]
    head = (n // _lanes(isa)) * _lanes(isa)
    g = gate[..., :head]
    y = g / (1.0 + ggml_expf(0.0 - g, isa)) * up[..., :head]
    if head == n:
        return y
    t = gate[..., head:]
    tail = t / (1.0 + _libm_map("expf", -t)) * up[..., head:]
    return torch.cat((y, tail), -1)


def ggml_rms_norm(x: Tensor, eps: float) -> Tensor:
    """ggml_compute_forward_rms_norm_f32: sum of float32 squares in double, mean rounded to
    float, scale = 1 / sqrtf(mean + eps), y = x * scale (the gain is a separate multiply)."""
    total = _sum_in_order((x * x).double())
    mean = (total / x.shape[-1]).float()
    root = torch.sqrt((mean + _f32(eps, x)).double()).float()  # sqrtf is correctly rounded
    return x * (torch.ones_like(root) / root)


class LlamaCppRMSNorm(nn.Module):
    """RMSNorm as llama.cpp computes it (ggml_rms_norm, then ggml_mul by the gain)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps  # ggml keeps eps as a float32 op parameter

    def forward(self, x: Tensor) -> Tensor:
        return ggml_rms_norm(x, self.eps) * self.weight


def ggml_rope_table(
    positions: Tensor,
    n_dims: int,
    base: float,
    freq_scale: float = 1.0,
    freq_factors: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """cos, sin (T, n_dims / 2) as ggml_rope_cache_init builds them: theta_scale =
    powf(base, -2 / n_dims), theta = pos * theta_scale^i by repeated float32 multiplication,
    divided by the rope_freqs factor, times freq_scale (linear scaling), through libm cosf/sinf."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    exponent = float(f32(-2.0) / f32(float(n_dims)))
    lib = _libm()
    theta_scale = lib.powf(_to_f32(base), exponent) if lib is not None else _to_f32(_to_f32(base) ** exponent)
    theta = positions.detach().to("cpu", torch.float32)  # (T,)
    thetas = []
    for i in range(n_dims // 2):  # the C loop multiplies theta in place, pair after pair
        t = theta / f32(freq_factors[i]) if freq_factors is not None else theta
        thetas.append(f32(freq_scale) * t)
        theta = theta * f32(theta_scale)
    table = torch.stack(thetas, -1)  # (T, n_dims / 2)
    return _libm_map("cosf", table).to(positions.device), _libm_map("sinf", table).to(positions.device)


def ggml_attention_scale(head_dim: int) -> float:
    """llama.cpp's kq_scale, 1.0f / sqrtf(head_dim), each step correctly rounded to float32."""
    return _to_f32(1.0 / _to_f32(math.sqrt(head_dim)))


def ggml_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, nh, T, hd) by a ggml_rope_table (T, hd / 2) each. The pairs are (i, i + hd/2)
    in our (un-permuted) layout, which is llama.cpp's pair (2i, 2i+1) in the GGUF's. ggml writes
    x0*cos - x1*sin and x0*sin + x1*cos; compiled with FMA, each fuses its first product."""
    x0, x1 = x.chunk(2, dim=-1)
    return torch.cat((_fma(x0, cos, -(x1 * sin)), _fma(x0, sin, x1 * cos)), dim=-1)


# -- dot products in the kernels' order


def _dot_lanes(a: Tensor, b: Tensor, lanes: int) -> Tensor:
    """llamafile's tinyBLAS (ggml's matmul for 2+ rows of F16/F32): per output, `lanes` lanes
    (KN: 8 on AVX2, 16 on AVX512) each accumulate every KN-th product by FMA, then hsum.
    a, b (..., K) broadcast; K % lanes == 0."""
    acc = a[..., 0:lanes] * b[..., 0:lanes]  # fma(a, b, 0)
    for lo in range(lanes, a.shape[-1], lanes):
        _fma_(acc, a[..., lo : lo + lanes], b[..., lo : lo + lanes])
    return _hsum(acc)


def _dot_vec(a: Tensor, b: Tensor, isa: str = "avx2", f16: bool = True) -> Tensor:
    """ggml_vec_dot_f16 / ggml_vec_dot_f32 (one output row): GGML_F32_ARR = 4 accumulators of
    EPR lanes (8 on AVX2, 16 on AVX512) over steps of 4 * EPR elements by FMA, then
    GGML_F32x8_REDUCE / GGML_F32x16_REDUCE, then the remainder one element at a time: in double
    (ggml_float) for F16, in the float sum for F32 (`sumf += x[i]*y[i]`: measured against
    llama.cpp at K = 96 and 136, GCC 12 does not contract it to an FMA)."""
    lanes = _lanes(isa)
    step = 4 * lanes
    K = a.shape[-1]
    head = (K // step) * step
    sums: list[Tensor] = []
    for lo in range(0, head, step):
        for j in range(4):
            s = slice(lo + lanes * j, lo + lanes * (j + 1))
            if lo == 0:
                sums.append(a[..., s] * b[..., s])  # fma(a, b, 0)
            else:
                _fma_(sums[j], a[..., s], b[..., s])
    if head:
        x0, x1 = sums[0] + sums[2], sums[1] + sums[3]
        x0 = x0 + x1
        if isa == "avx512":
            out = _hsum(x0)  # _mm512_reduce_add_ps
        else:
            t = x0[..., :4] + x0[..., 4:]  # low half + high half
            out = (t[..., 0] + t[..., 1]) + (t[..., 2] + t[..., 3])  # two _mm_hadd_ps
    else:
        out = torch.zeros(torch.broadcast_shapes(a.shape[:-1], b.shape[:-1]), device=a.device)
    if f16:
        out = out.double()
        for i in range(head, K):  # leftovers: float products summed in ggml_float (double)
            out = out + (a[..., i] * b[..., i]).double()
        return out.float()
    for i in range(head, K):  # leftovers: float sumf += x[i] * y[i], rounded twice
        out = out + a[..., i] * b[..., i]
    return out


def _use_tinyblas(n_rows: int, n_out: int, k: int, isa: str) -> bool:
    """Whether ggml's mul_mat hands an F16/F32 product to tinyBLAS: 2+ input rows, and
    tinyBLAS::matmul accepts K % KN == 0 and M % 4 == 0 (M: the weight's rows); otherwise
    ggml's own loop runs vec_dot for each output."""
    return n_rows > 1 and k % _lanes(isa) == 0 and n_out % 4 == 0


def _float_matmul(x: Tensor, w: Tensor, isa: str, f16: bool, tinyblas: bool) -> Tensor:
    """x (N, K) @ w (O, K)^T in ggml's order: tinyBLAS (`tinyblas`, _use_tinyblas of the
    whole batch, which may come here in chunks) or vec_dot for each output."""
    if tinyblas:
        return _dot_lanes(x[:, None, :], w[None], _lanes(isa))
    return _dot_vec(x[:, None, :], w[None], isa, f16)


@dataclass
class GGMLBlocks:
    """A Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weight as ggml's dot products read it."""

    q: Tensor  # (out, n_blocks, 32) int8 quants, with the sign the kernel multiplies (Q4_0: q - 8)
    d: Tensor  # (out, n_blocks) float32: block scales (fp16 values)
    m: Tensor | None = None  # (out, n_blocks) float32: block minimums, Q4_1/Q5_1 only


_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def gguf_block_quants(mm, t) -> tuple[Any, Any, Any]:
    """(q int8 (rows, nb, 32), d float32 (rows, nb), m float32 (rows, nb) or None) of a
    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tensor, from the block layouts of ggml-common.h; `mm` and `t`
    as for dequantize_gguf_tensor. d * q (+ m) is the dequantized weight."""
    import numpy as np
    from gguf import GGMLQuantizationType

    kind = GGMLQuantizationType(t.ggml_type).name
    if kind not in _BLOCK_BYTES:
        raise InvalidRequest(f"tensor {t.name} is {kind}, not one of {', '.join(_BLOCK_BYTES)}")
    size = _BLOCK_BYTES[kind]
    ne0, rows = t.shape[0], math.prod(t.shape[1:])
    raw = np.asarray(mm[t.offset : t.offset + rows * (ne0 // 32) * size]).reshape(rows, ne0 // 32, size)

    def half(lo: int) -> Any:
        return np.ascontiguousarray(raw[:, :, lo : lo + 2]).view(np.float16)[:, :, 0].astype(np.float32)

    def nibbles(lo: int) -> Any:  # 16 bytes -> elements 0..15 (low nibbles), 16..31 (high nibbles)
        qs = raw[:, :, lo : lo + 16]
        return np.concatenate((qs & 0x0F, qs >> 4), axis=-1).astype(np.int16)

    def fifth_bits(lo: int) -> Any:  # qh: bit j is element j's 5th bit
        qh = np.ascontiguousarray(raw[:, :, lo : lo + 4]).view("<u4")  # (rows, nb, 1)
        return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int16)

    m = None
    if kind == "Q8_0":
        q = raw[:, :, 2:].view(np.int8).astype(np.int16)
    elif kind == "Q4_0":
        q = nibbles(2) - 8
    elif kind == "Q4_1":
        m, q = half(2), nibbles(4)
    elif kind == "Q5_0":
        q = (nibbles(6) | fifth_bits(2)) - 16
    else:  # Q5_1
        m, q = half(2), nibbles(8) | fifth_bits(4)
    return q.astype(np.int8), half(0), m


def _block_lanes(q: Tensor) -> Tensor:
    """Integer quants (O, nb, 32) as the right operand of _lane_sums: (nb * 8, 4, O) float32."""
    n_out, nb, _ = q.shape
    return q.float().reshape(n_out, nb * 8, 4).permute(1, 2, 0).contiguous()


def _lane_sums(qx: Tensor, lanes: Tensor) -> Tensor:
    """Integer dot products of every input block with every weight block, split in the 8 int32
    lanes of the AVX2 kernels (lane j sums elements 4j..4j+3): qx (N, nb, 32) and
    _block_lanes (nb * 8, 4, O) -> (nb, 8, N, O). Values stay below 2^24: float32 is exact."""
    N, nb, _ = qx.shape
    a = qx.reshape(N, nb * 8, 4).transpose(0, 1)  # (G, N, 4)
    return torch.bmm(a, lanes).view(nb, 8, N, -1)


def _block_matmul(x: Tensor, lanes: Tensor, d: Tensor, m: Tensor | None) -> Tensor:
    acts = quantize_q8_1(x) if m is not None else quantize_q8_0(x)
    xy = _lane_sums(acts.qs, lanes)  # (nb, 8, N, O)
    scale = acts.d.t()[:, :, None] * d.t()[:, None, :]  # (nb, N, O): fp16 x fp16, exact in fp32
    acc = xy[0] * scale[0]  # fma(d, xy, 0)
    for blk in range(1, xy.shape[0]):  # the kernel's loop over blocks: a float32 recurrence
        _fma_(acc, xy[blk], scale[blk])
    y = _hsum(acc, dim=0)  # (N, O)
    if m is not None:  # Q4_1/Q5_1: summs += m * s block after block (the product is exact)
        mins = acts.s.t()[:, :, None] * m.t()[:, None, :]  # (nb, N, O)
        summs = mins[0].clone()
        for blk in range(1, mins.shape[0]):
            summs += mins[blk]
        y = y + summs
    return y


def ggml_block_matmul(x: Tensor, w: GGMLBlocks) -> Tensor:
    """x (N, K) times a block weight (O, K), as ggml_vec_dot_<type>_q8_<0|1> (AVX2) computes
    each output: the input quantized to Q8_1 (Q4_1/Q5_1) or Q8_0, per block one FMA of
    d_w * d_x (exact in fp32) times the integer lane sums into 8 accumulators, hsum, and for
    Q4_1/Q5_1 plus the float sum over blocks of m * s. -> (N, O)."""
    return _block_matmul(x, _block_lanes(w.q), w.d, w.m)


class LlamaCppLinear(nn.Module):
    """A Linear that returns what ggml-cpu's mul_mat returns for a weight of `ggml_type`.

    Block types (`blocks`: the weight's integer quants) and F16/F32 run ggml's kernels step by
    step, bit-exact for GGML_EXACT_TYPES. Others (K-quants, IQ, BF16) get the rounding of the
    type's vec_dot_type on the input and a torch matmul: close, not exact.
    `weight` and `bias` are the replaced module's Parameters (a tied output stays tied).
    `isa` (LLAMA_CPP_ISAS) picks the F16/F32 kernels' lane count; block kernels are the same.
    """

    def __init__(
        self, linear: nn.Linear, ggml_type: str, blocks: GGMLBlocks | None = None, isa: str = "avx2"
    ):
        super().__init__()
        _check_isa(isa)
        self.isa = isa
        if ggml_type not in GGML_VEC_DOT_TYPE:
            raise InvalidModelFile(
                f"llama.cpp numerics: unsupported ggml type {ggml_type} for a linear layer"
            )
        if (blocks is not None) != (ggml_type in _BLOCK_BYTES):
            raise InvalidRequest(
                f"{ggml_type} weights {'need' if blocks is None else 'take no'} integer blocks"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.ggml_type = ggml_type
        self.vec_dot_type = GGML_VEC_DOT_TYPE[ggml_type]
        if blocks is not None:
            if tuple(blocks.q.shape) != (self.out_features, self.in_features // 32, 32):
                raise InvalidModelFile(
                    f"{ggml_type} blocks {tuple(blocks.q.shape)} do not fit {tuple(self.weight.shape)}"
                )
            # The quants in the layout the lane sums multiply (float32: ~4 bytes per weight).
            self.register_buffer("lanes", _block_lanes(blocks.q), persistent=False)
            self.register_buffer("d", blocks.d, persistent=False)
            self.register_buffer("m", blocks.m, persistent=False)
        self.kernel = blocks is not None or ggml_type in ("F16", "F32")  # False: input rounding only

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, K)
        if self.kernel:
            # Decided for the whole batch: ggml takes its vec_dot path for a single input row.
            tinyblas = _use_tinyblas(rows.shape[0], self.out_features, self.in_features, self.isa)
            y = _in_row_chunks(rows, self.out_features, lambda r: self._exact(r, tinyblas))
        elif self.vec_dot_type == "BF16":
            y = F.linear(rows.bfloat16().float(), self.weight)
        else:
            y = F.linear(_QUANTIZE_ACTIVATIONS[self.vec_dot_type](rows).dequantize(), self.weight)
        if self.bias is not None:  # ggml adds biases after the matmul, in fp32
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _exact(self, rows: Tensor, tinyblas: bool) -> Tensor:
        if self.ggml_type == "F16":  # the input is converted to F16 (vec_dot_type) first
            return _float_matmul(_fp16(rows), self.weight, self.isa, True, tinyblas)
        if self.ggml_type == "F32":
            return _float_matmul(rows, self.weight, self.isa, False, tinyblas)
        return _block_matmul(rows, self.lanes, self.d, self.m)

    def extra_repr(self) -> str:
        how = "exact" if self.ggml_type in GGML_EXACT_TYPES else "kernel" if self.kernel else "rounding only"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.ggml_type} ({how}), "
                f"isa={self.isa}")  # fmt: skip


def _in_row_chunks(rows: Tensor, n_out: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """fn over chunks of rows (N, K) -> (N, n_out), so intermediates (.., rows, n_out, K / 4)
    stay under _ELEMENT_BUDGET elements."""
    chunk = max(1, _ELEMENT_BUDGET // (n_out * max(rows.shape[-1] // 4, 8)))
    parts = [fn(rows[i : i + chunk]) for i in range(0, rows.shape[0], chunk)]
    return torch.cat(parts) if parts else rows.new_zeros(0, n_out)


class LlamaCppFused(nn.Module):
    """Block-type LlamaCppLinear layers of one ggml type that read the same input (q/k/v,
    gate/up) run as one kernel call. ggml computes every output row on its own, so stacking
    the rows changes no value; it saves an input quantization and a loop over blocks per
    layer. The parts' lane buffers become views of the stacked one (no second copy)."""

    def __init__(self, parts: Sequence[LlamaCppLinear]):
        super().__init__()
        if len({p.ggml_type for p in parts}) != 1 or not all(hasattr(p, "lanes") for p in parts):
            raise InvalidRequest("only block-quantized layers of one ggml type can be fused")
        self.parts = list(parts)  # a plain list: the layers stay registered where they are
        self.sizes = [p.out_features for p in parts]
        self.register_buffer("lanes", torch.cat([p.lanes for p in parts], dim=-1), persistent=False)
        self.register_buffer("d", torch.cat([p.d for p in parts]), persistent=False)
        m = torch.cat([p.m for p in parts]) if parts[0].m is not None else None
        self.register_buffer("m", m, persistent=False)
        start = 0
        for p, size in zip(parts, self.sizes, strict=True):
            p.lanes = self.lanes[..., start : start + size]
            start += size

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        rows = x.reshape(-1, x.shape[-1])  # (N, K)
        y = _in_row_chunks(rows, sum(self.sizes), lambda r: _block_matmul(r, self.lanes, self.d, self.m))
        outs = []
        for p, part in zip(self.parts, y.split(self.sizes, dim=-1), strict=True):
            if p.bias is not None:
                part = part + p.bias
            outs.append(part.reshape(*x.shape[:-1], p.out_features))
        return tuple(outs)


def _fuse(parts: Sequence[nn.Module]) -> LlamaCppFused | None:
    ok = all(isinstance(p, LlamaCppLinear) and hasattr(p, "lanes") for p in parts)
    return LlamaCppFused(parts) if ok and len({p.ggml_type for p in parts}) == 1 else None


def ggml_soft_max(scores: Tensor, mask: Tensor, scale: float, isa: str = "avx2") -> Tensor:
    """ggml_compute_forward_soft_max_f32 without ALiBi: w = scores * scale + mask (0 / -inf),
    e = ggml_v_expf(w - max) per vector (8 lanes AVX2, 16 AVX512), each vector's float hsum
    added in double, e * (1 / sum). scores (..., S) with S % lanes == 0 (the caller pads: the
    kernel's scalar remainder is not modelled); mask (T, S) bool, True = attend."""
    lanes = _lanes(isa)
    if scores.shape[-1] % lanes:
        raise InvalidRequest(
            f"ggml_soft_max emulates whole {lanes}-lane vectors; got {scores.shape[-1]} scores"
        )
    w = scores * _f32(scale, scores)
    w = w.masked_fill(~mask, float("-inf"))
    e = ggml_expf(w - w.amax(-1, keepdim=True), isa)
    total = _sum_in_order(_hsum(e.unflatten(-1, (-1, lanes))).double())
    return e * (1.0 / total).float()


def llama_cpp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    qk_order: Tensor | None = None,
    isa: str = "avx2",
) -> Tensor:
    """Attention (B, nh, T, hd) as llama.cpp's CPU graph computes it without flash attention
    (llm_graph_context::build_attn_mha). k, v (B, nh, S, hd) hold fp16 values (the F16 cache).
    kq = mul_mat(k, q) converts Q to F16 and, like kqv = mul_mat(v, softmax) with F16
    probabilities, sums by tinyBLAS for a multi-token batch and by ggml_vec_dot_f16 for one
    token (`isa`'s lane counts). Key positions are padded with zeros to a multiple of the
    vec_dot step (32 AVX2, 64 AVX512): llama.cpp's KV view is a multiple of 256 cells, and zero
    terms change no float sum. `qk_order` lists the head dims in the GGUF's order: q.k is
    summed in that order (llama-arch files interleave RoPE pairs)."""
    lanes = _lanes(isa)
    T, S, hd = q.shape[-2], k.shape[-2], q.shape[-1]
    if qk_order is not None:
        q, k = q[..., qk_order], k[..., qk_order]
    if mask is None:  # plain causal over this forward's own positions
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    pad = -S % (4 * lanes)
    q16 = _fp16(q)
    # kq: M = the KV positions (a multiple of 256 in llama.cpp), K = hd; kqv: M = hd, K = S + pad.
    kq_blas, kqv_blas = _use_tinyblas(T, 256, hd, isa), _use_tinyblas(T, hd, S + pad, isa)
    kq_dot = (lambda a, b: _dot_lanes(a, b, lanes)) if kq_blas else (lambda a, b: _dot_vec(a, b, isa))
    kqv_dot = (lambda a, b: _dot_lanes(a, b, lanes)) if kqv_blas else (lambda a, b: _dot_vec(a, b, isa))
    chunk = max(1, _ELEMENT_BUDGET // max(1, q.shape[0] * q.shape[1] * (S + pad) * lanes))
    outs = []
    for lo in range(0, T, chunk):  # query chunks bound the (.., T, S, lanes) intermediates
        qc = q16[:, :, lo : lo + chunk]
        scores = kq_dot(k[:, :, None], qc[:, :, :, None])  # (B, nh, t, S)
        scores = F.pad(scores, (0, pad))
        m = F.pad(mask[lo : lo + chunk], (0, pad), value=False)
        probs = _fp16(ggml_soft_max(scores, m, scale, isa))  # (B, nh, t, S + pad), as F16 for kqv
        vt = F.pad(v.transpose(-2, -1), (0, pad))  # (B, nh, hd, S + pad)
        outs.append(kqv_dot(vt[:, :, None], probs[:, :, :, None]))  # (B, nh, t, hd)
    return torch.cat(outs, dim=2)


def emulate_llama_cpp(
    model: Transformer,
    blocks: dict[str, GGMLBlocks] | None = None,
    rope_freqs: Sequence[float] | None = None,
    isa: str | None = None,
) -> Transformer:
    """Make `model` (loaded from GGUF in float32) compute what llama.cpp's CPU backend computes.

    Linear layers become LlamaCppLinear for the ggml type their weight had in the file
    (model.ggml_types; `blocks` maps parameter names to their integer quants), norms become
    LlamaCppRMSNorm, and attention, RoPE and SwiGLU follow ggml (see the section comment).
    `rope_freqs` are the file's rope_freqs.weight values, if any. Inference only: the
    roundings have no useful gradient. load_gguf(path, emulate="llama.cpp") does all this.

    `isa` is the kernel family to emulate, "avx2" or "avx512" (LLAMA_CPP_ISAS); None (the
    default) takes the one the installed llama.cpp was built for (llama_cpp_isa), which raises
    InvalidRequest for a build whose kernels are not emulated. Bit-exact with llama.cpp's x86
    AVX2 and AVX512 builds, without flash attention, for GGML_EXACT_TYPES weights. llama.cpp
    picks kernels per batch (one token: vec_dot, more: tinyBLAS), and so does this per
    forward: feed it tokens as llama.cpp was fed (prompt at once, then one at a time).
    """
    if isa is None:
        isa = llama_cpp_isa()
    _check_isa(isa)
    if model.numerics == "llama.cpp":
        if model.ggml_isa != isa:
            raise InvalidRequest(
                f"the model already emulates llama.cpp's {model.ggml_isa} kernels, not {isa}"
            )
        return model
    if not model.ggml_types:
        raise InvalidRequest("llama.cpp numerics need a model loaded from a GGUF file (its tensor types)")
    if model.output.weight.dtype != torch.float32:
        raise InvalidRequest(
            f"llama.cpp numerics need a float32 model (llama.cpp's CPU backend computes in fp32), "
            f"not {model.output.weight.dtype}"
        )
    blocks = blocks or {}
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(module, nn.Linear):
            ggml_type = model.ggml_types.get(f"{name}.weight")
            if ggml_type is None:
                raise InvalidRequest(f"no ggml type recorded for {name}.weight")
            setattr(owner, child, LlamaCppLinear(module, ggml_type, blocks.get(f"{name}.weight"), isa))
        elif isinstance(module, _rms_norm_class()):
            setattr(owner, child, LlamaCppRMSNorm(module))
    hd = model.args.head_dim
    # llama-arch GGUFs store Q/K rows with RoPE pairs interleaved (we un-permuted them on
    # load); llama.cpp sums q.k in that order, our dim i and i + hd/2 side by side.
    order = torch.arange(hd).view(2, hd // 2).t().reshape(-1) if model.args.arch == "llama" else None
    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        att.numerics = ffn.numerics = "llama.cpp"
        att.ggml_isa = ffn.ggml_isa = isa
        att.ggml_qk_order = order.to(model.output.weight.device) if order is not None else None
        att.ggml_qkv, ffn.ggml_w13 = _fuse([att.wq, att.wk, att.wv]), _fuse([ffn.w1, ffn.w3])
    # Only the tables and kernels change; every Parameter is the one the model had.
    model.ggml_rope_freqs = tuple(float(f) for f in rope_freqs) if rope_freqs is not None else None
    model.numerics, model.ggml_isa = "llama.cpp", isa
    return model


def _rms_norm_class() -> type:
    from .model import RMSNorm

    return RMSNorm
