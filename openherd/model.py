"""The Llama family in PyTorch, in one file.

Read top to bottom: ``ModelArgs`` (config + presets), ``RMSNorm``, rotary embeddings,
``KVCache``, ``Attention``, ``FeedForward``, ``TransformerBlock``, ``Transformer``;
then generation (``logits_to_probs -> sample -> prefill -> decode_one_token ->
generate``, as in gpt-fast) and the loaders for Hugging Face safetensors
directories and GGUF files.

One module covers Llama 2, Llama 3/3.1/3.2, SmolLM2, TinyLlama, Mistral and Qwen2.
They differ only in config flags: grouped-query attention (``n_kv_heads``), RoPE
base and scaling (``rope_*``), tied embeddings, q/k/v biases (Qwen2) and a sliding
attention window (Mistral v0.1).

Tensor names follow meta-llama/llama-models (``tok_embeddings``,
``layers.N.attention.wq``, ``feed_forward.w1``, ...). The *layout* of wq/wk follows
Hugging Face: RoPE rotates the two halves of each head (``rotate_half``), not
interleaved pairs, so HF checkpoints load as they are and GGUF files (which
store Meta's interleaved layout) are un-permuted on load.

    model, tok = load_torch_model("smollm2")            # store name, .gguf path or HF directory
    logits = model(torch.tensor([tok.encode("Hi")]))      # (B, T, vocab)
    new_ids = generate(model, tok.encode("Hi"), max_new_tokens=32)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ContextOverflow, InvalidModelFile, InvalidRequest, ModelNotFound

__all__ = [
    "PRESETS",
    "Attention",
    "FeedForward",
    "KVCache",
    "ModelArgs",
    "RMSNorm",
    "Transformer",
    "TransformerBlock",
    "config_from_gguf",
    "config_from_hf",
    "config_to_hf",
    "decode_one_token",
    "generate",
    "gguf_state_dict_to_ours",
    "hf_state_dict_to_ours",
    "load_gguf",
    "load_hf_dir",
    "llama3_rope_factors",
    "load_torch_model",
    "dequantize_gguf_tensor",
    "emulate_llama_cpp",
    "ggml_block_matmul",
    "ggml_expf",
    "ggml_rms_norm",
    "ggml_rope",
    "ggml_rope_table",
    "ggml_swiglu",
    "gguf_block_quants",
    "gguf_name_to_ours",
    "GGML_EXACT_TYPES",
    "GGML_VEC_DOT_TYPE",
    "GGMLBlocks",
    "LlamaCppFused",
    "LlamaCppLinear",
    "LlamaCppRMSNorm",
    "llama_cpp_attention",
    "llama_cpp_isa",
    "LLAMA_CPP_ISAS",
    "Q8Blocks",
    "quantize_q8_0",
    "quantize_q8_1",
    "quantize_q8_K",
    "logits_to_probs",
    "ours_to_hf_state_dict",
    "prefill",
    "rope_inv_freq",
    "sample",
    "save_hf_dir",
]


# --------------------------------------------------------------------------- config


@dataclass
class ModelArgs:
    arch: str = "llama"  # "llama" | "mistral" | "qwen2": HF model_type / GGUF architecture on export
    dim: int = 4096  # hidden size (d_model)
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads: n_heads = MHA, fewer = GQA, 1 = MQA; None -> n_heads
    head_dim: int | None = None  # per-head size; None -> dim // n_heads (Mistral NeMo sets it explicitly)
    hidden_dim: int = 11008  # SwiGLU inner size (HF intermediate_size)
    vocab_size: int = 32000  # rows of the embedding and of the output projection
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 4096  # context the model was trained for; generation refuses to go past it
    rope_theta: float = 10000.0  # RoPE base frequency
    # "default" | "linear" (positions / factor) | "llama3" (Llama 3.1 per-band frequency scaling)
    rope_scaling: str = "default"
    rope_factor: float = 1.0  # linear/llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original / this are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original / this are kept as they are
    rope_original_max_seq_len: int = 8192  # llama3: the context length before extension
    # Explicit per-frequency divisors (GGUF rope_freqs.weight, how llama.cpp stores Llama 3.1
    # scaling); when set they replace rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    qkv_bias: bool = False  # biases on wq/wk/wv (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # bias on wo (Llama with attention_bias only)
    mlp_bias: bool = False  # biases on w1/w2/w3 (Llama with mlp_bias)
    tie_embeddings: bool = False  # output shares tok_embeddings.weight (Llama 3.2, SmolLM2, small Qwen2)
    sliding_window: int | None = None  # attend to at most this many latest positions (Mistral v0.1)
    sliding_window_from_layer: int = 0  # layers before this index attend fully (Qwen2 max_window_layers)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise InvalidModelFile(f"hidden size {self.dim} is not divisible by {self.n_heads} heads")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise InvalidModelFile(
                f"{self.n_heads} query heads cannot be grouped over {self.n_kv_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise InvalidModelFile(f"head size {self.head_dim} is odd; RoPE rotates pairs")
        if self.rope_scaling not in ("default", "linear", "llama3"):
            raise InvalidModelFile(
                f"unsupported RoPE scaling {self.rope_scaling!r} (supported: default, linear, llama3)"
            )
        if self.rope_freq_factors is not None:
            self.rope_freq_factors = tuple(float(f) for f in self.rope_freq_factors)
            if len(self.rope_freq_factors) != self.head_dim // 2:
                raise InvalidModelFile(
                    f"rope_freqs has {len(self.rope_freq_factors)} entries, expected {self.head_dim // 2}"
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise InvalidModelFile(f"sliding window must be positive, got {self.sliding_window}")

    @property
    def n_rep(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> int | None:
        return self.sliding_window if layer >= self.sliding_window_from_layer else None

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise InvalidRequest(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["rope_freq_factors"] is not None:
            d["rope_freq_factors"] = list(d["rope_freq_factors"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_seq_len=8192)  # fmt: skip

# Published shapes, as plain data (values from each model's config.json).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000, max_seq_len=4096),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256,
                       rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256,
                         max_seq_len=131072, rope_factor=8.0, **_LLAMA3_ROPE),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192,
                         vocab_size=128256, max_seq_len=131072, rope_factor=32.0, tie_embeddings=True, **_LLAMA3_ROPE),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192,
                         vocab_size=128256, max_seq_len=131072, rope_factor=32.0, tie_embeddings=True, **_LLAMA3_ROPE),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, vocab_size=49152,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-1.7b": dict(dim=2048, n_layers=24, n_heads=32, hidden_dim=8192, vocab_size=49152,
                         rope_theta=130000.0, max_seq_len=8192, tie_embeddings=True),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000,
                           max_seq_len=2048),
    "mistral-7b-v0.1": dict(arch="mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                            vocab_size=32000, max_seq_len=32768, sliding_window=4096),
    "mistral-7b-v0.3": dict(arch="mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                            vocab_size=32768, max_seq_len=32768, rope_theta=1000000.0),
    "qwen2-0.5b": dict(arch="qwen2", dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                       vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True,
                       tie_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960,
                         vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True,
                         tie_embeddings=True),
}  # fmt: skip


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the gain, as the reference code does:
        # in bf16 the mean of squares loses the digits that matter.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> Tensor:
    """RoPE inverse frequencies, (head_dim // 2,) in fp32, with the model's scaling applied."""
    dim = args.head_dim
    inv_freq = 1.0 / (
        args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    if args.rope_freq_factors is not None:
        # llama.cpp stores Llama 3.1 scaling as precomputed divisors (convert_hf_to_gguf.py, rope_freqs).
        return inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float32, device=device)
    if args.rope_scaling == "linear":
        # Position interpolation (Chen et al. 2023): positions / factor, i.e. frequencies / factor.
        return inv_freq / args.rope_factor
    if args.rope_scaling == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between
        # (llama-models `apply_scaling`; HF `_compute_llama3_parameters`).
        factor, old_len = args.rope_factor, args.rope_original_max_seq_len
        low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for `positions` (T,): each (T, head_dim), angles computed in fp32."""
    freqs = torch.outer(positions.float(), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd): both halves of a head share a frequency
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, nh, T, hd) by per-position angles; cos/sin are (T, hd)."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Keys and values of past positions, one per attention layer (gpt-fast)."""

    def __init__(
        self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None
    ):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        # Not persistent: caches never belong in a checkpoint.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v (B, n_kv, T, hd) at `input_pos` (T,); return the caches (B, n_kv, S_max, hd)."""
        B = k.shape[0]
        self.k_cache[:B, :, input_pos] = k
        self.v_cache[:B, :, input_pos] = v
        return self.k_cache[:B], self.v_cache[:B]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.window(layer)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.kv_cache: KVCache | None = None
        self.numerics = "torch"  # "llama.cpp": compute as llama.cpp's CPU attention does (emulate_llama_cpp)
        # "llama.cpp": head dims in the GGUF's order (a buffer so .to() moves it; never saved)
        self.register_buffer("ggml_qk_order", None, persistent=False)
        self.ggml_qkv: LlamaCppFused | None = None  # "llama.cpp": wq, wk, wv as one kernel call
        self.ggml_isa = "avx2"  # "llama.cpp": the kernel family emulated (LLAMA_CPP_ISAS)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None
    ) -> Tensor:
        B, T, _ = x.shape
        if self.ggml_qkv is not None:  # llama.cpp numerics: the three projections in one kernel call
            q, k, v = self.ggml_qkv(x)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if self.numerics == "llama.cpp":
            # cos/sin are ggml_rope_table's (T, hd/2). llama.cpp attends from its KV cache (F16
            # by default), so every key and value, the current positions' too, is fp16-rounded.
            q, k = ggml_rope(q, cos, sin), ggml_rope(k, cos, sin)
            k, v = _fp16(k), _fp16(v)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_caches() first")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S_max, hd)
            k, v = (
                k[:, :, : mask.shape[-1]],
                v[:, :, : mask.shape[-1]],
            )  # (B, n_kv, S, hd): only filled positions
        if self.n_kv_heads != self.n_heads:  # GQA/MQA: each kv head serves n_heads // n_kv_heads query heads
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(rep, dim=1)
        # mask None means plain causal attention over this forward's own T positions.
        if self.numerics == "llama.cpp":
            y = llama_cpp_attention(
                q, k, v, mask, ggml_attention_scale(self.head_dim), self.ggml_qk_order, self.ggml_isa
            )
        else:  # (B, nh, T, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # up
        self.numerics = "torch"  # "llama.cpp": ggml's silu (emulate_llama_cpp)
        self.ggml_w13: LlamaCppFused | None = None  # "llama.cpp": w1, w3 as one kernel call
        self.ggml_isa = "avx2"  # "llama.cpp": the kernel family emulated (LLAMA_CPP_ISAS)

    def forward(self, x: Tensor) -> Tensor:
        if self.numerics == "llama.cpp":
            gate, up = self.ggml_w13(x) if self.ggml_w13 is not None else (self.w1(x), self.w3(x))
            return self.w2(ggml_swiglu(gate, up, self.ggml_isa))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the RoPE
        # frequencies (bf16 angles are off by whole radians at position 10k).
        self._inv_freq: Tensor | None = None
        self.cache_shape: tuple[int, int] | None = None  # (max_batch_size, max_seq_len) of the KV caches
        # Parameter name -> ggml type name ("Q4_1", "F32", ...) of the GGUF tensor it was
        # dequantized from; empty for models not loaded from GGUF.
        self.ggml_types: dict[str, str] = {}
        self.numerics = "torch"  # "torch" | "llama.cpp" (see emulate_llama_cpp)
        self.ggml_rope_freqs: tuple[float, ...] | None = None  # the GGUF's rope_freqs values, for "llama.cpp"
        self.ggml_isa: str | None = None  # "llama.cpp": the kernel family emulated, "avx2" | "avx512"

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate KV caches for generation; a no-op when big enough ones exist."""
        if self.cache_shape and self.cache_shape[0] >= max_batch_size and self.cache_shape[1] >= max_seq_len:
            return
        w = self.output.weight
        for block in self.layers:
            block.attention.kv_cache = KVCache(
                max_batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, w.dtype, w.device
            )
        self.cache_shape = (max_batch_size, max_seq_len)

    def clear_caches(self) -> None:
        for block in self.layers:
            block.attention.kv_cache = None
        self.cache_shape = None

    def inv_freq(self, device: torch.device) -> Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.args, device)
        return self._inv_freq

    def forward(self, input_ids: Tensor, input_pos: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Logits (B, T', vocab) for input_ids (B, T); T' = logits_to_keep last positions, or all when 0.

        Without `input_pos` this is a plain causal forward over positions 0..T-1 (training,
        scoring). With `input_pos` (T,) the keys/values go to the KV cache at those
        positions and the queries attend to everything cached before them (generation).
        """
        B, T = input_ids.shape
        device = input_ids.device
        positions = input_pos if input_pos is not None else torch.arange(T, device=device)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        if self.numerics == "llama.cpp":
            cos, sin = self._ggml_rope(positions)  # (T, hd/2) each
        else:
            cos, sin = rope_cos_sin(self.inv_freq(device), positions, x.dtype)  # (T, hd) each
        masks = self._masks(positions, T, input_pos is not None, device)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, masks[self.args.window(i)], input_pos)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, T', dim): prefill needs only the last position
        return self.output(x)  # (B, T', vocab)

    def _ggml_rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        a = self.args
        freq_scale = 1.0
        if a.rope_scaling == "linear":  # llama.cpp: rope_freq_scale = 1.0f / factor
            freq_scale = float(
                torch.tensor(1.0, dtype=torch.float32) / torch.tensor(a.rope_factor, dtype=torch.float32)
            )
        factors = self.ggml_rope_freqs or a.rope_freq_factors
        if factors is None and a.rope_scaling == "llama3":
            raise InvalidRequest("llama.cpp numerics need the GGUF's rope_freqs values for Llama 3.1 scaling")
        return ggml_rope_table(positions, a.head_dim, a.rope_theta, freq_scale, factors)

    def _masks(self, positions: Tensor, T: int, cached: bool, device) -> dict[int | None, Tensor | None]:
        """Boolean attention masks (T, S) per distinct window; None = use SDPA's is_causal."""
        windows = {self.args.window(i) for i in range(self.args.n_layers)}
        if cached:
            S = int(positions[-1]) + 1  # keys: every cached position up to the last query
        else:
            S = T
        masks: dict[int | None, Tensor | None] = {}
        for w in windows:
            if not cached and (w is None or w >= T):
                masks[w] = None  # plain causal: SDPA picks its fused kernels
                continue
            q_pos = positions.view(-1, 1)  # (T, 1)
            k_pos = torch.arange(S, device=device).view(1, -1)  # (1, S)
            allowed = k_pos <= q_pos
            if w is not None:  # a query sees itself and the w-1 positions before it (HF/Mistral semantics)
                allowed = allowed & (k_pos > q_pos - w)
            masks[w] = allowed
        return masks

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once


