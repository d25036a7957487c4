"""openherd.tune.export against the real consumers: llama.cpp (adapter and merged GGUF),
transformers (merged safetensors) and peft (adapter directory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openherd import cli
from openherd.errors import InvalidRequest
from openherd.model import load_torch_model
from openherd.tune.export import (
    export_gguf,
    load_tuned,
    read_adapter_gguf,
    write_adapter_gguf,
)
from openherd.tune.lora import LoRAConfig, LoRALinear, apply_lora, lora_state_dict
from openherd.tune.sft import register_tuned

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def lora_model(gguf_path: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0):
    """The GGUF's torch model with a LoRA whose B is random (a fresh adapter would be a no-op)."""
    model, tok = load_torch_model(gguf_path, device="cpu", dtype=torch.float32)
    # A and B both from the seeded generator: with torch's global RNG for A, the adapter (and
    # so whether a tiny q4_0 model's greedy answer is empty) depended on which tests ran first.
    g = torch.Generator().manual_seed(seed)
    apply_lora(model, LoRAConfig(rank=rank, alpha=alpha, dropout=0.0), generator=g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.3)
    return model.eval(), tok


def llama_logits(model_path: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    """Logits of every position from plain llama-cpp-python (not openherd's engine)."""
    from llama_cpp import Llama

    kw = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(model_path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, **kw)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-tied"])
def tiny(request, tmp_path_factory):
    from tinymodels import write_tiny_gguf

    arch = request.param.split("-")[0]
    d = tmp_path_factory.mktemp(request.param)
    return write_tiny_gguf(d / "base.gguf", arch=arch, tie_embeddings=request.param.endswith("tied"), seed=3)


# --------------------------------------------------------------------------- the llama.cpp adapter


def test_adapter_gguf_round_trips_and_has_llama_cpp_metadata(tiny, tmp_path):
    from openherd.gguf import read_gguf

    model, _ = lora_model(tiny)
    path = write_adapter_gguf(model, LoRAConfig(rank=4, alpha=8.0), tmp_path / "a.gguf", name="t")
    md = read_gguf(path).metadata
    assert md["general.type"] == "adapter" and md["adapter.type"] == "lora"
    assert md["adapter.lora.alpha"] == 8.0 and md["general.architecture"] == ("qwen2" if "qwen2" in str(tiny) else "llama")
    info = read_gguf(path)
    a = info.tensor("blk.0.attn_q.weight.lora_a")
    b = info.tensor("blk.0.attn_q.weight.lora_b")
    assert a.shape == (64, 4) and b.shape == (4, 64)  # GGML order: ne0 = in for A, = rank for B
    cfg, sd = read_adapter_gguf(path, model.args)
    assert (cfg.rank, cfg.alpha, cfg.targets) == (4, 8.0, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    ours = lora_state_dict(model)
    assert set(sd) == set(ours)
    for k in ours:
        torch.testing.assert_close(sd[k], ours[k], rtol=0, atol=0)


def test_a_failed_gguf_write_leaves_the_old_file_and_no_partial(tiny, tmp_path):
    from openherd.tune.export import _gguf_file

    path = tmp_path / "out" / "a.gguf"
    model, _ = lora_model(tiny)
    write_adapter_gguf(model, LoRAConfig(rank=4, alpha=8.0), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="mid-export"):
        with _gguf_file(path, "llama") as w:
            w.add_name("half")
            w.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
            raise RuntimeError("mid-export")
    assert path.read_bytes() == before  # the reader still sees the whole old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.gguf"]  # no .a.gguf.<pid>.tmp left


def test_llama_cpp_with_the_adapter_matches_our_lora_model(tiny, tmp_path):
    from openherd.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from openherd.model import generate

    model, tok = lora_model(tiny)
    adapter = write_adapter_gguf(model, LoRAConfig(rank=4, alpha=8.0), tmp_path / "a.gguf")
    e = Engine.load(str(tiny), EngineConfig(n_ctx=256, n_parallel=1, n_threads=2, lora=str(adapter)))
    try:
        prompt = e.encode_chat(PROMPT)
        events = list(e.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=16))))
    finally:
        e.close()
    gen = [ev.token for ev in events[:-1]]
    # Greedy agreement, teacher-forced on llama.cpp's output: every token it chose is our
    # argmax too, unless our top two are within float noise (a random tiny model has near-ties).
    with torch.no_grad():
        seq_logits = model(torch.tensor([prompt + gen]))[0]
    for i, t in enumerate(gen):
        row = seq_logits[len(prompt) + i - 1]
        assert int(row.argmax()) == t or float(row.max() - row[t]) < 2e-2, f"token {i}"
    if len(prompt) + 16 <= 256:
        # Free-running, the two may part only at a near-tie (then the paths differ after it).
        for i, (a, b) in enumerate(zip(gen[:4], generate(model, prompt, 4), strict=False)):
            if a != b:
                row = seq_logits[len(prompt) + i - 1]
                assert float(row.max() - row[a]) < 2e-2, f"free-running divergence at token {i} is not a near-tie"
                break
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    theirs = llama_logits(tiny, prompt, lora=adapter)
    base = llama_logits(tiny, prompt)
    # llama.cpp keeps K/V in f16, which alone moves these logits by ~3e-3 (base model, no adapter).
    np.testing.assert_allclose(theirs, ours, atol=1e-2, rtol=0)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9  # near-ties may flip
    assert np.abs(base - ours).max() > 0.1  # the adapter really changes the logits


