"""Memory figures in /metrics: the standard ``process_*`` series and, per loaded model,
``herd_model_memory_bytes{kind="weights"|"kv_cache"|"compute"}`` as llama.cpp allocated it.

The live test runs a real ``herd serve`` with the tiny model and checks the figures
against independent sources: the GGUF's tensor sizes, the KV cache arithmetic of
llama.cpp's ``llama_kv_cache``, the server process' own ``/proc/<pid>/status`` and
``/api/ps``. The in-process tests check the pieces against real llama.cpp contexts.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import MODEL, live_server
from tinymodels import TinyConfig, write_tiny_gguf

from openherd.engine.engine import EngineConfig
from openherd.engine.runtime import ContextConfig, LlamaContext, LlamaModel, ReportedBuffers, kv_cache_bytes
from openherd.server.metrics import ProcessStats, read_process_stats, render_process

HAS_PROCFS = Path("/proc/self/stat").exists() and Path("/proc/stat").exists()
MIB = 1024 * 1024
ROUNDING = MIB // 100 + 1  # llama.cpp logs buffer sizes as "%.2f MiB"

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    """Strictly parse the text format: every sample follows its family's HELP and TYPE,
    and no series appears twice. Returns (series -> value, family -> type)."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in helped and name not in types, line
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE line before it"
        key = (name, tuple(sorted(LABEL.findall(m.group(2) or ""))))
        assert key not in samples, f"duplicate series {line!r}"
        samples[key] = float(m.group(3))
    return samples, types


def scrape(url: str) -> tuple[dict, dict[str, str]]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(r.text)


def model_memory(samples: dict) -> dict[str, float]:
    """kind -> bytes of MODEL's herd_model_memory_bytes series."""
    out = {}
    for (name, labels), v in samples.items():
        d = dict(labels)
        if name == "herd_model_memory_bytes" and d["model"] == MODEL:
            out[d["kind"]] = v
    return out


def kv_bytes_per_cell(cfg: TinyConfig) -> int:
    # llama_kv_cache: per layer, K and V rows of n_head_kv * head_dim F16 values per cell.
    return cfg.n_layer * 2 * cfg.n_head_kv * cfg.head_dim * 2


def gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ----------------------------------------------------------------------------- live server


@pytest.mark.skipif(not HAS_PROCFS, reason="the process_* series come from procfs (Linux)")
def test_live_server_reports_process_and_model_memory(tmp_path, serve_gguf):
    n_ctx, n_parallel = 1024, 2  # 2048 KV cells: already a multiple of llama.cpp's 256-cell padding
    env = {"HERD_NUM_CTX": str(n_ctx), "HERD_NUM_PARALLEL": str(n_parallel)}
    t_launch = time.time()
    with live_server(tmp_path, serve_gguf, env=env) as s:
        # No model loaded: the process series are there, no model memory series.
        samples, types = scrape(s.url)
        assert types["process_cpu_seconds_total"] == "counter"
        for name in ("process_resident_memory_bytes", "process_virtual_memory_bytes",
                     "process_start_time_seconds", "process_open_fds", "process_max_fds",
                     "herd_model_memory_bytes"):  # fmt: skip
            assert types[name] == "gauge", name
        assert not model_memory(samples)
        rss = samples[("process_resident_memory_bytes", ())]
        assert rss > 10 * MIB  # a Python interpreter with FastAPI and libllama loaded
        assert rss == pytest.approx(vm_rss(s.proc.pid), rel=0.2)  # the kernel's figure, moments apart
        assert samples[("process_virtual_memory_bytes", ())] >= rss
        assert t_launch - 5 <= samples[("process_start_time_seconds", ())] <= time.time()
        cpu0 = samples[("process_cpu_seconds_total", ())]
        assert cpu0 > 0
        fds = samples[("process_open_fds", ())]
        assert 3 <= fds <= samples[("process_max_fds", ())]

        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
        })  # fmt: skip
        assert r.status_code == 200
        samples, _ = scrape(s.url)
        mem = model_memory(samples)
        assert set(mem) == {"weights", "kv_cache", "compute"}
        # Weights: llama_model_size, every tensor of the file: within a factor of the file size.
        assert mem["weights"] == gguf_tensor_bytes(serve_gguf)
        assert 0.5 * serve_gguf.stat().st_size <= mem["weights"] <= serve_gguf.stat().st_size
        # KV cache: exact, n_ctx per sequence x n_parallel sequences of F16 K and V.
        per_cell = kv_bytes_per_cell(TinyConfig())
        assert mem["kv_cache"] == n_ctx * n_parallel * per_cell
        assert mem["compute"] > 0
        assert samples[("process_resident_memory_bytes", ())] > mem["weights"]
        assert samples[("process_cpu_seconds_total", ())] >= cpu0
        # /api/ps reports what the manager's memory budget counts: the same three figures.
        [ps] = httpx.get(f"{s.url}/api/ps", timeout=10).json()["models"]
        assert ps["size"] == mem["weights"] + mem["kv_cache"] + mem["compute"]

        # An embeddings request creates the engine's embedding context: its KV cache and
        # compute buffers count towards the model too.
        r = httpx.post(f"{s.url}/v1/embeddings", timeout=60, json={"model": MODEL, "input": ["a herd", "llamas"]})
        assert r.status_code == 200
        after = model_memory(scrape(s.url)[0])
        grown = after["kv_cache"] - mem["kv_cache"]
        assert grown >= EngineConfig().embed_ctx * per_cell and grown % per_cell == 0
        assert after["compute"] > mem["compute"]
        assert after["weights"] == mem["weights"]

        # Unloaded (keep_alive 0): its series go with it.
        r = httpx.post(f"{s.url}/api/generate", timeout=60, json={"model": MODEL, "keep_alive": 0})
        assert r.status_code == 200
        samples, _ = scrape(s.url)
        assert not model_memory(samples)
        assert samples[("herd_models_loaded", ())] == 0