# --------------------------------------------------------------------------- generation


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next tokens (B, 1) from the last position of logits (B, T, vocab); temperature 0 = greedy."""
    last = logits[:, -1]  # (B, vocab)
    if temperature <= 0:
        return last.argmax(dim=-1, keepdim=True)
    probs = logits_to_probs(last, temperature, top_k)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def prefill(model: Transformer, x: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    """Run the prompt x (B, T) through the model at input_pos (T,); return the first new tokens (B, 1)."""
    logits = model(x, input_pos, logits_to_keep=1)
    return sample(logits, **sampling)


@torch.no_grad()
def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    """One step: x (B, 1) at input_pos (1,) -> next tokens (B, 1)."""
    logits = model(x, input_pos)
    return sample(logits, **sampling)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue one prompt; return the new token ids (a stop id, when hit, is included last).

    Greedy when temperature is 0. `on_token` sees each id as it is produced (streaming).
    """
    device = model.output.weight.device
    ids = torch.as_tensor(
        list(prompt) if not isinstance(prompt, Tensor) else prompt, dtype=torch.long, device=device
    )
    T = ids.numel()
    if T == 0:
        raise InvalidRequest("generate() needs at least one prompt token (add BOS for an empty prompt)")
    if max_new_tokens <= 0:
        return []
    total = T + max_new_tokens
    if total > model.args.max_seq_len:
        raise ContextOverflow(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {model.args.max_seq_len}"
        )
    model.setup_caches(1, total)
    stop = set(stop_ids)
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator)

    next_token = prefill(model, ids.view(1, -1), torch.arange(T, device=device), **sampling)  # (1, 1)
    out: list[int] = []
    for pos in range(T, total):
        token = int(next_token)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or pos == total - 1:
            break
        next_token = decode_one_token(model, next_token, torch.tensor([pos], device=device), **sampling)
    return out


