"""A real `herd serve` for tests: a subprocess on a free 127.0.0.1 port.

``live_server(...)`` makes a temporary HERD_HOME, registers the tiny generated
GGUF in its store under ``MODEL``, starts ``python -m openherd serve``, waits
for ``/health`` and, on exit, stops it with SIGTERM (the graceful path) and
checks that it exited 0. Nothing from the developer's environment (HERD_*,
OLLAMA_*, OPENAI_*) leaks in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny"
N_CTX = 2048  # the served model's training context: room for tool prompts in a 512-token vocabulary
# Token ids of the tiny model's end-of-generation tokens (<|endoftext|>, <|im_end|>):
# biasing them away makes a random model talk for as long as max_tokens says.
NO_EOS = {"0": -100, "2": -100}


@pytest.fixture(scope="session")
def serve_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama of tests/tinymodels.py with a 2048-token context."""
    from tinymodels import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("serve-gguf") / "tiny-2k.gguf", n_ctx=N_CTX)


# A Llama-3.1-style tool template over ChatML tokens: tools are rendered by the template and
# calls are bare {"name", "parameters"} objects (tools.py's "llama3" format).
LLAMA3_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou have these functions: {{ tools | tojson }}\n"
    'Respond with {"name": function name, "parameters": dictionary of argument name and its value}, '
    "or <|python_tag|> code.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.tool_calls %}<|im_start|>assistant\n{{ message.tool_calls[0].function | tojson }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ 'ipython' if message.role == 'tool' else message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="session")
def llama3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with LLAMA3_TOOLS_TEMPLATE."""
    from tinymodels import write_tiny_gguf

    path = tmp_path_factory.mktemp("serve-gguf-l3") / "tiny-l3.gguf"
    return write_tiny_gguf(path, n_ctx=N_CTX, chat_template=LLAMA3_TOOLS_TEMPLATE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_model(home: Path, gguf: Path, name: str = MODEL) -> None:
    """Put the GGUF into the store at `home` under `name` (what `herd pull FILE --name` does)."""
    from openherd.settings import Settings
    from openherd.store import Store

    Store(Settings(home=home)).pull(str(gguf), name=name)


def server_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERD_", "OLLAMA_", "OPENAI_"))}
    env.update({"HERD_HOME": str(home), "HERD_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


@dataclass
class LiveServer:
    url: str
    port: int
    home: Path
    proc: subprocess.Popen
    log_path: Path
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the graceful exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"herd serve did not exit within {timeout}s of SIGTERM:\n{self.log()[-3000:]}"
                ) from None
        return self.proc.returncode

    def metric(self, series: str, default: float | None = None) -> float:
        """The value of one series from /metrics, e.g. 'herd_queue_depth_total' or
        'herd_sequences_total{model="tiny",finish_reason="abort"}'."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise AssertionError(f"{series} not in /metrics")


def wait_for_health(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"herd serve exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(
        f"herd serve did not become healthy in {timeout}s:\n{log_path.read_text(errors='replace')[-3000:]}"
    )


@contextlib.contextmanager
def live_server(
    workdir: Path,
    gguf: Path,
    *,
    api_key: str | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    check_exit: bool = True,
    host: str = "127.0.0.1",
) -> Iterator[LiveServer]:
    """Start `herd serve` with the tiny model registered as MODEL; stop it gracefully."""
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    if not (home / "models").is_dir():
        register_model(home, gguf)
    port = free_port()
    log_path = workdir / f"serve-{port}.log"
    extra = dict(env or {})
    if api_key:
        extra["HERD_API_KEYS"] = api_key
    cmd = [sys.executable, "-m", "openherd", "serve", "--host", f"{host}:{port}", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=server_env(home, extra), stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    server = LiveServer(url, port, home, proc, log_path, api_key)
    try:
        wait_for_health(url, proc, log_path)
        yield server
    finally:
        code = server.stop()
    if check_exit:
        assert code == 0, f"herd serve exited with {code} after SIGTERM:\n{server.log()[-3000:]}"
