"""The cost meter: what a token costs on this deployment, against closed APIs' list prices.

Llama 3.1's release letter claims open models run at "roughly 50% the cost of closed
models". `herd cost` answers that for one deployment with its own numbers:

* **throughput**, measured here: prefill (prompt) and decode (completion) tokens per
  second of the machine under full load, each measured on its own (``measure_throughput``),
  so the two prices below are what each kind of token costs in machine time;
* **the machine's price per hour**, a setting (HERD_MACHINE_COST) or a named row of the
  machines table;
* **closed APIs' prices** per million input and output tokens, from the same editable
  table (``cost_tables.yaml``; HERD_PRICES points at a user's copy), each row with its
  source and date.

Self-hosted price per million tokens = USD per hour / (tokens per second * 3600) * 1e6.
A workload's blended price weights input and output tokens by its mix (3:1 input to
output by default, the ratio public API comparisons use).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InvalidRequest
from .untrusted import load_yaml

TABLES = Path(__file__).with_name("cost_tables.yaml")
DEFAULT_MIX = (3.0, 1.0)  # input : output tokens of a typical chat workload


@dataclass(frozen=True)
class ApiPrice:
    name: str  # the model as the provider names it, e.g. "gpt-4o"
    provider: str
    input_per_mtok: float  # USD per million input (prompt) tokens
    output_per_mtok: float  # USD per million output (completion) tokens
    source: str  # where the price is published
    as_of: str  # when it was published there (ISO date)
    recorded: str = ""  # when it was written into the table


@dataclass(frozen=True)
class MachinePrice:
    name: str  # e.g. "aws-c7i.large"
    provider: str
    hardware: str  # what the price buys, in words
    usd_per_hour: float
    source: str
    as_of: str
    recorded: str = ""


@dataclass(frozen=True)
class PriceTables:
    apis: tuple[ApiPrice, ...]
    machines: tuple[MachinePrice, ...]

    def machine(self, name: str) -> MachinePrice:
        for m in self.machines:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.machines) or "none"
        raise InvalidRequest(f"unknown machine {name!r} in the price table; known: {known}")


def _rows(doc: dict, key: str, cls: type, what: str) -> tuple:
    rows = doc.get(key, [])
    if not isinstance(rows, list):
        raise InvalidRequest(f"{what}: '{key}' must be a list")
    fields = {f for f in cls.__dataclass_fields__}
    numeric = {f for f in fields if f.endswith(("_per_mtok", "_per_hour"))}
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{what}: {key}[{i}]"
        if not isinstance(row, dict):
            raise InvalidRequest(f"{where} must be a mapping")
        unknown = sorted(set(row) - fields)
        missing = sorted(f for f in fields - set(row) if f != "recorded")
        if unknown or missing:
            raise InvalidRequest(
                f"{where}: " + "; ".join(
                    ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
                    + ([f"missing field(s) {', '.join(missing)}"] if missing else [])
                )
            )  # fmt: skip
        values = {}
        for f, v in row.items():
            if f in numeric:
                if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                    raise InvalidRequest(f"{where}: {f} must be a number >= 0, got {v!r}")
                values[f] = float(v)
            else:  # a YAML date (as_of: 2024-10-01 unquoted) reads as a date: keep its text
                values[f] = str(v)
        out.append(cls(**values))
    return tuple(out)


def load_tables(path: str | Path | None = None) -> PriceTables:
    """The price tables from `path`, or the ones shipped with openherd."""
    path = Path(path) if path else TABLES
    what = str(path) if path != TABLES else "the built-in price table"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidRequest(f"cannot read the price table {path}: {e.strerror}") from None
    doc = load_yaml(raw, what) or {}
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{what} must be a mapping with 'closed_apis' and 'machines'")
    unknown = sorted(set(doc) - {"closed_apis", "machines"})
    if unknown:
        raise InvalidRequest(
            f"{what}: unknown section(s) {', '.join(unknown)}; expected closed_apis, machines"
        )
    return PriceTables(_rows(doc, "closed_apis", ApiPrice, what), _rows(doc, "machines", MachinePrice, what))


@dataclass(frozen=True)
class Throughput:
    prompt_tps: float  # prompt tokens evaluated per second, machine-wide, under full load
    completion_tps: float  # tokens generated per second, machine-wide, with `concurrency` streams
    concurrency: int  # sequences decoded together while measuring
    source: str  # "benchmark" (measured here) or "given"

    def __post_init__(self):
        if not (self.prompt_tps > 0 and self.completion_tps > 0):
            raise InvalidRequest("throughput must be > 0 tokens per second for prompt and completion")


def per_mtok(usd_per_hour: float, tokens_per_second: float) -> float:
    """USD per million tokens at a sustained rate on a machine billed by the hour."""
    return usd_per_hour / (tokens_per_second * 3600.0) * 1e6


def blended(input_price: float, output_price: float, mix: tuple[float, float] = DEFAULT_MIX) -> float:
    """USD per million tokens of a workload with `mix` input : output tokens."""
    i, o = mix
    return (input_price * i + output_price * o) / (i + o)


def parse_mix(text: str) -> tuple[float, float]:
    """'3:1' -> (3.0, 1.0): input to output tokens."""
    try:
        i, o = (float(x) for x in text.split(":"))
    except ValueError:
        raise InvalidRequest(f"--mix must look like INPUT:OUTPUT, e.g. 3:1, not {text!r}") from None
    if i < 0 or o < 0 or i + o == 0:
        raise InvalidRequest("--mix parts must be >= 0 and not both 0")
    return i, o


@dataclass(frozen=True)
class CostRow:
    name: str  # "self-hosted" or an API's name
    input_per_mtok: float
    output_per_mtok: float
    blended_per_mtok: float
    note: str  # where the figures come from


@dataclass(frozen=True)
class CostReport:
    model: str
    machine: str  # a table row's name, or "HERD_MACHINE_COST"
    usd_per_hour: float
    throughput: Throughput
    mix: tuple[float, float]
    rows: tuple[CostRow, ...]  # self-hosted first, then each closed API

    def to_dict(self) -> dict:
        return asdict(self)


def compare(
    model: str,
    throughput: Throughput,
    usd_per_hour: float,
    machine: str,
    tables: PriceTables,
    mix: tuple[float, float] = DEFAULT_MIX,
) -> CostReport:
    if not usd_per_hour > 0:
        raise InvalidRequest("the machine's cost per hour must be > 0 USD")
    inp = per_mtok(usd_per_hour, throughput.prompt_tps)
    out = per_mtok(usd_per_hour, throughput.completion_tps)
    rows = [
        CostRow("self-hosted", inp, out, blended(inp, out, mix), f"{model} on {machine}, {throughput.source}")
    ]
    for api in tables.apis:
        rows.append(
            CostRow(
                api.name,
                api.input_per_mtok,
                api.output_per_mtok,
                blended(api.input_per_mtok, api.output_per_mtok, mix),
                f"{api.provider} list price as of {api.as_of} ({api.source})",
            )
        )
    return CostReport(model, machine, usd_per_hour, throughput, mix, tuple(rows))


# The measurement prompts: distinct texts, so no prefix is shared between them and every
# prompt token is really evaluated (the engine's prefix cache is off while measuring too).
_TOPICS = ("the tides", "a violin", "glaciers", "bread", "a lighthouse", "comets", "bees", "rivers",
           "chess", "volcanoes", "owls", "paper", "clocks", "deserts", "salt", "bridges")  # fmt: skip


def measure_throughput(
    path: str,
    *,
    concurrency: int = 8,
    prompt_tokens: int = 256,
    completion_tokens: int = 64,
    threads: int = 0,
) -> Throughput:
    """Prefill and decode tokens per second of the GGUF at `path` on this machine, full load.

    Prefill: `concurrency` distinct prompts of about `prompt_tokens` tokens, one token
    generated each, all submitted at once. Decode: `concurrency` short prompts generating
    `completion_tokens` each with EOS ignored, so every stream runs to the end. Each rate
    is tokens over wall time, as a machine billed by the hour sees it.
    """
    from .engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    if concurrency < 1 or prompt_tokens < 16 or completion_tokens < 1:
        raise InvalidRequest("measure with concurrency >= 1, prompt_tokens >= 16 and completion_tokens >= 1")
    config = EngineConfig(
        # Room for each sequence, in whole 256-token pages (llama.cpp pads its KV to them).
        n_ctx=-(-(prompt_tokens + completion_tokens + 32) // 256) * 256,
        n_parallel=concurrency,
        n_threads=threads,
        max_queue=concurrency,
        prefix_cache=False,
    )
    engine = Engine.load(path, config, name="cost")
    try:
        prompts = []
        for i in range(concurrency):
            words = f"Notes on {_TOPICS[i % len(_TOPICS)]}, part {i}: "
            ids = engine.tokenize(
                words + " ".join(f"{_TOPICS[(i + k) % len(_TOPICS)]} {k}" for k in range(prompt_tokens))
            )
            prompts.append(ids[:prompt_tokens])
        greedy = dict(temperature=0.0, ignore_eos=True)
        # Warm-up: first-call allocations and page faults are not throughput.
        engine.submit(GenerationRequest(prompts[0][:32], SamplingParams(max_tokens=2, **greedy))).result()

        def timed(reqs: list[GenerationRequest]) -> tuple[float, int, int]:
            t0 = time.perf_counter()
            handles = [engine.submit(r) for r in reqs]
            finishes = [h.result()[1] for h in handles]
            wall = time.perf_counter() - t0
            return (
                wall,
                sum(f.usage.prompt_tokens for f in finishes),
                sum(f.usage.completion_tokens for f in finishes),
            )

        wall, n_prompt, _ = timed(
            [GenerationRequest(p, SamplingParams(max_tokens=1, **greedy)) for p in prompts]
        )
        prompt_tps = n_prompt / wall
        short = [p[:16] for p in prompts]
        wall, _, n_out = timed(
            [GenerationRequest(p, SamplingParams(max_tokens=completion_tokens, **greedy)) for p in short]
        )
        completion_tps = n_out / wall
    finally:
        engine.close()
    return Throughput(prompt_tps, completion_tps, concurrency, "benchmark")
