"""openherd.model and openherd.tokenizer without transformers: shapes, RoPE, caches,
sampling, loaders and their errors, and parity with real llama.cpp on tiny GGUFs.

Parity with Hugging Face transformers lives in test_model_parity.py.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import _permute_qk, tiny_vocab, write_tiny_gguf

from openherd.errors import ContextOverflow, InvalidModelFile, InvalidRequest, ModelNotFound
from openherd.model import (
    PRESETS,
    ModelArgs,
    Transformer,
    config_from_gguf,
    config_from_hf,
    config_to_hf,
    generate,
    hf_state_dict_to_ours,
    llama3_rope_factors,
    load_torch_model,
    logits_to_probs,
    ours_to_hf_state_dict,
    permute_qk,
    rope_inv_freq,
    sample,
    save_hf_dir,
    unpermute_qk,
)
from openherd.tokenizer import Tokenizer

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=256)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU every
    parallel region waits for a descheduled thread (SDPA calls went from 0.03 to 20 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with weights large enough that logits spread (greedy depends on the input)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.eval()


def greedy_full_forward(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding: the whole sequence through the model at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


# --------------------------------------------------------------------------- import hygiene


def test_import_openherd_does_not_import_torch():
    code = "import sys, openherd, openherd.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --------------------------------------------------------------------------- config


def test_model_args_derives_sizes_and_rejects_bad_shapes():
    a = ModelArgs(dim=64, n_heads=4)
    assert (a.n_kv_heads, a.head_dim, a.n_rep) == (4, 16, 1)
    assert ModelArgs(dim=64, n_heads=4, n_kv_heads=1).n_rep == 4
    with pytest.raises(InvalidModelFile, match="grouped"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(InvalidModelFile, match="RoPE scaling"):
        ModelArgs(dim=64, n_heads=4, rope_scaling="yarn")
    with pytest.raises(InvalidRequest, match="unknown model preset"):
        ModelArgs.from_name("llama-99b")


# Published parameter counts (model cards / safetensors metadata). Tied embeddings count once.
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "llama-3.2-1b": 1_235_814_400,
    "tinyllama-1.1b": 1_100_048_384,
    "qwen2-0.5b": 494_032_768,
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_have_published_parameter_counts(name):
    with torch.device("meta"):  # shapes only, no memory
        model = Transformer(ModelArgs.from_name(name))
    assert model.num_parameters() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    args = ModelArgs.from_name(name)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(args)))) == args


def test_config_from_hf_reads_transformers_4_and_5_rope_spellings():
    base = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, vocab_size=100)  # fmt: skip
    rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    v4 = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **rope}})
    v5 = config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **rope}})
    old = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **rope}})
    assert v4 == v5 == old
    assert (v5.rope_scaling, v5.rope_theta, v5.rope_factor, v5.rope_original_max_seq_len) == (
        "llama3",
        5e5,
        8.0,
        32,
    )
    with pytest.raises(InvalidModelFile, match="yarn"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(InvalidModelFile, match="model_type 'gemma'"):
        config_from_hf({**base, "model_type": "gemma"})
    with pytest.raises(InvalidModelFile, match="missing"):
        config_from_hf({"model_type": "llama"})


# --------------------------------------------------------------------------- RoPE


def test_llama3_rope_matches_llama_models_apply_scaling():
    """Checked against meta-llama/llama-models `apply_scaling`, transcribed in plain Python floats."""
    args = ModelArgs(dim=2048, n_heads=16, rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0,
                     rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=8192)  # fmt: skip
    expected = []
    for i in range(0, 128, 2):
        freq = 1.0 / (500000.0 ** (i / 128))
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            expected.append(freq)
        elif wavelen > 8192 / 1.0:
            expected.append(freq / 32.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * freq / 32.0 + smooth * freq)
    got = rope_inv_freq(args).double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    # All three bands are present, so the test exercises each branch.
    plain = rope_inv_freq(ModelArgs(dim=2048, n_heads=16, rope_theta=500000.0))
    ratio = (plain / got).tolist()
    assert min(ratio) == pytest.approx(1.0) and max(ratio) == pytest.approx(32.0)
    assert any(1.01 < r < 31.9 for r in ratio)


def test_explicit_rope_freq_factors_and_linear_scaling():
    plain = rope_inv_freq(ModelArgs(dim=64, n_heads=4))
    linear = rope_inv_freq(ModelArgs(dim=64, n_heads=4, rope_scaling="linear", rope_factor=4.0))
    torch.testing.assert_close(linear, plain / 4)
    factors = tuple(float(i + 1) for i in range(8))
    explicit = rope_inv_freq(ModelArgs(dim=64, n_heads=4, rope_freq_factors=factors))
    torch.testing.assert_close(explicit, plain / torch.tensor(factors))


def test_gguf_rope_freqs_are_recognised_as_llama3_scaling():
    md = {"general.architecture": "llama", "llama.embedding_length": 2048, "llama.attention.head_count": 32,
          "llama.block_count": 16, "llama.feed_forward_length": 8192, "llama.rope.freq_base": 500000.0}  # fmt: skip
    shapes = {"token_embd.weight": (128256, 2048)}
    factors = llama3_rope_factors(500000.0, 64, 32.0, 1.0, 4.0, 8192)  # Llama 3.2 1B
    args = config_from_gguf(md, shapes, np.float32(factors))  # as stored: float32
    preset = ModelArgs.from_name("llama-3.2-1b")
    assert (args.rope_scaling, args.rope_factor, args.rope_original_max_seq_len) == ("llama3", 32.0, 8192)
    torch.testing.assert_close(rope_inv_freq(args), rope_inv_freq(preset))
    odd = [f * 1.01 for f in factors]  # not Llama 3.1's formula: kept as explicit divisors
    assert config_from_gguf(md, shapes, odd).rope_freq_factors == tuple(odd)


def test_rope_frequencies_stay_fp32_in_a_bf16_model():
    model = random_model().to(torch.bfloat16)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16
    assert model.inv_freq(torch.device("cpu")).dtype == torch.float32


# --------------------------------------------------------------------------- names and layouts


def test_state_dict_names_round_trip_through_hf_names():
    for tie in (False, True):
        model = random_model(tie_embeddings=tie, qkv_bias=True, o_bias=True, mlp_bias=True)
        ours = model.state_dict()
        hf = ours_to_hf_state_dict(ours, model.args)
        assert "model.layers.1.self_attn.q_proj.bias" in hf and "model.layers.0.mlp.gate_proj.weight" in hf
        assert "model.layers.0.post_attention_layernorm.weight" in hf and "model.norm.weight" in hf
        assert ("lm_head.weight" in hf) is not tie
        back = hf_state_dict_to_ours(hf, model.args)
        assert back.keys() == ours.keys()
        assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_qk_permutation_is_llama_cpp_and_inverts():
    w = torch.randn(4 * 16, 64)
    b = torch.randn(4 * 16)
    assert torch.equal(permute_qk(w, 4), torch.from_numpy(_permute_qk(w.numpy(), 4)))
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert torch.equal(unpermute_qk(permute_qk(b, 4), 4), b)
    assert not torch.equal(permute_qk(w, 4), w)


# --------------------------------------------------------------------------- forward, caches, generation


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_heads": 1}, {"tie_embeddings": True, "qkv_bias": True}, {"sliding_window": 4},
     {"sliding_window": 3, "sliding_window_from_layer": 1}],
    ids=["gqa", "mqa", "tied-bias", "window", "window-from-layer-1"],
)  # fmt: skip
def test_kv_cache_generation_equals_full_forward_greedy(overrides):
    model = random_model(seed=1, **overrides)
    prompt = [5, 17, 3, 42, 8, 9]
    cached = generate(model, prompt, 20)
    assert cached == greedy_full_forward(model, prompt, 20)
    assert len(set(cached)) > 3  # a real continuation, not one token repeated


def test_sliding_window_limits_the_receptive_field():
    """With window w and L layers, position t sees back to t - L*(w-1) and no further."""
    w, layers, T = 4, 2, 12
    model = random_model(seed=2, sliding_window=w)
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(0))
    reach = layers * (w - 1)  # 6: the last position (11) depends on positions 5..11
    with torch.no_grad():
        base = model(ids)[0, -1]
        far, near = ids.clone(), ids.clone()
        far[0, T - 1 - reach - 1] = (far[0, T - 1 - reach - 1] + 1) % 97
        near[0, T - 1 - reach] = (near[0, T - 1 - reach] + 1) % 97
        assert torch.equal(model(far)[0, -1], base)
        assert not torch.allclose(model(near)[0, -1], base)
        # Shorter than the window, windowed attention is plain causal attention.
        full = random_model(seed=2)
        torch.testing.assert_close(model(ids[:, :w]), full(ids[:, :w]))


def test_batched_forward_matches_single_rows_and_logits_to_keep():
    model = random_model()
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(ids)
        assert batch.shape == (3, 10, 97)
        for i in range(3):
            torch.testing.assert_close(batch[i], model(ids[i : i + 1])[0])
        torch.testing.assert_close(model(ids, logits_to_keep=1), batch[:, -1:])


def test_training_forward_backward_reaches_every_parameter():
    model = random_model(tie_embeddings=True, qkv_bias=True, sliding_window=4).train()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_sampling_functions():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.9]]])
    assert sample(logits).tolist() == [[1]]  # temperature 0: greedy
    probs = logits_to_probs(logits[0, -1], temperature=1.0, top_k=2)
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs[0].item() == 0 and probs[2].item() == 0 and probs[1] > probs[3] > 0
    assert sample(logits, temperature=5.0, top_k=1).tolist() == [[1]]
    draws = [
        int(sample(logits, temperature=2.0, generator=torch.Generator().manual_seed(s))) for s in range(40)
    ]
    assert len(set(draws)) > 1  # really sampling
    again = [
        int(sample(logits, temperature=2.0, generator=torch.Generator().manual_seed(s))) for s in range(40)
    ]
    assert draws == again  # and reproducible with a seeded generator


def test_generate_stops_streams_and_checks_the_context():
    model = random_model(seed=3)
    full = generate(model, [1, 2, 3], 12)
    seen: list[int] = []
    stopped = generate(model, [1, 2, 3], 12, stop_ids={full[4]}, on_token=seen.append)
    assert stopped == full[: full.index(full[4]) + 1] and seen == stopped
    assert generate(model, [1, 2, 3], 0) == []
    with pytest.raises(ContextOverflow, match="context of 256"):
        generate(model, list(range(200)), 57)
    with pytest.raises(InvalidRequest, match="at least one prompt token"):
        generate(model, [], 5)
    seeded = [
        generate(model, [1, 2], 8, temperature=1.5, generator=torch.Generator().manual_seed(7)) for _ in "ab"
    ]
    assert seeded[0] == seeded[1]


# --------------------------------------------------------------------------- loaders


def test_hf_dir_and_gguf_of_the_same_model_give_the_same_logits(tiny_hf_dir, tiny_gguf):
    """tinymodels writes one model in both formats; the GGUF one has llama.cpp's Q/K permutation."""
    hf_model, hf_tok = load_torch_model(tiny_hf_dir)
    gg_model, gg_tok = load_torch_model(tiny_gguf)
    # GGUF stores the epsilon as float32; everything else must agree exactly.
    assert gg_model.args.norm_eps == pytest.approx(hf_model.args.norm_eps)
    assert hf_model.args == ModelArgs.from_dict(
        {**gg_model.args.to_dict(), "norm_eps": hf_model.args.norm_eps}
    )
    text = "<|im_start|>user\nThe herd counts 1234 llamas.<|im_end|>\n"
    ids = hf_tok.encode(text)
    assert ids == gg_tok.encode(text)
    with torch.no_grad():
        torch.testing.assert_close(
            gg_model(torch.tensor([ids])), hf_model(torch.tensor([ids])), atol=1e-5, rtol=1e-5
        )


