"""Coverage-guided fuzzing of the parsers with atheris (issue 18): tests/fuzz_targets.py.

Every target (JSON, YAML, persona YAML, GGUF, persona archives, tune JSONL, chat
templates, knowledge documents) runs in its own process from a small seed corpus, with
a fixed seed and a bounded number of runs: RUNS inputs or SECONDS seconds, whichever
comes first, about a minute for all eight in CI. A crash (any exception but a
HerdError, a multi-line error, an input past TIMEOUT seconds or RSS_MB of memory)
fails the test with atheris's report, which names the input.

The long run, for developers (ATHERIS_SECONDS per target, 300 unless set)::

    pytest -m fuzz_long tests/test_fuzz_atheris.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_fuzz_formats import ARCHIVE_SEED, DOC_SEEDS, PERSONA_YAML, TUNE_JSONL

HERE = Path(__file__).resolve().parent
RUNS = 50_000
SECONDS = 4
LONG_SECONDS = int(os.environ.get("ATHERIS_SECONDS", "300"))
TIMEOUT = 10  # per input: a chat template may use its whole 2 s budget, on a busy machine
RSS_MB = 2048

SEEDS: dict[str, list[bytes]] = {
    "json": [b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 1}', b"[1, 2.5, null]"],
    "yaml": [PERSONA_YAML, b"a: [1, {b: c}]\n- x\n"],
    "persona_yaml": [PERSONA_YAML],
    "gguf": [],  # filled from the tiny model below
    "archive": [ARCHIVE_SEED],
    "tune": [TUNE_JSONL],
    "template": [b"{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"],
    "document": [bytes([i]) + seed for i, seed in enumerate(DOC_SEEDS[k] for k in ("txt", "md", "html", "pdf"))],
}


def run_target(target: str, corpus: Path, tmp: Path, *flags: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    env["HERD_HOME"] = str(tmp / "home")
    r = subprocess.run(
        [sys.executable, str(HERE / "fuzz_targets.py"), target, str(corpus),
         f"-timeout={TIMEOUT}", f"-rss_limit_mb={RSS_MB}", "-max_len=8192", *flags],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"atheris found a crash in {target}:\n{out[-6000:]}"
    done = [line for line in out.splitlines() if line.startswith("Done ")]
    assert done, out[-3000:]
    print(f"atheris {target}: {done[-1]}")  # "Done 2000 runs in 4 second(s)", shown with -s or -rP


FOUND = HERE / "fuzz_corpus"  # FOUND/TARGET/NAME: inputs that crashed a target once, kept as seeds


def _found(target: str) -> list[Path]:
    return sorted((FOUND / target).glob("*")) if (FOUND / target).is_dir() else []


def _corpus(target: str, tmp: Path, tiny_gguf: Path) -> Path:
    corpus = tmp / f"corpus-{target}"
    corpus.mkdir()
    seeds = SEEDS[target] or [Path(tiny_gguf).read_bytes()[:8192]]
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    for path in _found(target):
        (corpus / path.name).write_bytes(path.read_bytes())
    return corpus


@pytest.mark.parametrize("target", sorted(SEEDS))
def test_found_crashes_stay_fixed(target, tmp_path):
    """Each input that once crashed a target, replayed in-process: a HerdError or success."""
    import fuzz_targets

    from openherd.errors import HerdError

    for path in _found(target):
        try:
            fuzz_targets.TARGETS[target](path.read_bytes())
        except HerdError as e:
            assert "\n" not in e.message.strip(), (path.name, e.message)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", sorted(SEEDS))
def test_atheris(target, tmp_path, tiny_gguf):
    run_target(target, _corpus(target, tmp_path, tiny_gguf), tmp_path,
               f"-runs={RUNS}", f"-max_total_time={SECONDS}", "-seed=1")


@pytest.mark.fuzz_long
@pytest.mark.timeout(LONG_SECONDS + 300)
@pytest.mark.parametrize("target", sorted(SEEDS))
def test_atheris_long(target, tmp_path, tiny_gguf):
    run_target(target, _corpus(target, tmp_path, tiny_gguf), tmp_path, f"-max_total_time={LONG_SECONDS}")
