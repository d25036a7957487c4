"""The web app's server side over real HTTP: static assets and their headers, the
session login and CSRF checks, the conversations API (shared with `herd chat`)
and the jobs API (real `herd tune` / `herd eval` subprocesses).

``web_server(...)`` is also what tests/test_web_browser.py drives Chromium against:
the real app (``build_app`` + ``mount_web``) under uvicorn on a free 127.0.0.1
port, in a thread of the test process, with the tiny generated model registered.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server_helpers import MODEL, free_port, register_model, serve_gguf  # noqa: F401  (fixture)

from openherd.settings import Settings
from openherd.web.routes import CSP, STATIC_DIR, load_assets

FIRST_LOAD_BUDGET = 300 * 1024


# ----------------------------------------------------------------------------- the server


@dataclass
class WebServer:
    url: str
    home: Path
    settings: Settings
    app: object
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)



@contextlib.contextmanager
def web_server(
    home: Path,
    gguf: Path | None = None,
    *,
    api_key: str | None = None,
    catalog: dict | None = None,
    pypi_index: str = "",
    models: dict[str, Path] | None = None,
) -> Iterator[WebServer]:
    """build_app (which mounts the web app) under uvicorn on 127.0.0.1, with `gguf` registered as MODEL."""
    import uvicorn

    import openherd.server.app as app_module
    from openherd.engine.manager import ModelManager
    from openherd.store import Store

    home.mkdir(parents=True, exist_ok=True)
    if gguf is not None and not (home / "models").is_dir():
        register_model(home, gguf)
    for name, path in (models or {}).items():
        register_model(home, path, name)
    settings = Settings(
        home=home,
        api_keys=(api_key,) if api_key else (),
        threads=1,
        num_parallel=2,
        num_ctx=2048,
        pypi_index=pypi_index,
    )
    store = Store(settings, catalog=catalog) if catalog is not None else None
    manager = ModelManager(settings, store=store) if store is not None else ModelManager(settings)
    app = app_module.build_app(settings, manager=manager)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="web-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the web test server did not start")
        time.sleep(0.05)
    try:
        yield WebServer(f"http://127.0.0.1:{port}", home, settings, app, api_key)
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the web test server did not stop"


@pytest.fixture
def server(tmp_path, serve_gguf) -> Iterator[WebServer]:  # noqa: F811
    with web_server(tmp_path / "home", serve_gguf) as s:
        yield s


@pytest.fixture
def keyed_server(tmp_path, serve_gguf) -> Iterator[WebServer]:  # noqa: F811
    with web_server(tmp_path / "home", serve_gguf, api_key="sekrit-key-1") as s:
        yield s


# ----------------------------------------------------------------------------- assets


def first_load_files() -> list[str]:
    """index.html and everything it references under /static/."""
    index = (STATIC_DIR / "index.html").read_text()
    return ["index.html", *re.findall(r'(?:src|href)="/static/([^"]+)"', index)]


def test_the_built_app_is_in_the_package_and_fits_the_first_load_budget():
    files = first_load_files()
    assert any(f.endswith(".js") for f in files) and any(f.endswith(".css") for f in files)
    sizes = {f: len(gzip.compress((STATIC_DIR / f).read_bytes(), 9)) for f in files}
    total = sum(sizes.values())
    assert total <= FIRST_LOAD_BUDGET, f"first load is {total} bytes gzip: {sizes}"
    index = (STATIC_DIR / "index.html").read_text()
    # No inline script or style: the CSP forbids them, so the page must not need them.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", index)
    assert "<style" not in index and "style=" not in index


def test_index_and_assets_headers(server):
    with server.client() as c:
        r = c.get("/", headers={"Accept": "text/html"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CSP
        for directive in (
            "script-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
            "base-uri 'none'",
        ):
            assert directive in CSP
        assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cache-control"] == "no-cache"
        etag = r.headers["etag"]
        assert c.get("/", headers={"Accept": "text/html", "If-None-Match": etag}).status_code == 304

        # Ollama's health check (no text/html in Accept) still gets its plain answer.
        plain = c.get("/")
        assert plain.status_code == 200 and plain.text == "openherd is running"

        js = next(f for f in first_load_files() if f.endswith(".js"))
        raw = (STATIC_DIR / js).read_bytes()
        r = c.get(f"/static/{js}", headers={"Accept-Encoding": "identity"})
        assert r.status_code == 200 and r.content == raw and "content-encoding" not in r.headers
        assert r.headers["content-type"].startswith("text/javascript")
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert r.headers["vary"] == "Accept-Encoding"
        r = c.get(f"/static/{js}", headers={"Accept-Encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip" and r.content == raw  # httpx decodes it
        r = c.get(f"/static/{js}", headers={"Accept-Encoding": "br, gzip"})
        assert r.headers["content-encoding"] == "br"
        assert int(r.headers["content-length"]) < len(raw) // 2
        # One ETag per representation.
        assert (
            r.headers["etag"] != c.get(f"/static/{js}", headers={"Accept-Encoding": "gzip"}).headers["etag"]
        )


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2fweb%2froutes.py",
        "/static/assets/../../routes.py",
        "/static/nope.js",
        "/static/",
        "/static/assets/.hidden",
    ],
)
def test_static_serves_only_the_built_files(server, path):
    with server.client() as c:
        r = c.get(path)
    assert r.status_code == 404
    assert "root:" not in r.text and "def mount_web" not in r.text
    assert str(server.home) not in r.text and str(STATIC_DIR) not in r.text


def test_load_assets_pairs_precompressed_twins(tmp_path):
    (tmp_path / "assets").mkdir()
    body = b"console.log('x');" * 100
    (tmp_path / "assets" / "a-1234abcd.js").write_bytes(body)
    (tmp_path / "assets" / "a-1234abcd.js.gz").write_bytes(gzip.compress(body))
    (tmp_path / "index.html").write_bytes(b"<!doctype html>")
    (tmp_path / "index.html.gz").write_bytes(gzip.compress(b"<!doctype html>") * 10)  # larger: ignored
    (tmp_path / ".secret").write_bytes(b"x")
    assets = load_assets(tmp_path)
    assert sorted(assets) == ["assets/a-1234abcd.js", "index.html"]
    assert assets["assets/a-1234abcd.js"].immutable and not assets["index.html"].immutable
    assert set(assets["assets/a-1234abcd.js"].encoded) == {"gzip"}
    assert assets["index.html"].encoded == {}
    assert assets["assets/a-1234abcd.js"].pick("gzip;q=0, br") == (None, body)


# ----------------------------------------------------------------------------- session login


def _login(c: httpx.Client, key: str, origin: str | None = None) -> httpx.Response:
    headers = {"Origin": origin} if origin else {}
    return c.post("/v1/session", json={"api_key": key}, headers=headers)


def test_no_keys_means_no_login(server):
    with server.client() as c:
        s = c.get("/v1/session").json()
        assert s["auth_required"] is False and s["authenticated"] is True
        r = _login(c, "anything")
        assert r.status_code == 400 and "no API keys" in r.json()["error"]["message"]


def test_login_gives_an_httponly_strict_cookie_that_authenticates(keyed_server):
    url = keyed_server.url
    with keyed_server.client() as c:
        # Everything but the shell, the login and /health needs a key or a session.
        assert c.get("/v1/models").status_code == 401
        assert c.get("/api/tags").status_code == 401
        assert c.get("/", headers={"Accept": "text/html"}).status_code == 200
        js = next(f for f in first_load_files() if f.endswith(".js"))
        assert c.get(f"/static/{js}").status_code == 200
        s = c.get("/v1/session").json()
        assert s == {
            "object": "session",
            "auth_required": True,
            "authenticated": False,
            "csrf_token": None,
            "expires_at": None,
        }

        r = _login(c, "wrong", origin=url)
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = _login(c, "sekrit-key-1", origin=url)
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("herd_session=")
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "path", "max-age"} <= attrs and "secure" not in attrs  # plain http
        assert "samesite=strict" in cookie.lower()
        token = r.json()["csrf_token"]
        assert len(token) >= 32 and "sekrit" not in cookie

        # The cookie now authenticates reads...
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/session").json()["csrf_token"] == token
        # ...and writes that carry the CSRF token and our own Origin.
        ok = c.post(
            "/v1/conversations", json={"model": MODEL}, headers={"X-CSRF-Token": token, "Origin": url}
        )
        assert ok.status_code == 201, ok.text
        no_token = c.post("/v1/conversations", json={"model": MODEL}, headers={"Origin": url})
        assert no_token.status_code == 403 and "CSRF" in no_token.json()["error"]["message"]
        bad_token = c.post(
            "/v1/conversations", json={"model": MODEL}, headers={"X-CSRF-Token": "x" * 43, "Origin": url}
        )
        assert bad_token.status_code == 403
        foreign = c.post(
            "/v1/conversations",
            json={"model": MODEL},
            headers={"X-CSRF-Token": token, "Origin": "http://localhost:9999"},
        )
        assert foreign.status_code == 403  # loopback passes the host guard, but is not our origin
        no_origin = c.post("/v1/conversations", json={"model": MODEL}, headers={"X-CSRF-Token": token})
        assert no_origin.status_code == 403

        # A bearer key still works without any of it (API clients are not browsers).
        with keyed_server.client() as api:
            assert (
                api.post("/v1/conversations", json={"model": MODEL}, headers=keyed_server.headers).status_code
                == 201
            )

        # Logging out ends the session server-side: the old cookie is worthless.
        old = c.cookies.get("herd_session")
        out = c.delete("/v1/session", headers={"X-CSRF-Token": token, "Origin": url})
        assert out.status_code == 200
        with keyed_server.client(cookies={"herd_session": old}) as replay:
            assert replay.get("/v1/models").status_code == 401


def test_login_is_refused_cross_origin_and_rate_limited(keyed_server):
    with keyed_server.client() as c:
        r = _login(c, "sekrit-key-1", origin="http://127.0.0.1:1")
        assert r.status_code == 403
        for _ in range(10):
            assert _login(c, "nope").status_code == 401
        r = _login(c, "sekrit-key-1")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0


def test_session_store_expiry_and_fixation():
    from openherd.web.session import SessionConfig, SessionStore

    now = [1000.0]
    store = SessionStore(
        Settings(home=Path("/nonexistent"), api_keys=("k1", "k2")),
        SessionConfig(idle_ttl=60, absolute_ttl=300),
        clock=lambda: now[0],
    )
    token, s = store.create("k1")
    assert store.get(token) is s
    now[0] += 59
    assert store.get(token) is s  # touched: the idle clock restarts
    now[0] += 59
    assert store.get(token) is s
    now[0] += 61
    assert store.get(token) is None  # idle too long
    token, _ = store.create("k2")
    for _ in range(10):
        now[0] += 50
        store.get(token)
    assert store.get(token) is None  # absolute lifetime
    assert store.get("x" * 500) is None and store.get(None) is None
    # A session dies with the key that opened it.
    t2, _ = store.create("k2")
    store.key_digests.clear()
    assert store.get(t2) is None


# ----------------------------------------------------------------------------- conversations


def test_conversations_are_the_persona_memory_of_herd_chat(server):
    from openherd.personas.bundle import PersonaStore
    from openherd.personas.memory import ConversationStore

    with server.client() as c:
        r = c.post("/v1/personas", json={"name": "guide", "model": MODEL, "greeting": "Welcome, traveller."})
        assert r.status_code == 201, r.text
        # A conversation started in the browser opens with the greeting, as `herd chat` does...
        conv = c.post("/v1/conversations", json={"persona": "guide"}).json()
        assert [m["role"] for m in conv["messages"]] == ["assistant"]
        assert conv["messages"][0]["meta"] == {"greeting": True}
        cid = conv["id"]
        assert (
            c.post(
                f"/v1/conversations/{cid}/turns?persona=guide",
                json={"role": "user", "content": "Where is the lighthouse?"},
            ).status_code
            == 201
        )
        assert (
            c.post(
                f"/v1/conversations/{cid}/turns?persona=guide",
                json={"role": "assistant", "content": "North.", "meta": {"finish": "stop"}},
            ).status_code
            == 201
        )

        # ...and it is in the persona's memory.db, where `herd chat guide` resumes from.
        personas = PersonaStore(server.settings)
        with ConversationStore(personas.memory_db("guide"), "guide") as mem:
            latest = mem.latest()
            assert latest.id == cid and latest.title == "Where is the lighthouse?"
            assert [m["content"] for m in mem.messages(cid)] == [
                "Welcome, traveller.",
                "Where is the lighthouse?",
                "North.",
            ]
            # The other way round: a terminal conversation shows in the sidebar.
            other = mem.new(model=MODEL)
            mem.append(other.id, "user", "from the terminal")
        listed = c.get("/v1/conversations?persona=guide").json()["data"]
        assert {x["id"] for x in listed} == {cid, other.id}

        r = c.patch(f"/v1/conversations/{cid}?persona=guide", json={"title": "  Lighthouse\n<b>trip</b>  "})
        assert (
            r.status_code == 200 and r.json()["title"] == "Lighthouse <b>trip</b>"
        )  # one line; text, not markup
        # Regenerate: drop the answer (turn 3), keep the question.
        r = c.delete(f"/v1/conversations/{cid}/turns?persona=guide&from=3")
        assert [m["content"] for m in r.json()["messages"]] == [
            "Welcome, traveller.",
            "Where is the lighthouse?",
        ]
        md = c.get(f"/v1/conversations/{cid}/export?persona=guide&format=markdown")
        assert md.status_code == 200 and "Where is the lighthouse?" in md.text
        assert md.headers["content-disposition"] == f'attachment; filename="conversation-{cid}.md"'
        assert c.delete(f"/v1/conversations/{cid}?persona=guide").status_code == 200
        assert c.get(f"/v1/conversations/{cid}?persona=guide").status_code == 404

        # Plain-model chats have their own store; nothing about them leaks paths.
        m = c.post("/v1/conversations", json={"model": MODEL}).json()
        assert m["persona"] is None and m["model"] == MODEL and m["messages"] == []
        assert [x["id"] for x in c.get("/v1/conversations").json()["data"]] == [m["id"]]

        for bad in (
            c.get("/v1/conversations?persona=../../etc"),
            c.post("/v1/conversations", json={"model": "../x"}),
            c.post(f"/v1/conversations/{m['id']}/turns", json={"role": "root", "content": "x"}),
            c.patch(f"/v1/conversations/{m['id']}", json={"title": 5}),
            c.delete(f"/v1/conversations/{m['id']}/turns?from=zero"),
            c.get("/v1/conversations?persona=nobody"),
        ):
            assert bad.status_code in (400, 404), bad.text
            assert str(server.home) not in bad.text


def test_model_chat_continues_between_browser_and_terminal(server, monkeypatch, capsys):
    """`herd chat --resume ID` picks up a model chat the web app saved, and the browser sees
    the terminal's turns (and its new chats) in the same $HERD_HOME/conversations.db."""
    import io
    import sys

    from openherd.cli import main

    monkeypatch.setenv("HERD_HOME", str(server.home))
    with server.client() as c:
        conv = c.post("/v1/conversations", json={"model": MODEL}).json()
        cid = conv["id"]
        for role, content in (("user", "Where is the lighthouse?"), ("assistant", "North.")):
            r = c.post(f"/v1/conversations/{cid}/turns", json={"role": role, "content": content})
            assert r.status_code == 201, r.text

        rc = main(["chat", "--list"])
        listed = capsys.readouterr().out.splitlines()
        assert rc == 0 and listed[1].split()[:3] == [cid, MODEL, "2"]

        monkeypatch.setattr(sys, "stdin", io.StringIO("And the ferry?\n"))
        assert main(["chat", "--resume", cid, "--temperature", "0", "--max-tokens", "3"]) == 0
        capsys.readouterr()
        got = c.get(f"/v1/conversations/{cid}").json()
        assert [(m["role"], m["content"]) for m in got["messages"][:3]] == [
            ("user", "Where is the lighthouse?"),
            ("assistant", "North."),
            ("user", "And the ferry?"),
        ]
        answer = got["messages"][3]
        assert answer["role"] == "assistant" and answer["meta"]["finish"] in ("stop", "length")
        assert answer["meta"]["tokens"] <= 3

        monkeypatch.setattr(sys, "stdin", io.StringIO("From the terminal\n"))
        assert main(["chat", MODEL, "--temperature", "0", "--max-tokens", "2"]) == 0
        data = c.get("/v1/conversations").json()["data"]
        assert [x["id"] for x in data][1] == cid
        assert data[0]["title"] == "From the terminal" and data[0]["model"] == MODEL and data[0]["turns"] == 2


