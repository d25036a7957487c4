"""Take a model anywhere: llama.cpp LoRA adapters, merged GGUF, merged Hugging Face
safetensors, and PEFT adapters.

    write_adapter_gguf(model, lora, path, arch)   LoRA factors -> a GGUF llama.cpp applies at load
    read_adapter_gguf(path, args)                 ... and back (no pickle anywhere)
    load_tuned(name)                              store model (base + adapter) -> torch model with LoRA
    export_gguf / export_safetensors / export_peft
    export_model(name, fmt, out)                  what `herd export` runs

Two layouts meet here. Hugging Face and openherd.model rotate the two halves of each
attention head (``rotate_half``); llama.cpp's llama architecture rotates adjacent
pairs, so ``convert_hf_to_gguf.py`` permutes the rows of Q and K (``LlamaModel.permute``).
Whatever goes into a llama-arch GGUF is therefore permuted: merged attn_q / attn_k
weights, and for adapters the *rows of lora_b* only, because (B A) with B's rows
permuted is exactly the permuted update and A acts on the input side, which the
permutation does not touch. That is what ``convert_lora_to_gguf.py`` does too (its
``LoraTorchTensor.reshape/permute`` move B and leave A). Qwen2 uses NEOX rotation in
llama.cpp and is stored unpermuted.

Adapter GGUF layout (llama.cpp ``llama_adapter_lora_init``): ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (f32), ``general.architecture`` equal to
the base's, and per adapted weight ``blk.N.attn_q.weight.lora_a`` with ne = [in, r]
(numpy (r, in)) and ``.lora_b`` with ne = [r, out] (numpy (out, r)). llama.cpp scales
the update by alpha / r, r read from the tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidModelFile, InvalidRequest
from ..model import ModelArgs, Transformer, load_torch_model, permute_qk, save_hf_dir, unpermute_qk
from .lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_modules, unwrap_lora

log = logging.getLogger("openherd.tune")

__all__ = [
    "FORMATS",
    "GGUF_QUANTS",
    "export_gguf",
    "export_model",
    "export_peft",
    "export_safetensors",
    "gguf_arch",
    "load_tuned",
    "read_adapter_gguf",
    "write_adapter_gguf",
]

FORMATS = ("gguf", "safetensors", "peft")
GGUF_QUANTS = ("f16", "q8_0", "q4_0", "f32")

# Our module name inside a block -> llama.cpp tensor stem, and -> the HF module name.
_GGUF_MODULES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}  # fmt: skip
_HF_MODULES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}  # fmt: skip
_GGUF_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
               "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}  # fmt: skip


def gguf_arch(args: ModelArgs) -> str:
    """GGUF general.architecture for a model: Mistral runs on llama.cpp's llama graph."""
    return "qwen2" if args.arch == "qwen2" else "llama"


def _permutes_qk(args: ModelArgs) -> bool:
    return gguf_arch(args) == "llama"


def _split_name(name: str) -> tuple[int, str]:
    """'layers.3.attention.wq' -> (3, 'attention.wq')."""
    _, idx, rest = name.split(".", 2)
    return int(idx), rest


# --------------------------------------------------------------------------- adapter GGUF


def write_adapter_gguf(model: Transformer, lora: LoRAConfig, path: str | Path, *, name: str = "") -> Path:
    """Write the model's LoRA factors as a llama.cpp adapter GGUF (f32), atomically."""
    import gguf

    args = model.args
    path = Path(path)
    with _gguf_file(path, gguf_arch(args)) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.alpha))
        if name:
            w.add_name(name)
        # Informational (llama.cpp ignores unknown keys): what produced this adapter.
        w.add_uint32("openherd.lora.rank", lora.rank)
        w.add_float32("openherd.lora.dropout", float(lora.dropout))
        for mod_name, m in lora_modules(model):
            layer, rest = _split_name(mod_name)
            stem = f"blk.{layer}.{_GGUF_MODULES[rest]}.weight"
            a = m.lora_a.detach().float().cpu()  # (r, in)
            b = m.lora_b.detach().float().cpu()  # (out, r)
            if _permutes_qk(args) and rest in ("attention.wq", "attention.wk"):
                b = permute_qk(b, args.n_heads if rest == "attention.wq" else args.n_kv_heads)
            w.add_tensor(f"{stem}.lora_a", np.ascontiguousarray(a.numpy()))
            w.add_tensor(f"{stem}.lora_b", np.ascontiguousarray(b.numpy()))
    return path


