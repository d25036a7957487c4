"""openherd.model against the references: Hugging Face transformers and llama.cpp.

Fast tests build tiny random transformers models (hidden 64, 2-3 layers) covering
every variant the torch model claims -- Llama 3.1 RoPE scaling over sequences
longer than its original context, GQA, MQA, tied and untied embeddings, linear
RoPE scaling, attention/MLP biases, Qwen2 (biases, per-layer sliding window),
Mistral (sliding window shorter than the sequence) -- save them with
save_pretrained, and check in fp32 that our loader gives the same logits, the same
greedy continuation with the KV cache, and the same logits again after a round
trip through a GGUF written the way llama.cpp's converter writes it (Q/K
permutation, rope_freqs), which llama.cpp itself also runs.

The llama.cpp numerics emulation (load_gguf(..., emulate="llama.cpp")) is checked
bit for bit against llama.cpp itself: its activation quantizers against independent
references, then whole models (tiny ones quantized by llama.cpp, and the GGUF round-trip
cases above) whose logits must equal llama.cpp's exactly, prefill and cached decoding.
Those run the kernels of the ISA the installed llama.cpp reports (llama_cpp_isa: AVX2 or
AVX512); the other ISA's float kernels are checked without llama.cpp, against ports of
ggml's C code and values recorded from it.

Slow tests use the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tinymodels import tiny_vocab

from openherd.errors import InvalidRequest
from openherd.model import (
    GGML_EXACT_TYPES,
    LLAMA_CPP_ISAS,
    LlamaCppLinear,
    LlamaCppRMSNorm,
    dequantize_gguf_tensor,
    emulate_llama_cpp,
    generate,
    ggml_expf,
    ggml_swiglu,
    gguf_block_quants,
    llama_cpp_isa,
    load_gguf,
    load_torch_model,
    permute_qk,
    quantize_q8_0,
    quantize_q8_1,
    quantize_q8_K,
    save_hf_dir,
)

VOCAB = len(tiny_vocab("bpe"))  # 512: the tiny byte-level vocabulary, so llama.cpp can load our GGUFs


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU every
    parallel region waits for a descheduled thread (SDPA calls went from 0.03 to 20 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Case:
    name: str
    arch: str  # llama | qwen2 | mistral
    config: dict = field(default_factory=dict)
    seq: int = 40  # tokens in the parity forward
    gguf: bool = True  # False: GGUF cannot express it (llama.cpp's llama/qwen2 archs have no sliding window)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip

CASES = [
    # Llama 3.1: scaled RoPE evaluated at positions up to 80, past original_max_position_embeddings=32.
    Case("llama3-scaled-gqa", "llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE), seq=80),
    # Llama 3.2 / SmolLM2 shape: tied embeddings; MQA; linear RoPE scaling.
    Case(
        "llama-tied-mqa-linear",
        "llama",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),  # fmt: skip
    # Llama 2 shape (MHA) with every optional bias switched on.
    Case("llama2-mha-bias", "llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    Case(
        "qwen2-bias-tied",
        "qwen2",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),  # fmt: skip
    # Qwen2 with a sliding window on layers >= max_window_layers only.
    Case(
        "qwen2-window-layer2",
        "qwen2",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        ),
        gguf=False,
    ),  # fmt: skip
    # Mistral v0.1: 40 tokens against a 16-token window, so the window really cuts.
    Case("mistral-window", "mistral", dict(num_key_value_heads=2, sliding_window=16), gguf=False),
]


# pyproject allows transformers >= 4.44. 5.x spells RoPE as one `rope_parameters` dict (theta
# inside) and loads with `dtype=`; 4.x takes `rope_theta` + `rope_scaling` (None: default RoPE)
# and `torch_dtype=` (its from_pretrained hands an unknown `dtype` to the model's __init__).
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
HF_FP32 = {"dtype": torch.float32} if TRANSFORMERS_5 else {"torch_dtype": torch.float32}


def rope_config(config: dict) -> dict:
    """Case.config (5.x spelling) in the installed transformers' spelling."""
    if TRANSFORMERS_5 or "rope_parameters" not in config:
        return config
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    return config


def hf_drops_window(case: Case) -> bool:
    """Whether the installed transformers computes this case without its sliding window:
    Qwen2's SDPA/eager attention ignores it before 4.51 (measured on 4.44.2, 4.46.3, 4.48.3 and
    4.50.3: max |logit diff| 1.24 against the windowed model, the same as with no window; 4.57.3
    and 5.x apply it; 4.51-4.56 not measured)."""
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return case.arch == "qwen2" and "sliding_window" in case.config and (major, minor) < (4, 51)


def hf_rope(cfg) -> dict:
    """A config's RoPE as a 5.x rope_parameters dict, whichever transformers made the config."""
    if getattr(cfg, "rope_parameters", None):
        return dict(cfg.rope_parameters)
    return {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}


def hf_config(case: Case):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)  # fmt: skip
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }
    return cls[case.arch](**{**base, **rope_config(case.config)})