def test_hf_dir_tokenizer(tiny_hf_dir, tmp_path):
    _, tok = load_torch_model(tiny_hf_dir)
    voc = tiny_vocab("bpe")
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (voc.bos_id, (voc.eos_id,), False)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template
    ids = tok.encode("<|im_start|>hi 🦙")
    assert ids[0] == voc.bos_id and tok.decode(ids) == "<|im_start|>hi 🦙"
    assert tok.decode(ids, skip_special=True) == "hi 🦙"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_hf_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert load_torch_model(bare)[1] is None


def test_save_hf_dir_round_trip(tmp_path):
    model = random_model(seed=4, tie_embeddings=True, qkv_bias=True, o_bias=True)
    save_hf_dir(model, tmp_path / "out", dtype=torch.float32, bos_token_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["bos_token_id"] == 1
    back, tok = load_torch_model(tmp_path / "out")
    assert tok is None and back.args == model.args
    assert back.output.weight is back.tok_embeddings.weight  # still tied after loading
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)


def test_dtype_and_device_arguments(tiny_hf_dir):
    model, _ = load_torch_model(tiny_hf_dir, device="cpu", dtype="bfloat16")
    assert model.output.weight.dtype == torch.bfloat16 and model.output.weight.device.type == "cpu"
    model, _ = load_torch_model(tiny_hf_dir)
    assert model.output.weight.dtype == torch.float32 or torch.cuda.is_available()
    with pytest.raises(InvalidRequest, match="unknown dtype"):
        load_torch_model(tiny_hf_dir, dtype="float8")


