"""Hugging Face directory (config.json, *.safetensors, tokenizer.json) -> GGUF.

The same conversion llama.cpp's ``convert_hf_to_gguf.py`` performs for the Llama
family, in one readable file:

    read_hf_config   config.json           -> HFConfig (architecture, sizes, rope)
    SafetensorsFile  *.safetensors          -> numpy arrays, memory-mapped, never pickle
    plan_tensors     HF names               -> GGUF names, transforms and output types
    read_tokenizer   tokenizer.json & co.   -> vocab, token types, pre-tokenizer or piece scores
    convert_hf_dir   all of it              -> one GGUF file, written tensor by tensor

Supported: LlamaForCausalLM (Llama 2/3/3.1/3.2, SmolLM), MistralForCausalLM and
Qwen2ForCausalLM, with byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2
pre-tokenizers) or SentencePiece-style BPE ones (Llama 2, Mistral) from
tokenizer.json. Output types: f32, f16 (default) and q8_0; 1-D tensors (norms,
biases, rope factors) always stay f32, as upstream.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidModelFile
from .blobs import ProgressFn, Reporter
from .catalog import QUANTS

# config.json "architectures"[0] -> GGUF general.architecture. Mistral is the llama graph
# in llama.cpp (sliding-window attention is not used by any llama.cpp Mistral path).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


def _bad(path: Path | str, problem: str) -> InvalidModelFile:
    return InvalidModelFile(f"cannot convert {Path(path).name}: {problem}")


# --------------------------------------------------------------------------- config


@dataclass
class HFConfig:
    hf_arch: str  # "LlamaForCausalLM", ...
    arch: str  # GGUF architecture: "llama" | "qwen2"
    n_embd: int  # hidden_size
    n_layer: int  # num_hidden_layers
    n_head: int  # num_attention_heads
    n_head_kv: int  # num_key_value_heads (GQA); = n_head for MHA
    n_ff: int  # intermediate_size
    n_vocab: int  # vocab_size (may exceed the tokenizer's: padded embedding rows)
    n_ctx: int  # max_position_embeddings
    head_dim: int  # per-head size; hidden_size // n_head unless config says otherwise
    rms_eps: float
    rope_theta: float
    tie_embeddings: bool  # lm_head shares token_embd: no output.weight is written
    rope_scaling: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def read_hf_config(model_dir: Path) -> HFConfig:
    path = model_dir / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(model_dir, "no config.json (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as e:
        raise _bad(model_dir, f"config.json is unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise _bad(model_dir, "config.json is not a JSON object")
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if hf_arch not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise _bad(model_dir, f"unsupported architecture {hf_arch or 'unknown'!r} (supported: {supported})")

    def need_int(key: str) -> int:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise _bad(model_dir, f"config.json: {key} must be a positive integer, got {v!r}")
        return v

    n_embd, n_head = need_int("hidden_size"), need_int("num_attention_heads")
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or n_embd // n_head
    if not isinstance(n_head_kv, int) or n_head % n_head_kv:
        raise _bad(
            model_dir, f"config.json: num_key_value_heads {n_head_kv!r} must divide num_attention_heads"
        )
    if not isinstance(head_dim, int) or head_dim % 2:
        raise _bad(model_dir, f"config.json: head_dim {head_dim!r} must be an even integer")
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise _bad(model_dir, "config.json: rope_scaling must be an object or null")
    config = HFConfig(
        hf_arch=hf_arch,
        arch=ARCHITECTURES[hf_arch],
        n_embd=n_embd,
        n_layer=need_int("num_hidden_layers"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=need_int("intermediate_size"),
        n_vocab=need_int("vocab_size"),
        n_ctx=need_int("max_position_embeddings"),
        head_dim=head_dim,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling or None,
        raw=cfg,
    )
    rope_type = _rope_type(config)
    if rope_type not in (None, "default", "linear", "llama3", "yarn"):
        raise _bad(
            model_dir, f"rope_scaling type {rope_type!r} is not supported (supported: linear, llama3, yarn)"
        )
    if rope_type in ("linear", "yarn", "llama3") and not isinstance(
        config.rope_scaling.get("factor", 8.0), (int, float)
    ):
        raise _bad(model_dir, f"config.json: rope_scaling {rope_type!r} needs a numeric 'factor'")
    return config


def llama3_rope_factors(cfg: HFConfig) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1 "llama3" rope scaling, as llama.cpp's rope_freqs.weight.

    transformers scales inv_freq (modeling_rope_utils._compute_llama3_parameters); llama.cpp
    divides by a factor tensor instead, so we store inv_freq / scaled_inv_freq.
    """
    rs = cfg.rope_scaling or {}
    factor = float(rs.get("factor", 8.0))
    low_freq_factor = float(rs.get("low_freq_factor", 1.0))
    high_freq_factor = float(rs.get("high_freq_factor", 4.0))
    old_context_len = float(rs.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:  # high frequencies: untouched
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:  # low frequencies: interpolated by the full factor
            factors.append(factor)
        else:  # in between: smooth blend
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _rope_type(cfg: HFConfig) -> str | None:
    rs = cfg.rope_scaling
    if not rs:
        return None
    return str(rs.get("rope_type") or rs.get("type") or "").lower() or None


# --------------------------------------------------------------------------- safetensors

# safetensors dtype -> (numpy dtype of the stored bytes, item size). BF16 has no numpy dtype:
# it is read as uint16 and widened to float32 by a 16-bit shift (bf16 is the top half of f32).
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "F64": ("<f8", 8),
}
_MAX_HEADER = 100 << 20  # the safetensors spec's own limit


