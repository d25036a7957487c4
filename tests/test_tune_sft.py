"""openherd.tune.sft: the training step's maths, the loop, checkpoints that survive
kills and full disks, resume, registration and the `herd tune` command."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from openherd import cli
from openherd.errors import InvalidRequest, StoreError
from openherd.model import apply_rope, load_torch_model, rope_cos_sin
from openherd.tune import sft
from openherd.tune.data import IGNORE, ChatRenderer, Example, collate, pack_rows, single_rows, tokenize_all
from openherd.tune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
)
from openherd.tune.sft import (
    BlockCausalAttention,
    LinearCrossEntropy,
    QKVRope,
    RMSNorm,
    SwiGLU,
    TuneConfig,
    fit,
    forward_hidden,
    latest_checkpoint,
    lr_at,
    setup,
)

REPO = Path(__file__).resolve().parent.parent


def write_data(path: Path, n: int = 24) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."}) + "\n")
    return path


def config(tmp_path: Path, base: Path, **kw) -> TuneConfig:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_data(data)
    defaults = dict(base=str(base), data=str(data), out="tiny-tuned", max_steps=6, lr=5e-3, seq_len=64,
                    batch_size=4, save_every=3, progress=False, run_dir=str(tmp_path / "run"))  # fmt: skip
    defaults.update(kw)
    return TuneConfig(**defaults)


def adapted(path, arch_seed: int = 0, dropout: float = 0.0):
    model, tok = load_torch_model(path, dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout))
    g = torch.Generator().manual_seed(arch_seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)
    mark_only_lora_as_trainable(model)
    return model, tok


def batch_of(tok, texts: list[tuple[str, str]], packed: bool, seq_len: int = 128):
    ex = [Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"x:{i}")
          for i, (q, a) in enumerate(texts)]  # fmt: skip
    ts = tokenize_all(ex, ChatRenderer(tok), seq_len)
    rows = pack_rows(ts, 10_000) if packed else single_rows(ts)
    return collate(rows, 0, packed)


# --------------------------------------------------------------------------- the step's maths


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_forward_matches_the_model(tmp_path, arch):
    from tinymodels import write_tiny_gguf

    model, tok = adapted(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch))
    model.eval()
    b = batch_of(tok, [("hello there", "general kenobi"), ("a", "b")], packed=False)
    torch.testing.assert_close(model.output(forward_hidden(model, b)), model(b.input_ids), atol=2e-5, rtol=1e-5)


def test_lora_gradients_match_the_plain_forward(tiny_gguf):
    model, tok = adapted(tiny_gguf)
    model.train()  # dropout is 0: both paths are deterministic
    b = batch_of(tok, [("what is two plus two", "four"), ("hi", "hello")], packed=False)
    sft.batch_loss(model, b).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(b.input_ids)
    F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE, reduction="sum").backward()
    plain = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(fused) == set(plain) and len(fused) == 2 * 7 * 2
    for n in fused:
        torch.testing.assert_close(fused[n], plain[n], atol=1e-4, rtol=1e-4)


def test_packed_examples_do_not_see_each_other(tiny_gguf):
    model, tok = adapted(tiny_gguf)
    model.eval()
    pairs = [("what is two plus two", "four"), ("name a colour", "blue, like the sky")]
    packed = batch_of(tok, pairs, packed=True)
    assert packed.input_ids.shape[0] == 1
    with torch.no_grad():
        alone = sum(float(sft.batch_loss(model, batch_of(tok, [p], packed=False))) for p in pairs)
        assert float(sft.batch_loss(model, packed)) == pytest.approx(alone, rel=1e-5)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 10, 1e-3, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


# --------------------------------------------------------------------------- the loop


def test_training_lowers_the_loss_and_writes_the_run(tmp_path, tiny_gguf, herd_home):
    run = setup(config(tmp_path, tiny_gguf, max_steps=12, save_every=6))
    try:
        state = fit(run)
    finally:
        run.close()
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0]
    evals = [h for h in state.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [6, 12] and len(run.eval_rows) == 2
    assert (run.run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run.run_dir / "history.json").read_text()) == state.history
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    files = sorted(p.name for p in (run.run_dir / "checkpoints" / "step-0000012").iterdir())
    assert files == ["adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]


def _adapter_after(cfg: TuneConfig, stop_at: int | None = None) -> dict:
    def interrupt(run, rec):
        if rec["step"] == stop_at:
            raise KeyboardInterrupt

    run = setup(cfg)
    try:
        fit(run, on_step=interrupt if stop_at else None)
        return {k: v.clone() for k, v in lora_state_dict(run.model).items()}
    finally:
        run.close()


def test_same_seed_same_adapter_and_resume_continues_exactly(tmp_path, tiny_gguf, herd_home):
    straight = _adapter_after(config(tmp_path, tiny_gguf, dropout=0.1, run_dir=str(tmp_path / "a")))
    again = _adapter_after(config(tmp_path, tiny_gguf, dropout=0.1, run_dir=str(tmp_path / "b")))
    for k in straight:
        torch.testing.assert_close(again[k], straight[k], rtol=0, atol=0)
    # Ctrl-C after step 4 checkpoints (the scheduled one was at 3); --resume goes on from 4.
    with pytest.raises(KeyboardInterrupt):
        _adapter_after(config(tmp_path, tiny_gguf, dropout=0.1, run_dir=str(tmp_path / "c")), stop_at=4)
    assert latest_checkpoint(tmp_path / "c" / "checkpoints").name == "step-0000004"
    resumed = _adapter_after(config(tmp_path, tiny_gguf, dropout=0.1, run_dir=str(tmp_path / "c"), resume=True))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-6, atol=1e-7)


def test_out_of_disk_mid_checkpoint_keeps_the_previous_one(tmp_path, tiny_gguf, herd_home, monkeypatch):
    real = sft._write_durably
    calls = {"n": 0}

    def half_then_enospc(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 6:  # the second file of the second checkpoint
            with open(path, "xb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(sft, "_write_durably", half_then_enospc)
    cfg = config(tmp_path, tiny_gguf)
    run = setup(cfg)
    try:
        with pytest.raises(StoreError) as e:
            fit(run)
    finally:
        run.close()
    assert "No space left on device" in e.value.message
    assert "the previous checkpoint (step-0000003) is intact" in e.value.message and "--resume" in e.value.message
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-0000003"]  # no half-written directory left behind
    monkeypatch.setattr(sft, "_write_durably", real)
    run = setup(config(tmp_path, tiny_gguf, resume=True))
    try:
        assert run.state.step == 3
        fit(run)
        assert run.state.step == 6
    finally:
        run.close()


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from openherd.tune import sft
real = sft._write_durably
def slow(path, data):
    if path.parent.name.startswith(".tmp-step-0000002") and path.name == "optimizer.safetensors":
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        print("WRITING", flush=True)
        time.sleep(600)
    real(path, data)
sft._write_durably = slow
cfg = sft.TuneConfig(base=sys.argv[1], data=sys.argv[2], out="killed", max_steps=4, save_every=1, lr=5e-3,
                     seq_len=64, progress=False, run_dir=sys.argv[3])
run = sft.setup(cfg)
sft.fit(run)
"""


