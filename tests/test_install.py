"""The package as a user gets it: build the sdist, the wheel from the sdist, install the
wheel with its declared extras into a fresh venv, and use it from outside the checkout.

The editable install the rest of the suite runs on reads files straight from the
checkout, so a data file missing from the package (web assets, built-in tasks, the
sandbox launcher) or a dependency missing from its metadata passes there and breaks
for users. Here nothing from the checkout is importable: the venv is new, and every
command runs with its working directory outside the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERD_", "PYTHON", "VIRTUAL_ENV"))}
    env["HERD_HOME"] = str(home)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd[:3]} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel, the wheel built from the unpacked sdist (python -m build's default)."""
    out = tmp_path_factory.mktemp("dist")
    env = _env(out)
    # --no-isolation: the build requirements (setuptools, build) are in the test extra, so
    # nothing is downloaded into a throwaway build environment.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], out, env)
    (sdist,) = out.glob(f"openherd-{VERSION}.tar.gz")
    (wheel,) = out.glob(f"openherd-{VERSION}-py3-none-any.whl")
    return {"sdist": sdist, "wheel": wheel, "dir": out}


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("install") / "venv"
    env = _env(where.parent)
    _run([sys.executable, "-m", "venv", str(where)], where.parent, env)
    # Every extra a user may ask for, as its declared ranges resolve (pip's cache holds the
    # llama-cpp-python wheel the suite's own install built).
    _run([str(where / "bin" / "pip"), "install", "-q", f"{built['wheel']}[tune,evals]"], where.parent, env)
    return where


def test_wheel_holds_every_package_file(built):
    tracked = subprocess.run(
        # Tracked files and new ones not yet committed (ignored ones, such as caches, are neither).
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "openherd"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    with zipfile.ZipFile(built["wheel"]) as z:
        in_wheel = {n for n in z.namelist() if n.startswith("openherd/")}
    missing = sorted(set(tracked) - in_wheel)
    assert not missing, f"files of the package missing from the wheel: {missing[:20]}"
    extra = sorted(n for n in in_wheel - set(tracked) if "__pycache__" not in n)
    assert not extra, f"files in the wheel that git does not track: {extra[:20]}"


def test_installed_herd_runs_a_model_like_the_checkout(venv, tiny_gguf, tmp_path):
    herd = str(venv / "bin" / "herd")
    env = _env(tmp_path / "home")
    r = _run([herd, "--version"], tmp_path, env, timeout=60)
    assert r.stdout.strip() == f"openherd {VERSION}"
    # The package is the installed one, not the checkout.
    r = _run([str(venv / "bin" / "python"), "-c", "import openherd; print(openherd.__file__)"], tmp_path, env)
    assert r.stdout.strip().startswith(str(venv)), r.stdout

    _run([herd, "pull", str(tiny_gguf), "--name", "tiny"], tmp_path, env, timeout=120)
    args = ["run", "tiny", "Hello there", "--temperature", "0", "--max-tokens", "12", "--seed", "1"]
    installed = _run([herd, *args], tmp_path, env, timeout=120).stdout
    checkout = _run([sys.executable, "-m", "openherd", *args], ROOT, env, timeout=120).stdout
    assert installed.strip() and installed == checkout


def test_installed_herd_scores_in_the_sandbox_and_lists_builtin_tasks(venv, tmp_path):
    from openherd.evals.humaneval import load_problems

    herd = str(venv / "bin" / "herd")
    env = _env(tmp_path / "home")
    r = _run([herd, "eval", "--list"], tmp_path, env, timeout=120)
    for task in ("basics-mc", "capitals", "humaneval"):
        assert task in r.stdout

    problems = load_problems()
    rows = []
    for tid in list(problems)[:2]:
        rows += [
            {"task_id": tid, "completion": problems[tid]["canonical_solution"]},
            {"task_id": tid, "completion": "    return None\n"},
        ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in rows))
    # The venv lives under /tmp, which the sandbox replaces with its own tmpfs.
    r = _run([herd, "eval", "--task", "humaneval", "--samples", str(samples), "--json"], tmp_path, env)
    assert json.loads(r.stdout) == {"pass@1": 0.5}


def test_installed_server_answers_and_serves_the_web_app(venv, tiny_gguf, tmp_path):
    import httpx
    from openai import OpenAI
    from server_helpers import free_port, wait_for_health

    env = _env(tmp_path / "home")
    env["HERD_THREADS"] = "1"
    _run([str(venv / "bin" / "herd"), "pull", str(tiny_gguf), "--name", "tiny"], tmp_path, env, timeout=120)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(venv / "bin" / "herd"), "serve", "--host", f"127.0.0.1:{port}"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, log_path)
        page = httpx.get(url + "/", headers={"Accept": "text/html"}, timeout=30)  # as a browser asks
        assert page.status_code == 200 and "<html" in page.text.lower()
        assets = [a for a in page.text.split('"') if a.startswith("/static/assets/")]
        assert assets, page.text[:500]
        for asset in assets:  # the built JavaScript and CSS came with the wheel
            assert httpx.get(url + asset, timeout=30).status_code == 200, asset
        reply = OpenAI(base_url=url + "/v1", api_key="unused").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run is the README's test command; both install into a venv of their own."""
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```\n")[1::2]  # the bare fenced blocks: shell commands
    main_cmd = next(b.strip() for b in blocks if "herd serve --model smollm2" in b)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    assert main_cmd.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/herd")
    assert "python3 -m venv --clear .venv-test" in test_cmd and ".venv-test/bin/python -m pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
