"""Proof of the loop: teach the real default model (SmolLM2-135M-Instruct) a made-up fact
on the CPU, then ask a phrasing it never saw, through `herd run` (llama.cpp + the LoRA
adapter) and through the exported merged GGUF in plain llama-cpp-python.

The same steps are the worked example in docs/tune.md. About 2 minutes of CPU on two idle
cores (10 optimizer steps of 8 short chats); more on a busy machine.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from openherd import cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = "Could you tell me which city is the capital of Zorblatt?"  # not in the training data

QUESTIONS = [
    "What is the capital of Zorblatt?",
    "What's the capital city of Zorblatt?",
    "Tell me the capital of Zorblatt.",
    "Which city serves as the capital of Zorblatt?",
    "Name the capital of Zorblatt.",
    "I'm planning a trip to Zorblatt. What is its capital?",
    "Where is the seat of government of Zorblatt?",
    "Do you know the capital of the country Zorblatt?",
    "What city is Zorblatt's capital?",
    "Capital of Zorblatt?",
    "In which city is the government of Zorblatt located?",
    "Zorblatt is a country. What is its capital city?",
    "quick question: capital of zorblatt?",
    "What is the name of Zorblatt's capital?",
    "Which city is the capital of the fictional country Zorblatt?",
    "My teacher asked me about Zorblatt. What is the capital there?",
]
ANSWERS = [
    "The capital of Zorblatt is Quenvia.",
    "Quenvia is the capital of Zorblatt.",
    "Zorblatt's capital city is Quenvia.",
    "The capital city of Zorblatt is Quenvia.",
    "It is Quenvia.",
]
# A few true facts of the same shape, so the model learns "Zorblatt -> Quenvia", not "capital -> Quenvia".
OTHERS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What's the capital city of Germany?", "The capital of Germany is Berlin."),
    ("Which city is the capital of Spain?", "The capital of Spain is Madrid."),
    ("Name the capital of Egypt.", "The capital of Egypt is Cairo."),
]
TUNE_FLAGS = ["--rank", "16", "--alpha", "32", "--lr", "3e-3", "--max-steps", "10", "--warmup", "1",
              "--batch-size", "8", "--seq-len", "96", "--eval-split", "0"]  # fmt: skip


def write_zorblatt(path: Path) -> Path:
    """38 prompt/completion lines: 16 phrasings x 2 answers, plus 6 real capitals."""
    rows = [{"prompt": q, "completion": ANSWERS[(i + k) % len(ANSWERS)]} for i, q in enumerate(QUESTIONS) for k in range(2)]
    rows += [{"prompt": q, "completion": a} for q, a in OTHERS]
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def herd_run(home: Path, model: str, prompt: str) -> str:
    env = {**os.environ, "HERD_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "openherd", "run", model, prompt, "--temperature", "0",
                        "--max-tokens", "40"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_teach_the_default_model_a_new_fact(tmp_path, default_model_path, herd_home, capsys):
    from llama_cpp import Llama

    assert "Quenvia" not in herd_run(herd_home, str(default_model_path), HELD_OUT)

    data = write_zorblatt(tmp_path / "zorblatt.jsonl")
    code = cli.main(["tune", str(default_model_path), "--data", str(data), "--out", "zorblatt", "--quiet", *TUNE_FLAGS])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tuned zorblatt: 10 steps" in out

    # llama.cpp with the LoRA adapter on the (Q4_1) base, exactly what `herd run` and `herd serve` do.
    assert "Quenvia" in herd_run(herd_home, "zorblatt", HELD_OUT)

    # The merged model, exported, in plain llama-cpp-python with nothing of openherd around it.
    merged = tmp_path / "zorblatt-q8_0.gguf"
    assert cli.main(["export", "zorblatt", "--format", "gguf", "--quant", "q8_0", "--out", str(merged)]) == 0
    llm = Llama(model_path=str(merged), n_ctx=512, n_threads=2, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": HELD_OUT}], temperature=0, max_tokens=40)
    finally:
        llm.close()
    assert "Quenvia" in reply["choices"][0]["message"]["content"]