def test_kill_9_mid_checkpoint_keeps_the_previous_one(tmp_path, tiny_gguf, herd_home):
    data = write_data(tmp_path / "data.jsonl")
    run_dir = tmp_path / "run"
    env = {**os.environ, "HERD_HOME": str(herd_home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(tiny_gguf), str(data), str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert len(names) == 2 and names[0].startswith(".tmp-step-0000002") and names[1] == "step-0000001"
    assert latest_checkpoint(ckpts).name == "step-0000001"
    run = setup(TuneConfig(base=str(tiny_gguf), data=str(data), out="killed", max_steps=4, save_every=1, lr=5e-3,
                           seq_len=64, progress=False, run_dir=str(run_dir), resume=True))  # fmt: skip
    try:
        assert run.state.step == 1
        assert [p.name for p in ckpts.iterdir()] == ["step-0000001"]  # the dead writer's temp dir is gone
        fit(run)
    finally:
        run.close()
    assert latest_checkpoint(ckpts).name == "step-0000004"


def test_checkpoints_and_adapters_are_never_unpickled(tmp_path, tiny_gguf, herd_home, monkeypatch):
    import pickle

    run = setup(config(tmp_path, tiny_gguf, max_steps=3))
    try:
        fit(run)
    finally:
        run.close()

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    run = setup(config(tmp_path, tiny_gguf, max_steps=3, resume=True))
    try:
        assert run.state.step == 3
        adapter = sft.finish(run)
    finally:
        run.close()
    from openherd.tune.export import load_tuned

    model, _, manifest = load_tuned(adapter.name)
    assert manifest.adapter and any(isinstance(m, LoRALinear) for m in model.modules())


def test_resume_and_overwrite_rules(tmp_path, tiny_gguf, herd_home):
    with pytest.raises(InvalidRequest, match="nothing to resume"):
        setup(config(tmp_path, tiny_gguf, resume=True))
    run = setup(config(tmp_path, tiny_gguf, max_steps=3))
    try:
        with pytest.raises(InvalidRequest, match="another `herd tune` is using"):
            setup(config(tmp_path, tiny_gguf))
        fit(run)
    finally:
        run.close()
    with pytest.raises(InvalidRequest, match="pass --resume to continue it or --overwrite"):
        setup(config(tmp_path, tiny_gguf))
    with pytest.raises(InvalidRequest, match="rank was 8, now 4"):
        setup(config(tmp_path, tiny_gguf, resume=True, rank=4))
    write_data(tmp_path / "data.jsonl", n=30)
    with pytest.raises(InvalidRequest, match="the data file changed"):
        setup(config(tmp_path, tiny_gguf, resume=True))
    run = setup(config(tmp_path, tiny_gguf, overwrite=True))
    run.close()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None


# --------------------------------------------------------------------------- registration and the CLI


def test_tune_registers_base_plus_adapter_that_herd_run_uses(tmp_path, tiny_gguf, herd_home, capsys):
    from openherd.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from openherd.model import generate
    from openherd.store import Store
    from openherd.tune.export import load_tuned

    data = write_data(tmp_path / "data.jsonl")
    code = cli.main(["tune", str(tiny_gguf), "--data", str(data), "--out", "tiny-math", "--max-steps", "8",
                     "--lr", "5e-3", "--seq-len", "64", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tuned tiny-math: 8 steps" in out
    m = Store().resolve("tiny-math")
    assert m.base == str(tiny_gguf) and m.adapter and Path(m.adapter).is_file()
    assert Path(m.path).parent == herd_home / "blobs" and Path(m.adapter).parent == herd_home / "blobs"
    assert m.details["lora"]["rank"] == 8 and m.details["training"]["steps"] == 8
    assert (herd_home / "runs" / "tiny-math" / "loss.png").is_file()

    # `herd run NAME` loads manifest.adapter on manifest.path: same greedy text as torch + LoRA.
    env = {**os.environ, "HERD_HOME": str(herd_home), "HERD_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "openherd", "run", "tiny-math", "What is 3 plus 3?",
                          "--temperature", "0", "--max-tokens", "8"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    model, tok, _ = load_tuned("tiny-math")
    e = Engine.load(m.path, EngineConfig(n_ctx=128, n_parallel=1, n_threads=1))
    try:
        prompt = e.encode_chat([{"role": "user", "content": "What is 3 plus 3?"}])
        base_text, _ = e.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=8))).result()
    finally:
        e.close()
    ours = tok.decode(generate(model, prompt, 8))
    assert res.stdout.strip() == ours.strip()
    assert ours != base_text  # the adapter changed what the model says


def test_cli_reports_a_bad_line_with_its_number(tmp_path, tiny_gguf, herd_home, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    code = cli.main(["tune", str(tiny_gguf), "--data", str(bad), "--out", "x", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"herd: error: {bad}:2: invalid JSON") and err.count("\n") == 1
    assert not (herd_home / "runs").exists()  # nothing was started
    assert cli.main(["tune", str(tiny_gguf), "--data", str(bad), "--out", "../evil"]) == 1
    assert "invalid model name" in capsys.readouterr().err


def test_herd_serve_serves_the_tuned_model_by_name(tmp_path, tiny_gguf, monkeypatch):
    import httpx
    from server_helpers import live_server

    from openherd.model import generate
    from openherd.tune.export import load_tuned, write_adapter_gguf

    home = tmp_path / "srv" / "home"
    for name in list(os.environ):
        if name.startswith("HERD_") and not name.startswith("HERD_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HERD_HOME", str(home))
    model, tok = load_torch_model(tiny_gguf, dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    sft.register_tuned("tiny-tuned", str(tiny_gguf), tiny_gguf, write_adapter_gguf(model, LoRAConfig(rank=4, alpha=8),
                       tmp_path / "a.gguf"), {})  # fmt: skip
    ours, tok, _ = load_tuned("tiny-tuned")
    with live_server(tmp_path / "srv", tiny_gguf) as srv:
        models = httpx.get(f"{srv.url}/v1/models", timeout=30).json()
        assert "tiny-tuned" in {m["id"] for m in models["data"]}
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "tiny-tuned", "messages": [{"role": "user", "content": "What is 3 plus 3?"}],
            "temperature": 0, "max_tokens": 6})  # fmt: skip
    assert r.status_code == 200, r.text
    prompt = tok.encode("<|im_start|>user\nWhat is 3 plus 3?<|im_end|>\n<|im_start|>assistant\n", add_special=False)
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(generate(ours, prompt, 6))


def test_a_hugging_face_directory_base_is_converted_for_llama_cpp(tmp_path, tiny_hf_dir, herd_home):
    from openherd.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from openherd.store import Store
    from openherd.tune.export import load_tuned

    data = write_data(tmp_path / "data.jsonl")
    run, manifest = sft.tune(TuneConfig(base=str(tiny_hf_dir), data=str(data), out="from-hf", max_steps=4,
                                        lr=5e-3, seq_len=64, progress=False))  # fmt: skip
    m = Store().resolve("from-hf")
    assert m.base == str(tiny_hf_dir) and m.details["base_source"] == f"hf-dir:{tiny_hf_dir}"
    assert m.architecture == "llama" and Path(m.path).is_file() and Path(m.adapter).is_file()
    model, tok, _ = load_tuned("from-hf")  # the converted GGUF + the adapter, back in torch
    for k, v in lora_state_dict(run.model).items():
        torch.testing.assert_close(lora_state_dict(model)[k], v.float(), rtol=0, atol=0)
    e = Engine.load(m.path, EngineConfig(n_ctx=128, n_parallel=1, n_threads=1, lora=m.adapter))
    try:
        prompt = e.encode_chat([{"role": "user", "content": "What is 3 plus 3?"}])
        events = list(e.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=4))))
    finally:
        e.close()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + [ev.token for ev in events[:-1]]]))[0]
    for i, ev in enumerate(events[:-1]):
        row = logits[len(prompt) + i - 1]
        assert int(row.argmax()) == ev.token or float(row.max() - row[ev.token]) < 2e-2


