"""The cost meter: its arithmetic, its price table, its measurement and `herd cost`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from openherd import cost
from openherd.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[1]


def test_prices_follow_from_throughput_and_the_hourly_rate():
    # $0.36/h = $0.0001/s; 100 prompt tok/s -> $1 per million, 10 completion tok/s -> $10.
    assert cost.per_mtok(0.36, 100.0) == pytest.approx(1.0)
    assert cost.per_mtok(0.36, 10.0) == pytest.approx(10.0)
    assert cost.blended(1.0, 10.0, (3, 1)) == pytest.approx(3.25)
    assert cost.blended(1.0, 10.0, (0, 1)) == pytest.approx(10.0)
    tables = cost.load_tables()
    report = cost.compare("m", cost.Throughput(100.0, 10.0, 8, "given"), 0.36, "box", tables)
    own, *apis = report.rows
    assert (own.name, own.input_per_mtok, own.output_per_mtok) == (
        "self-hosted",
        pytest.approx(1.0),
        pytest.approx(10.0),
    )
    assert own.blended_per_mtok == pytest.approx(3.25)
    gpt4o = next(r for r in apis if r.name == "gpt-4o")
    assert gpt4o.blended_per_mtok == pytest.approx((3 * 2.5 + 10.0) / 4)


def test_the_built_in_table_states_a_source_and_date_for_every_price():
    tables = cost.load_tables()
    names = {a.name for a in tables.apis}
    assert {"gpt-4o", "gpt-4o-mini"} <= names and len(names) >= 3
    for row in (*tables.apis, *tables.machines):
        assert row.source.startswith("https://"), row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row.as_of), row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row.recorded), row
    assert tables.machine("aws-c7i.large").usd_per_hour > 0
    with pytest.raises(InvalidRequest, match="unknown machine 'nope'.*aws-c7i.large"):
        tables.machine("nope")


@pytest.mark.parametrize(
    "text, message",
    [
        ("closed_apis: {}\n", "'closed_apis' must be a list"),
        ("closed_apis:\n  - name: x\n", "closed_apis\\[1\\]: missing field"),
        ("machines:\n  - {name: m, provider: p, hardware: h, usd_per_hour: -1, source: s, as_of: d}\n",
         "usd_per_hour must be a number >= 0"),
        ("closed_apis:\n  - {name: a, provider: p, input_per_mtok: 1, output_per_mtok: 2, source: s, as_of: d, x: 1}\n",
         "unknown field\\(s\\) x"),
        ("[1, 2]\n", "must be a mapping"),
        ("apis: []\n", "unknown section"),
        ("a: [" * 200 + "\n", "nested"),
    ],
)  # fmt: skip
def test_a_bad_price_table_is_one_clear_error(tmp_path, text, message):
    f = tmp_path / "prices.yaml"
    f.write_text(text)
    with pytest.raises(InvalidRequest, match=message):
        cost.load_tables(f)


def test_mix_parsing():
    assert cost.parse_mix("3:1") == (3.0, 1.0)
    for bad in ("3", "a:b", "0:0", "-1:2"):
        with pytest.raises(InvalidRequest):
            cost.parse_mix(bad)


def test_measured_throughput_counts_every_token(tiny_gguf):
    tp = cost.measure_throughput(
        str(tiny_gguf), concurrency=2, prompt_tokens=64, completion_tokens=8, threads=1
    )
    assert tp.source == "benchmark" and tp.concurrency == 2
    assert tp.prompt_tps > 0 and tp.completion_tps > 0
    # Prefill evaluates far more tokens per decode step than decoding makes: on any CPU the
    # prompt rate is the higher one, which is why input tokens are the cheaper ones.
    assert tp.prompt_tps > tp.completion_tps


def _herd(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    return subprocess.run(
        [sys.executable, "-m", "openherd", "cost", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**base, "HERD_HOME": str(home), "HERD_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_cli_reports_given_throughput_against_the_table(tmp_path):
    r = _herd(
        "--usd-per-hour", "0.36", "--prompt-tps", "100", "--completion-tps", "10", "--json", home=tmp_path
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    own = rep["rows"][0]
    assert own["name"] == "self-hosted" and own["blended_per_mtok"] == pytest.approx(3.25)
    assert rep["throughput"]["source"] == "given"
    # The machine from the table, and the human-readable form.
    r = _herd("--machine", "aws-c7i.large", "--prompt-tps", "1000", "--completion-tps", "100", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "gpt-4o" in r.stdout and "self-hosted is" in r.stdout and "https://openai.com" in r.stdout


def test_cli_measures_a_model_and_reads_the_rate_from_the_environment(tmp_path, tiny_gguf):
    r = _herd(str(tiny_gguf), "--concurrency", "2", "--json", home=tmp_path, env={"HERD_MACHINE_COST": "1.5"})
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["usd_per_hour"] == 1.5 and rep["machine"].endswith("(HERD_MACHINE_COST)")
    assert rep["throughput"]["source"] == "benchmark" and rep["throughput"]["completion_tps"] > 0


def test_cli_uses_an_edited_table(tmp_path):
    table = tmp_path / "mine.yaml"
    table.write_text(
        "closed_apis:\n  - {name: house-api, provider: Us, input_per_mtok: 1, output_per_mtok: 1,"
        " source: https://example.invalid/p, as_of: 2026-01-01}\n"
    )
    r = _herd("--usd-per-hour", "1", "--prompt-tps", "10", "--completion-tps", "10", "--json",
              home=tmp_path, env={"HERD_PRICES": str(table)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [row["name"] for row in json.loads(r.stdout)["rows"]] == ["self-hosted", "house-api"]
    r = _herd("--tables", home=tmp_path, env={"HERD_PRICES": str(table)})
    assert r.stdout == table.read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "say what this machine costs"),
        (("--usd-per-hour", "1", "--prompt-tps", "5"), "give both --prompt-tps and --completion-tps"),
        (("--usd-per-hour", "0", "--prompt-tps", "5", "--completion-tps", "5"), "cost per hour must be > 0"),
        (("--usd-per-hour", "1", "--prompt-tps", "0", "--completion-tps", "5"), "throughput must be > 0"),
        (("--machine", "nope"), "unknown machine 'nope'"),
        (("--usd-per-hour", "1", "--mix", "x"), "--mix must look like"),
        (("--usd-per-hour", "1", "--prices", "/nonexistent/p.yaml"), "cannot read the price table"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    r = _herd(*args, home=tmp_path)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.startswith("herd: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