# --------------------------------------------------------------------------- merged GGUF


@pytest.mark.parametrize("quant, atol", [("f32", 1e-2), ("f16", 5e-2)])
def test_merged_gguf_matches_our_merged_model_in_plain_llama_cpp(tiny, tmp_path, quant, atol):
    model, tok = lora_model(tiny)
    with torch.no_grad():
        ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", add_special=False)
        unmerged = model(torch.tensor([ids]))[0].numpy()
    out = export_gguf(model, tiny, tmp_path / f"merged-{quant}.gguf", quant=quant, name="merged")
    theirs = llama_logits(out, ids)
    np.testing.assert_allclose(theirs, unmerged, atol=atol, rtol=0)  # f16 K/V cache: ~3e-3 even at f32
    assert (theirs.argmax(-1) == unmerged.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_merged_gguf_loads_and_answers(tiny, tmp_path, quant):
    from llama_cpp import Llama

    from openherd.gguf import read_gguf

    model, _ = lora_model(tiny)
    out = export_gguf(model, tiny, tmp_path / f"merged-{quant}.gguf", quant=quant)
    info, base = read_gguf(out, load_arrays=True), read_gguf(tiny, load_arrays=True)
    assert info.tensor("blk.0.attn_q.weight").type_name == quant.upper()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert info.metadata.get(key) == base.metadata.get(key)
    llm = Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    try:
        r = llm.create_chat_completion(messages=PROMPT, max_tokens=8, temperature=0)
    finally:
        llm.close()
    assert r["choices"][0]["message"]["content"] and r["usage"]["completion_tokens"] > 0


# --------------------------------------------------------------------------- Hugging Face formats


def test_safetensors_export_loads_in_transformers_with_the_same_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openherd.tune.export import export_safetensors

    model, tok = lora_model(tiny)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special=False)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    out = export_safetensors(model, tok, tmp_path / "hf", dtype="float32")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    chat = hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert chat == text


def test_peft_export_loads_on_the_hf_base_with_the_same_logits(tmp_path, herd_home):
    from peft import PeftModel
    from tinymodels import write_tiny_gguf, write_tiny_hf_dir
    from transformers import AutoModelForCausalLM

    base_gguf = write_tiny_gguf(tmp_path / "base.gguf", seed=5)
    base_hf = write_tiny_hf_dir(tmp_path / "base-hf", seed=5)  # the same weights, HF layout
    model, tok = lora_model(base_gguf)
    adapter = write_adapter_gguf(model, LoRAConfig(rank=4, alpha=8.0), tmp_path / "a.gguf")
    register_tuned("tiny-peft", str(base_gguf), base_gguf, adapter, {})
    out = tmp_path / "peft"
    assert cli.main(["export", "tiny-peft", "--format", "peft", "--out", str(out), "--base-model-id", str(base_hf)]) == 0
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32), out).eval()
    ids = tok.encode("The herd moved slowly across the plain.", add_special=False)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        theirs = hf(torch.tensor([ids])).logits[0]
        plain = hf.get_base_model()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), hf.disable_adapter():
        assert (plain(torch.tensor([ids])).logits[0] - ours).abs().max() > 0.1


def test_export_cli_round_trip_and_errors(tmp_path, herd_home, tiny_gguf, capsys):
    from llama_cpp import Llama

    model, _ = lora_model(tiny_gguf)
    adapter = write_adapter_gguf(model, LoRAConfig(rank=4, alpha=8.0), tmp_path / "a.gguf")
    register_tuned("tiny-x", str(tiny_gguf), tiny_gguf, adapter, {})
    loaded, _, manifest = load_tuned("tiny-x")
    assert manifest.base == str(tiny_gguf)
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(lora_state_dict(loaded)[k], v, rtol=0, atol=0)

    out = tmp_path / "x.gguf"
    assert cli.main(["export", "tiny-x", "--format", "gguf", "--out", str(out), "--quant", "q8_0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    llm = Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False)
    llm.close()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli.main(["export", "tiny-x", "--format", "safetensors", "--out", str(tmp_path / "full")]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert cli.main(["export", "nope", "--format", "gguf", "--out", str(out)]) == 1
    assert "model 'nope' not found" in capsys.readouterr().err
    from openherd.store import Store

    Store().pull(str(tiny_gguf), name="plain")
    with pytest.raises(InvalidRequest, match="not a LoRA-tuned model"):
        from openherd.tune.export import export_model

        export_model("plain", "peft", tmp_path / "p")
