"""`herd tune --gate` and `herd tune --progress-json`: a tuned model that scores worse than
its base on the named eval tasks is not registered (and the run stays resumable); one that
holds up is registered with the gate's numbers; a bad task name fails before training; the
JSON progress lines are what the web UI's job runner parses.

Everything is real: torch LoRA training on the tiny generated model, the adapter GGUF
evaluated in llama.cpp, the store on disk, the CLI in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (a declared test dependency: a broken install fails here)

from openherd import cli
from openherd.evals.lm import EvalModelConfig, open_model
from openherd.evals.runner import run_task
from openherd.evals.tasks import load_task
from openherd.store import Store
from openherd.web.jobs import parse_progress_json

REPO = Path(__file__).resolve().parent.parent
CHOICES = ["grass", "water", "stone", "sky"]
MC_SPEC = {"type": "multiple_choice", "prompt": "Question: {{ q }}\nAnswer:", "choices": "choices", "gold": "gold"}


@pytest.fixture
def one_thread(herd_home, monkeypatch):
    """torch and llama.cpp on one thread each: the test machine is shared."""
    monkeypatch.setenv("HERD_THREADS", "1")
    return herd_home


@pytest.fixture(scope="module")
def selfgold(tiny_gguf, tmp_path_factory) -> Path:
    """A 16-item multiple-choice task whose gold answers are the tiny base model's own picks:
    the base scores acc = 1.0, so any change to its preferences is a measurable regression."""
    import yaml

    d = tmp_path_factory.mktemp("selfgold")
    rows = [{"q": f"Item {i}: which word follows the herd?", "choices": CHOICES, "gold": 0} for i in range(16)]

    def write(rows: list[dict]) -> Path:
        (d / "selfgold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        path = d / "selfgold.yaml"
        path.write_text(yaml.safe_dump({"name": "selfgold", "data": "selfgold.jsonl", **MC_SPEC}, sort_keys=False))
        return path

    path = write(rows)
    with open_model(str(tiny_gguf), EvalModelConfig(n_ctx=256, n_parallel=8, n_threads=1)) as base:
        lls = [r["loglikelihoods"] for r in run_task(base, load_task(str(path))).records]
    return write([dict(r, gold=int(np.argmax(x))) for r, x in zip(rows, lls, strict=True)])


def wrong_answers(path: Path, selfgold: Path) -> Path:
    """Training data that answers every gate question with a choice the base did not pick."""
    rows = [json.loads(line) for line in (selfgold.with_suffix(".jsonl")).read_text().splitlines()]
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            wrong = CHOICES[(r["gold"] + 1 + i % 3) % 4]
            f.write(json.dumps({"prompt": f"Question: {r['q']}\nAnswer:", "completion": wrong}) + "\n")
    return path


def plain_data(path: Path, n: int = 12) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."}) + "\n")
    return path


FAST = ["--seq-len", "64", "--batch-size", "4", "--save-every", "100", "--quiet"]


# --------------------------------------------------------------------------- the gate


def test_a_regressing_adapter_is_not_registered_and_the_run_can_resume(
    tmp_path, tiny_gguf, selfgold, one_thread, capsys
):
    data = wrong_answers(tmp_path / "wrong.jsonl", selfgold)
    argv = ["tune", str(tiny_gguf), "--data", str(data), "--out", "tiny-worse", "--max-steps", "8", "--lr", "3e-2",
            "--warmup", "0", "--eval-split", "0", *FAST, "--gate", str(selfgold)]  # fmt: skip
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd: error: gate failed: 'tiny-worse' regresses by more than ")
    msg = lines[0]
    assert f"against '{tiny_gguf}': selfgold acc 1.0000 -> " in msg
    run_dir = one_thread / "runs" / "tiny-worse"
    gate = json.loads((run_dir / "gate.json").read_text())
    assert gate["passed"] is False and gate["threshold"] == 0.02
    (acc,) = [d for d in gate["per_task"]["selfgold"] if d["metric"] == "acc"]
    assert acc["regressed"] and acc["base"] == 1.0 and acc["candidate"] <= 0.75
    assert f"selfgold acc 1.0000 -> {acc['candidate']:.4f} ({acc['delta']:+.4f}, 95% CI" in msg
    # Nothing reached the store; what the user needs to go on is on disk and named in the message.
    assert not Store().exists("tiny-worse") and not (one_thread / "models").exists()
    assert (run_dir / "adapter.gguf").is_file() and (run_dir / "checkpoints" / "step-0000008").is_dir()
    assert "'tiny-worse' was not registered" in msg and str(run_dir) in msg
    assert f"--adapter {run_dir / 'adapter.gguf'}" in msg and "--resume" in msg and "--gate-threshold" in msg
    assert out == ""

    # The suggested check reproduces the gate's tuned score.
    assert cli.main(["eval", str(tiny_gguf), "--task", str(selfgold), "--adapter", str(run_dir / "adapter.gguf"),
                     "--json", "--out", str(tmp_path / "ev")]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] == acc["candidate"]

    # --resume reaches the gate again without a training step; a threshold the drop fits
    # under lets the very same adapter through, and the manifest records the gate.
    code = cli.main([*argv, "--resume", "--gate-threshold", "1.0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "gate passed: 'tiny-worse' stays within 1 of " in out and "tuned tiny-worse: 8 steps" in out
    m = Store().resolve("tiny-worse")
    assert m.details["gate"]["threshold"] == 1.0
    assert m.details["gate"]["tasks"]["selfgold"]["acc"] == {"base": 1.0, "tuned": acc["candidate"],
                                                            "delta": acc["delta"]}  # fmt: skip
    assert m.details["training"]["steps"] == 8


def test_an_adapter_that_holds_up_is_registered_with_its_gate(tmp_path, tiny_gguf, selfgold, one_thread, capsys):
    # A learning rate too small to move the base's choices: the tuned model is as good as its base.
    data = plain_data(tmp_path / "data.jsonl")
    code = cli.main(["tune", str(tiny_gguf), "--data", str(data), "--out", "tiny-same", "--max-steps", "2",
                     "--lr", "1e-6", *FAST[:-1], "--gate", f"{selfgold},basics-mc", "--gate-limit", "8"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0].startswith("gate passed: 'tiny-same' stays within 0.02 of ")
    assert "on selfgold, basics-mc" in out.splitlines()[0]
    assert "herd: gate: base " in err and "herd: gate: candidate tiny-same on basics-mc" in err
    m = Store().resolve("tiny-same")
    assert m.adapter and Path(m.adapter).is_file()
    tasks = m.details["gate"]["tasks"]
    assert set(tasks) == {"selfgold", "basics-mc"} and tasks["selfgold"]["acc"]["base"] == 1.0
    assert all(abs(v["delta"]) <= 0.02 for metrics in tasks.values() for v in metrics.values())
    gate = json.loads((one_thread / "runs" / "tiny-same" / "gate.json").read_text())
    assert gate["passed"] and all(d["n"] == 8 for d in gate["per_task"]["basics-mc"])  # --gate-limit


def test_gate_mistakes_fail_before_any_training(tmp_path, tiny_gguf, one_thread, capsys):
    data = plain_data(tmp_path / "data.jsonl")
    base = ["tune", str(tiny_gguf), "--data", str(data), "--out", "never", *FAST]
    cases = [
        (["--gate", "basics-mc,capitalz"], "unknown task 'capitalz' (did you mean 'capitals'?)"),
        (["--gate", str(tmp_path / "nope.yaml")], "does not exist"),
        (["--gate", "basics-mc,"], "--gate takes task names separated by commas"),
        (["--gate", "basics-mc", "--gate", "basics-mc"], "two gate tasks are both named 'basics-mc'"),
        (["--gate", "basics-mc", "--gate-threshold", "-0.1"], "--gate-threshold must be >= 0"),
        (["--gate", "basics-mc", "--gate-limit", "0"], "--gate-limit must be >= 1"),
        (["--gate-threshold", "0.05"], "--gate-threshold applies to the regression gate: add --gate TASKS"),
    ]
    for extra, expected in cases:
        assert cli.main([*base, *extra]) != 0, extra
        err = capsys.readouterr().err
        assert err.startswith("herd: error: ") and err.count("\n") == 1 and expected in err, (extra, err)
    assert not (one_thread / "runs").exists()  # no run directory: nothing was loaded or trained


# --------------------------------------------------------------------------- --progress-json


def test_progress_json_is_pure_json_lines_the_web_ui_parses(tmp_path, tiny_gguf, herd_home):
    # Exactly what the web UI's job runner starts (no gate), as a process: stdout at the fd level.
    data = plain_data(tmp_path / "data.jsonl", n=20)
    env = {**os.environ, "HERD_HOME": str(herd_home), "HERD_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "openherd", "tune", str(tiny_gguf), "--data", str(data), "--out", "tiny-json",
         "--max-steps", "5", "--lr", "5e-3", "--seq-len", "64", "--batch-size", "4", "--eval-every", "2",
         "--progress-json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    objs = [parse_progress_json(line) for line in lines]
    assert lines and all(o is not None for o in objs), res.stdout  # every stdout line, nothing else
    steps = [o for o in objs if "loss" in o]
    assert [o["step"] for o in steps] == [1, 2, 3, 4, 5] and all(o["total"] == 5 for o in objs)
    for o in steps:
        assert o["loss"] > 0 and o["lr"] > 0 and o["tok_s"] > 0 and o["tokens"] > 0
    # 18 training rows (2 held out) in micro-batches of 4: an epoch is 5 steps (the last batch is short).
    assert [o["epoch"] for o in steps] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert [(o["step"], o["eval_loss"] > 0) for o in objs if "eval_loss" in o] == [(2, True), (4, True), (5, True)]
    assert not any("gate" in o for o in objs)
    assert objs[-1]["done"] is True and objs[-1]["registered"] is True and objs[-1]["model"] == "tiny-json"
    assert objs[-1]["step"] == 5 and objs[-1]["final_loss"] == steps[-1]["loss"]
    assert objs[-1]["final_eval_loss"] == objs[-2]["eval_loss"]
    # The history file agrees with the stream, and the summary for people went to stderr.
    history = json.loads((herd_home / "runs" / "tiny-json" / "history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h] == [o["loss"] for o in steps]
    assert "tuned tiny-json: 5 steps" in res.stderr
    assert "|" not in res.stderr  # no tqdm bar
    assert Store().exists("tiny-json")


def test_progress_json_ends_with_the_refusal_when_the_gate_fails(tmp_path, tiny_gguf, selfgold, one_thread, capsys):
    data = wrong_answers(tmp_path / "wrong.jsonl", selfgold)
    code = cli.main(["tune", str(tiny_gguf), "--data", str(data), "--out", "tiny-worse", "--max-steps", "8",
                     "--lr", "3e-2", "--warmup", "0", "--eval-split", "0", "--seq-len", "64",
                     "--gate", str(selfgold), "--progress-json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    objs = [parse_progress_json(line) for line in out.splitlines()]
    assert all(o is not None for o in objs)
    assert [o["step"] for o in objs if "loss" in o] == list(range(1, 9))
    gate = objs[-2]["gate"]
    assert gate["passed"] is False and gate["candidate"] == "tiny-worse" and gate["base"] == str(tiny_gguf)
    assert any(d["regressed"] for d in gate["per_task"]["selfgold"])
    last = objs[-1]
    assert last["done"] is True and last["registered"] is False and last["model"] == "tiny-worse"
    assert last["error"]["code"] == "regression_gate_failed"
    assert err.strip().splitlines()[-1] == f"herd: error: {last['error']['message']}"
    assert not Store().exists("tiny-worse")