# ----------------------------------------------------------------------------- jobs


def _wait_job(c: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


CHAT_JSONL = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
    )
    + "\n"
    for i in range(12)
)


def test_tune_job_streams_loss_and_registers_the_model(server):
    with server.client() as c:
        r = c.post(
            f"/v1/jobs/tune?base={MODEL}&out=tiny-tuned&max_steps=4&batch_size=2&save_every=2&seq_len=64",
            content=CHAT_JSONL,
        )
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["params"]["examples"] == 12
        events = []
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=600) as s:
            assert s.headers["content-type"].startswith("application/x-ndjson")
            for line in s.iter_lines():
                if line:
                    events.append(json.loads(line))
                    if events[-1]["type"] == "end":
                        break
        done = c.get(f"/v1/jobs/{job['id']}").json()
        assert done["status"] == "succeeded", done
        assert done["result"]["model"] == "tiny-tuned"
        assert events[0]["type"] == "snapshot"
        kinds = {e["type"] for e in events}
        assert "status" in kinds and ("point" in kinds or "points" in kinds)
        losses = [p for p in done["points"] if "loss" in p]
        assert [p["step"] for p in losses] == [1, 2, 3, 4]  # exact, from history.json
        assert all(p["loss"] > 0 for p in losses)
        assert any("eval_loss" in p for p in done["points"])
        assert done["progress"]["step"] == 4
        assert "tiny-tuned" in [m["name"] for m in c.get("/api/tags").json()["models"]]
        assert not any(str(server.home) in line for line in done["log"])
        # The run directory is the CLI's own: `herd tune --resume` finds it.
        assert (server.home / "runs" / "tiny-tuned" / "history.json").is_file()