def test_sharded_safetensors_directory(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "sharded"
    shutil.copytree(tiny_hf_dir, d)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, d / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, _ = load_torch_model(d)
    whole, _ = load_torch_model(tiny_hf_dir)
    assert all(
        torch.equal(a, b)
        for a, b in zip(sharded.state_dict().values(), whole.state_dict().values(), strict=True)
    )

    index["weight_map"][names[0]] = "../escape.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidModelFile, match="bad shard"):
        load_torch_model(d)


def test_loader_errors_are_clear(tiny_hf_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_hf_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InvalidModelFile, match="never unpickles"):
        load_torch_model(pickled)

    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_hf_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(InvalidModelFile, match="no config.json"):
        load_torch_model(no_config)

    other = tmp_path / "other"
    shutil.copytree(tiny_hf_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(InvalidModelFile, match="unsupported model_type"):
        load_torch_model(other)

    wrong = tmp_path / "wrong-shape"
    shutil.copytree(tiny_hf_dir, wrong)
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(InvalidModelFile, match="shape"):
        load_torch_model(wrong)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_hf_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidModelFile, match="safetensors"):
        load_torch_model(corrupt)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidModelFile, match="neither a GGUF"):
        load_torch_model(text)
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00" * 4)
    with pytest.raises(InvalidModelFile):
        load_torch_model(bad_gguf)
    with pytest.raises(ModelNotFound, match="no such model file"):
        load_torch_model(tmp_path / "missing.gguf")


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(path, "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidModelFile, match="unsupported GGUF architecture 'phi2'"):
        load_torch_model(path)


def test_store_names_resolve_through_the_store(herd_home, tiny_gguf):
    from openherd.store import Store

    with pytest.raises(ModelNotFound, match="herd pull"):
        load_torch_model("no-such-model")
    Store().pull(str(tiny_gguf), name="tiny-torch")
    by_name, tok = load_torch_model("tiny-torch")
    by_path, _ = load_torch_model(tiny_gguf)
    assert tok is not None
    assert all(
        torch.equal(a, b)
        for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values(), strict=True)
    )


