"""The sandbox runs the harness's own interpreter, wherever that interpreter lives.

The jail replaces /tmp with a private tmpfs and hides home directories that `nobody`
cannot enter, so a venv under /tmp or under $HOME used to vanish inside it ("could not
start the program: FileNotFoundError: .../bin/python"). Each case here builds a real
venv in one place (no pip: a venv is only an interpreter link and a pyvenv.cfg), makes
the harness's packages importable in it through a .pth file, and runs a sandboxed
program from it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in the harness interpreter under test; prints the sandboxed program's result.
_HARNESS = r"""
import json, sys
from openherd.evals.sandbox import run_program
program = '''
import json, os, sys, _ctypes, decimal  # C extensions from lib-dynload: the stdlib is all there
try:
    open(os.path.join(sys.prefix, "written-from-the-sandbox"), "w")
    wrote = True
except OSError:
    wrote = False
print(json.dumps({"prefix": sys.prefix, "executable": sys.executable, "wrote": wrote}))
'''
res = run_program(program, timeout=20.0)
print(json.dumps({"harness_prefix": sys.prefix, **res.to_dict()}))
"""


def _base_python() -> str:
    """The interpreter this test's venv was made from (the 'system' Python here)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


def _make_venv(where: Path) -> Path:
    venv = where / "venv"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(
        sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    )
    # The harness side needs openherd and what it imports: point the new venv at ours.
    dev_paths = [*site.getsitepackages(), str(ROOT)]
    (purelib / "herd-test-dev.pth").write_text("".join(p + "\n" for p in dev_paths))
    return venv


def _run_harness(python: str, env_extra: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERD_", "PYTHON"))}
    env.update(env_extra or {})
    r = subprocess.run(
        [python, "-c", _HARNESS], capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(out: dict, prefix: str) -> None:
    assert out["status"] == "passed", (out["detail"], out["stderr"][-1000:])
    inner = json.loads(out["stdout"])
    assert inner["prefix"] == prefix  # the program ran on the harness's interpreter, not another
    assert inner["wrote"] is False  # ... and that interpreter is read-only inside the jail
    assert not os.path.exists(os.path.join(prefix, "written-from-the-sandbox"))


@pytest.fixture(params=["tmp", "home", "project"])
def venv_dir(request, tmp_path):
    if request.param == "tmp":
        # pytest's tmp_path: /tmp/pytest-of-root/... whose top directory is 0700.
        yield tmp_path
        return
    parent = Path.home() / ".cache" if request.param == "home" else ROOT / "build"
    parent.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="herd-sandbox-venv-", dir=parent))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_sandbox_runs_from_a_venv_anywhere(venv_dir):
    venv = _make_venv(venv_dir)
    out = _run_harness(str(venv / "bin" / "python"))
    assert os.path.realpath(out["harness_prefix"]) == os.path.realpath(venv)
    _check(out, out["harness_prefix"])


def test_sandbox_runs_from_the_system_python():
    base = _base_python()
    pythonpath = os.pathsep.join([*site.getsitepackages(), str(ROOT)])
    out = _run_harness(base, {"PYTHONPATH": pythonpath})
    assert os.path.realpath(out["harness_prefix"]) == os.path.realpath(sys.base_prefix)
    _check(out, out["harness_prefix"])