@dataclass(frozen=True)
class _STEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """Header-validated, memory-mapped safetensors reader.

    Why not ``safetensors.numpy``: numpy has no bfloat16, and that is how nearly every
    Llama checkpoint ships, so ``safe_open(framework="np")`` refuses those files. The
    format is a u64 header length, a JSON header and raw little-endian data, so we check
    every offset against the file and map the bytes read-only: no pickle, no copies
    beyond the one tensor being converted.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _bad(path, "truncated safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise _bad(path, "safetensors header length is larger than the file")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                raise _bad(path, "safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise _bad(path, "safetensors header is not a JSON object")
        base = 8 + n
        self.entries: dict[str, _STEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise _bad(path, f"malformed safetensors entry for {name[:80]!r}") from None
            if dtype not in _ST_DTYPES:
                raise _bad(
                    path, f"tensor {name[:80]!r} has dtype {dtype!r}; only F32, F16, BF16, F64 are supported"
                )
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size - base
            ):
                raise _bad(path, f"tensor {name[:80]!r} has an invalid shape or offsets")
            if math.prod(shape) * _ST_DTYPES[dtype][1] != end - begin:
                raise _bad(path, f"tensor {name[:80]!r}: shape {shape} does not match its byte size")
            self.entries[name] = _STEntry(dtype, shape, base + begin, base + end)
        self._mmap: np.memmap | None = np.memmap(path, dtype=np.uint8, mode="r") if size > base else None

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array: transforms may modify it)."""
        e = self.entries[name]
        if e.end == e.begin or self._mmap is None:
            return np.zeros(e.shape, dtype=np.float32)
        np_dtype, _ = _ST_DTYPES[e.dtype]
        data = self._mmap[e.begin : e.end].view(np_dtype).reshape(e.shape)
        if e.dtype == "BF16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32)


