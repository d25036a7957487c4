"""Hugging Face directory -> GGUF conversion, checked against the real thing:
llama.cpp loads the converted file, tokenizes exactly like the `tokenizers` library,
and its logits match transformers' forward pass on the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tinymodels import CHATML_TEMPLATE, tiny_vocab, write_tiny_hf_dir

from openherd.errors import InvalidModelFile
from openherd.gguf import read_gguf
from openherd.store import Store
from openherd.store.convert import llama3_rope_factors, read_hf_config

TEXTS = [
    "Hello world! The herd has 12345 llamas.",
    "  leading spaces, tabs\tand\n\nnewlines  ",
    "émoji 🦙 and 中文 round-trip",
    "it's what they'll do, isn't it?",
]
PROMPT = "The herd moved slowly across the high plain, and the llamas kept close to one another."


# --------------------------------------------------------------------------- helpers


def llama(path: str, f32_kv: bool = True):
    import llama_cpp

    # f32 KV cache for tight comparisons: llama.cpp's default f16 cache alone costs ~1e-3.
    kv = 0 if f32_kv else 1  # GGML_TYPE_F32 / GGML_TYPE_F16
    return llama_cpp.Llama(path, n_ctx=256, n_threads=2, logits_all=True, verbose=False, type_k=kv, type_v=kv)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    # `dtype=` is transformers 5's spelling; 4.x (pyproject allows >= 4.44) takes `torch_dtype=`.
    fp32 = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **fp32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def prompt_ids(model_dir: Path) -> list[int]:
    return hf_tokenizer(model_dir).encode(PROMPT, add_special_tokens=False).ids


def pull(model_dir: Path, quant: str = "f16", name: str | None = None):
    return Store().pull(str(model_dir), name=name, quant=quant)


def copy_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- parity


def test_llama_f32_matches_transformers_and_tokenizers(herd_home, tiny_hf_dir):
    m = pull(tiny_hf_dir, "f32")
    assert m.name == "tiny-llama:f32" and m.quantization == "F32" and m.architecture == "llama"
    assert m.source == f"hf-dir:{tiny_hf_dir.resolve()}"
    info = read_gguf(m.path, load_arrays=True)
    assert info.get("tokenizer.ggml.model") == "gpt2" and info.get("tokenizer.ggml.pre") == "smollm"
    assert info.chat_template == CHATML_TEMPLATE
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert info.get("tokenizer.ggml.add_bos_token") is False
    assert m.details["converted_from"] == "LlamaForCausalLM"

    llm = llama(m.path)
    tok = hf_tokenizer(tiny_hf_dir)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>\n"]:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == tok.encode(text, add_special_tokens=False).ids
        )

    ids = prompt_ids(tiny_hf_dir)
    np.testing.assert_allclose(cpp_logits(llm, ids), hf_logits(tiny_hf_dir, ids), atol=1e-4, rtol=0)


def test_llama_f16_default(herd_home, tiny_hf_dir):
    m = pull(tiny_hf_dir)
    assert m.name == "tiny-llama" and m.quantization == "F16"
    types = {t.name: t.type_name for t in read_gguf(m.path).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay f32
    ids = prompt_ids(tiny_hf_dir)
    # Measured 7.2e-3 with llama.cpp's AVX2 and AVX512 kernels alike: the fp16 rounding of weights
    # and activations, which no ISA changes (kernel order moves it by ~1e-7).
    np.testing.assert_allclose(cpp_logits(llama(m.path), ids), hf_logits(tiny_hf_dir, ids), atol=1e-2, rtol=0)


def test_llama_q8_0(herd_home, tiny_hf_dir):
    m = pull(tiny_hf_dir, "q8_0")
    assert m.name == "tiny-llama:q8_0" and m.quantization == "Q8_0"
    types = {t.name: t.type_name for t in read_gguf(m.path).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    ids = prompt_ids(tiny_hf_dir)
    got, ref = cpp_logits(llama(m.path), ids), hf_logits(tiny_hf_dir, ids)
    assert np.abs(got - ref).max() < 0.3  # 8-bit weights: close, not exact
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999


def test_qwen2_tied_f32(herd_home, tmp_path):
    src = write_tiny_hf_dir(tmp_path / "tiny-qwen", arch="qwen2", tie_embeddings=True, seed=3)
    m = pull(src, "f32")
    assert m.architecture == "qwen2"
    names = {t.name for t in read_gguf(m.path).tensors}
    assert "output.weight" not in names, "tied embeddings: llama.cpp reuses token_embd"
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    ids = prompt_ids(src)
    np.testing.assert_allclose(cpp_logits(llama(m.path), ids), hf_logits(src, ids), atol=1e-4, rtol=0)


def test_mistral_f32(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "tiny-mistral")
    edit_config(src, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    m = pull(src, "f32")
    assert m.architecture == "llama" and m.details["converted_from"] == "MistralForCausalLM"
    ids = prompt_ids(src)
    np.testing.assert_allclose(cpp_logits(llama(m.path), ids), hf_logits(src, ids), atol=1e-4, rtol=0)


def test_llama3_rope_scaling_writes_rope_freqs(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "tiny-llama31")
    # head_dim 16, theta 1e4: wavelengths 6..2e4; with an "original" context of 256 the
    # high (< 64), blended (64..256) and scaled (> 256) bands are all exercised.
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}  # fmt: skip
    edit_config(src, rope_scaling=rope)
    m = pull(src, "f32")
    info = read_gguf(m.path)
    factors = llama3_rope_factors(read_hf_config(src))
    assert info.tensor("rope_freqs.weight").shape == (8,)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[3] < 8.0

    ids = prompt_ids(src)
    got = cpp_logits(llama(m.path), ids)
    np.testing.assert_allclose(got, hf_logits(src, ids), atol=1e-4, rtol=0)
    unscaled = hf_logits(tiny_hf_dir, ids)
    assert np.abs(got - unscaled).max() > 1e-2, (
        "the scaling must change the output for this test to mean anything"
    )


def test_bf16_checkpoint(herd_home, tiny_hf_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = copy_dir(tiny_hf_dir, tmp_path / "tiny-bf16")
    weights = load_file(str(src / "model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) for k, v in weights.items()},
        str(src / "model.safetensors"),
        metadata={"format": "pt"},
    )
    edit_config(src, torch_dtype="bfloat16")
    m = pull(src, "f32")
    ids = prompt_ids(src)
    # transformers upcasts bf16 -> f32 exactly; so must we.
    np.testing.assert_allclose(cpp_logits(llama(m.path), ids), hf_logits(src, ids), atol=1e-4, rtol=0)


def test_sharded_checkpoint_converts_identically(herd_home, tiny_hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    single = copy_dir(tiny_hf_dir, tmp_path / "a" / "tiny")
    sharded = copy_dir(tiny_hf_dir, tmp_path / "b" / "tiny")
    weights = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(sharded / fname))
        weight_map.update({k: fname for k in keys})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    a = pull(single, "f16", name="single")
    b = pull(sharded, "f16", name="sharded")
    assert a.sha256 == b.sha256


def test_padded_vocab(herd_home, tiny_hf_dir, tmp_path):
    """Embedding rows beyond the tokenizer (Qwen2 pads to a multiple of 128) become UNUSED tokens."""
    from safetensors.numpy import load_file, save_file

    src = copy_dir(tiny_hf_dir, tmp_path / "tiny-padded")
    w = load_file(str(src / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        w[k] = np.concatenate([w[k], np.zeros((32, w[k].shape[1]), np.float32)])
    save_file(w, str(src / "model.safetensors"))
    edit_config(src, vocab_size=544)
    m = pull(src, "f32")
    info = read_gguf(m.path, load_arrays=True)
    tokens, types = info.get("tokenizer.ggml.tokens"), info.get("tokenizer.ggml.token_type")
    assert len(tokens) == 544 and tokens[543] == "[PAD543]" and types[543] == 5  # UNUSED
    ids = prompt_ids(src)
    np.testing.assert_allclose(cpp_logits(llama(m.path), ids), hf_logits(src, ids), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- tokenizers


def test_sentencepiece_style_tokenizer(herd_home, tmp_path):
    src = write_tiny_hf_dir(tmp_path / "tiny-spm", vocab="spm")
    m = pull(src, "f32")
    info = read_gguf(m.path, load_arrays=True)
    assert info.get("tokenizer.ggml.model") == "llama"
    assert info.get("tokenizer.ggml.add_bos_token") is True
    voc = tiny_vocab("spm")
    types = info.get("tokenizer.ggml.token_type")
    assert list(types[:4]) == [2, 3, 3, 6]  # UNKNOWN <unk>, CONTROL <s> </s>, BYTE <0x00>

    llm = llama(m.path)
    tok = hf_tokenizer(src)
    for text in [*TEXTS, "a", "The herd moved slowly"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text).ids, text
    ids = tok.encode(PROMPT).ids
    assert ids[0] == voc.bos_id
    np.testing.assert_allclose(cpp_logits(llm, ids), hf_logits(src, ids), atol=1e-4, rtol=0)


LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def test_llama3_style_pre_tokenizer(herd_home, tiny_hf_dir, tmp_path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    src = copy_dir(tiny_hf_dir, tmp_path / "tiny-l3tok")
    voc = tiny_vocab("bpe")
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(voc.tokens)}, merges=voc.merges, ignore_merges=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in voc.tokens[:3]])
    tok.save(str(src / "tokenizer.json"))

    m = pull(src, "f32")
    assert read_gguf(m.path).get("tokenizer.ggml.pre") == "llama-bpe"
    llm = llama(m.path)
    for text in [*TEXTS, "1234567 digits in threes", "line\r\n\r\nbreaks"]:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=False)
            == tok.encode(text, add_special_tokens=False).ids
        ), text


def test_unknown_pre_tokenizer_is_refused(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "tiny-ws")
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidModelFile, match="unsupported pre-tokenizer"):
        pull(src)


# --------------------------------------------------------------------------- refusals


def assert_refused(src: Path, needle: str, home: Path) -> None:
    with pytest.raises(InvalidModelFile) as e:
        pull(src)
    assert needle in e.value.message and "\n" not in e.value.message
    assert not (home / "models").exists() or not list((home / "models").iterdir())
    blobs = home / "blobs"
    assert not blobs.exists() or not list(blobs.iterdir()), "no blob and no partial may remain"


def test_pickle_only_checkpoint_is_refused(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "pickled")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    assert_refused(src, "never unpickles", herd_home)


def test_unsupported_architecture(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "gpt")
    edit_config(src, architectures=["GPT2LMHeadModel"])
    assert_refused(src, "unsupported architecture 'GPT2LMHeadModel'", herd_home)


def test_unsupported_rope_scaling(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "dyn")
    edit_config(src, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert_refused(src, "rope_scaling type 'dynamic'", herd_home)


def test_missing_tensor(herd_home, tiny_hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = copy_dir(tiny_hf_dir, tmp_path / "holey")
    w = load_file(str(src / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(src / "model.safetensors"))
    assert_refused(src, "missing tensor blk.1.ffn_up.weight", herd_home)


def test_shapes_must_match_config(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "misfit")
    edit_config(src, intermediate_size=96)
    assert_refused(src, "has shape [64, 128], config.json implies [64, 96]", herd_home)


def test_hostile_safetensors_header(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "hostile")
    (src / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    assert_refused(src, "header length is larger than the file", herd_home)


def test_safetensors_offsets_out_of_file(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "offsets")
    header = json.dumps(
        {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 1 << 30]}}
    ).encode()
    (src / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 256)
    assert_refused(src, "invalid shape or offsets", herd_home)


def test_index_cannot_point_outside_the_directory(herd_home, tiny_hf_dir, tmp_path):
    src = copy_dir(tiny_hf_dir, tmp_path / "escape")
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../../elsewhere.safetensors"}})
    )
    assert_refused(src, "outside the directory", herd_home)
