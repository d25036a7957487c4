"""Parity with lm-evaluation-harness: its HF backend (transformers, offline) on the tiny HF
model, and `herd eval` (llama.cpp) on the GGUF of the same weights, on the same local
JSONL tasks. Multiple choice: the same answer per item (>= 95%), the same accuracy (within
one item) and close log-likelihoods. Perplexity (loglikelihood_rolling): the same metrics.

lm-eval runs in a subprocess: it imports torch, and its `datasets` cache goes to tmp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# The reference is a test dependency (pyproject `test` extra: lm-eval): a missing package must
# fail here, not skip the parity check.
import lm_eval  # noqa: F401
import pytest

from openherd import cli

N_ITEMS = 40
CHOICES = [
    ["grass", "stones", "the cold wind", "water from the river"],
    ["one", "seven", "a patient keeper"],
    ["yes", "no"],
    ["Paris", "the old stone wall", "four", "a small book", "the mountains"],
]
TEXTS = [
    "The herd moved slowly across the high plain, and the llamas kept close to one another.",
    "In the morning the keeper counts the herd: one, two, three, four, five, six, seven.",
    "Models are like herds too. You pull them, you run them, you serve them.",
]

LM_EVAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_dir, model_dir, out = sys.argv[1:4]
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["herd_mc", "herd_ppl"],
        device="cpu", batch_size=16, task_manager=TaskManager(include_path=task_dir), log_samples=True,
    )
    samples = {
        doc["doc_id"]: {"lls": [r[0] for r in doc["filtered_resps"]], "acc": doc["acc"], "acc_norm": doc["acc_norm"]}
        for doc in res["samples"]["herd_mc"]
    }
    json.dump({"results": res["results"], "mc": samples}, open(out, "w"))
    """
)


def _rows() -> list[dict]:
    rows = []
    for i in range(N_ITEMS):
        choices = CHOICES[i % len(CHOICES)]
        rows.append(
            {
                "q": f"Item {i}: what does the herd find near the wall?",
                "choices": choices,
                "gold": (i * 7) % len(choices),
            }
        )
    return rows


def _write_tasks(tmp_path: Path) -> tuple[Path, Path, Path]:
    import yaml

    mc_data = tmp_path / "mc.jsonl"
    mc_data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    ppl_data = tmp_path / "ppl.jsonl"
    ppl_data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    description = "Answer the questions about the herd.\n\n"
    prompt = "Question: {{ q }}\nAnswer:"

    lm_eval_dir = tmp_path / "lm_eval_tasks"
    lm_eval_dir.mkdir()
    (lm_eval_dir / "herd_mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "herd_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(mc_data)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "description": description,
                "doc_to_text": prompt,
                "doc_to_choice": "{{ choices }}",
                "doc_to_target": "{{ gold }}",
                "target_delimiter": " ",
                "metric_list": [
                    {"metric": m, "aggregation": "mean", "higher_is_better": True}
                    for m in ("acc", "acc_norm")
                ],
            }
        )
    )
    (lm_eval_dir / "herd_ppl.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "herd_ppl",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(ppl_data)}},
                "test_split": "test",
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{ text }}",
                "metric_list": [
                    {"metric": m, "aggregation": agg, "higher_is_better": False}
                    for m, agg in (
                        ("word_perplexity", "weighted_perplexity"),
                        ("byte_perplexity", "weighted_perplexity"),
                        ("bits_per_byte", "bits_per_byte"),
                    )
                ],
            }
        )
    )
    ours_mc = tmp_path / "herd_mc.yaml"
    ours_mc.write_text(
        yaml.safe_dump(
            {
                "name": "herd_mc",
                "type": "multiple_choice",
                "data": mc_data.name,
                "description": description,
                "prompt": prompt,
                "choices": "choices",
                "gold": "gold",
                "target_delimiter": " ",
            }
        )
    )
    ours_ppl = tmp_path / "herd_ppl.yaml"
    ours_ppl.write_text(
        yaml.safe_dump({"name": "herd_ppl", "type": "perplexity", "data": ppl_data.name, "text": "text"})
    )
    return lm_eval_dir, ours_mc, ours_ppl


def _run_lm_eval(task_dir: Path, model_dir: Path, tmp_path: Path) -> dict:
    script = tmp_path / "run_lm_eval.py"
    script.write_text(LM_EVAL_SCRIPT)
    out = tmp_path / "lm_eval.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run(
        [sys.executable, str(script), str(task_dir), str(model_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_multiple_choice_and_perplexity_match_lm_eval(tiny_gguf, tiny_hf_dir, herd_home, tmp_path, capsys):
    lm_eval_dir, ours_mc, ours_ppl = _write_tasks(tmp_path)
    ref = _run_lm_eval(lm_eval_dir, tiny_hf_dir, tmp_path)

    out = tmp_path / "ours-mc"
    assert cli.main(["eval", str(tiny_gguf), "--task", str(ours_mc), "--json", "--out", str(out)]) == 0
    ours = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == len(ref["mc"]) == N_ITEMS

    agree = {"acc": 0, "acc_norm": 0}
    for rec in records:
        theirs = ref["mc"][str(rec["index"])]  # JSON object keys are strings
        # llama.cpp and transformers agree on these tiny models' summed log-likelihoods to
        # 1.2e-2 at worst (measured over the 40 items, mean 5e-3); 3e-2 leaves room for other
        # CPUs' rounding and still fails on a dropped or extra token (~0.5 and more).
        assert rec["loglikelihoods"] == pytest.approx(theirs["lls"], abs=3e-2)
        for metric in agree:
            agree[metric] += rec[metric] == theirs[metric]
    for metric in agree:
        assert agree[metric] >= 0.95 * N_ITEMS, (metric, agree)
        assert abs(ours[metric] - ref["results"]["herd_mc"][f"{metric},none"]) <= 1 / N_ITEMS + 1e-9
    # Not a degenerate task: the random model gets some right and some wrong, and the two
    # normalisations disagree somewhere (choices of different lengths).
    assert 0 < ours["acc"] < 1
    assert any(r["pred"] != r["pred_norm"] for r in records)

    assert (
        cli.main(
            ["eval", str(tiny_gguf), "--task", str(ours_ppl), "--json", "--out", str(tmp_path / "ours-ppl")]
        )
        == 0
    )
    ppl = json.loads(capsys.readouterr().out)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ppl[metric] == pytest.approx(ref["results"]["herd_ppl"][f"{metric},none"], rel=1e-2), metric
