"""Serving under concurrency: `herd serve` against llama.cpp's own `llama-server`.

Closed-loop streaming clients (each sends its next request as soon as the previous
one finishes) at several concurrency levels, max_tokens 128, against both servers in
the same run, on the same GGUF, thread count and number of parallel sequences (`-np`
equal to HERD_NUM_PARALLEL), each server alone on the machine. The two sides alternate
for --rounds rounds (herd, peer, herd, peer, ...), because this machine is shared and
noisy, and the table reports medians and the per-round ratios. Reports aggregate
completion tok/s, time to first token (p50/p99), inter-token latency (p50/p99) and
errors. Traffic goes to 127.0.0.1 only; every loop is bounded.

    python bench/serve.py [--model smollm2] [--threads 2] [--levels 1,8,16] [--rounds 2]
                          [--peer llama-server|llama-cpp-python]

`llama-server` is built once from the llama.cpp source that the installed
llama-cpp-python vendors (bench/llama_server.py) and cached.

Goal (the serving-core issue): aggregate tok/s at least 1.0x llama-server at
concurrency 1, 8 and 16, TTFT p99 no higher than llama-server's, zero errors; single
stream decode at least 0.95x raw llama.cpp (bench/decode.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from statistics import median

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from common import resolve_model, write_section  # noqa: E402
from llama_server import ensure_llama_server  # noqa: E402

TOPICS = ["a lighthouse", "the moon", "a tiny robot", "autumn", "the sea", "a library", "a fox", "a city",
          "mountains", "a violin", "the desert", "a garden", "a train", "snow", "a market", "a comet"]


@dataclass
class Stats:
    tokens: int = 0
    errors: int = 0
    requests: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


async def one_request(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, st: Stats):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
    }
    t0 = time.perf_counter()
    last = None
    n = 0
    try:
        async with client.stream("POST", url, json=body, timeout=300) as r:
            if r.status_code != 200:
                st.errors += 1
                st.error_samples.append(f"HTTP {r.status_code}: {(await r.aread())[:120]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if not choices or not (choices[0].get("delta") or {}).get("content"):
                    continue
                now = time.perf_counter()
                if last is None:
                    st.ttft.append(now - t0)
                else:
                    st.itl.append(now - last)
                last = now
                n += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        st.errors += 1
        st.error_samples.append(type(e).__name__)
        return
    st.tokens += n
    st.requests += 1


async def run_level(base: str, model: str, concurrency: int, per_client: int, max_tokens: int) -> tuple[Stats, float]:
    st = Stats()
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def client_loop(c: int):
            for k in range(per_client):  # bounded closed loop
                await one_request(client, url, model, c * per_client + k, max_tokens, st)

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    return st, wall


def raw_batched(path: str, threads: int, n_seqs: int, max_tokens: int) -> float:
    """The hardware ceiling at this concurrency: the same chat prompts, all prefilled
    and then decoded together with llama.cpp's C API (one llama_decode per step, one
    token per sequence, native samplers, no EOS), no HTTP and no scheduler. Returns
    aggregate tok/s over prefill + decode, as the servers' numbers are."""
    import ctypes  # noqa: F401  (llama_cpp's batch fields are ctypes arrays)
    import threading

    import llama_cpp as ll

    from openherd.chat_template import ChatTemplate
    from openherd.engine.runtime import LlamaModel

    m = LlamaModel(path)
    info = m.info("bench", 1024)
    tmpl = ChatTemplate(info.chat_template, info.bos_text, info.eos_text)
    prompts = [m.tokenize(tmpl.render([{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}],
                                      add_generation_prompt=True), add_special=False, parse_special=True)
               for i in range(n_seqs)]
    box: list[float] = []

    def run() -> None:
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024 * n_seqs, 512, 512, n_seqs
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        ctx = ll.llama_init_from_model(m.ptr, cp)
        batch = ll.llama_batch_init(512, 0, 1)
        samplers = []
        for i in range(n_seqs):
            ch = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
            for s in (ll.llama_sampler_init_top_k(40), ll.llama_sampler_init_top_p(0.95, 1),
                      ll.llama_sampler_init_temp(0.7), ll.llama_sampler_init_dist(i)):
                ll.llama_sampler_chain_add(ch, s)
            samplers.append(ch)

        def add(j: int, tok: int, pos: int, seq: int, want: bool) -> None:
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = tok, pos, 1, seq, want

        t0 = time.perf_counter()
        n = 0
        for i, p in enumerate(prompts):  # all prompts in one prefill batch (they fit in 512)
            for k, tok in enumerate(p):
                add(n, tok, k, i, k == len(p) - 1)
                n += 1
        batch.n_tokens = n
        assert ll.llama_decode(ctx, batch) == 0
        out = [sum(len(q) for q in prompts[: i + 1]) - 1 for i in range(n_seqs)]
        pos = [len(p) for p in prompts]
        produced = 0
        for _ in range(max_tokens):
            toks = [ll.llama_sampler_sample(samplers[i], ctx, out[i]) for i in range(n_seqs)]
            produced += n_seqs
            for i, tok in enumerate(toks):
                add(i, tok, pos[i], i, True)
                pos[i] += 1
            batch.n_tokens = n_seqs
            out = list(range(n_seqs))
            assert ll.llama_decode(ctx, batch) == 0
        box.append(produced / (time.perf_counter() - t0))
        for ch in samplers:
            ll.llama_sampler_free(ch)
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)

    t = threading.Thread(target=run)  # llama_decode off the main thread, as bench/decode.py explains
    t.start()
    t.join()
    m.close()
    return box[0]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become ready")