@contextmanager
def _gguf_file(path: Path, arch: str) -> Iterator[Any]:
    """A ``gguf.GGUFWriter`` whose file appears at ``path`` whole or not at all.

    The block adds metadata and tensors; on leaving it the file is written to a hidden
    temporary name next to ``path``, fsynced and renamed over it, so a reader (llama.cpp
    loading the store, a second export) never sees half a file and a crash leaves the
    old one. If the block raises, the temporary file is removed."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        yield w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def _read_gguf_arrays(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, {name: float32 array in (out, in) order}); the header is validated first."""
    from ..gguf import read_gguf
    from ..model import dequantize_gguf_tensor

    info = read_gguf(path, load_arrays=True)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return info.metadata, {t.name: dequantize_gguf_tensor(mm, t) for t in info.tensors}


def read_adapter_gguf(path: str | Path, args: ModelArgs) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """(LoRAConfig, {'layers.N.attention.wq.lora_a': (r, in), ...}) in openherd/HF layout.

    The file is validated by openherd.gguf and its tensors read through numpy: no pickle.
    """
    md, arrays = _read_gguf_arrays(path)
    label = Path(path).name
    if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
        raise InvalidModelFile(f"{label} is not a LoRA adapter GGUF (general.type/adapter.type)")
    if md.get("general.architecture") != gguf_arch(args):
        raise InvalidModelFile(
            f"{label} is an adapter for a {md.get('general.architecture')!r} model, not {gguf_arch(args)!r}"
        )
    inverse = {v: k for k, v in _GGUF_MODULES.items()}
    sd: dict[str, Tensor] = {}
    targets: set[str] = set()
    rank = None
    for tname, arr in arrays.items():
        stem, _, ab = tname.rpartition(".")
        parts = stem.split(".")
        if ab not in ("lora_a", "lora_b") or len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight":
            raise InvalidModelFile(f"{label}: unsupported adapter tensor {tname!r}")
        ours = inverse.get(parts[2])
        if ours is None or not parts[1].isdigit() or ours in ("attention_norm", "ffn_norm"):
            raise InvalidModelFile(f"{label}: adapter tensor {tname!r} targets no linear layer of the model")
        t = torch.from_numpy(np.ascontiguousarray(arr)).float()
        if ab == "lora_b" and _permutes_qk(args) and ours in ("attention.wq", "attention.wk"):
            t = unpermute_qk(t, args.n_heads if ours == "attention.wq" else args.n_kv_heads)
        r = t.shape[0] if ab == "lora_a" else t.shape[1]
        if rank is not None and r != rank:
            raise InvalidModelFile(f"{label}: adapters of different ranks ({rank} and {r}) are not supported")
        rank = r
        targets.add(ours.split(".")[1])
        sd[f"layers.{parts[1]}.{ours}.{ab}"] = t
    if rank is None:
        raise InvalidModelFile(f"{label} holds no LoRA tensors")
    alpha = float(md.get("adapter.lora.alpha") or 0.0) or float(rank)  # llama.cpp: alpha 0 means scale 1
    dropout = float(md.get("openherd.lora.dropout", 0.0))
    order = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    return LoRAConfig(rank=int(rank), alpha=alpha, dropout=dropout, targets=tuple(t for t in order if t in targets)), sd


# --------------------------------------------------------------------------- loading a tuned model


def load_tuned(name_or_path: str, *, device=None, dtype=None):
    """(model with LoRA modules (unmerged), tokenizer, manifest) for a store model.

    A tuned model is its base GGUF (dequantized by openherd.model) plus the adapter GGUF;
    a plain model comes back without LoRA modules.
    """
    from ..store import Store

    manifest = Store().resolve(name_or_path)
    model, tok = load_torch_model(manifest.path, device=device, dtype=dtype)
    if manifest.adapter:
        lora, sd = read_adapter_gguf(manifest.adapter, model.args)
        apply_lora(model, lora)
        load_lora_state_dict(model, {k: v.to(model.output.weight.device) for k, v in sd.items()})
    model.eval()
    return model, tok, manifest