@pytest.mark.parametrize("vocab_block", [16, LinearCrossEntropy.VOCAB_BLOCK])
def test_linear_cross_entropy_matches_torch_in_value_and_gradients(vocab_block, monkeypatch):
    # Slabs of 16 columns over a vocabulary of 50: three whole slabs and a partial one, so the
    # per-slab maxima, their combination and the targets' places in the buffer are all exercised.
    monkeypatch.setattr(LinearCrossEntropy, "VOCAB_BLOCK", vocab_block)
    torch.manual_seed(0)
    h = torch.randn(70, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 4).requires_grad_(True)  # large logits: each slab's max must keep exp finite
    targets = torch.randint(0, 50, (70,))
    ours = LinearCrossEntropy.apply(h, w, targets)
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h2 @ w2.t(), targets, reduction="sum")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    (ours / 3).backward()
    (ref / 3).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)
    with torch.no_grad():  # validation: forward only
        assert LinearCrossEntropy.apply(h, w, targets).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("n_kv_heads", [2, 6])
def test_block_causal_attention_matches_sdpa(n_kv_heads):
    torch.manual_seed(0)
    B, H, T, D = 2, 6, 70, 8  # 70 tokens: the last query block is a partial one
    qkv = torch.randn(B, T, (H + 2 * n_kv_heads) * D, requires_grad=True)

    def heads():  # strided (B, nh, T, hd) views of one projection, as the training step has them
        q, k, v = qkv.split([H * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
        return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, n_kv_heads, D).transpose(1, 2),
                v.view(B, T, n_kv_heads, D).transpose(1, 2))  # fmt: skip

    grad = torch.randn(B, H, T, D)
    ours = BlockCausalAttention.apply(*heads())
    (d_ours,) = torch.autograd.grad(ours, qkv, grad)
    ref = F.scaled_dot_product_attention(*heads(), is_causal=True, enable_gqa=n_kv_heads != H)
    (d_ref,) = torch.autograd.grad(ref, qkv, grad)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d_ours, d_ref, atol=1e-5, rtol=1e-5)
    # Kept probabilities are bounded: short rows qualify, long ones go to SDPA.
    assert BlockCausalAttention.fits(256, 9, 1536) and not BlockCausalAttention.fits(1024, 9, 1536)