def test_tune_job_input_errors_are_400_before_any_work(server):
    with server.client() as c:
        cases = [
            (f"base={MODEL}&out=x", "not json\n", "data.jsonl:1"),
            (f"base={MODEL}&out=x", "", "training data"),
            ("base=/etc/passwd&out=x", CHAT_JSONL, "invalid model name"),
            ("base=nope&out=x", CHAT_JSONL, "nope"),
            (f"base={MODEL}&out=../evil", CHAT_JSONL, "invalid model name"),
            (f"base={MODEL}&out={MODEL}", CHAT_JSONL, "replace the base"),
            (f"base={MODEL}&out=x&lr=fast", CHAT_JSONL, "lr"),
            (f"base={MODEL}&out=x&rank=0", CHAT_JSONL, "rank"),
            (f"base={MODEL}&out=x&evil=1", CHAT_JSONL, "evil"),
        ]
        for query, body, needle in cases:
            r = c.post(f"/v1/jobs/tune?{query}", content=body)
            assert r.status_code in (400, 404), (query, r.text)
            msg = r.json()["error"]["message"]
            assert needle in msg, (query, msg)
            assert str(server.home) not in msg
        assert c.get("/v1/jobs").json()["data"] == []
        assert not list((server.home / "jobs").glob("job-*")) if (server.home / "jobs").exists() else True


