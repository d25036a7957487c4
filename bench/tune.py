"""LoRA fine-tuning speed: `herd tune` vs Hugging Face transformers + PEFT, same run.

Both sides train the same model (the default model's GGUF, dequantized; the peer loads
it as a Hugging Face directory written from the same weights) on the same rows in the
same order: chat examples rendered with the model's template and truncated to exactly
--seq-len tokens (no padding on either side), loss on assistant tokens only, LoRA rank 8
on all seven linear layers (alpha 16, dropout 0.05), AdamW with the same warmup + cosine
schedule and gradient clipping, fp32 on the CPU, the same LoRA initialisation (the peer
copies ours). Each side runs in its own process, so peak RSS is its own.

Reported: train tokens/s over steps 2..N (step 1 warms caches and allocators up), the
same per CPU-second of the process (robust to a busy shared machine), peak RSS, and the
loss at the last step (the goal is within 2%: the same maths). With --runs N the two sides
alternate N times (ours, peer, ours, peer, ...), so a slow spell of a shared machine hits
both, and the table gives each side's median and the median of the per-run ratios.

    python bench/tune.py [--model smollm2|PATH.gguf] [--steps 50] [--seq-len 256] [--batch-size 4]
                         [--runs 1] [--threads N] [--tiny] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import resolve_model, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_NAME = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
           "feed_forward.w3": "mlp.up_proj"}  # fmt: skip

TOPICS = ["llamas", "rivers", "the moon", "bread", "compilers", "glaciers", "chess", "bees", "trains", "volcanoes",
          "libraries", "tea", "bicycles", "owls", "tides", "maps"]  # fmt: skip
SENTENCES = [
    "It has a long history that people still argue about.",
    "Most of what we know comes from careful observation over many years.",
    "There are several kinds, and each one behaves a little differently.",
    "The simplest explanation is often the best place to start.",
    "Small changes in the conditions can lead to very different results.",
    "Experts recommend patience, good tools and a clear plan.",
    "Many countries have their own traditions around it.",
    "It is easy to learn the basics and hard to master the details.",
    "Scientists measure it with instruments that are surprisingly simple.",
    "In the past it was rare, but today it is common almost everywhere.",
]


def write_data(path: Path, n: int) -> Path:
    """Chat examples with a short question and an answer long enough to fill any --seq-len <= 512."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            answer = " ".join(f"{SENTENCES[(i + k) % len(SENTENCES)]} Point {k + 1} about {topic}." for k in range(40))
            f.write(json.dumps({"prompt": f"Tell me everything about {topic} (part {i}).", "completion": answer}) + "\n")
    return path


# --------------------------------------------------------------------------- workers (one process each)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_ours(a: dict) -> dict:
    import torch

    from openherd.tune.lora import lora_state_dict
    from openherd.tune.sft import TuneConfig, fit, setup

    torch.set_num_threads(a["threads"])
    cfg = TuneConfig(base=a["gguf"], data=a["data"], out="bench-tune", rank=8, alpha=16, dropout=0.05,
                     max_steps=a["steps"], lr=a["lr"], warmup=a["warmup"], batch_size=a["batch_size"],
                     seq_len=a["seq_len"], eval_split=0.0, save_every=10**9, seed=a["seed"], progress=False,
                     run_dir=a["run_dir"], overwrite=True)  # fmt: skip
    run = setup(cfg)
    try:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in lora_state_dict(run.model).items()}, a["init"])
        steps: list[dict] = []
        fit(run, on_step=lambda r, rec: steps.append({**rec, "cpu": time.process_time()}))
    finally:
        run.close()
    tok = a["batch_size"] * a["seq_len"]
    wall = sum(tok / s["tok_s"] for s in steps[1:])  # each step's own time, as fit measured it
    cpu = steps[-1]["cpu"] - steps[0]["cpu"]
    return {"losses": [s["loss"] for s in steps], "tok_s": tok * (len(steps) - 1) / wall,
            "cpu_tok_s": tok * (len(steps) - 1) / cpu, "rss_mb": _rss_mb()}  # fmt: skip