# --------------------------------------------------------------------------- merged GGUF


def _quant_type(name: str, shape: tuple[int, ...], quant: str):
    """GGML type for one tensor: 1-D stays F32 (norms, biases; as llama.cpp's converters),
    matrices take the requested type when their rows split into whole blocks."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or quant == "f32":
        return Q.F32
    if quant == "f16":
        return Q.F16
    want = Q.Q8_0 if quant == "q8_0" else Q.Q4_0
    # q4_0 keeps the embedding / output projection at 8 bits: they are the most
    # quantization-sensitive matrices (llama.cpp's Q4_0 preset uses Q6_K for output).
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        want = Q.Q8_0
    block = GGML_QUANT_SIZES[want][0]
    return want if shape[-1] % block == 0 else Q.F16


def _gguf_tensors(model: Transformer) -> list[tuple[str, Tensor]]:
    """Merged weights under llama.cpp names, Q/K permuted for the llama architecture."""
    args = model.args
    out: list[tuple[str, Tensor]] = []
    for name, t in model.state_dict().items():
        stem, _, kind = name.rpartition(".")
        if stem in _GGUF_TOP:
            if stem == "output" and args.tie_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            out.append((f"{_GGUF_TOP[stem]}.{kind}", t))
            continue
        layer, rest = _split_name(stem)
        if _permutes_qk(args) and rest in ("attention.wq", "attention.wk"):
            t = permute_qk(t, args.n_heads if rest == "attention.wq" else args.n_kv_heads)
        out.append((f"blk.{layer}.{_GGUF_MODULES[rest]}.{kind}", t))
    return out


# Keys the writer sets itself, or that describe the old tensors.
_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.name",
              "general.alignment"}  # fmt: skip


def _copy_metadata(w: Any, base_gguf: Path) -> None:
    """Every key-value of the base GGUF (tokenizer, chat template, hyperparameters) with its exact type."""
    import gguf

    from ..gguf import read_gguf

    read_gguf(base_gguf)  # validated before gguf-py memory-maps it
    reader = gguf.GGUFReader(base_gguf)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIP_KEYS:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) > 2:
                log.warning("skipping nested-array metadata %s", key)
                continue
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)


def _base_tensor(path: Path, name: str) -> np.ndarray | None:
    from ..gguf import read_gguf
    from ..model import dequantize_gguf_tensor

    info = read_gguf(path)
    t = info.tensor(name)
    return dequantize_gguf_tensor(np.memmap(path, dtype=np.uint8, mode="r"), t) if t is not None else None


def export_gguf(model: Transformer, base_gguf: str | Path, out: str | Path, *, quant: str = "f16", name: str = "") -> Path:
    """A standalone GGUF of the model with its adapters merged (in place): tokenizer, chat
    template and hyperparameters copied from the base GGUF."""
    import gguf

    if quant not in GGUF_QUANTS:
        raise InvalidRequest(f"unknown --quant {quant!r}; choose one of {', '.join(GGUF_QUANTS)}", param="quant")
    unwrap_lora(model)
    out = Path(out)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]  # fmt: skip
    with _gguf_file(out, gguf_arch(model.args)) as w:
        if name:
            w.add_name(name)
        w.add_file_type(int(file_type))
        if quant in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _copy_metadata(w, Path(base_gguf))
        tensors = _gguf_tensors(model)
        # Llama 3.1 files carry their RoPE scaling as a tensor: keep the base's as it is.
        freqs = _base_tensor(Path(base_gguf), "rope_freqs.weight")
        if freqs is not None:
            tensors.append(("rope_freqs.weight", torch.from_numpy(freqs)))
        for tname, t in tensors:
            arr = t.detach().float().cpu().numpy()
            qtype = _quant_type(tname, arr.shape, quant)
            if qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(tname, arr.astype(np.float16))
            else:
                w.add_tensor(tname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    return out


# --------------------------------------------------------------------------- merged safetensors


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer(tok: Any, out: Path, max_len: int) -> dict[str, Any]:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json from openherd's Tokenizer
    (rebuilt from GGUF metadata exactly as llama.cpp tokenizes). Returns config.json extras."""
    tok.backend.save(str(out / "tokenizer.json"))
    specials: dict[str, str] = {}
    if tok.bos_id is not None:
        specials["bos_token"] = tok.bos_token
    if tok.eos_id is not None:
        specials["eos_token"] = tok.eos_token
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(tok.add_bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        **specials,
    }
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "special_tokens_map.json", specials)
    extra: dict[str, Any] = {}
    if tok.bos_id is not None:
        extra["bos_token_id"] = tok.bos_id
    if tok.eos_ids:
        extra["eos_token_id"] = list(tok.eos_ids) if len(tok.eos_ids) > 1 else tok.eos_ids[0]
    _write_json(out / "generation_config.json", {**extra, "_from_model_config": False})
    return extra