def open_weights(model_dir: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it, across shards."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise _bad(model_dir, "model.safetensors.index.json is malformed") from None
        for f in files:
            if not isinstance(f, str) or Path(f).name != f:  # shard names must stay inside the directory
                raise _bad(model_dir, f"index names a shard outside the directory: {str(f)[:80]!r}")
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        # Mistral repos also ship consolidated.safetensors in the original (non-HF) layout.
        files = sorted(
            p.name for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated")
        )
    if not files:
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")) or any(model_dir.glob("*.pth")):
            raise _bad(
                model_dir,
                "only PyTorch pickle weights (*.bin/*.pt) found; openherd never unpickles files "
                "(they can run code): download the .safetensors variant of the model",
            )
        raise _bad(model_dir, "no *.safetensors weights found")
    tensors: dict[str, SafetensorsFile] = {}
    for fname in files:
        path = model_dir / fname
        if not path.is_file():
            raise _bad(model_dir, f"missing weight shard {fname}")
        st = SafetensorsFile(path)
        for name in st.entries:
            tensors[name] = st
    return tensors


# --------------------------------------------------------------------------- tensor plan


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores Q/K rows in the rotate-half (NeoX) order; llama.cpp's llama graph rotates
    interleaved pairs (the original Meta layout). Undo HF's permutation, exactly as
    convert_hf_to_gguf.py's LlamaModel.permute. Works for weights (2-D) and biases (1-D)."""
    shape = w.shape
    # (n_head, 2, head_dim/2, *rest) -> (n_head, head_dim/2, 2, *rest): interleave the halves
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # recomputed from rope_theta by every runtime


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: int  # gguf.GGMLQuantizationType
    nbytes: int
    load: Callable[[], np.ndarray]  # -> float32 array in GGUF layout (before type conversion)


def _out_type(shape: tuple[int, ...], quant: str) -> int:
    from gguf import GGMLQuantizationType as T

    if quant == "f32" or len(shape) == 1:  # norms, biases, rope factors: tiny and precision-critical
        return T.F32
    if quant == "q8_0" and shape[-1] % 32 == 0:  # Q8_0 blocks are 32 values along a row
        return T.Q8_0
    return T.F16


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def plan_tensors(
    cfg: HFConfig, weights: dict[str, SafetensorsFile], quant: str, where: Path
) -> list[PlannedTensor]:
    plan: list[PlannedTensor] = []
    seen: set[str] = set()

    def add(gguf_name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray]) -> None:
        qtype = _out_type(shape, quant)
        plan.append(PlannedTensor(gguf_name, shape, qtype, _nbytes(shape, qtype), load))
        seen.add(gguf_name)

    if _rope_type(cfg) == "llama3":
        factors = llama3_rope_factors(cfg)
        add("rope_freqs.weight", factors.shape, lambda f=factors: f)

    for hf_name in sorted(weights, key=_natural_key):
        if _IGNORED.fullmatch(hf_name):
            continue
        st = weights[hf_name]
        shape = st.entries[hf_name].shape
        m = _LAYER_RE.fullmatch(hf_name)
        if m and m[2] in _LAYER_MAP and int(m[1]) < cfg.n_layer:
            gguf_name = f"blk.{int(m[1])}.{_LAYER_MAP[m[2]]}"
        elif hf_name in _GLOBAL_MAP:
            gguf_name = _GLOBAL_MAP[hf_name]
        else:
            raise _bad(where, f"unexpected tensor {hf_name[:100]!r} for {cfg.hf_arch}")
        if gguf_name == "output.weight" and cfg.tie_embeddings:
            continue  # tied: llama.cpp reuses token_embd.weight
        expected = _expected_shape(cfg, gguf_name)
        if shape != expected:  # catch it here: llama.cpp would refuse the file at load time
            raise _bad(
                where, f"tensor {hf_name} has shape {list(shape)}, config.json implies {list(expected)}"
            )
        n_rot_heads = _rotary_heads(cfg, m[2] if m else "")
        if n_rot_heads:

            def load(st=st, hf_name=hf_name, n=n_rot_heads) -> np.ndarray:
                return permute_qk(st.get(hf_name), n)

        else:

            def load(st=st, hf_name=hf_name) -> np.ndarray:
                return st.get(hf_name)

        add(gguf_name, shape, load)

    _check_complete(cfg, seen, where)
    return plan


