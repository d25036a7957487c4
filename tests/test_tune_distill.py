"""openherd.tune.distill against real HTTP servers on 127.0.0.1 (herd serve itself and a
scripted OpenAI-compatible endpoint for rate limits and failures) and a local model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from server_helpers import MODEL, live_server

from openherd import cli
from openherd.errors import AuthError, InvalidRequest, Unavailable
from openherd.tune.data import read_jsonl
from openherd.tune.distill import DistillConfig, distill, read_prompts

pytestmark = pytest.mark.timeout(300)


class Scripted(BaseHTTPRequestHandler):
    """/v1/chat/completions that rate-limits each prompt's first request, fails prompts with
    'boom' (400), answers 'same' prompts identically and everything else with a counter."""

    server: _Server

    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "teacher-1", "object": "model"}]})
        self._send(404, {"error": {"message": "no such route"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.server
        with s.lock:
            s.requests.append(body)
            prompt = body["messages"][-1]["content"]
            if s.status:
                return self._send(s.status, {"error": {"message": "bad key"}})
            if self.headers.get("Authorization") != "Bearer sk-test":
                return self._send(401, {"error": {"message": "missing key"}})
            if prompt not in s.limited:
                s.limited.add(prompt)
                return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            if "boom" in prompt:
                return self._send(400, {"error": {"message": "prompt rejected"}})
            s.n += 1
            answer = "always the same" if "same" in prompt else f"answer {s.n} to {prompt}"
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                      "finish_reason": "stop"}]})  # fmt: skip


class _Server(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), Scripted)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.limited: set[str] = set()
        self.n = 0
        self.status = 0


@pytest.fixture
def endpoint():
    s = _Server()
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s
    s.shutdown()
    s.server_close()


def cfg(endpoint, tmp_path: Path, prompts: Path, **kw) -> DistillConfig:
    base = dict(teacher=f"http://127.0.0.1:{endpoint.server_address[1]}", prompts=str(prompts),
                out=str(tmp_path / "out.jsonl"), api_key="sk-test", concurrency=3, progress=False)  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


def test_retries_dedup_failures_and_resume(endpoint, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is a llama?\nwhat  is a LLAMA?\nsame thing twice\nboom\nName a colour.\n")
    stats = distill(cfg(endpoint, tmp_path, prompts, samples=2, system="Be brief."))
    assert stats.prompts == 4 and stats.duplicate_prompts == 1  # normalised: case and spaces
    assert stats.failed == 2 and any("prompt rejected" in e for e in stats.errors)  # 'boom' x 2 samples
    assert stats.duplicates == 1  # the second 'same' answer
    assert stats.written == 5
    assert {r["model"] for r in endpoint.requests} == {"teacher-1"}  # the first model /v1/models lists
    out = tmp_path / "out.jsonl"
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(x["messages"][0] == {"role": "system", "content": "Be brief."} for x in lines)
    assert all(x["messages"][-1]["role"] == "assistant" for x in lines)
    assert len(read_jsonl(out)) == 5  # herd tune reads it as it is

    # Interrupted mid-write: a cut last line, and new prompts appended to the prompts file.
    with open(out, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "half')
    with open(prompts, "a") as f:
        f.write("A new question?\n")
    before = len(endpoint.requests)
    stats = distill(cfg(endpoint, tmp_path, prompts, samples=2, system="Be brief."))
    new_requests = [r["messages"][-1]["content"] for r in endpoint.requests[before:]]
    # Only what is missing is asked: the new prompt (x2 samples, each rate-limited once),
    # 'same' (its duplicate answer was dropped) and 'boom' (it failed) again.
    assert set(new_requests) == {"A new question?", "same thing twice", "boom"}
    assert new_requests.count("A new question?") == 3
    assert stats.already_done == 5 and stats.written == 2
    assert len(read_jsonl(out)) == 7 and out.read_bytes().endswith(b"\n")


def test_auth_failure_stops_at_once(endpoint, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"question {i}" for i in range(50)) + "\n")
    with pytest.raises(AuthError, match="rejected the request .HTTP 401"):
        distill(cfg(endpoint, tmp_path, prompts, api_key="wrong", model="m"))
    assert len(endpoint.requests) <= 3  # one per worker at most, not 50
    endpoint.status = 503
    with pytest.raises(Unavailable, match="none of 1 requests.*HTTP 503"):
        prompts.write_text("one\n")
        distill(cfg(endpoint, tmp_path, prompts, model="m", retries=1))


def test_distill_from_herd_serve_feeds_herd_tune(tmp_path, serve_gguf, tiny_gguf, herd_home):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "Tell me about llamas."},
        "Count to three.",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "How are you?"}]},
    ]) + "\n")  # fmt: skip
    out = tmp_path / "data.jsonl"
    with live_server(tmp_path / "srv", serve_gguf) as srv:
        code = cli.main(["distill", "--teacher", f"{srv.url}/v1", "--prompts", str(prompts), "--out", str(out),
                         "--max-tokens", "6", "--temperature", "0", "--keep-truncated", "--quiet"])  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    asked = [[{"role": "user", "content": "Tell me about llamas."}], [{"role": "user", "content": "Count to three."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "How are you?"}]]  # fmt: skip
    # A random model may answer with whitespace only (dropped as empty): at least 2 of 3 land.
    assert len(rows) >= 2 and all(r["messages"][:-1] in asked for r in rows)
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip() for r in rows)
    # ... and `herd tune` trains on it directly.
    assert cli.main(["tune", str(tiny_gguf), "--data", str(out), "--out", "distilled", "--max-steps", "2",
                     "--seq-len", "64", "--eval-split", "0", "--quiet"]) == 0  # fmt: skip
    assert MODEL == "tiny"


def test_local_teacher_runs_on_the_engine(tmp_path, tiny_gguf, herd_home):
    from openherd.store import Store

    Store().pull(str(tiny_gguf), name="teacher")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    stats = distill(DistillConfig(teacher="teacher", prompts=str(prompts), out=str(tmp_path / "o.jsonl"),
                                  max_tokens=5, temperature=0, concurrency=2, progress=False))  # fmt: skip
    # The tiny model never emits EOS, so every answer stops at max_tokens and is dropped by default.
    assert stats.truncated == 3 and stats.written == 0
    stats = distill(DistillConfig(teacher="teacher", prompts=str(prompts), out=str(tmp_path / "o.jsonl"),
                                  max_tokens=5, temperature=0, concurrency=2, keep_truncated=True, progress=False))  # fmt: skip
    assert stats.written == 3 and len(read_jsonl(tmp_path / "o.jsonl")) == 3


def test_bad_prompt_and_output_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(InvalidRequest, match=r"p.jsonl:2: the conversation already ends"):
        read_prompts(p)
    p.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(InvalidRequest, match=r"p.jsonl:2: invalid JSON"):
        read_prompts(p)
    good = tmp_path / "good.txt"
    good.write_text("q\n")
    bad_out = tmp_path / "o.jsonl"
    bad_out.write_text('{"text": "not mine"}\n')
    with pytest.raises(InvalidRequest, match=r"o.jsonl:1: not a distill output line"):
        distill(DistillConfig(teacher="http://127.0.0.1:9", prompts=str(good), out=str(bad_out), progress=False))