def export_safetensors(model: Transformer, tok: Any, out: str | Path, *, dtype: str = "float32") -> Path:
    """A merged Hugging Face directory: config.json, model.safetensors and tokenizer files.
    Merges `model`'s adapters in place."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise InvalidRequest(f"unknown --dtype {dtype!r}; choose float32, bfloat16 or float16", param="dtype")
    out = Path(out)
    _fresh_dir(out)
    unwrap_lora(model)
    extra = write_hf_tokenizer(tok, out, model.args.max_seq_len) if tok is not None else {}
    save_hf_dir(model, out, dtype=dtypes[dtype], **extra)
    return out


# --------------------------------------------------------------------------- PEFT


def export_peft(model: Transformer, lora: LoRAConfig, out: str | Path, *, base_model_name_or_path: str) -> Path:
    """adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained."""
    from safetensors.torch import save_file

    out = Path(out)
    _fresh_dir(out)
    tensors: dict[str, Tensor] = {}
    for mod_name, m in lora_modules(model):
        layer, rest = _split_name(mod_name)
        prefix = f"base_model.model.model.layers.{layer}.{_HF_MODULES[rest]}"
        tensors[f"{prefix}.lora_A.weight"] = m.lora_a.detach().float().cpu().contiguous()  # (r, in)
        tensors[f"{prefix}.lora_B.weight"] = m.lora_b.detach().float().cpu().contiguous()  # (out, r)
    if not tensors:
        raise InvalidRequest("this model has no LoRA adapter to export as PEFT; use --format safetensors")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(_HF_TARGETS[t] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    })  # fmt: skip
    return out


def _fresh_dir(out: Path) -> None:
    """Create `out`; refuse to write into a non-empty directory (never clobber someone's files)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequest(f"{out} already exists and is not an empty directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- herd export


def export_model(name: str, fmt: str, out: str | Path, *, quant: str = "f16", dtype: str = "float32",
                 base_model_id: str | None = None) -> Path:  # fmt: skip
    """What `herd export` does: load NAME (base + adapter) on CPU in fp32 and write `fmt`."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}", param="format")
    out = Path(out).expanduser()
    if fmt == "gguf" and out.is_dir():
        raise InvalidRequest(f"--out {out} is a directory; give a file name ending in .gguf", param="out")
    model, tok, manifest = load_tuned(name, device="cpu", dtype=torch.float32)
    if fmt == "gguf":
        return export_gguf(model, manifest.path, out, quant=quant, name=manifest.name or Path(manifest.path).stem)
    if fmt == "safetensors":
        return export_safetensors(model, tok, out, dtype=dtype)
    if not manifest.adapter:
        raise InvalidRequest(f"{name} is not a LoRA-tuned model; --format peft needs an adapter (herd tune)")
    lora, _ = read_adapter_gguf(manifest.adapter, model.args)
    base_id = base_model_id or _base_model_id(manifest)
    return export_peft(model, lora, out, base_model_name_or_path=base_id)


def _base_model_id(manifest: Any) -> str:
    """Where PEFT should find the base: the HF directory it was converted from, when known."""
    src = manifest.details.get("base_source") or ""
    if isinstance(src, str) and src.startswith("hf-dir:"):
        return src[len("hf-dir:") :]
    return manifest.base or manifest.name