def worker_peer(a: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from openherd.tune.sft import lr_at

    torch.set_num_threads(a["threads"])
    torch.manual_seed(a["seed"])
    batches = load_file(a["batches"])
    model = AutoModelForCausalLM.from_pretrained(a["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS_HF,
                                             bias="none", task_type="CAUSAL_LM"))  # fmt: skip
    # The same starting point as ours: copy our seeded A (B is zero on both sides).
    init = load_file(a["init"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in init.items():
            mod, _, ab = name.rpartition(".")
            _, layer, rest = mod.split(".", 2)
            hf = f"base_model.model.model.layers.{layer}.{HF_NAME[rest]}.lora_{ab[-1].upper()}.default.weight"
            params[hf].copy_(t)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True)
    losses, walls, cpus = [], [], []
    for step in range(a["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a["steps"], a["warmup"], a["lr"], 0.1)
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=batches["input_ids"][step], labels=batches["labels"][step])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    tok = a["batch_size"] * a["seq_len"]
    return {"losses": losses, "tok_s": tok * (len(walls) - 1) / sum(walls[1:]),
            "cpu_tok_s": tok * (len(cpus) - 1) / sum(cpus[1:]), "rss_mb": _rss_mb()}  # fmt: skip


# --------------------------------------------------------------------------- orchestration


def prepare(a: dict, work: Path) -> None:
    """The HF directory of the same weights, and the exact batches `herd tune` will train on."""
    import torch
    from safetensors.torch import save_file

    from openherd.model import load_torch_model, save_hf_dir
    from openherd.tune.data import (
        IGNORE,
        ChatRenderer,
        batches,
        collate,
        read_jsonl,
        single_rows,
        tokenize_all,
    )

    logging.getLogger("openherd.tune").setLevel(logging.ERROR)  # truncating to --seq-len is the point here
    model, tok = load_torch_model(a["gguf"], device="cpu", dtype=torch.float32)
    save_hf_dir(model, work / "hf", dtype=torch.float32)
    a["hf_dir"] = str(work / "hf")
    rows = single_rows(tokenize_all(read_jsonl(a["data"]), ChatRenderer(tok), a["seq_len"]))
    assert all(len(r) == a["seq_len"] for r in rows), "every row must be exactly --seq-len tokens (no padding)"
    stream = batches(rows, a["batch_size"], a["seed"])  # the same generator fit() draws from
    ids, labels = [], []
    for _ in range(a["steps"]):
        rs = next(stream)
        b = collate(rs, 0, packed=False)
        ids.append(b.input_ids)
        # HF shifts labels itself: label[t] = token t where it is trained (our target[t-1]).
        lab = torch.full_like(b.input_ids, IGNORE)
        lab[:, 1:] = b.targets[:, :-1]
        labels.append(lab)
    save_file({"input_ids": torch.stack(ids), "labels": torch.stack(labels)}, str(work / "batches.safetensors"))
    a["batches"] = str(work / "batches.safetensors")


def run_worker(kind: str, a: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, __file__, "--worker", kind, "--args", json.dumps(a)], env=env,
                       capture_output=True, text=True, cwd=REPO)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="store name or .gguf path (default: the default model)")
    ap.add_argument("--tiny", action="store_true", help="a tiny generated model instead (a quick smoke run)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--runs", type=int, default=1, help="alternate the two sides this many times; medians reported")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_peer
        print(json.dumps(fn(json.loads(args.args))))
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        if args.tiny:
            sys.path.insert(0, str(REPO / "tests"))
            from tinymodels import write_tiny_gguf

            gguf = str(write_tiny_gguf(work / "tiny.gguf", n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256))
        else:
            gguf = resolve_model(args.model)
        a = dict(gguf=gguf, data=str(write_data(work / "data.jsonl", max(64, args.steps * args.batch_size))),
                 steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                 warmup=max(1, round(0.05 * args.steps)), threads=threads, seed=args.seed,
                 run_dir=str(work / "run"), init=str(work / "init.safetensors"))  # fmt: skip
        os.environ.setdefault("HERD_HOME", str(work / "home"))
        prepare(a, work)
        runs = []
        for r in range(args.runs):
            runs.append((run_worker("ours", a), run_worker("peer", a)))
            if args.runs > 1:
                o, p = runs[-1]
                print(f"run {r + 1}: ours {o['tok_s']:.1f} tok/s, peer {p['tok_s']:.1f} tok/s, "
                      f"{o['tok_s'] / p['tok_s']:.3f}x", flush=True)  # fmt: skip

    def median(key: str, side: int) -> float:
        return statistics.median(r[side][key] for r in runs)

    ours, peer = runs[-1]  # losses and RSS: every run trains the same steps
    ours = {**ours, "tok_s": median("tok_s", 0), "cpu_tok_s": median("cpu_tok_s", 0)}
    peer = {**peer, "tok_s": median("tok_s", 1), "cpu_tok_s": median("cpu_tok_s", 1)}
    n = args.steps
    rel = abs(ours["losses"][-1] - peer["losses"][-1]) / peer["losses"][-1]
    ratios = [o["tok_s"] / p["tok_s"] for o, p in runs]
    speedup = statistics.median(ratios)
    cpu_speedup = statistics.median(o["cpu_tok_s"] / p["cpu_tok_s"] for o, p in runs)
    model_name = "tiny generated llama (4 layers, 128 dims)" if args.tiny else f"`{args.model}` ({Path(gguf).name[:19]}…, dequantized)"
    import peft
    import transformers

    runs_note = "" if args.runs == 1 else (
        f" Median of {args.runs} interleaved runs; per-run ratios " + ", ".join(f"{x:.2f}x" for x in ratios) + ".")
    body = f"""`python bench/tune.py{' --tiny' if args.tiny else ''} --steps {n}{f' --runs {args.runs}' if args.runs > 1 else ''}` on {date.today()}: {model_name}, \
LoRA r=8 alpha=16 dropout=0.05 on q/k/v/o/gate/up/down, seq len {args.seq_len}, batch {args.batch_size}, fp32, \
{threads} torch threads, {n} steps of AdamW (lr {args.lr}, warmup + cosine, clip 1.0) on the same rows in the same \
order, loss on assistant tokens only. torch {torch.__version__}, transformers {transformers.__version__}, \
peft {peft.__version__}, {platform.machine()} `{platform.processor() or platform.platform()}`, {os.cpu_count()} CPUs.

| | train tok/s | tok per CPU-second | peak RSS | loss at step {n} |
| --- | --- | --- | --- | --- |
| `herd tune` | {ours['tok_s']:.0f} | {ours['cpu_tok_s']:.0f} | {ours['rss_mb']:.0f} MB | {ours['losses'][-1]:.4f} |
| transformers + PEFT | {peer['tok_s']:.0f} | {peer['cpu_tok_s']:.0f} | {peer['rss_mb']:.0f} MB | {peer['losses'][-1]:.4f} |

Speed-up {speedup:.2f}x wall ({cpu_speedup:.2f}x per CPU-second; goal 1.5x); loss at step {n} differs by \
{100 * rel:.2f}% (goal < 2%; LoRA dropout masks differ between the two, the rest is the same maths).{runs_note}
"""
    print(body)
    print("losses ours:", " ".join(f"{x:.3f}" for x in ours["losses"]))
    print("losses peer:", " ".join(f"{x:.3f}" for x in peer["losses"]))
    if not args.no_write:
        write_section("tune", body)


if __name__ == "__main__":
    main()