# --------------------------------------------------------------------------- Hugging Face format

_SUPPORTED_HF = ("llama", "mistral", "qwen2")

# (our name, HF name) inside layers.N / model.layers.N
_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def config_from_hf(cfg: dict[str, Any]) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
    model_type = cfg.get("model_type")
    if model_type not in _SUPPORTED_HF:
        raise InvalidModelFile(
            f"unsupported model_type {model_type!r}; the torch model supports {', '.join(_SUPPORTED_HF)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise InvalidModelFile(
            f"unsupported hidden_act {cfg.get('hidden_act')!r}; the Llama family uses silu"
        )
    # transformers 5 nests theta and scaling in rope_parameters; 4.x had rope_theta + rope_scaling.
    params, legacy = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    rope = {**(legacy if isinstance(legacy, dict) else {}), **(params if isinstance(params, dict) else {})}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise InvalidModelFile(f"unsupported RoPE scaling {rope_type!r} (supported: default, linear, llama3)")
    try:
        n_heads = int(cfg["num_attention_heads"])
        args = dict(
            arch=model_type,
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=cfg.get("head_dim") or None,
            hidden_dim=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=theta,
            rope_scaling=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_seq_len=int(rope.get("original_max_position_embeddings", 8192)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidModelFile(f"config.json is missing or has a bad value for {e}") from None
    if model_type == "llama":
        bias = bool(cfg.get("attention_bias", False))
        args.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
    elif model_type == "mistral":
        args.update(sliding_window=cfg.get("sliding_window") or None)
    elif model_type == "qwen2":
        args.update(qkv_bias=True)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        if window:
            layer_types = cfg.get("layer_types")
            if isinstance(layer_types, list):
                sliding = [t == "sliding_attention" for t in layer_types]
                start = sliding.index(True) if any(sliding) else len(sliding)
                if not all(sliding[start:]):
                    raise InvalidModelFile("unsupported Qwen2 layer_types: sliding layers must come last")
            else:
                start = int(cfg.get("max_window_layers", 0))
            args.update(sliding_window=int(window), sliding_window_from_layer=start)
    return ModelArgs(**args)


def config_to_hf(args: ModelArgs, *, dtype: str = "bfloat16", **extra: Any) -> dict[str, Any]:
    """A config.json dict for `args` that transformers (4.x and 5.x) and llama.cpp's converter read.

    `extra` adds keys such as bos_token_id / eos_token_id.
    """
    if args.rope_freq_factors is not None:
        raise InvalidRequest("cannot express explicit RoPE frequency factors in a Hugging Face config")
    arch_names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    cfg: dict[str, Any] = {
        "architectures": [arch_names[args.arch]],
        "model_type": args.arch,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        # The 4.x spelling: transformers 5 still reads it, and so does convert_hf_to_gguf.py.
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": dtype,
    }
    if args.rope_scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": args.rope_factor}
    elif args.rope_scaling == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": args.rope_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    if args.arch == "llama":
        if args.qkv_bias != args.o_bias:
            raise InvalidRequest("a Llama config has one attention_bias for q/k/v/o; these weights differ")
        cfg.update(attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias)
    elif args.arch == "mistral":
        cfg.update(sliding_window=args.sliding_window)
    elif args.arch == "qwen2":
        cfg.update(use_sliding_window=args.sliding_window is not None, sliding_window=args.sliding_window,
                   max_window_layers=args.sliding_window_from_layer if args.sliding_window else args.n_layers)  # fmt: skip
    if args.arch != "llama" and (args.o_bias or args.mlp_bias or args.qkv_bias != (args.arch == "qwen2")):
        raise InvalidRequest(f"these bias settings cannot be expressed as a {args.arch} config")
    cfg.update(extra)
    return cfg


def hf_state_dict_to_ours(sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename a Hugging Face state dict (model.layers.N.self_attn.q_proj.weight, ...) to ours."""
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        ours = _hf_to_our_name(name)
        if ours is None:
            continue
        out[ours] = t
    if args.tie_embeddings:
        # HF omits lm_head when tied (or keeps a copy); ours is the embedding itself.
        out.pop("output.weight", None)
        if "tok_embeddings.weight" in out:
            out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _hf_to_our_name(name: str) -> str | None:
    if name.endswith("rotary_emb.inv_freq"):  # older checkpoints saved the RoPE buffer; we recompute it
        return None
    for ours, hf in _HF_TOP_NAMES.items():
        if name.startswith(hf + "."):
            return ours + name[len(hf) :]
    if name.startswith("model.layers."):
        idx, _, rest = name[len("model.layers.") :].partition(".")
        for ours, hf in _HF_LAYER_NAMES.items():
            if rest.startswith(hf + "."):
                return f"layers.{idx}.{ours}{rest[len(hf) :]}"
    raise InvalidModelFile(f"unexpected tensor {name!r} in a Llama-family checkpoint")


def ours_to_hf_state_dict(sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """The inverse of hf_state_dict_to_ours; drops the tied output projection as HF does."""
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if args.tie_embeddings and name == "output.weight":
            continue
        top, _, rest = name.partition(".")
        if top in _HF_TOP_NAMES:
            out[f"{_HF_TOP_NAMES[top]}.{rest}"] = t
            continue
        if top != "layers":
            raise InvalidRequest(f"unexpected tensor {name!r} in an openherd state dict")
        idx, _, rest = rest.partition(".")
        for ours, hf in _HF_LAYER_NAMES.items():
            if rest.startswith(ours + "."):
                out[f"model.layers.{idx}.{hf}{rest[len(ours) :]}"] = t
                break
        else:
            raise InvalidRequest(f"unexpected tensor {name!r} in an openherd state dict")
    return out


def load_hf_dir(path: str | Path, *, device=None, dtype=None) -> Transformer:
    """Build the model of a Hugging Face directory (config.json + *.safetensors)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InvalidModelFile(f"{path.name} has no config.json; expected a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModelFile(f"cannot parse config.json in {path.name}: {e}") from None
    args = config_from_hf(cfg)
    device, dtype = _pick_device_dtype(device, dtype)

    from safetensors import SafetensorError, safe_open

    sd: dict[str, Tensor] = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except OSError as e:
            raise InvalidModelFile(f"cannot read {file.name}: {e}") from None
        except SafetensorError as e:
            raise InvalidModelFile(f"corrupt safetensors file {file.name}: {e}") from None
        for name, t in tensors.items():
            sd[name] = t.to(device=device, dtype=dtype)
    return _build(args, hf_state_dict_to_ours(sd, args), device)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidModelFile(f"cannot parse {index.name}: {e}") from None
        names = sorted(set(weight_map.values()))
        for n in names:  # the index is data from the model's author: never follow it out of the directory
            if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors"):
                raise InvalidModelFile(f"{index.name} names a bad shard {str(n)[:80]!r}")
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidModelFile(f"missing safetensors shard(s): {', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise InvalidModelFile(
            f"{path.name} has only pickle weights (.bin/.pt); openherd never unpickles model files. "
            "Convert them to safetensors first (e.g. save_pretrained in transformers)"
        )
    raise InvalidModelFile(f"{path.name} has no *.safetensors weights")


def save_hf_dir(
    model: Transformer, path: str | Path, *, dtype: torch.dtype | None = None, **config_extra
) -> None:
    """Write config.json + model.safetensors that transformers and convert_hf_to_gguf.py load.

    Copy the tokenizer files separately (they are not the model's business).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.output.weight.dtype
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    hf = ours_to_hf_state_dict(sd, model.args)
    cfg = config_to_hf(model.args, dtype=str(dtype).removeprefix("torch."), **config_extra)
    save_file(hf, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- GGUF format

_SUPPORTED_GGUF = ("llama", "qwen2")

_GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_GGUF_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def config_from_gguf(
    md: dict[str, Any], shapes: dict[str, tuple[int, ...]], rope_freqs: Sequence[float] | None = None
) -> ModelArgs:
    """ModelArgs from GGUF metadata (llama.cpp key names), the tensor shapes (name -> PyTorch-order
    shape) and the values of the rope_freqs.weight tensor when the file has one."""
    arch = md.get("general.architecture")
    if arch not in _SUPPORTED_GGUF:
        raise InvalidModelFile(
            f"unsupported GGUF architecture {arch!r}; the torch model supports {', '.join(_SUPPORTED_GGUF)}"
        )

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise InvalidModelFile(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):
            raise InvalidModelFile(f"per-layer {arch}.{key} is not supported by the torch model")
        return kind(value)

    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    head_dim = get("attention.key_length", dim // n_heads if n_heads else 0)
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise InvalidModelFile(
            f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported by the torch model"
        )
    if "token_embd.weight" not in shapes:
        raise InvalidModelFile("GGUF has no token_embd.weight")
    scaling = md.get(f"{arch}.rope.scaling.type") or "none"
    factor = float(md.get(f"{arch}.rope.scaling.factor") or 1.0)
    if scaling == "none" and md.get(f"{arch}.rope.scale_linear"):  # the key older files used
        scaling, factor = "linear", float(md[f"{arch}.rope.scale_linear"])
    if scaling not in ("none", "linear"):
        raise InvalidModelFile(f"unsupported GGUF RoPE scaling {scaling!r} (supported: none, linear)")
    linear = scaling == "linear" and factor != 1.0
    theta = get("rope.freq_base", 10000.0, float)
    rope: dict[str, Any] = {
        "rope_scaling": "linear" if linear else "default",
        "rope_factor": factor if linear else 1.0,
    }
    if rope_freqs is not None:
        # Name the scaling when the factors are Llama 3.1's, so the model exports to a HF config.
        orig = int(md.get(f"{arch}.rope.scaling.original_context_length") or 8192)
        rope = _llama3_rope_from_factors(list(rope_freqs), theta, head_dim, orig) or {
            "rope_freq_factors": tuple(float(f) for f in rope_freqs)
        }
    window = md.get(f"{arch}.attention.sliding_window")
    return ModelArgs(
        arch=arch,
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        hidden_dim=get("feed_forward_length"),
        vocab_size=int(shapes["token_embd.weight"][0]),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
        max_seq_len=get("context_length", 4096),
        rope_theta=theta,
        **rope,
        qkv_bias="blk.0.attn_q.bias" in shapes,
        o_bias="blk.0.attn_output.bias" in shapes,
        mlp_bias="blk.0.ffn_up.bias" in shapes,
        tie_embeddings="output.weight" not in shapes,
        sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
    )


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original_max_seq_len: int
) -> list[float]:
    """Llama 3.1 scaling as per-frequency divisors: llama.cpp's rope_freqs.weight
    (convert_hf_to_gguf.py, `LlamaModel.generate_extra_tensors`)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original_max_seq_len / high:
            out.append(1.0)
        elif wavelen > original_max_seq_len / low:
            out.append(factor)
        else:
            smooth = (original_max_seq_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_rope_from_factors(factors: list[float], theta: float, head_dim: int, orig: int) -> dict | None:
    """The llama3 rope fields whose factors these are, trying Meta's published low/high (1, 4)."""
    factor = max(factors)
    expected = llama3_rope_factors(theta, head_dim, factor, 1.0, 4.0, orig)
    if len(expected) != len(factors) or any(
        abs(a - b) > 1e-5 * b for a, b in zip(factors, expected, strict=True)
    ):
        return None
    return dict(rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                rope_original_max_seq_len=orig)  # fmt: skip


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    HF checkpoints rotate the two halves of each head; llama.cpp's llama arch rotates
    interleaved pairs, so the converter reorders rows (n_head, 2, hd/2) -> (n_head, hd/2, 2).
    Works for weights (out, in) and biases (out,).
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's permutation itself (for writing llama-arch GGUF files)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_name_to_ours(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name (blk.N.attn_q.weight -> layers.N.attention.wq.weight);
    None for rope_freqs.weight, which is folded into ModelArgs.rope_freq_factors."""
    if name == "rope_freqs.weight":
        return None
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
        raise InvalidModelFile(f"unsupported tensor {name!r} for the torch Llama model")
    return f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"


def gguf_state_dict_to_ours(tensors: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename GGUF tensors (blk.N.attn_q.weight, ...) to ours, un-permuting Q/K for the llama arch.

    Also right for any per-row tensor (out, ...) that follows a weight's rows, such as the
    integer block quants of the llama.cpp numerics emulation (GGMLBlocks).
    """
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        ours = gguf_name_to_ours(name)
        if ours is None:
            continue
        module = name.rpartition(".")[0].rpartition(".")[2]  # blk.N.attn_q.weight -> attn_q
        if args.arch == "llama" and module in ("attn_q", "attn_k"):
            t = unpermute_qk(t, args.n_heads if module == "attn_q" else args.n_kv_heads)
        out[ours] = t
    if args.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def dequantize_gguf_tensor(mm, t) -> Any:
    """One tensor of a GGUF file as a float32 numpy array in PyTorch (out, in) order.

    `mm` is the file memory-mapped as uint8, `t` an openherd.gguf.TensorInfo whose offset and
    size read_gguf has already checked against the file. The gguf package dequantizes
    (Q4_0, Q4_1, Q8_0, K-quants, F16, BF16, ...).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(t.ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise InvalidModelFile(f"tensor {t.name} has unknown ggml type {t.ggml_type}") from None
    ne0, rows = t.shape[0], math.prod(t.shape[1:])  # GGML order: ne0 is the contiguous dim
    raw = mm[t.offset : t.offset + rows * (ne0 // block) * type_size].reshape(rows, -1)
    try:
        data = dequantize(raw, qtype)  # (rows, ne0) float32
    except NotImplementedError:
        raise InvalidModelFile(f"tensor {t.name}: the gguf package cannot dequantize {qtype.name}") from None
    if not data.flags.writeable:  # F32 comes back as a view of the read-only map
        data = data.copy()
    return data.reshape(tuple(reversed(t.shape)))


def load_gguf(
    path: str | Path, *, device=None, dtype=None, emulate: str | None = None, isa: str | None = None
) -> Transformer:
    """Build the model of a GGUF file, dequantized to `dtype`.

    `emulate="llama.cpp"` makes the model compute what llama.cpp's CPU backend computes from
    this file, bit for bit (see `emulate_llama_cpp`; float32 only, inference only), with the
    kernels of `isa` ("avx2" | "avx512"; None: those of the installed llama.cpp). Default
    None: plain fp32/bf16 arithmetic on the dequantized weights, as for training and parity
    with transformers.
    """
    return _load_gguf(path, device, dtype, emulate, isa)[0]


def _load_gguf(
    path, device, dtype, emulate: str | None = None, isa: str | None = None
) -> tuple[Transformer, dict[str, Any]]:
    import numpy as np
    from gguf import GGMLQuantizationType

    from .gguf import read_gguf

    _check_emulate(emulate, isa)
    # The validating reader checks every count, length and offset before any byte is mapped.
    info = read_gguf(path, load_arrays=True)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    shapes = {t.name: tuple(reversed(t.shape)) for t in info.tensors}
    freqs = info.tensor("rope_freqs.weight")
    rope_freqs = dequantize_gguf_tensor(mm, freqs).tolist() if freqs is not None else None
    args = config_from_gguf(info.metadata, shapes, rope_freqs)
    device, dtype = _pick_device_dtype(device, dtype)
    if emulate and dtype != torch.float32:
        raise InvalidRequest(
            f"llama.cpp numerics need dtype float32 (llama.cpp's CPU backend computes in fp32), got {dtype}"
        )
    tensors: dict[str, Tensor] = {}
    types: dict[str, str] = {}
    quants: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}  # emulation: integer blocks by GGUF name
    for t in info.tensors:  # one fp32 tensor at a time: peak memory is the model in `dtype` plus one
        if t.name == "rope_freqs.weight":
            continue
        tensors[t.name] = torch.from_numpy(dequantize_gguf_tensor(mm, t)).to(device=device, dtype=dtype)
        types[t.name] = GGMLQuantizationType(t.ggml_type).name  # dequantize_gguf_tensor checked it is known
        if emulate and types[t.name] in _BLOCK_BYTES and len(t.shape) == 2:
            q, d, m = gguf_block_quants(mm, t)
            quants[t.name] = (torch.from_numpy(q).to(device), torch.from_numpy(d).to(device),
                              torch.from_numpy(m).to(device) if m is not None else None)  # fmt: skip
    model = _build(args, gguf_state_dict_to_ours(tensors, args), device)
    model.ggml_types = {ours: types[name] for name in types if (ours := gguf_name_to_ours(name))}
    if args.tie_embeddings:  # llama.cpp multiplies by token_embd itself, in its type
        model.ggml_types["output.weight"] = model.ggml_types["tok_embeddings.weight"]
    if emulate:
        # Rename (and un-permute Q/K rows of) the quants exactly as the weights were.
        parts = [gguf_state_dict_to_ours({n: v[i] for n, v in quants.items() if v[i] is not None}, args)
                 for i in range(3)]  # fmt: skip
        blocks = {name: GGMLBlocks(q, parts[1][name], parts[2].get(name)) for name, q in parts[0].items()}
        emulate_llama_cpp(model, blocks, rope_freqs, isa)
    return model, info.metadata


# --------------------------------------------------------------------------- loading


def _pick_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """CUDA when present; bf16 there (fp16 on GPUs without bf16), fp32 on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}.get(dtype, dtype)  # fmt: skip
        if isinstance(dtype, str):
            raise InvalidRequest(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return device, dtype


def _build(args: ModelArgs, sd: dict[str, Tensor], device: torch.device) -> Transformer:
    # Parameters start on the meta device (no memory, no random init) and the
    # checkpoint tensors are assigned in place of them.
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise InvalidModelFile(f"checkpoint does not match its config: {what}")
    for name, t in sd.items():
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise InvalidModelFile(f"tensor {name} has shape {tuple(t.shape)}, config implies {tuple(want)}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two
    return model.eval()


def _resolve(path_or_name: str | os.PathLike[str]) -> Path:
    p = Path(path_or_name).expanduser()
    if p.exists():
        return p
    text = str(path_or_name)
    if os.sep in text or "/" in text or text.endswith((".gguf", ".safetensors")):
        raise ModelNotFound(text, f"no such model file or directory: {text}")
    try:
        from .store import Store
    except ImportError:  # the store is optional for the torch side: paths always work
        raise ModelNotFound(text) from None
    return Path(Store().resolve(text).path)


def load_torch_model(
    path_or_name: str | os.PathLike[str],
    *,
    device=None,
    dtype=None,
    emulate: str | None = None,
    isa: str | None = None,
):
    """(model, tokenizer) for a Hugging Face directory, a .gguf file or a store name.

    The model is in eval mode on `device` (CUDA when available, else CPU) in `dtype`
    (bf16 on CUDA, fp32 on CPU by default); GGUF weights are dequantized. The tokenizer
    (openherd.tokenizer.Tokenizer) is None for a directory without tokenizer.json.
    `emulate="llama.cpp"` (GGUF only) reproduces llama.cpp's CPU rounding, `isa` its kernel
    family; see load_gguf.
    """
    from .gguf import is_gguf
    from .tokenizer import Tokenizer

    _check_emulate(emulate, isa)
    path = _resolve(path_or_name)
    if path.is_dir():
        if emulate:
            raise InvalidRequest("llama.cpp numerics follow a GGUF file's tensor types; load a .gguf file")
        return load_hf_dir(path, device=device, dtype=dtype), Tokenizer.from_hf_dir(path)
    if not is_gguf(path):
        raise InvalidModelFile(f"{path.name} is neither a GGUF file nor a Hugging Face model directory")
    model, metadata = _load_gguf(path, device, dtype, emulate, isa)
    return model, Tokenizer.from_gguf_metadata(metadata)


# The opt-in llama.cpp numerics (load_gguf's `emulate`) live in their own module and are
# re-exported here; imported last because they build on the classes above.
from .model_llamacpp import (  # noqa: E402
    _BLOCK_BYTES,
    GGML_EXACT_TYPES,
    GGML_VEC_DOT_TYPE,
    LLAMA_CPP_ISAS,
    GGMLBlocks,
    LlamaCppFused,
    LlamaCppLinear,
    LlamaCppRMSNorm,
    Q8Blocks,
    _check_emulate,
    _fp16,
    emulate_llama_cpp,
    ggml_attention_scale,
    ggml_block_matmul,
    ggml_expf,
    ggml_rms_norm,
    ggml_rope,
    ggml_rope_table,
    ggml_swiglu,
    gguf_block_quants,
    llama_cpp_attention,
    llama_cpp_isa,
    quantize_q8_0,
    quantize_q8_1,
    quantize_q8_K,
)