def test_eval_job_compares_two_models(server, serve_gguf):  # noqa: F811
    from openherd.store import Store

    Store(server.settings).pull(str(serve_gguf), name="tiny-b")
    with server.client() as c:
        tasks = {t["name"]: t for t in c.get("/v1/jobs/tasks").json()["data"]}
        assert tasks["basics-mc"]["type"] == "multiple_choice"
        r = c.post("/v1/jobs/eval", json={"task": "basics-mc", "models": [MODEL, "tiny-b"], "limit": 3})
        assert r.status_code == 201, r.text
        job = _wait_job(c, r.json()["id"])
        assert job["status"] == "succeeded", job
        models = job["result"]["models"]
        assert list(models) == [MODEL, "tiny-b"]
        for summary in models.values():
            assert 0.0 <= summary["metrics"]["acc"] <= 1.0
            assert summary["counts"]
        # Same weights, same data: the same score, side by side.
        assert models[MODEL]["metrics"] == models["tiny-b"]["metrics"]
        for body in (
            {"task": "../x", "models": [MODEL]},
            {"task": "basics-mc", "models": []},
            {"task": "basics-mc", "models": ["/etc/passwd"]},
            {"task": "basics-mc", "models": [MODEL, MODEL]},
            {"task": "basics-mc", "models": [MODEL], "limit": -1},
        ):
            bad = c.post("/v1/jobs/eval", json=body)
            assert bad.status_code in (400, 404), bad.text