def build_hf_model(case: Case, seed: int = 0):
    """A random transformers model whose weights are large enough that logits spread widely.

    HF's default init (std 0.02) gives near-uniform logits where almost any bug passes
    atol=1e-4; N(0, 1/fan_in) matrices and norms around 1 make every term count.
    """
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}  # fmt: skip
    torch.manual_seed(seed)
    model = cls[case.arch](hf_config(case))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return model.eval()


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case_models(request, tmp_path_factory):
    """(case, HF model, its save_pretrained directory, our model loaded from it)."""
    case = request.param
    hf = build_hf_model(case)
    path = tmp_path_factory.mktemp(case.name)
    hf.save_pretrained(path, safe_serialization=True)
    ours, tok = load_torch_model(path, device="cpu", dtype=torch.float32)
    assert tok is None  # no tokenizer.json was written
    return case, hf, path, ours


def prompt_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- transformers parity


def test_logits_match_transformers(case_models):
    case, hf, _, ours = case_models
    ids = prompt_ids(case.seq)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert ref.std() > 0.5  # logits spread: a wrong RoPE band or mask would show
    if hf_drops_window(case):  # the reference is the unwindowed model: ours must differ from it
        assert (got - ref).abs().max() > 0.1
        return
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_cached_greedy_generation_matches_transformers_and_full_forward(case_models):
    case, hf, _, ours = case_models
    ids = prompt_ids(12, seed=1)
    n = 30  # 42 positions: past the Mistral/Qwen2 windows and Llama 3.1's original 32
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, 12:].tolist()  # fmt: skip
        full = ids[0].tolist()
        for _ in range(n):  # greedy with a full forward per step, no cache
            full.append(int(ours(torch.tensor([full]))[0, -1].argmax()))
    cached = generate(ours, ids[0].tolist(), n)
    assert cached == full[12:]
    assert (cached != ref) if hf_drops_window(case) else (cached == ref)


