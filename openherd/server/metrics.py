"""Prometheus metrics, in the text exposition format (version 0.0.4).

A few counters and histograms do not justify a dependency: this module writes
the format directly. Everything is updated from the server's event-loop thread
only (the serving layer and the HTTP middleware), so no locks are needed.
Gauges that belong to the engines (queue depth, active sequences) are read at
scrape time from ``Engine.stats()``, so they can never drift.

Time to first token and inter-token latency are measured where the user sees
them: in the serving layer, per stream, as each token is handed to the HTTP
response, so they include queueing and scheduling, not just ``llama_decode``.

Memory: the standard ``process_*`` series of Prometheus' client libraries (read
from procfs, as prometheus_client's ProcessCollector reads them, so existing
dashboards and alerts work unchanged; left out where there is no procfs), and
``herd_model_memory_bytes`` per loaded model and kind, as llama.cpp allocated it.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. TTFT spans queueing + prefill; ITL one decode step of the whole batch.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


@dataclass
class Counter:
    name: str
    help: str
    labelnames: tuple[str, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, *labels: str, value: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for lv, v in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labelnames, lv)} {_num(v)}")
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    labelnames: tuple[str, ...] = ()
    # per label set: (bucket counts (non-cumulative, +Inf last), sum, count)
    series: dict[tuple[str, ...], list] = field(default_factory=dict)

    def observe(self, value: float, *labels: str) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        s[0][bisect.bisect_left(self.buckets, value)] += 1
        s[1] += value
        s[2] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for lv, (counts, total, n) in sorted(self.series.items()):
            cum = 0
            for le, c in zip((*self.buckets, math.inf), counts, strict=True):
                cum += c
                le_label = 'le="' + _num(le) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, lv, le_label)} {cum}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, lv)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, lv)} {n}")
        return lines


def render_gauge(
    name: str, help: str, labelnames: tuple[str, ...], values: dict[tuple[str, ...], float]
) -> list[str]:
    lines = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    for lv, v in sorted(values.items()):
        lines.append(f"{name}{_labels(labelnames, lv)} {_num(v)}")
    return lines


@dataclass(frozen=True)
class ProcessStats:
    resident_bytes: int
    virtual_bytes: int
    cpu_seconds: float  # user + system
    start_time: float  # Unix seconds
    open_fds: int
    max_fds: int | None  # the soft RLIMIT_NOFILE; None when unlimited


def read_process_stats(proc: str = "/proc/self") -> ProcessStats | None:
    """This process' figures from procfs; None where there is none (macOS, Windows)."""
    try:
        with open(f"{proc}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        # proc(5): field 2 (comm) may hold spaces and ')', so split after the last ')'.
        # fields[0] is then field 3 (state): utime is field 14, rss field 24.
        fields = stat[stat.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])
        start_ticks, vsize, rss_pages = int(fields[19]), int(fields[20]), int(fields[21])
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        open_fds = len(os.listdir(f"{proc}/fd"))
        boot = _boot_time()
    except (OSError, ValueError, IndexError):
        return None
    return ProcessStats(
        resident_bytes=rss_pages * page,
        virtual_bytes=vsize,
        cpu_seconds=(utime + stime) / ticks,
        start_time=boot + start_ticks / ticks,  # starttime counts clock ticks since boot
        open_fds=open_fds,
        max_fds=_max_fds(),
    )


@functools.cache
def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


def _max_fds() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def render_process(stats: ProcessStats | None) -> list[str]:
    if stats is None:
        return []
    lines = [
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
        "# TYPE process_cpu_seconds_total counter",
        f"process_cpu_seconds_total {_num(stats.cpu_seconds)}",
    ]
    lines += render_gauge(
        "process_resident_memory_bytes", "Resident memory size in bytes.", (), {(): stats.resident_bytes}
    )
    lines += render_gauge(
        "process_virtual_memory_bytes", "Virtual memory size in bytes.", (), {(): stats.virtual_bytes}
    )
    lines += render_gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        (),
        {(): stats.start_time},
    )
    lines += render_gauge("process_open_fds", "Number of open file descriptors.", (), {(): stats.open_fds})
    if stats.max_fds is not None:
        lines += render_gauge(
            "process_max_fds", "Maximum number of open file descriptors.", (), {(): stats.max_fds}
        )
    return lines


MEMORY_KINDS = ("weights", "kv_cache", "compute")


def render_model_memory(memory: dict[str, object]) -> list[str]:
    """``memory``: loaded model name -> its ``ModelMemory`` (weights, kv_cache, compute)."""
    values: dict[tuple[str, ...], float] = {}
    for model, mem in memory.items():
        for kind in MEMORY_KINDS:
            v = getattr(mem, kind, None)
            if v is not None:  # llama.cpp could not tell: no series rather than a false 0
                values[(model, kind)] = float(v)
    return render_gauge(
        "herd_model_memory_bytes",
        "Memory llama.cpp allocated for a loaded model: weights (llama_model_size; LoRA variants "
        "share their base's), kv_cache, compute buffers.",
        ("model", "kind"),
        values,
    )


class Metrics:
    def __init__(self):
        self.requests = Counter(
            "herd_http_requests_total",
            "HTTP requests by route, method and status.",
            ("route", "method", "status"),
        )
        self.request_duration = Histogram(
            "herd_http_request_duration_seconds",
            "Time to the end of the response, by route.",
            DURATION_BUCKETS,
            ("route",),
        )
        self.prompt_tokens = Counter(
            "herd_prompt_tokens_total", "Prompt tokens of finished sequences.", ("model",)
        )
        self.completion_tokens = Counter("herd_completion_tokens_total", "Generated tokens.", ("model",))
        self.cached_tokens = Counter(
            "herd_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.", ("model",)
        )
        self.sequences = Counter(
            "herd_sequences_total", "Finished sequences by finish reason.", ("model", "finish_reason")
        )
        self.ttft = Histogram(
            "herd_time_to_first_token_seconds",
            "Request arrival to first streamed token.",
            TTFT_BUCKETS,
            ("model",),
        )
        self.itl = Histogram(
            "herd_inter_token_latency_seconds",
            "Gap between consecutive tokens of one sequence.",
            ITL_BUCKETS,
            ("model",),
        )

    def render(self, engine_stats: dict[str, object], memory: dict[str, object] | None = None) -> str:
        """``engine_stats``: loaded model name -> its ``EngineStats``; ``memory``: loaded
        model name -> its ``ModelMemory`` (``ModelManager.memory()``)."""
        queue = {(m,): float(getattr(s, "queue_depth", 0)) for m, s in engine_stats.items()}
        active = {(m,): float(getattr(s, "active", 0)) for m, s in engine_stats.items()}
        lines: list[str] = []
        lines += render_gauge(
            "herd_models_loaded", "Models loaded in memory.", (), {(): float(len(engine_stats))}
        )
        lines += render_gauge("herd_queue_depth", "Requests waiting for a sequence slot.", ("model",), queue)
        lines += render_gauge(
            "herd_active_sequences", "Sequences being prefilled or decoded.", ("model",), active
        )
        lines += render_gauge(
            "herd_queue_depth_total", "Requests waiting, all models.", (), {(): sum(queue.values())}
        )
        lines += render_gauge(
            "herd_active_sequences_total", "Active sequences, all models.", (), {(): sum(active.values())}
        )
        lines += render_model_memory(memory or {})
        lines += render_process(read_process_stats())
        for metric in (
            self.requests,
            self.request_duration,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.sequences,
            self.ttft,
            self.itl,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"