def test_jobs_queue_one_at_a_time_and_cancel(server):
    with server.client() as c:
        long = f"base={MODEL}&max_steps=100000&batch_size=1&seq_len=64&save_every=100000"
        a = c.post(f"/v1/jobs/tune?{long}&out=tiny-a", content=CHAT_JSONL).json()
        b = c.post(f"/v1/jobs/tune?{long}&out=tiny-b", content=CHAT_JSONL).json()
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{a['id']}").json()["progress"].get("step", 0) < 1:
            assert time.monotonic() < deadline, c.get(f"/v1/jobs/{a['id']}").json()
            time.sleep(0.2)
        assert c.get(f"/v1/jobs/{b['id']}").json()["status"] == "queued"  # one running at a time
        # Cancelling the queued one never starts it; cancelling the running one stops its process.
        assert c.post(f"/v1/jobs/{b['id']}/cancel").status_code == 200
        assert _wait_job(c, b["id"], 30)["status"] == "cancelled"
        pid = server.app.state.web.jobs.jobs[a["id"]].proc.pid
        assert c.post(f"/v1/jobs/{a['id']}/cancel").status_code == 200
        done = _wait_job(c, a["id"], 60)
        assert done["status"] == "cancelled" and done["started_at"] and done["finished_at"]
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)
        assert c.delete(f"/v1/jobs/{a['id']}").status_code == 200
        assert c.get(f"/v1/jobs/{a['id']}").status_code == 404
        assert not (server.home / "jobs" / a["id"]).exists()
        assert c.get("/v1/jobs/../../etc").status_code == 404


def test_finished_jobs_survive_a_restart(tmp_path, serve_gguf):  # noqa: F811
    home = tmp_path / "home"
    with web_server(home, serve_gguf) as s, s.client() as c:
        job = c.post("/v1/jobs/eval", json={"task": "capitals", "models": [MODEL], "limit": 2}).json()
        done = _wait_job(c, job["id"])
        assert done["status"] == "succeeded", done
    with web_server(home, serve_gguf) as s, s.client() as c:
        again = c.get(f"/v1/jobs/{job['id']}").json()
        assert again["status"] == "succeeded" and again["result"] == done["result"]
    shutil.rmtree(home, ignore_errors=True)