def _expected_shape(cfg: HFConfig, gguf_name: str) -> tuple[int, ...]:
    """The (rows, cols) numpy shape a tensor must have for this config."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    kind = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else gguf_name
    shapes = {
        "token_embd.weight": (cfg.n_vocab, cfg.n_embd),
        "output.weight": (cfg.n_vocab, cfg.n_embd),
        "output_norm.weight": (cfg.n_embd,),
        "attn_norm.weight": (cfg.n_embd,),
        "ffn_norm.weight": (cfg.n_embd,),
        "attn_q.weight": (q, cfg.n_embd),
        "attn_q.bias": (q,),
        "attn_k.weight": (kv, cfg.n_embd),
        "attn_k.bias": (kv,),
        "attn_v.weight": (kv, cfg.n_embd),
        "attn_v.bias": (kv,),
        "attn_output.weight": (cfg.n_embd, q),
        "attn_output.bias": (cfg.n_embd,),
        "ffn_gate.weight": (cfg.n_ff, cfg.n_embd),
        "ffn_up.weight": (cfg.n_ff, cfg.n_embd),
        "ffn_down.weight": (cfg.n_embd, cfg.n_ff),
    }
    return shapes[kind]


def _rotary_heads(cfg: HFConfig, layer_key: str) -> int:
    """Heads to permute for Q/K of the llama graph (qwen2 rotates NeoX-style: nothing to undo)."""
    if cfg.arch != "llama":
        return 0
    if layer_key.startswith("self_attn.q_proj."):
        return cfg.n_head
    if layer_key.startswith("self_attn.k_proj."):
        return cfg.n_head_kv
    return 0


def _check_complete(cfg: HFConfig, seen: set[str], where: Path) -> None:
    required = ["token_embd.weight", "output_norm.weight"]
    if not cfg.tie_embeddings:
        required.append("output.weight")
    for i in range(cfg.n_layer):
        for t in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ):
            required.append(f"blk.{i}.{t}.weight")
        if cfg.arch == "qwen2":
            required += [f"blk.{i}.attn_q.bias", f"blk.{i}.attn_k.bias", f"blk.{i}.attn_v.bias"]
    missing = [t for t in required if t not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _bad(where, f"weights are missing tensor {missing[0]}{more}")


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- tokenizer

# The pre-tokenizer regexes of tokenizer.json that llama.cpp implements natively
# (llama-vocab.cpp): matched structurally so that a model is never written with a
# pre-tokenizer that splits text differently from the one it was trained with.
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass
class TokenizerSpec:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    tokens: list[str]
    toktypes: list[int]  # gguf.TokenType per token
    pre: str | None = None  # tokenizer.ggml.pre ("gpt2" model only)
    scores: list[float] | None = None  # piece scores ("llama" model only): higher merges first
    add_space_prefix: bool = True  # "llama" model: SentencePiece's leading "▁"


def _pre_steps(tj: dict[str, Any]) -> list[tuple[Any, ...]]:
    pre = tj.get("pre_tokenizer")
    if not pre:
        return []
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out: list[tuple[Any, ...]] = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            out.append(("ByteLevel", bool(s.get("use_regex", True)), bool(s.get("add_prefix_space", False))))
        elif kind == "Split":
            pattern = s.get("pattern") or {}
            out.append(
                (
                    "Split",
                    pattern.get("Regex", pattern.get("String")),
                    s.get("behavior"),
                    bool(s.get("invert")),
                )
            )
        elif kind == "Digits":
            out.append(("Digits", bool(s.get("individual_digits"))))
        else:
            out.append((kind,))
    return out


def pre_tokenizer_name(tj: dict[str, Any], where: Path) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json, or a clear refusal."""
    steps = _pre_steps(tj)
    if steps == [("ByteLevel", True, False)]:
        return "gpt-2"  # GPT-2's own regex inside ByteLevel
    if steps == [("Digits", True), ("ByteLevel", True, False)]:
        return "smollm"  # SmolLM/StarCoder: every digit alone, then the GPT-2 regex
    if len(steps) == 2 and steps[0][0] == "Split" and steps[1] == ("ByteLevel", False, False):
        _, regex, behavior, invert = steps[0]
        if behavior == "Isolated" and not invert:
            if regex == _LLAMA3_REGEX:
                return "llama-bpe"
            if regex == _QWEN2_REGEX:
                return "qwen2"
    summary = ", ".join(str(s[0]) for s in steps) or "none"
    raise _bad(
        where,
        f"unsupported pre-tokenizer in tokenizer.json ({summary}); "
        "supported: GPT-2 byte-level, SmolLM, Llama 3 and Qwen2 styles",
    )


def _looks_special(token: str) -> bool:
    # Same heuristic as convert_hf_to_gguf.py: some models mark chat markers as non-special.
    return (token.startswith("<|") and token.endswith("|>")) or (
        token.startswith("<｜") and token.endswith("｜>")
    )