def test_export_loads_in_transformers(case_models, tmp_path):
    """save_hf_dir (ours_to_hf_state_dict + config_to_hf) writes what transformers reads back."""
    case, hf, _, ours = case_models
    save_hf_dir(ours, tmp_path / "export", dtype=torch.float32)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", **HF_FP32).eval()
    assert type(back) is type(hf)
    ids = prompt_ids(case.seq, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- GGUF round trip


def llama3_rope_factors(theta: float, dim: int, rope: dict) -> list[float]:
    """rope_freqs.weight exactly as convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors` computes it."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def write_gguf_like_llama_cpp(hf, path: Path) -> Path:
    """An f32 GGUF of a transformers model, written the way convert_hf_to_gguf.py writes it.

    Llama-arch Q/K rows (weights and biases) get `LlamaModel.permute`; Llama 3.1
    scaling becomes a rope_freqs.weight tensor, linear scaling two metadata keys.
    The tiny vocabulary of tinymodels is included so llama.cpp can load the file.
    """
    import gguf

    cfg = hf.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[cfg.model_type]
    rope = hf_rope(cfg)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] == "llama3":  # lets the loader name the scaling (llama.cpp reads it for YaRN only)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])

    voc = tiny_vocab("bpe")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(voc.tokens)
    w.add_token_types(voc.token_types)
    w.add_token_merges([f"{a} {b}" for a, b in voc.merges])
    w.add_bos_token_id(voc.bos_id)
    w.add_eos_token_id(voc.eos_id)
    w.add_add_bos_token(False)

    tensors: dict[str, torch.Tensor] = {}
    if rope["rope_type"] == "llama3":
        tensors["rope_freqs.weight"] = torch.tensor(llama3_rope_factors(rope["rope_theta"], head_dim, rope))
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = t
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = t
        elif name == "lm_head.weight":
            tensors["output.weight"] = t
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module == "self_attn.q_proj":
                t = permute_qk(t, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                t = permute_qk(t, cfg.num_key_value_heads)
            tensors[f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"] = t
    for name, t in tensors.items():
        w.add_tensor(name, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_CASES = [c for c in CASES if c.gguf]


@pytest.mark.parametrize("case_models", GGUF_CASES, ids=[c.name for c in GGUF_CASES], indirect=True)
def test_gguf_round_trip_and_llama_cpp(case_models, tmp_path):
    """HF model -> GGUF (llama.cpp layout) -> our GGUF loader: same logits as the HF directory.

    This validates the Q/K un-permutation and rope_freqs handling; llama.cpp running the
    same file validates that the file really is in llama.cpp's layout.
    """
    case, hf, _, ours = case_models
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf")
    from_gguf, tok = load_torch_model(path, device="cpu", dtype=torch.float32)
    assert tok is not None and tok.vocab_size == VOCAB
    # Same config, Llama 3.1 scaling recognised from rope_freqs; GGUF stores eps as float32.
    assert from_gguf.args.norm_eps == pytest.approx(ours.args.norm_eps)
    assert from_gguf.args == ours.args.from_dict({**ours.args.to_dict(), "norm_eps": from_gguf.args.norm_eps})
    ids = prompt_ids(case.seq, seed=3)
    with torch.no_grad():
        ref = ours(ids)
        got = from_gguf(ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # fmt: skip
    llm.eval(ids[0].tolist())
    cpp = torch.from_numpy(np.array(llm.scores[: case.seq]))
    # Measured max |diff| 3.9e-6 with llama.cpp's AVX2 kernels and its AVX512 ones alike (an f32
    # KV cache; summation order alone): 1e-3 is for a file in the wrong layout, not for kernels.
    torch.testing.assert_close(got[0], cpp, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- llama.cpp numerics

# llama.cpp's llama_ftype values (llama.h) for llama_model_quantize.
LLAMA_FTYPES = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}


def q8_0_x86_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml-cpu's x86 quantize_row_q8_0 (AVX2 branch of arch/x86/quants.c) in numpy float32:
    d = amax / 127 stored as fp16, q = round-half-even(x * (127 / amax))."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv[:, None])  # rint: nearest, ties to even (_MM_ROUND_NEAREST)
    return q.astype(np.float32), (amax / np.float32(127)).astype(np.float16).astype(np.float32)


def test_q8_0_activations_match_independent_references():
    rng = np.random.default_rng(0)
    # Any data: an independent numpy port of the x86 kernel.
    x = (rng.standard_normal((4, 256)) * rng.uniform(1e-3, 30, (4, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: d = 0, q = 0
    q, d = q8_0_x86_reference(x)
    ours = quantize_q8_0(torch.from_numpy(x))
    assert torch.equal(ours.qs.reshape(-1, 32), torch.from_numpy(q))
    assert torch.equal(ours.d.reshape(-1), torch.from_numpy(d))
    assert torch.equal(ours.dequantize(), (ours.qs * ours.d.unsqueeze(-1)).flatten(-2))

    # gguf-py's port of the scalar reference (quantize_row_q8_0_ref) differs from the x86
    # kernel only where 1/d and 127/amax differ or x * id is an exact .5: with each block's
    # amax = 127 * 2^e both scales are 2^-e and no product below is a tie, so the bytes agree.
    import gguf

    scale = 2.0 ** rng.integers(-8, 4, (64, 1)).astype(np.float32)
    blocks = (rng.uniform(-126, 126, (64, 32)) * scale).astype(np.float32)
    blocks[:, 5] = 127 * scale[:, 0] * np.sign(rng.standard_normal(64))
    frac = np.abs(blocks / scale) % 1
    assert not np.any(frac == 0.5)
    raw = gguf.quants.quantize(blocks, gguf.GGMLQuantizationType.Q8_0)  # (64, 34): fp16 d, 32 x int8
    ours = quantize_q8_0(torch.from_numpy(blocks))
    assert torch.equal(
        ours.d.reshape(-1), torch.from_numpy(raw[:, :2].copy().view(np.float16)[:, 0].astype(np.float32))
    )
    assert torch.equal(
        ours.qs.reshape(64, 32), torch.from_numpy(raw[:, 2:].copy().view(np.int8).astype(np.float32))
    )


def test_q8_1_block_computed_by_hand():
    x = torch.zeros(3, 32)
    # amax 127: d = 1 and q = x rounded half to even, as the x86 kernel does (the C reference's
    # roundf would give 3, -3, 1 and -1 for 2.5, -2.5, 0.5 and -0.5).
    x[0, :8] = torch.tensor([127.0, -2.5, 2.5, 0.5, -0.5, 1.5, 3.49, -126.6])
    # amax 2: id = 127 / 2 = 63.5, so 2 -> 127, -1 -> -63.5 -> -64 (even), 0.5 -> 31.75 -> 32.
    x[1, :3] = torch.tensor([2.0, -1.0, 0.5])
    # x[2] stays zero: d = 0, q = 0, s = 0.
    b = quantize_q8_1(x)
    assert b.qs.shape == (3, 1, 32)
    assert b.qs[0, 0, :8].tolist() == [127, -2, 2, 0, 0, 2, 3, -127]
    assert b.qs[1, 0, :3].tolist() == [127, -64, 32]
    assert not b.qs[:, :, 8:].any() and not b.qs[2].any()
    # d as fp16: 1; 2/127 = 0.0157480... -> 2^-6 + 8 * 2^-16 = 0.0157470703125; 0.
    assert b.d.view(-1).tolist() == [1.0, 0.0157470703125, 0.0]
    # s = fp16(d * sum(q)) with d before rounding: 5; (2/127) * 95 = 1.49606... -> 1 + 508/1024; 0.
    assert b.s.view(-1).tolist() == [5.0, 1.49609375, 0.0]


def q8_K_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's quantize_row_q8_K_ref (ggml-quants.c), block by block in numpy float32."""
    qs, ds = [], []
    for block in x.astype(np.float32).reshape(-1, 256):
        i = int(np.argmax(np.abs(block)))  # the first largest magnitude: the C loop's `>`
        mx = block[i]
        if mx == 0:
            qs.append(np.zeros(256, np.float32))
            ds.append(np.float32(0))
            continue
        iscale = np.float32(-127) / mx
        qs.append(np.minimum(np.rint(iscale * block), 127).astype(np.float32))  # nearest_int: ties to even
        ds.append(np.float32(1) / iscale)
    return np.stack(qs), np.array(ds, np.float32)


def test_q8_K_activations_match_reference():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 512)) * 4).astype(np.float32)
    x[1, 256:] = 0.0
    q, d = q8_K_reference(x)
    ours = quantize_q8_K(torch.from_numpy(x))
    assert torch.equal(ours.qs.reshape(-1, 256), torch.from_numpy(q))
    assert torch.equal(ours.d.reshape(-1), torch.from_numpy(d))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_block_quants_give_back_the_dequantized_weights(kind, tmp_path):
    """d * q (+ m) from the raw blocks equals the gguf package's dequantization, bit for bit."""
    import gguf

    from openherd.gguf import read_gguf

    qtype = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(2).standard_normal((12, 96)).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    writer.add_tensor("w", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf(tmp_path / "q.gguf")
    mm = np.memmap(tmp_path / "q.gguf", dtype=np.uint8, mode="r")
    t = info.tensor("w")
    q, d, m = gguf_block_quants(mm, t)
    assert q.shape == (12, 3, 32) and q.dtype == np.int8 and (m is None) == (kind not in ("Q4_1", "Q5_1"))
    back = d[:, :, None] * q.astype(np.float32) + (m[:, :, None] if m is not None else 0)
    np.testing.assert_array_equal(back.reshape(12, 96), dequantize_gguf_tensor(mm, t))


def quantize_with_llama_cpp(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = LLAMA_FTYPES[ftype], True, 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


def emulated_or_refused(path: Path, **kw):
    """The GGUF at `path` emulating the installed llama.cpp's kernels, or None where that
    build's kernels are not emulated (llama_cpp_isa refuses it): then loading must fail with
    that InvalidRequest, which this asserts, and the caller has nothing to compare."""
    try:
        isa = llama_cpp_isa()
    except InvalidRequest as refusal:
        with pytest.raises(InvalidRequest, match="llama.cpp numerics") as err:
            load_gguf(path, device="cpu", dtype=torch.float32, emulate="llama.cpp", **kw)
        assert str(err.value) == str(refusal)
        return None
    model = load_gguf(path, device="cpu", dtype=torch.float32, emulate="llama.cpp", **kw)
    assert model.ggml_isa == isa in LLAMA_CPP_ISAS
    return model


def llama_cpp_logits(path: Path, prompt: list[int], decode: list[int]) -> torch.Tensor:
    """llama.cpp's logits for a prompt (one batch) and then tokens decoded one at a time."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, n_threads_batch=1, logits_all=True,
                          verbose=False, flash_attn=False)  # fmt: skip
    llm.eval(prompt)
    for token in decode:
        llm.eval([token])
    return torch.from_numpy(np.array(llm.scores[: len(prompt) + len(decode)]))


def emulated_logits(model, prompt: list[int], decode: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits (T, V), cached logits of the last prompt position and each decoded token)."""
    T = len(prompt)
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0]
        model.setup_caches(1, T + len(decode))
        cached = [model(torch.tensor([prompt]), torch.arange(T))[0, -1:]]
        for i, token in enumerate(decode):
            cached.append(model(torch.tensor([[token]]), torch.tensor([T + i]))[0])
    return full, torch.cat(cached)


def assert_emulation_matches_llama_cpp(path: Path, prompt: list[int], decode: list[int]) -> None:
    """Logits of a prompt (one batch, every position) and of tokens decoded one at a time
    with the KV cache: the emulated model's must equal llama.cpp's bit for bit."""
    model = emulated_or_refused(path)
    if model is None:
        return
    ref = llama_cpp_logits(path, prompt, decode)
    full, cached = emulated_logits(model, prompt, decode)
    T = len(prompt)
    assert ref.std() > 0.3  # logits that spread: a wrong kernel would show
    torch.testing.assert_close(full, ref[:T], atol=0, rtol=0)
    torch.testing.assert_close(cached, ref[T - 1 :], atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny_f32_ggufs(tmp_path_factory) -> dict[str, Path]:
    from tinymodels import write_tiny_gguf

    root = tmp_path_factory.mktemp("tiny-numerics")
    return {arch: write_tiny_gguf(root / f"{arch}.gguf", arch=arch, tie_embeddings=arch == "qwen2")
            for arch in ("llama", "qwen2")}  # fmt: skip


@pytest.mark.parametrize("ftype", list(LLAMA_FTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_emulation_is_bit_exact_with_llama_cpp(arch, ftype, tiny_f32_ggufs, tmp_path):
    """Tiny models quantized by llama.cpp's own quantizer; llama: interleaved RoPE pairs and
    untied output, qwen2: NEOX RoPE, q/k/v biases, tied output."""
    path = quantize_with_llama_cpp(tiny_f32_ggufs[arch], tmp_path / f"{ftype}.gguf", ftype)
    model = load_gguf(path, device="cpu", dtype=torch.float32)
    assert ftype in model.ggml_types.values() and set(model.ggml_types.values()) <= {*GGML_EXACT_TYPES}
    prompt = np.random.default_rng(3).integers(20, VOCAB, 30).tolist()
    assert_emulation_matches_llama_cpp(path, prompt, [7, 99, 250, 31])


@pytest.mark.parametrize("case_models", GGUF_CASES, ids=[c.name for c in GGUF_CASES], indirect=True)
def test_emulation_is_bit_exact_on_round_trip_cases(case_models, tmp_path):
    """The f32 GGUFs of the round-trip cases: Llama 3.1 rope_freqs past the original context,
    linear RoPE scaling, MQA, attention/MLP biases, Qwen2. llama.cpp keeps its F16 KV cache."""
    case, hf, _, _ = case_models
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf")
    assert_emulation_matches_llama_cpp(path, prompt_ids(case.seq, seed=3)[0].tolist()[:-3], [11, 222, 333])


def test_emulation_is_opt_in(tiny_gguf, tiny_hf_dir):
    plain = load_gguf(tiny_gguf, device="cpu", dtype=torch.float32)
    assert plain.numerics == "torch" and plain.ggml_types["layers.0.attention.wq.weight"] == "F32"
    assert not any(isinstance(m, (LlamaCppLinear, LlamaCppRMSNorm)) for m in plain.modules())
    emulated = load_gguf(tiny_gguf, device="cpu", dtype=torch.float32, emulate="llama.cpp")
    assert emulated.numerics == "llama.cpp" and isinstance(emulated.layers[1].feed_forward.w2, LlamaCppLinear)
    # Same parameters, so the state dict (and export) is the plain model's.
    for (name, a), b in zip(plain.state_dict().items(), emulated.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(InvalidRequest, match="float32"):
        load_gguf(tiny_gguf, device="cpu", dtype=torch.bfloat16, emulate="llama.cpp")
    with pytest.raises(InvalidRequest, match="GGUF"):
        load_torch_model(tiny_hf_dir, device="cpu", dtype=torch.float32, emulate="llama.cpp")
    with pytest.raises(InvalidRequest, match="unknown numerics"):
        load_gguf(tiny_gguf, emulate="vllm")


# --------------------------------------------------------------------------- kernel families (ISA)

# llama_print_system_info() of builds this emulation meets or refuses (the first two are
# llama-cpp-python 0.3.36 built with GGML_NATIVE on an AVX-512 EPYC and with GGML_AVX2 only).
AVX512_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
AVX2_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
             "OPENMP = 1 | REPACK = 1 | ")  # fmt: skip


@pytest.mark.parametrize(
    "info, want",
    [
        (AVX512_INFO, "avx512"),
        (AVX2_INFO, "avx2"),
        ("CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | " + AVX2_INFO, "avx2"),
        (AVX2_INFO.replace("LLAMAFILE = 1 | ", ""), "without LLAMAFILE"),
        (AVX512_INFO.replace("REPACK", "AMX_INT8 = 1 | REPACK"), "AMX_INT8"),
        ("CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | ", "x86 avx2 and avx512"),
        ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | F16C = 1 | LLAMAFILE = 1 | ", "x86 avx2 and avx512"),
    ],
)  # fmt: skip
def test_llama_cpp_isa_reads_llama_cpp_system_info(info, want):
    if want in LLAMA_CPP_ISAS:
        assert llama_cpp_isa(info) == want
    else:
        with pytest.raises(InvalidRequest, match=want):
            llama_cpp_isa(info)


def test_isa_is_a_checked_parameter(tiny_gguf):
    for isa in LLAMA_CPP_ISAS:
        model = load_gguf(tiny_gguf, device="cpu", dtype=torch.float32, emulate="llama.cpp", isa=isa)
        block = model.layers[0]
        assert (
            model.ggml_isa
            == block.attention.ggml_isa
            == block.feed_forward.ggml_isa
            == block.attention.wq.isa
            == isa
        )
    with pytest.raises(InvalidRequest, match="already emulates llama.cpp's avx512 kernels, not avx2"):
        emulate_llama_cpp(model, isa="avx2")
    with pytest.raises(InvalidRequest, match="no emulation of llama.cpp's 'neon' kernels"):
        load_gguf(tiny_gguf, device="cpu", dtype=torch.float32, emulate="llama.cpp", isa="neon")
    with pytest.raises(InvalidRequest, match="isa only applies"):
        load_gguf(tiny_gguf, isa="avx2")


def test_emulating_an_unemulated_build_is_refused(tiny_gguf, monkeypatch):
    """load_gguf asks the installed llama.cpp for its kernels unless told: a build it cannot
    emulate (here its system info says ARM) is an InvalidRequest; an explicit isa is taken as is."""
    import llama_cpp

    arm = b"CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: arm)
    with pytest.raises(
        InvalidRequest, match="emulated kernels are x86 avx2 and avx512; this llama.cpp reports ARM_FMA"
    ):
        load_gguf(tiny_gguf, device="cpu", dtype=torch.float32, emulate="llama.cpp")
    assert emulated_or_refused(tiny_gguf) is None  # what the parity tests assert on such a build
    assert (
        load_gguf(tiny_gguf, device="cpu", dtype=torch.float32, emulate="llama.cpp", isa="avx2").ggml_isa
        == "avx2"
    )


# ggml_v_expf compiled from llama-cpp-python 0.3.36's ggml-cpu/vec.h by GCC 12, once with -mavx2
# -mfma, once with -mavx512f -mavx512dq: (x, AVX2 result, AVX512 result). The first seven are
# inputs where the two differ (24% of inputs do); both kernels were bit-identical to ggml_expf on
# 6.2M inputs over [-110, 90], the subnormal and overflow ranges and +-inf included.
GGML_V_EXPF = [
    ("-0x1.3fc0c2p-5", "0x1.ec6684p-1", "0x1.ec6682p-1"),
    ("0x1.42e298p-1", "0x1.e0f940p+0", "0x1.e0f942p+0"),
    ("-0x1.1c222cp+0", "0x1.5180dcp-2", "0x1.5180dep-2"),
    ("-0x1.63f4f4p+5", "0x1.c02790p-65", "0x1.c0278ep-65"),
    ("0x1.a33706p+5", "0x1.84000ep+75", "0x1.84000cp+75"),
    ("-0x1.619946p+6", "0x1.61a8f0p-128", "0x1.61a8e8p-128"),  # subnormal: scalef rounds once
    ("-0x1.5ep+6", "0x1.b2caecp-127", "0x1.b2caf0p-127"),
    ("-0x1.9ep+6", "0x1p-149", "0x1p-149"),
    ("0x1.62p+6", "0x1.99b986p+127", "0x1.99b986p+127"),
    ("0x1.9p+6", "inf", "inf"),
    ("-inf", "0x0p+0", "0x0p+0"),
    ("0x0p+0", "0x1p+0", "0x1p+0"),
]


@pytest.mark.parametrize("isa", LLAMA_CPP_ISAS)
def test_expf_is_ggml_v_expf_of_each_isa(isa):
    col = 1 + LLAMA_CPP_ISAS.index(isa)
    x = torch.tensor([float.fromhex(row[0]) for row in GGML_V_EXPF])
    want = torch.tensor([float.fromhex(row[col]) for row in GGML_V_EXPF])
    got = ggml_expf(x, isa)
    assert got.view(torch.int32).tolist() == want.view(torch.int32).tolist()


def f32_sum_tree(v: np.ndarray) -> np.float32:
    """Halving horizontal sum in float32: lane i + lane i + n/2 until one lane is left."""
    while len(v) > 1:
        v = v[: len(v) // 2] + v[len(v) // 2 :]
    return v[0]


def vec_dot_f16_reference(x: np.ndarray, y: np.ndarray, isa: str) -> np.float32:
    """ggml_vec_dot_f16 (vec.cpp) on fp16-valued float32 rows, ported to numpy float32 from the
    C: GGML_F16_ARR = 4 accumulators of EPR lanes, FMA (exact product + sum, rounded once),
    GGML_F32Cx8_REDUCE (two _mm_hadd_ps) or GGML_F32Cx16_REDUCE (_mm512_reduce_add_ps), and
    leftovers in double."""
    epr = {"avx2": 8, "avx512": 16}[isa]
    step = 4 * epr
    n = len(x) // step * step
    acc = [np.zeros(epr, np.float32) for _ in range(4)]
    for i in range(0, n, step):
        for j in range(4):
            lo = i + j * epr
            acc[j] = (x[lo : lo + epr].astype(np.float64) * y[lo : lo + epr] + acc[j]).astype(np.float32)
    r = (acc[0] + acc[2]) + (acc[1] + acc[3])
    if isa == "avx2":
        t = r[:4] + r[4:]
        h = np.float32(t[0] + t[1]) + np.float32(t[2] + t[3])
    else:
        h = f32_sum_tree(r)
    total = np.float64(h) if n else np.float64(0)
    for i in range(n, len(x)):
        total += np.float64(x[i] * y[i])
    return np.float32(total)


@pytest.mark.parametrize("isa", LLAMA_CPP_ISAS)
@pytest.mark.parametrize("k", [16, 24, 64, 96, 136])
def test_one_row_f16_dot_follows_ggml_vec_dot_f16(isa, k):
    """The vec_dot path of F16 matmuls and one-token attention, on lengths with and without
    a remainder for either ISA's step (32 AVX2, 64 AVX512)."""
    from openherd.model_llamacpp import _dot_vec

    rng = np.random.default_rng(k)
    x = (rng.standard_normal((6, k)) * rng.uniform(0.1, 30, (6, 1))).astype(np.float16).astype(np.float32)
    y = rng.standard_normal((6, k)).astype(np.float16).astype(np.float32)
    got = _dot_vec(torch.from_numpy(x), torch.from_numpy(y), isa)
    want = [vec_dot_f16_reference(a, b, isa) for a, b in zip(x, y, strict=True)]
    assert got.tolist() == np.array(want, np.float32).tolist()


@pytest.mark.parametrize("isa", LLAMA_CPP_ISAS)
def test_batched_float_dot_follows_tinyblas(isa):
    """tinyBLAS::gemm_bloc per output: KN lanes (8 AVX2, 16 AVX512) accumulate every KN-th
    product by FMA (exact here: fp16-valued inputs have float32-exact products), then hsum."""
    from openherd.model_llamacpp import _LANES, _dot_lanes

    kn = _LANES[isa]
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((5, 96)) * rng.uniform(0.1, 30, (5, 1))).astype(np.float16).astype(np.float32)
    y = rng.standard_normal((5, 96)).astype(np.float16).astype(np.float32)
    want = []
    for a, b in zip(x, y, strict=True):
        acc = np.zeros(kn, np.float32)
        for lo in range(0, 96, kn):
            acc = acc + a[lo : lo + kn] * b[lo : lo + kn]
        want.append(f32_sum_tree(acc))
    got = _dot_lanes(torch.from_numpy(x), torch.from_numpy(y), kn)
    assert got.tolist() == np.array(want, np.float32).tolist()


@pytest.mark.parametrize("isa", LLAMA_CPP_ISAS)
def test_swiglu_runs_whole_vectors_and_a_libm_remainder(isa):
    """ggml_vec_swiglu_f32 over 136 = 8 * 17 = 16 * 8 + 8 values: AVX2 has no remainder, AVX512
    leaves 8 to the scalar loop's libm expf (not to its AVX2 code)."""
    from openherd.model_llamacpp import _libm_map

    g = torch.from_numpy(np.random.default_rng(4).standard_normal((3, 136)).astype(np.float32) * 4)
    u = torch.ones_like(g)
    got = ggml_swiglu(g, u, isa)
    head = 128 if isa == "avx512" else 136
    torch.testing.assert_close(
        got[:, :head], g[:, :head] / (1 + ggml_expf(-g[:, :head], isa)), atol=0, rtol=0
    )
    tail = g[:, head:]
    torch.testing.assert_close(got[:, head:], tail / (1 + _libm_map("expf", -tail)), atol=0, rtol=0)


@pytest.mark.parametrize("ftype", ["F32", "F16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_emulation_is_bit_exact_on_shapes_with_kernel_remainders(arch, ftype, tmp_path):
    """n_embd 96 (head dim 24: no AVX512 tinyBLAS for q.k, a vec_dot remainder of 32), n_ff 136
    (a scalar silu remainder on AVX512; the down projection, K % 16 != 0, falls back from
    tinyBLAS to vec_dot with an 8-element remainder). The other ISA's kernels must not match:
    the choice of kernels is what makes the emulation exact."""
    from tinymodels import write_tiny_gguf

    src = write_tiny_gguf(
        tmp_path / "odd.gguf", arch=arch, n_embd=96, n_ff=136, tie_embeddings=arch == "qwen2"
    )
    path = quantize_with_llama_cpp(src, tmp_path / f"{ftype}.gguf", ftype) if ftype != "F32" else src
    model = emulated_or_refused(path)
    if model is None:
        return
    prompt, decode = np.random.default_rng(5).integers(20, VOCAB, 30).tolist(), [7, 99, 250, 31]
    ref = llama_cpp_logits(path, prompt, decode)
    full, cached = emulated_logits(model, prompt, decode)
    torch.testing.assert_close(full, ref[:30], atol=0, rtol=0)
    torch.testing.assert_close(cached, ref[29:], atol=0, rtol=0)
    (other,) = set(LLAMA_CPP_ISAS) - {model.ggml_isa}
    other_full, other_cached = emulated_logits(
        load_gguf(path, device="cpu", dtype=torch.float32, emulate="llama.cpp", isa=other), prompt, decode
    )
    assert (other_full != ref[:30]).float().mean() > 0.5 and (other_cached != ref[29:]).float().mean() > 0.5


# --------------------------------------------------------------------------- the real default model (slow)

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about llamas.",
    "Explain photosynthesis in one sentence.",
    "What is 17 times 23?",
    "Give me three tips for better sleep.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "What is a prime number?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
]
N_NEW = 32


def chatml(question: str) -> str:
    return (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_path(default_model_path) -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the store (or HERD_TEST_DEFAULT_GGUF; see conftest)."""
    return Path(default_model_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_torch_model(smollm2_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_path, tmp_path_factory) -> Path:
    """The same weights dequantized by llama.cpp itself (llama_model_quantize to ALL_F32)."""
    import llama_cpp

    out = tmp_path_factory.mktemp("smol-f32") / "smollm2-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 0, True, 2  # 0 = LLAMA_FTYPE_ALL_F32
    assert llama_cpp.llama_model_quantize(str(smollm2_path).encode(), str(out).encode(), params) == 0
    return out


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            break
    return out


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2, smollm2_path):
    """transformers dequantizes and un-permutes the same file its own way; logits agree
    to atol 1e-3 (measured: 0.0, the two dequantizations are bit-identical)."""
    model, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, **HF_FP32
    ).eval()
    ids = torch.tensor([tok.encode(chatml("Write a haiku about llamas, 12345."))])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_dequantization_and_logits_match_llama_cpp_f32(smollm2, smollm2_f32):
    """Our Q4_1/Q8_0 dequantization equals llama.cpp's bit for bit, and llama.cpp running
    those f32 weights gives our logits (measured max |diff| 9.1e-5 with llama.cpp's AVX2
    kernels, 9.7e-5 with its AVX512 ones, over a 60-token prompt) and our greedy continuations."""
    import llama_cpp

    model, tok = smollm2
    ref_model, _ = load_torch_model(smollm2_f32, device="cpu", dtype=torch.float32)
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    del ref_model

    llm = llama_cpp.Llama(model_path=str(smollm2_f32), n_ctx=512, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # fmt: skip
    ids = tok.encode(chatml("What is the capital of France?"))
    llm.eval(ids)
    ref = torch.from_numpy(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids]))[0], ref, atol=1e-3, rtol=1e-4)

    # Free-running greedy: count tokens up to each prompt's first divergence.
    agreed = 0
    for q in QUESTIONS[:5]:
        ids = tok.encode(chatml(q))
        ours, theirs = generate(model, ids, N_NEW), llama_cpp_greedy(llm, ids, N_NEW)
        agreed += next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), N_NEW)
    assert agreed / (5 * N_NEW) >= 0.95


@pytest.mark.slow
def test_smollm2_greedy_agrees_with_llama_cpp_q4_1(smollm2, smollm2_path):
    """llama.cpp's Q4_1 kernels quantize activations to Q8_1, which moves logits by ~0.25
    on average, so free-running greedy paths part at near-ties and then differ for good.
    The fair per-token measure is teacher-forced: llama.cpp generates 32 greedy tokens
    for each of 10 prompts; we score prompt + those tokens in one forward and count the
    positions where our argmax is llama.cpp's token. Required >= 95% (measured 97.5%),
    and every disagreement must be a near-tie in our logits (measured margins <= 0.2).
    The next test runs the model with llama.cpp's numerics, which follows it free-running.
    """
    import llama_cpp

    model, tok = smollm2
    # n_threads_batch too: left at the CPU count, prompt batches crawl on a busy machine (9 s, not 0.3).
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=1, n_threads_batch=1,
                          verbose=False, flash_attn=False)  # fmt: skip
    agree = total = prefix = 0
    margins: list[float] = []
    for q in QUESTIONS:
        ids = llm.tokenize(chatml(q).encode(), add_bos=False, special=True)
        assert ids == tok.encode(chatml(q))
        ref = llama_cpp_greedy(llm, ids, N_NEW)
        assert len(ref) == N_NEW
        with torch.no_grad():
            logits = model(torch.tensor([ids + ref[:-1]]))[0, len(ids) - 1 :]  # predicts ref[0..N-1]
        ours = logits.argmax(-1).tolist()
        for i, (want, got) in enumerate(zip(ref, ours, strict=True)):
            total += 1
            agree += want == got
            if want != got:
                margins.append(float(logits[i, got] - logits[i, want]))
        prefix += next((i for i, (a, b) in enumerate(zip(ref, ours, strict=True)) if a != b), N_NEW)
    print(f"teacher-forced agreement {agree}/{total}; tokens before first divergence {prefix}/{total}; "
          f"margins {sorted(round(m, 3) for m in margins)}")  # fmt: skip
    assert agree / total >= 0.95
    assert all(m < 0.75 for m in margins)


@pytest.fixture(scope="module")
def smollm2_emulated(smollm2_path):
    """The default model emulating the installed llama.cpp; None where its kernels are not
    emulated (emulated_or_refused asserted the refusal)."""
    return emulated_or_refused(smollm2_path)


@pytest.mark.slow
def test_smollm2_emulated_greedy_follows_llama_cpp_free_running(smollm2, smollm2_emulated, smollm2_path):
    """With llama.cpp's numerics emulated, free-running greedy decoding follows llama.cpp
    (flash attention off, its F16 KV cache) token for token: over the same 10 prompts x 32
    tokens, >= 95% of the tokens come before each prompt's first divergence (measured
    320/320; the plain fp32 model gets ~69%), and the first prompt's logits at every
    position are llama.cpp's bit for bit."""
    import llama_cpp

    if smollm2_emulated is None:
        return
    _, tok = smollm2
    ids = tok.encode(chatml(QUESTIONS[0]))
    scorer = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=1, n_threads_batch=1,
                             logits_all=True, verbose=False, flash_attn=False)  # fmt: skip
    scorer.eval(ids)
    with torch.no_grad():
        logits = smollm2_emulated(torch.tensor([ids]))[0]
    torch.testing.assert_close(logits, torch.from_numpy(np.array(scorer.scores[: len(ids)])), atol=0, rtol=0)
    del scorer

    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=1, n_threads_batch=1,
                          verbose=False, flash_attn=False)  # fmt: skip
    prefixes = []
    for q in QUESTIONS:
        ids = tok.encode(chatml(q))
        ref = llama_cpp_greedy(llm, ids, N_NEW)
        ours = generate(smollm2_emulated, ids, N_NEW)
        prefixes.append(next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), N_NEW))
    print(
        f"emulated free-running agreement: {sum(prefixes)}/{len(QUESTIONS) * N_NEW} tokens, per prompt {prefixes}"
    )
    assert sum(prefixes) / (len(QUESTIONS) * N_NEW) >= 0.95


SMOL_TEXTS = [
    "Hello world! 12345 and 3.14159",
    "  leading spaces\n\n\ttabs and trailing  ",
    "<|im_start|>user\nHi<|im_end|>\n",
    "ünïcödé 🦙 日本語 مرحبا Ελληνικά",
    "def f(x):\n    return x**2  # comment",
    "I'm can't won't they'll we've HELLO'S",
    "$$$ %%% ^^^ ... --- ___",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_llama_cpp(smollm2, smollm2_path):
    import llama_cpp

    _, tok = smollm2
    llm = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_id, tok.eos_id) == (llm.token_bos(), llm.token_eos())
    for text in SMOL_TEXTS:
        ref = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert tok.encode(text) == ref, text
        assert tok.decode(ref) == llm.detokenize(ref, special=True).decode() == text