def test_swiglu_matches_autograd():
    torch.manual_seed(0)
    gate_up = torch.randn(3, 5, 2 * 16, requires_grad=True)
    grad = torch.randn(3, 5, 16)
    ours = SwiGLU.apply(gate_up)
    (d_ours,) = torch.autograd.grad(ours, gate_up, grad)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    (d_ref,) = torch.autograd.grad(ref, gate_up, grad)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(d_ours, d_ref)


def test_qkv_rope_matches_apply_rope():
    torch.manual_seed(0)
    B, T, H, KV, D = 2, 7, 6, 2, 16
    qkv = torch.randn(B, T, (H + 2 * KV) * D, requires_grad=True)
    cos, sin = rope_cos_sin(torch.rand(D // 2), torch.arange(T), torch.float32)  # (T, hd)
    grads = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    for c, s in ((cos, sin), (cos.expand(B, 1, T, D), sin.expand(B, 1, T, D))):  # per-row positions (packing)
        ours = QKVRope.apply(qkv, c, s, H, KV)
        q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        ref = apply_rope(q, c, s), apply_rope(k, c, s), v
        for o, r in zip(ours, ref, strict=True):
            assert o.is_contiguous()
            torch.testing.assert_close(o, r)
        torch.testing.assert_close(torch.autograd.grad(ours, qkv, grads)[0], torch.autograd.grad(ref, qkv, grads)[0])
    # An output that gets no gradient (a head unused downstream) contributes zeros.
    q, k, v = QKVRope.apply(qkv, cos, sin, H, KV)
    (d,) = torch.autograd.grad((q * grads[0]).sum(), qkv)
    assert d[..., H * D :].abs().max() == 0 and d[..., : H * D].abs().max() > 0


def test_rms_norm_matches_torch_in_value_and_gradients():
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 16) * 4).requires_grad_(True)
    w = (torch.randn(16) * 0.1 + 1).requires_grad_(True)  # trainable here, to check its gradient too
    grad = torch.randn(3, 5, 16)
    ours = RMSNorm.apply(x, w, 1e-5)
    ref = F.rms_norm(x, (16,), w, 1e-5)
    torch.testing.assert_close(ours, ref)
    for got, want in zip(torch.autograd.grad(ours, (x, w), grad), torch.autograd.grad(ref, (x, w), grad), strict=True):
        torch.testing.assert_close(got, want)
