"""llama.cpp's own C++ server, built from the llama.cpp that the installed llama-cpp-python vendors.

The peer a user would pick instead of `herd serve` on a CPU is `llama-server`. To compare
kernels like with like, it is built from the exact llama.cpp source that llama-cpp-python
compiled (its sdist carries it under vendor/llama.cpp), with the same native CPU flags,
and cached per version and CPU, so a benchmark run pays for the build once:

    python bench/llama_server.py          # build (or find) it and print its path

Nothing here is a test dependency: only bench/serve.py uses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openherd" / "llama-server"


def _cpu_key() -> str:
    """The build is -march=native: key the cache by the CPU's flags as well as the version."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def installed_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def ensure_llama_server(version: str | None = None, jobs: int | None = None, log=print) -> Path:
    """Path of a cached `llama-server` for llama-cpp-python `version` (default: the installed
    one), building it first if needed: pip downloads the sdist, cmake builds the one target."""
    version = version or installed_version()
    target = CACHE / f"{version}-{_cpu_key()}" / "llama-server"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if not shutil.which("cmake"):
        raise RuntimeError("building llama-server needs cmake (apt-get install cmake)")
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = Path(tmp)
        log(f"downloading the llama-cpp-python {version} sdist (pip's cache usually has it)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(work)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")  # the "data" filter refuses links and paths out of `work`
        (src,) = (p / "vendor" / "llama.cpp" for p in work.glob("llama_cpp_python-*") if p.is_dir())
        build = work / "build"
        log(f"building llama-server from {src.relative_to(work)} (several minutes on 2 cores)")
        _run(
            ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON",  # what llama-cpp-python's build uses by default
             "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to cache
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=ON"],
            work / "build.log",
        )  # fmt: skip
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 2)],
             work / "build.log")  # fmt: skip
        (binary,) = build.rglob("bin/llama-server")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(binary, partial)
        partial.replace(target)  # a half-copied binary never looks cached
    return target


def _run(cmd: list[str], log: Path) -> None:
    """Run a build step into `log`; on failure, raise with the log's tail (the compiler's error)."""
    with open(log, "ab") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed with exit {code}:\n" + "\n".join(tail))


if __name__ == "__main__":
    print(ensure_llama_server(log=lambda m: print(m, file=sys.stderr)))