# --------------------------------------------------------------------------- parity with llama.cpp


def _llama(path: Path, **kw):
    import llama_cpp

    # f32 KV cache: llama.cpp's default f16 cache alone moves logits by ~1e-3.
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=1, verbose=False, type_k=0, type_v=0, **kw
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="llama"),
        dict(arch="llama", vocab="spm", n_head_kv=1),
        dict(arch="qwen2", tie_embeddings=True),
    ],
    ids=["llama-bpe-gqa", "llama-spm-mqa", "qwen2-tied"],
)
def test_logits_match_llama_cpp_on_tiny_gguf(tmp_path, kw):
    path = write_tiny_gguf(tmp_path / "m.gguf", **kw)
    llm = _llama(path, logits_all=True)
    model, tok = load_torch_model(path)
    ids = tok.encode("The keeper counts the herd: one, two, 3, 4 and 56789 llamas!")
    assert ids == llm.tokenize(
        b"The keeper counts the herd: one, two, 3, 4 and 56789 llamas!", add_bos=True, special=True
    )
    llm.eval(ids)
    ref = torch.from_numpy(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert generate(model, ids, 16) == _llama_greedy(llm, ids, 16)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            return out
    return out


def test_quantized_gguf_dequantizes_like_llama_cpp(tmp_path):
    """Our dequantized Q8_0 weights equal llama.cpp's own dequantization, bit for bit."""
    import llama_cpp

    q8 = write_tiny_gguf(tmp_path / "q8.gguf", dtype="q8_0")
    f32 = tmp_path / "f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 0, True, 1  # 0 = LLAMA_FTYPE_ALL_F32
    assert llama_cpp.llama_model_quantize(str(q8).encode(), str(f32).encode(), params) == 0
    ours, _ = load_torch_model(q8)
    ref, _ = load_torch_model(f32)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    exact, _ = load_torch_model(write_tiny_gguf(tmp_path / "exact.gguf", dtype="f32"))
    w, wq = exact.layers[0].feed_forward.w1.weight, ours.layers[0].feed_forward.w1.weight
    assert 0 < (w - wq).abs().max() < 0.02  # really quantized, and dequantized to the right scale


TOKENIZER_TEXTS = [
    "Hello world! The herd counts 12345 llamas.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>Hello</s> world <unk>",
    "ünïcödé 🦙 日本語 مرحبا",
    "I'm can't won't they'll we've",
    "",
    " ",
    "x" * 40,
]


@pytest.mark.parametrize("vocab", ["bpe", "spm"])
def test_gguf_tokenizer_matches_llama_cpp(tmp_path, vocab):
    import llama_cpp

    path = write_tiny_gguf(tmp_path / f"{vocab}.gguf", vocab=vocab)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    from openherd.gguf import read_gguf

    tok = Tokenizer.from_gguf_metadata(read_gguf(path, load_arrays=True).metadata)
    assert tok.add_bos is (vocab == "spm")
    for text in TOKENIZER_TEXTS:
        unparsed = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert tok.encode(text, add_special=False, parse_special=False) == unparsed, text
        for add_special in (False, True):
            ref = llm.tokenize(text.encode(), add_bos=add_special, special=True)
            assert tok.encode(text, add_special=add_special) == ref, (text, add_special)
        # llama-cpp-python drops SentencePiece's prefix space only after a BOS, as HF's
        # Llama tokenizer does, so compare decodes of the BOS-prefixed ids (the last `ref`).
        for special in (True, False):
            assert (
                tok.decode(ref, skip_special=not special) == llm.detokenize(ref, special=special).decode()
            ), text
        if vocab == "bpe":  # byte-level BPE is lossless
            assert tok.decode(tok.encode(text)) == text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_to_bf16_and_matches_cpu(tiny_gguf):
    gpu, tok = load_torch_model(tiny_gguf, device="cuda")
    cpu, _ = load_torch_model(tiny_gguf)
    assert gpu.output.weight.dtype == torch.bfloat16 and gpu.output.weight.is_cuda
    ids = tok.encode("The herd moved slowly across the high plain")
    with torch.no_grad():
        a = gpu(torch.tensor([ids], device="cuda")).float().cpu()
        b = cpu(torch.tensor([ids]))
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
    assert len(generate(gpu, ids, 8)) == 8