def _spm_space_prefix(tj: dict[str, Any], where: Path) -> bool | None:
    """For a SentencePiece-style tokenizer.json (spaces spelled "▁"): whether a leading "▁"
    is added. None if the tokenizer is not SentencePiece-style."""
    norm = tj.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else ([norm] if norm else [])
    pre = tj.get("pre_tokenizer") or {}
    # Legacy Llama 2 / Mistral layout: normalizer Prepend("▁") + Replace(" ", "▁").
    replace = any(
        st.get("type") == "Replace"
        and (st.get("pattern") or {}).get("String") == " "
        and st.get("content") == "▁"
        for st in steps
    )
    if replace:
        if pre or any(st.get("type") not in ("Prepend", "Replace") for st in steps):
            raise _bad(where, "unsupported SentencePiece-style normalizer in tokenizer.json")
        return any(st.get("type") == "Prepend" and st.get("prepend") == "▁" for st in steps)
    # Newer layout: a Metaspace pre-tokenizer does the same.
    if pre.get("type") == "Metaspace" and pre.get("replacement", "▁") == "▁" and not steps:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return scheme in ("first", "always")
    return None


def _merge_ranks(model: dict[str, Any]) -> dict[str, int]:
    """token -> rank of the first merge producing it (merges are "a b" strings or [a, b] pairs)."""
    ranks: dict[str, int] = {}
    for rank, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ranks.setdefault(a + b, rank)
    return ranks