def start_herd(path: str, threads: int, parallel: int, home: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = dict(os.environ, HERD_HOME=home, HERD_HOST=f"127.0.0.1:{port}", HERD_THREADS=str(threads),
               HERD_NUM_PARALLEL=str(parallel), HERD_NUM_CTX="1024", HERD_MAX_QUEUE="256")
    subprocess.run([sys.executable, "-m", "openherd", "pull", path, "--name", "bench"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "-m", "openherd", "serve", "--model", "bench"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}", "bench"


def start_llama_cpp_python(path: str, threads: int, parallel: int) -> tuple[subprocess.Popen, str, str]:
    """llama-cpp-python's own server (one sequence at a time: it has no continuous batching)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1", "--port", str(port),
         "--n_threads", str(threads), "--n_ctx", "2048", "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}", path


def start_llama_server(path: str, threads: int, parallel: int) -> tuple[subprocess.Popen, str, str]:
    """llama.cpp's C++ server with herd's settings: `parallel` slots of HERD_NUM_CTX (1024)
    tokens each (-c is the total that the slots share), continuous batching (its default)."""
    binary = ensure_llama_server(log=lambda m: print(m, flush=True))
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "-m", path, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
         "-tb", str(threads), "-np", str(parallel), "-c", str(1024 * parallel)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}", "bench"


PEERS = {"llama-server": start_llama_server, "llama-cpp-python": start_llama_cpp_python}


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_side(starter, levels: list[int], args) -> dict[int, tuple[Stats, float]]:
    """Start one server, warm it up, run every level, stop it."""
    proc, base, model = starter()
    out: dict[int, tuple[Stats, float]] = {}
    try:
        wait_ready(base, proc)
        asyncio.run(run_level(base, model, 1, 1, 8))  # warm-up
        for c in levels:
            out[c] = asyncio.run(run_level(base, model, c, args.per_client, args.max_tokens))
    finally:
        stop(proc)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,8,16")
    ap.add_argument("--per-client", type=int, default=2, help="requests each closed-loop client sends")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--parallel", type=int, default=8, help="sequences decoded together (herd and the peer)")
    ap.add_argument("--peer", choices=sorted(PEERS), default="llama-server")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two sides this many times")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the raw batched llama.cpp ceiling")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import tempfile

    path = resolve_model(args.model)
    levels = [int(x) for x in args.levels.split(",")]
    if args.peer == "llama-server":
        ensure_llama_server(log=lambda m: print(m, flush=True))  # build before anything is timed
    # rounds[side][r][c] = (stats, wall)
    rounds: dict[str, list[dict[int, tuple[Stats, float]]]] = {"openherd": [], args.peer: []}
    with tempfile.TemporaryDirectory() as home:
        sides = {
            "openherd": lambda: start_herd(path, args.threads, args.parallel, home),
            args.peer: lambda: PEERS[args.peer](path, args.threads, args.parallel),
        }
        for r in range(args.rounds):
            for name, starter in sides.items():
                res = serve_side(starter, levels, args)
                rounds[name].append(res)
                for c, (st, wall) in res.items():
                    print(f"round {r + 1} {name:>18} c={c:<3} {st.tokens / wall:7.1f} tok/s  "
                          f"ttft p50 {pct(st.ttft, 50):.2f}s p99 {pct(st.ttft, 99):.2f}s  "
                          f"itl p50 {pct(st.itl, 50) * 1000:.0f}ms p99 {pct(st.itl, 99) * 1000:.0f}ms  "
                          f"errors {st.errors} {st.error_samples[:2]}", flush=True)
    # The ceiling: what llama.cpp itself does with c sequences decoded together and
    # nothing else running (same prompts, max_tokens, sampler settings, threads).
    ceiling = {} if args.no_ceiling else {
        c: raw_batched(path, args.threads, c, args.max_tokens) for c in levels if 1 < c <= args.parallel
    }
    text = report(rounds, levels, ceiling, args, os.path.basename(path))
    print(text)
    if not args.no_write:
        write_section("serve", text)
    return 0


def report(rounds, levels: list[int], ceiling: dict[int, float], args, model: str) -> str:
    peer = args.peer
    peer_cmd = (
        f"`llama-server -t {args.threads} -tb {args.threads} -np {args.parallel} -c {1024 * args.parallel}` "
        "built from the llama.cpp that llama-cpp-python vendors"
        if peer == "llama-server" else "`python -m llama_cpp.server --interrupt_requests False`"
    )
    lines = [
        f"Date {date.today()}, {platform.node() or 'host'} ({os.cpu_count()} CPUs, {platform.machine()}), "
        f"model {model}, {args.threads} threads, max_tokens {args.max_tokens}, "
        f"{args.per_client} requests per closed-loop client, {args.rounds} interleaved rounds (medians); "
        f"herd HERD_NUM_PARALLEL={args.parallel}; peer {peer_cmd} (same GGUF and threads).",
        "",
        "| server | concurrency | tok/s (median) | per round | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]

    def med(side: str, c: int, f) -> float:
        return median(f(r[c][0], r[c][1]) for r in rounds[side])

    def tps(st: Stats, wall: float) -> float:
        return st.tokens / wall

    for side in rounds:
        for c in levels:
            per = ", ".join(f"{tps(*r[c]):.1f}" for r in rounds[side])
            lines.append(
                f"| {side} | {c} | {med(side, c, tps):.1f} | {per} "
                f"| {med(side, c, lambda st, w: pct(st.ttft, 50)):.2f} s "
                f"| {med(side, c, lambda st, w: pct(st.ttft, 99)):.2f} s "
                f"| {med(side, c, lambda st, w: pct(st.itl, 50)) * 1000:.0f} ms "
                f"| {med(side, c, lambda st, w: pct(st.itl, 99)) * 1000:.0f} ms "
                f"| {sum(r[c][0].errors for r in rounds[side])} |"
            )
    lines.append("")
    met = True
    for c in levels:
        h, p = med("openherd", c, tps), med(peer, c, tps)
        per_round = ", ".join(
            f"{tps(*a[c]) / tps(*b[c]):.2f}" for a, b in zip(rounds["openherd"], rounds[peer], strict=True)
        )
        th = med("openherd", c, lambda st, w: pct(st.ttft, 99))
        tp = med(peer, c, lambda st, w: pct(st.ttft, 99))
        errors = sum(r[c][0].errors for side in rounds for r in rounds[side])
        met = met and h >= p and th <= tp and errors == 0
        line = (f"- concurrency {c}: openherd / {peer} aggregate tok/s = **{h / p:.2f}x** (per round {per_round}); "
                f"TTFT p99 {th:.2f} s against {tp:.2f} s")
        if c in ceiling:
            line += f"; raw batched llama.cpp ceiling {ceiling[c]:.1f} tok/s, openherd reaches {h / ceiling[c]:.0%} of it"
        lines.append(line)
    if peer == "llama-server":
        lines.append(f"- goal (>= 1.0x at every level, TTFT p99 no higher, zero errors): **{'met' if met else 'not met'}**")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
