"""Prompt and single-stream decode speed: openherd's engine vs raw llama.cpp.

Both sides use the same GGUF, threads and context settings, in the same run.
"Raw" is the tightest loop llama-cpp-python allows: its C API directly
(llama_decode on a one-token batch + the native greedy sampler), i.e. zero
serving overhead. Goal (issue 2): openherd >= 0.95x raw decode, i.e. at most
~0.5 ms of Python per token.

    python bench/decode.py [--model smollm2|PATH] [--threads 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import threading
import time
from datetime import date

sys.path.insert(0, os.path.dirname(__file__))
from common import resolve_model, write_section  # noqa: E402


def raw_llama(path: str, prompt: list[int], n_decode: int, threads: int, n_ctx: int) -> tuple[float, float]:
    import llama_cpp as ll

    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0  # as the engine on a CPU build
    model = ll.llama_model_load_from_file(path.encode(), mp)
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    ctx = ll.llama_init_from_model(model, cp)
    smpl = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    ll.llama_sampler_chain_add(smpl, ll.llama_sampler_init_greedy())
    arr = (ll.llama_token * len(prompt))(*prompt)
    t0 = time.perf_counter()
    for i in range(0, len(prompt), 512):  # prefill in n_batch chunks, as the engine does
        n = min(512, len(prompt) - i)
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(ctypes.cast(ctypes.byref(arr, i * 4), ctypes.POINTER(ll.llama_token)), n)) == 0
    t1 = time.perf_counter()
    tok = ll.llama_sampler_sample(smpl, ctx, -1)
    one = (ll.llama_token * 1)()
    t2 = time.perf_counter()
    for _ in range(n_decode):
        one[0] = tok
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(one, 1)) == 0
        tok = ll.llama_sampler_sample(smpl, ctx, -1)
    t3 = time.perf_counter()
    ll.llama_sampler_free(smpl)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return len(prompt) / (t1 - t0), n_decode / (t3 - t2)


def herd_engine(path: str, prompt: list[int], n_decode: int, threads: int, n_ctx: int) -> tuple[float, float]:
    from openherd.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    e = Engine.load(path, EngineConfig(n_ctx=n_ctx, n_parallel=1, n_threads=threads, n_batch=512))
    try:
        h = e.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=n_decode + 1, ignore_eos=True)))
        _, fin = h.result()
        u = fin.usage
        # prompt_ms: admission -> first sampled token (includes sampling one token);
        # decode_ms: first -> last token, i.e. n_decode decode steps.
        return u.prompt_tokens / (u.prompt_ms / 1000), (u.completion_tokens - 1) / (u.decode_ms / 1000)
    finally:
        e.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    path = resolve_model(args.model)
    from openherd.engine.runtime import LlamaModel, init_backend

    init_backend()  # llama_backend_init + quiet logs, for both sides alike

    m = LlamaModel(path)
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 200)
    prompt = m.tokenize(text, add_special=False)[: args.prompt_tokens]
    m.close()
    n_ctx = 2048
    res = {"raw": ([], []), "herd": ([], [])}
    for _ in range(args.runs):  # interleave so drift on a shared machine hits both sides
        for name, fn in (("raw", raw_llama), ("herd", herd_engine)):
            # Both drive llama_decode from a non-main thread, as the engine's scheduler
            # does: on this VM the same loop on Python's main thread measured ~2x slower.
            box: list = []
            t = threading.Thread(target=lambda fn=fn, box=box: box.append(fn(path, prompt, args.decode_tokens, args.threads, n_ctx)))
            t.start()
            t.join()
            p, d = box[0]
            res[name][0].append(p)
            res[name][1].append(d)
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
    rp, rd = med["raw"]
    hp, hd = med["herd"]
    overhead_ms = (1000 / hd - 1000 / rd)
    lines = [
        f"Date {date.today()}, {platform.node() or 'host'} ({os.cpu_count()} CPUs, {platform.machine()}), "
        f"model {os.path.basename(path)}, {args.threads} threads, prompt {len(prompt)} tokens, "
        f"decode {args.decode_tokens} tokens, median of {args.runs} interleaved runs.",
        "",
        "| | prompt tok/s | decode tok/s |",
        "|---|---:|---:|",
        f"| raw llama-cpp-python (C API loop) | {rp:.1f} | {rd:.1f} |",
        f"| openherd engine | {hp:.1f} | {hd:.1f} |",
        f"| ratio openherd / raw | {hp / rp:.3f} | {hd / rd:.3f} |",
        "",
        f"Python overhead per decoded token: {overhead_ms:.3f} ms (goal: <= 0.5 ms, ratio >= 0.95).",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("decode", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
