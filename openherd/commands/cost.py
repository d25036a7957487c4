"""`herd cost`: dollars per million tokens on this machine, against closed APIs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cost",
        help="what a million tokens cost on this machine, against closed APIs",
        description=(
            "Measure MODEL's prefill and decode throughput on this machine under full load (a short "
            "benchmark, about a minute on 2 cores), price the machine by the hour, and compare dollars "
            "per million input, output and blended tokens with closed APIs' list prices. Prices come "
            "from an editable table (HERD_PRICES or --prices; `--tables` prints the built-in one)."
        ),
    )
    p.add_argument(
        "model", nargs="?", metavar="MODEL", help="store name or .gguf path (default: the default model)"
    )
    price = p.add_mutually_exclusive_group()
    price.add_argument("--usd-per-hour", type=float, metavar="USD", help="the machine's cost per hour")
    price.add_argument(
        "--machine", metavar="NAME", help="a row of the price table's machines, e.g. aws-c7i.large"
    )
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="sequences decoded together while measuring (default HERD_NUM_PARALLEL)")  # fmt: skip
    p.add_argument(
        "--prompt-tps", type=float, metavar="TOK/S", help="skip the benchmark: given prefill tok/s"
    )
    p.add_argument(
        "--completion-tps", type=float, metavar="TOK/S", help="skip the benchmark: given decode tok/s"
    )
    p.add_argument(
        "--mix", default="3:1", metavar="IN:OUT", help="input to output tokens of the workload (3:1)"
    )
    p.add_argument(
        "--prices", metavar="FILE", help="a price table (YAML) to use instead of HERD_PRICES / the built-in"
    )
    p.add_argument("--tables", action="store_true", help="print the price table in use (YAML) and exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_cost)


def cmd_cost(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .. import cost
    from ..errors import InvalidRequest
    from ..settings import get_settings

    settings = get_settings()
    table_path = args.prices or settings.prices or None
    if args.tables:
        print(Path(table_path or cost.TABLES).read_text(), end="")
        return 0
    tables = cost.load_tables(table_path)
    mix = cost.parse_mix(args.mix)
    if args.machine:
        row = tables.machine(args.machine)
        usd, machine = row.usd_per_hour, f"{row.name} ({row.hardware}, {row.source}, {row.as_of})"
    elif args.usd_per_hour is not None:
        usd, machine = args.usd_per_hour, "this machine (--usd-per-hour)"
    elif settings.machine_cost:
        usd, machine = settings.machine_cost, "this machine (HERD_MACHINE_COST)"
    else:
        raise InvalidRequest(
            "say what this machine costs: --usd-per-hour USD, HERD_MACHINE_COST=USD, or --machine NAME "
            f"(one of {', '.join(m.name for m in tables.machines)})"
        )
    if (args.prompt_tps is None) != (args.completion_tps is None):
        raise InvalidRequest(
            "give both --prompt-tps and --completion-tps, or neither (then they are measured)"
        )
    name = args.model or settings.default_model
    concurrency = args.concurrency or settings.num_parallel
    if args.prompt_tps is not None:
        tp = cost.Throughput(args.prompt_tps, args.completion_tps, concurrency, "given")
    else:
        from ..store import Store

        path = name if name.endswith(".gguf") and Path(name).is_file() else Store(settings).ensure(name).path
        tp = cost.measure_throughput(path, concurrency=concurrency, threads=settings.threads)
    report = cost.compare(name, tp, usd, machine, tables, mix)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(_table(report))
    return 0


def _table(r) -> str:
    tp = r.throughput
    i, o = r.mix
    lines = [
        f"{r.model} on {r.machine}: ${r.usd_per_hour:g}/hour; {tp.source}: prefill {tp.prompt_tps:.0f} tok/s, "
        f"decode {tp.completion_tps:.1f} tok/s with {tp.concurrency} streams",
        "",
        f"{'USD per million tokens':<24}{'input':>10}{'output':>10}{f'blended {i:g}:{o:g}':>16}",
    ]
    own = r.rows[0].blended_per_mtok
    for row in r.rows:
        share = "" if row is r.rows[0] else f"   self-hosted is {own / row.blended_per_mtok:.1%} of this"
        lines.append(
            f"{row.name:<24}{row.input_per_mtok:>10.4f}{row.output_per_mtok:>10.4f}{row.blended_per_mtok:>16.4f}{share}"
        )
    lines += [
        "",
        "Closed-API prices: "
        + "; ".join(dict.fromkeys(row.note.split(" (")[0] + f" ({row.name})" for row in r.rows[1:])),
    ]
    sources = dict.fromkeys(row.note.rsplit("(", 1)[-1].rstrip(")") for row in r.rows[1:])
    lines.append("Sources: " + ", ".join(sources) + " (edit the table: herd cost --tables, HERD_PRICES)")
    return "\n".join(lines)