def read_tokenizer(model_dir: Path, n_vocab: int) -> TokenizerSpec:
    """tokens, types and pre-tokenizer (or scores) from tokenizer.json, as llama.cpp expects."""
    from gguf import TokenType

    path = model_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(
            model_dir, "no tokenizer.json (openherd converts tokenizers from tokenizer.json)"
        ) from None
    except (OSError, ValueError) as e:
        raise _bad(model_dir, f"tokenizer.json is unreadable ({e})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise _bad(model_dir, f"tokenizer.json model type {model.get('type')!r} is not supported (need BPE)")

    spm_prefix = _spm_space_prefix(tj, model_dir) if model.get("byte_fallback") else None
    if model.get("byte_fallback") and spm_prefix is None:
        raise _bad(
            model_dir, "unsupported byte-fallback BPE tokenizer (expected SentencePiece-style '▁' spaces)"
        )
    if spm_prefix is None:
        normalizer = tj.get("normalizer")
        if normalizer and normalizer.get("type") != "NFC":  # Qwen2 declares NFC; llama.cpp skips it
            raise _bad(model_dir, f"unsupported tokenizer normalizer {normalizer.get('type')!r}")
        pre = pre_tokenizer_name(tj, model_dir)

    vocab: dict[str, int] = dict(model["vocab"])
    added: dict[int, dict[str, Any]] = {}
    for tok in tj.get("added_tokens") or []:
        added[tok["id"]] = tok
        vocab[tok["content"]] = tok["id"]
    if vocab and max(vocab.values()) >= n_vocab:
        raise _bad(model_dir, f"tokenizer has token id {max(vocab.values())} but vocab_size is {n_vocab}")
    reverse = {i: t for t, i in vocab.items()}
    unk = model.get("unk_token")
    ranks = _merge_ranks(model) if spm_prefix is not None else {}

    tokens: list[str] = []
    toktypes: list[int] = []
    scores: list[float] = []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:  # embedding rows padded beyond the tokenizer
            token, kind = f"[PAD{i}]", TokenType.UNUSED
        elif i in added and token != unk:
            special = added[i].get("special") or _looks_special(token)
            kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
        elif token == unk:
            kind = TokenType.UNKNOWN
        elif spm_prefix is not None and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        tokens.append(token)
        toktypes.append(kind)
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores
        # highest; scoring each piece by the rank of the merge that makes it reproduces the
        # BPE merge order of tokenizer.json (which HF derived from those same scores).
        scores.append(-float(ranks[token]) if token in ranks else 0.0)

    if spm_prefix is not None:
        return TokenizerSpec("llama", tokens, toktypes, scores=scores, add_space_prefix=spm_prefix)
    return TokenizerSpec("gpt2", tokens, toktypes, pre=pre)


# --------------------------------------------------------------------------- writer


@dataclass
class ConvertResult:
    path: Path
    arch: str
    quant: str
    n_tensors: int
    details: dict[str, Any]


def convert_hf_dir(
    model_dir: Path, out_path: Path, quant: str = "f16", progress: ProgressFn | None = None
) -> ConvertResult:
    """Write the GGUF for `model_dir` to `out_path` (which the caller verifies and stores)."""
    # gguf-py logs its own progress and harmless warnings at INFO/WARNING; the store reports
    # progress itself and turns real problems into errors, so keep the terminal clean.
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        return _convert(Path(model_dir), Path(out_path), quant, progress)
    finally:
        gguf_log.setLevel(level)


def _convert(model_dir: Path, out_path: Path, quant: str, progress: ProgressFn | None) -> ConvertResult:
    import gguf

    if quant not in QUANTS:
        raise InvalidModelFile(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    cfg = read_hf_config(model_dir)
    weights = open_weights(model_dir)
    plan = plan_tensors(cfg, weights, quant, model_dir)
    tok = read_tokenizer(model_dir, cfg.n_vocab)
    # SpecialVocab is llama.cpp's own reader of merges, bos/eos/pad ids, add_bos/add_eos
    # (from tokenizer_config.json or the post-processor) and the chat template.
    special = gguf.SpecialVocab(model_dir, load_merges=tok.model == "gpt2", n_vocab=cfg.n_vocab)
    if tok.model == "gpt2" and not special.merges:
        raise _bad(model_dir, "tokenizer.json has no BPE merges")

    w = gguf.GGUFWriter(out_path, cfg.arch)
    try:
        _write_metadata(w, cfg, quant, model_dir.name)
        w.add_tokenizer_model(tok.model)
        if tok.model == "gpt2":
            w.add_tokenizer_pre(tok.pre)
        w.add_token_list(tok.tokens)
        if tok.scores is not None:
            w.add_token_scores(tok.scores)
            w.add_add_space_prefix(tok.add_space_prefix)
        w.add_token_types(tok.toktypes)
        special.add_to_gguf(w, quiet=True)

        for t in plan:
            if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                np_dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                w.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), t.nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()

        reporter = Reporter(progress, "converting", sum(t.nbytes for t in plan))
        for t, data in _converted(plan):
            assert data.nbytes == t.nbytes, t.name
            w.write_tensor_data(data)
            reporter.advance(t.nbytes)
        reporter.done()
    finally:
        w.close()
    details = {
        "converted_from": cfg.hf_arch,
        "tokenizer": tok.model if tok.pre is None else f"{tok.model}/{tok.pre}",
        "rope_scaling": _rope_type(cfg),
    }
    return ConvertResult(out_path, cfg.arch, quant, len(plan), details)


def _converted(plan: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    import gguf

    for t in plan:
        data = t.load()
        if data.shape != t.shape:
            raise InvalidModelFile(f"tensor {t.name} has shape {data.shape}, expected {t.shape}")
        if t.qtype == gguf.GGMLQuantizationType.F32:
            out = np.ascontiguousarray(data, dtype=np.float32)
        elif t.qtype == gguf.GGMLQuantizationType.F16:
            out = np.ascontiguousarray(data, dtype=np.float16)
        else:
            out = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), t.qtype)
        yield t, out


def _write_metadata(w: Any, cfg: HFConfig, quant: str, dir_name: str) -> None:
    import gguf

    w.add_name(dir_name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.n_vocab)
    w.add_rope_dimension_count(cfg.head_dim)
    # Explicit head_dim (Mistral NeMo: 128 with hidden 5120 / 32 heads) needs the key/value lengths.
    if cfg.head_dim != cfg.n_embd // cfg.n_head:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)

    rope_type = _rope_type(cfg)
    rs = cfg.rope_scaling or {}
    if rope_type in (None, "default", "llama3"):
        pass  # llama3 travels as the rope_freqs.weight tensor
    elif rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs.get("factor", 1.0)))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs.get("factor", 1.0)))
        w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings", cfg.n_ctx)))

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    w.add_file_type(file_type[quant])
    if quant == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


__all__ = ["ConvertResult", "convert_hf_dir", "permute_qk", "read_hf_config"]