# ----------------------------------------------------------------------------- llama.cpp contexts


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model = LlamaModel(str(write_tiny_gguf(tmp_path_factory.mktemp("metrics-gguf") / "tiny.gguf")))
    yield model
    model.close()


@pytest.mark.parametrize(
    "n_ctx,n_seq,unified,cells",
    [
        (2048, 4, True, 2048),
        (1000, 3, True, 1024),  # llama.cpp pads the cache to 256 cells
        (1000, 3, False, 1536),  # one stream per sequence: 3 x 512 cells
        (512, 8, True, 512),
    ],
)
def test_context_memory_is_what_llama_cpp_allocated(tiny_model, n_ctx, n_seq, unified, cells):
    ctx = LlamaContext(tiny_model, ContextConfig(n_ctx=n_ctx, n_seq_max=n_seq, n_batch=512, n_threads=1,
                                                 kv_unified=unified))  # fmt: skip
    try:
        mem = ctx.memory()
        assert ctx.n_ctx == cells
        assert mem.kv_cache == cells * kv_bytes_per_cell(TinyConfig())
        # llama.cpp's own log report, captured while the context was created, agrees.
        assert ctx._reported.kv_cache is not None
        assert abs(ctx._reported.kv_cache - mem.kv_cache) <= ROUNDING
        assert mem.compute == ctx._reported.compute and mem.compute > 0
        assert mem == ctx.memory()  # nothing changes after creation
    finally:
        ctx.close()


def test_embedding_context_memory(tiny_model):
    ctx = LlamaContext(tiny_model, ContextConfig(n_ctx=512, n_seq_max=8, n_batch=512, n_threads=1,
                                                 embeddings=True, pooling=1))  # fmt: skip
    try:
        assert ctx.memory().kv_cache == 512 * kv_bytes_per_cell(TinyConfig())
        assert ctx.memory().compute > 0
    finally:
        ctx.close()


def test_kv_formula_declines_what_it_cannot_describe(tiny_model):
    f16 = kv_cache_bytes(tiny_model, 256)
    assert f16 == 256 * kv_bytes_per_cell(TinyConfig())
    assert kv_cache_bytes(tiny_model, 256, 0, 0) == 2 * f16  # F32 K and V
    assert kv_cache_bytes(tiny_model, 256, 8, 8) is None  # Q8_0: block-packed rows


def test_reported_buffers_parse_every_backend():
    lines = [
        "load_tensors:   CPU_Mapped model buffer size =   531.00 MiB",
        "llama_context:  CUDA_Host  output buffer size =     0.49 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =   384.00 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =    12.00 MiB",  # the SWA half of an iSWA cache
        "llama_memory_recurrent:        CPU RS buffer size =     1.50 MiB",
        "sched_reserve:      CUDA0 compute buffer size =   100.00 MiB",
        "sched_reserve:  CUDA_Host compute buffer size =     8.25 MiB",
        "sched_reserve:      CUDA0 compute buffer size =   164.50 MiB",  # a re-reservation replaces it
    ]
    r = ReportedBuffers.parse(lines)
    assert r.kv_cache == round((384 + 12 + 1.5) * MIB)
    assert r.compute == round((164.5 + 8.25) * MIB)
    assert ReportedBuffers.parse(["llama_context: n_ctx = 4096"]) == ReportedBuffers(None, None)


# ----------------------------------------------------------------------------- procfs


def _fake_proc(root: Path, comm: str, n_fds: int) -> Path:
    proc = root / "proc-self"
    (proc / "fd").mkdir(parents=True)
    for i in range(n_fds):
        (proc / "fd" / str(i)).touch()
    # proc(5) fields 1..24: pid (comm) state ppid ... utime=14 stime=15 ... starttime=22 vsize=23 rss=24
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 6 + ["5000", "7340032", "300"] + ["0"] * 28
    (proc / "stat").write_text(f"4242 ({comm}) " + " ".join(fields) + "\n")
    return proc


@pytest.mark.skipif(not HAS_PROCFS, reason="boot time comes from /proc/stat (Linux)")
def test_read_process_stats_parses_proc_stat(tmp_path):
    # A command name with spaces and parentheses must not shift the fields.
    st = read_process_stats(str(_fake_proc(tmp_path, "herd (serve) x", 5)))
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    assert st is not None
    assert st.cpu_seconds == pytest.approx(400 / ticks)
    assert st.virtual_bytes == 7340032
    assert st.resident_bytes == 300 * page
    assert st.open_fds == 5
    btime = next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime "))
    assert st.start_time == pytest.approx(btime + 5000 / ticks)


@pytest.mark.skipif(not HAS_PROCFS, reason="procfs (Linux)")
def test_read_process_stats_of_this_process():
    import resource

    st = read_process_stats()
    assert st is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    assert 0 < st.resident_bytes <= peak
    assert st.open_fds == len(os.listdir("/proc/self/fd"))  # each listing counts its own descriptor
    assert st.start_time <= time.time()


def test_no_procfs_means_no_process_series(tmp_path):
    assert read_process_stats(str(tmp_path / "no-such-proc")) is None
    assert render_process(None) == []
    lines = render_process(ProcessStats(1, 2, 0.5, 1.7e9, 4, None))
    assert "process_resident_memory_bytes 1" in lines and "process_cpu_seconds_total 0.5" in lines
    assert not any(x.startswith("process_max_fds") for x in lines)  # unlimited: left out
    assert all(math.isfinite(float(x.rsplit(" ", 1)[1])) for x in lines if not x.startswith("#"))
