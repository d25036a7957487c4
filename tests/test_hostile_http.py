"""Hostile HTTP input, by class (issue 18): each class is refused where it enters, with a
clean 400 shaped for its API, and leaves nothing behind.

* lone surrogates in any string field, integers past MAX_INT_DIGITS, nesting past
  MAX_DEPTH, on every route that reads a JSON body (BodyCheckMiddleware);
* a persona with a surrogate is not written (nor is one imported with it in its YAML);
* a tune upload that fails leaves no job directory;
* without keys, writes from another local origin (another port, *.localhost) get a 403;
* a client that leaves during its body is no unhandled error in the log;
* a request head sent a byte a second is cut off after HERD_HEADER_TIMEOUT (live server).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
import zipfile

import httpx
import pytest
from server_helpers import MODEL, live_server, register_model
from starlette.testclient import TestClient

from openherd.server.app import build_app
from openherd.settings import Settings
from openherd.untrusted import MAX_DEPTH, MAX_INT_DIGITS

pytestmark = pytest.mark.timeout(300)

KEY = "sk-hostile-0123456789"
SURROGATE = '"\\ud800"'  # as it appears in JSON text
BIG_INT = "1" * (MAX_INT_DIGITS + 1)
HUGE_INT = "9" * 5000  # past Python's own 4,300-digit int() limit


@pytest.fixture(scope="module")
def home(tmp_path_factory, serve_gguf):
    h = tmp_path_factory.mktemp("hostile-http") / "home"
    register_model(h, serve_gguf)
    return h


def client(home, **settings) -> TestClient:
    app = build_app(Settings(home=home, threads=1, **settings))
    return TestClient(app, base_url="http://127.0.0.1:11435", raise_server_exceptions=False)


# Every route that parses a JSON body, with a valid body whose one string field we poison.
# (method, path, body template with a {S} slot for a string value and {N} for a number)
JSON_ROUTES = [
    ("POST", "/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": {S}}], "seed": {N}}'),
    ("POST", "/v1/completions", '{"model": "tiny", "prompt": {S}, "max_tokens": {N}}'),
    ("POST", "/v1/embeddings", '{"model": "tiny", "input": {S}, "dimensions": {N}}'),
    ("POST", "/v1/moderations", '{"input": {S}, "n": {N}}'),
    ("POST", "/api/generate", '{"model": "tiny", "prompt": {S}, "options": {"seed": {N}}}'),
    ("POST", "/api/chat", '{"model": "tiny", "messages": [{"role": "user", "content": {S}}], "options": {"seed": {N}}}'),
    ("POST", "/api/embed", '{"model": "tiny", "input": {S}, "truncate": {N}}'),
    ("POST", "/api/embeddings", '{"model": "tiny", "prompt": {S}, "x": {N}}'),
    ("POST", "/api/show", '{"model": {S}, "x": {N}}'),
    ("POST", "/api/pull", '{"model": {S}, "x": {N}}'),
    ("DELETE", "/api/delete", '{"model": {S}, "x": {N}}'),
    ("POST", "/v1/personas", '{"name": "poisoned", "model": "tiny", "system": {S}, "x": {N}}'),
    ("PATCH", "/v1/personas/poisoned", '{"greeting": {S}, "x": {N}}'),
    ("POST", "/v1/conversations", '{"model": "tiny", "title": {S}, "x": {N}}'),
    ("POST", "/v1/conversations/c1/turns", '{"role": "user", "content": {S}, "x": {N}}'),
    ("PATCH", "/v1/conversations/c1", '{"title": {S}, "x": {N}}'),
    ("POST", "/v1/jobs/eval", '{"task": "basics-mc", "models": [{S}], "limit": {N}}'),
    ("POST", "/v1/session", '{"api_key": {S}, "x": {N}}'),
]


def _body(template: str, s: str = '"hi"', n: str = "1") -> bytes:
    return template.replace("{S}", s).replace("{N}", n).encode()


def _assert_400(r: httpx.Response, path: str, *words: str) -> None:
    assert r.status_code == 400, (path, r.status_code, r.text[:300])
    body = r.json()
    if path.startswith("/api/"):
        assert isinstance(body["error"], str), body  # Ollama's shape
        message = body["error"]
    else:
        assert body["error"]["type"] == "invalid_request_error", body  # OpenAI's shape
        message = body["error"]["message"]
    for w in words:
        assert w in message, (path, message)
    assert "Traceback" not in r.text and "/home" not in r.text and "/tmp" not in r.text


@pytest.mark.parametrize("method, path, template", JSON_ROUTES, ids=[f"{m} {p}" for m, p, _ in JSON_ROUTES])
def test_lone_surrogates_are_400s(home, method, path, template):
    with client(home) as c:
        r = c.request(method, path, content=_body(template, s=SURROGATE))
        _assert_400(r, path, "surrogate")
        # A high surrogate followed by its low half is one character, and is fine.
        ok = c.request(method, path, content=_body(template, s='"\\ud83d\\ude00"'))
        assert ok.status_code < 500, (path, ok.text[:300])


@pytest.mark.parametrize("method, path, template", JSON_ROUTES, ids=[f"{m} {p}" for m, p, _ in JSON_ROUTES])
@pytest.mark.parametrize("digits", [BIG_INT, HUGE_INT], ids=["1001-digits", "5000-digits"])
def test_oversized_integers_are_400s(home, method, path, template, digits):
    with client(home) as c:
        r = c.request(method, path, content=_body(template, n=digits))
        _assert_400(r, path, f"longer than {MAX_INT_DIGITS} digits")


DEEP = 100_000


@pytest.mark.parametrize("method, path, template", JSON_ROUTES, ids=[f"{m} {p}" for m, p, _ in JSON_ROUTES])
def test_deep_nesting_is_a_400(home, method, path, template):
    deep = "[" * DEEP + "]" * DEEP
    with client(home) as c:
        t0 = time.monotonic()
        r = c.request(method, path, content=_body(template, s=deep))
        _assert_400(r, path, "nested")
        assert time.monotonic() - t0 < 5
        # Unclosed, and a whole body of it: still a 400, not a RecursionError.
        _assert_400(c.request(method, path, content=b"[" * DEEP), path, "nested")
        # MAX_DEPTH itself is allowed through to the route (which may dislike it, but not 5xx).
        fine = "[" * (MAX_DEPTH - 5) + "]" * (MAX_DEPTH - 5)
        assert c.request(method, path, content=_body(template, s=fine)).status_code < 500


def test_login_route_without_a_key_refuses_hostile_bodies(home):
    # /v1/session is reachable without a key (it is where keys are presented).
    with client(home, api_keys=(KEY,)) as c:
        for body in (b"{" * DEEP, b'{"api_key": ' + HUGE_INT.encode() + b"}", b'{"api_key": "\\udfff"}'):
            _assert_400(c.post("/v1/session", content=body), "/v1/session")


def test_utf16_bodies_get_the_same_checks(home):
    # json.loads(bytes) reads UTF-16/32 too, so the check must not be skipped for them.
    body = ('{"model": "tiny", "prompt": "x", "max_tokens": ' + HUGE_INT + "}").encode("utf-16")
    with client(home) as c:
        _assert_400(c.post("/v1/completions", content=body), "/v1/completions", "digits")


def test_surrogate_persona_is_not_written_and_listing_still_works(home):
    with client(home) as c:
        r = c.post("/v1/personas", content=b'{"name": "halfchar", "model": "tiny", "system": "a\\udc00b"}')
        _assert_400(r, "/v1/personas", "surrogate")
        assert c.get("/v1/personas/halfchar").status_code == 404
        listing = c.get("/v1/personas")
        assert listing.status_code == 200 and "halfchar" not in listing.text
    assert not (home / "personas" / "halfchar").exists()


def _archive(persona_yaml: str) -> bytes:
    """A .herd archive around one persona.yaml, with a correct herd.json."""
    import hashlib

    data = persona_yaml.encode()
    manifest = {
        "format": "openherd-persona",
        "version": 1,
        "files": {"persona.yaml": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}},
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("herd.json", json.dumps(manifest))
        zf.writestr("persona.yaml", data)
    return buf.getvalue()


def test_surrogate_and_deep_persona_archives_are_400s(home):
    from openherd.personas.bundle import ARCHIVE_FORMAT

    assert ARCHIVE_FORMAT == "openherd-persona"  # what _archive writes
    deep = "a: " + "[" * 100_000 + "]" * 100_000  # under 200 KB; minutes of PyYAML before
    cases = {
        'schema: 1\nname: imp1\nmodel: tiny\nsystem: "x\\uD800y"\n': "",  # libyaml: "invalid escape"
        "schema: 1\nname: imp2\nmodel: tiny\n" + deep: "nested",
        f"schema: 1\nname: imp3\nmodel: tiny\nversion: {HUGE_INT}\n": "digits",
    }
    with client(home) as c:
        for yaml_text, word in cases.items():
            t0 = time.monotonic()
            r = c.post("/v1/personas/import", content=_archive(yaml_text))
            assert time.monotonic() - t0 < 5
            _assert_400(r, "/v1/personas/import", word)
        assert c.get("/v1/personas").status_code == 200
    for n in ("imp1", "imp2", "imp3"):
        assert not (home / "personas" / n).exists()


def test_failed_tune_upload_leaves_no_job_files(home):
    lines = [
        b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # RecursionError in json.loads, before
        b'{"prompt": "a", "completion": ' + HUGE_INT.encode() + b"}",  # ValueError from int(), before
        b'{"prompt": "\\ud800", "completion": "b"}',
    ]
    with client(home) as c:
        for line in lines:
            good = b'{"prompt": "p", "completion": "c"}\n'
            r = c.post(f"/v1/jobs/tune?base={MODEL}&out=hostile-out", content=good + line + b"\n")
            assert r.status_code == 400, r.text[:300]
    jobs = home / "jobs"
    leftovers = [p for p in jobs.rglob("data.jsonl")] if jobs.exists() else []
    assert leftovers == []


# ---------------------------------------------------------------------------- origins


@pytest.mark.parametrize(
    "origin", ["http://localhost:5173", "http://127.0.0.1:8888", "http://evil.localhost:11435", "http://[::1]:1"]
)
def test_keyless_writes_from_other_local_origins_are_refused(home, origin):
    with client(home) as c:
        r = c.post("/v1/jobs/eval", headers={"Origin": origin}, json={"task": "basics-mc", "models": [MODEL]})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
        r = c.patch("/v1/personas/anyone", headers={"Origin": origin}, json={"greeting": "owned"})
        assert r.status_code == 403
        r = c.post("/api/pull", headers={"Origin": origin}, json={"model": "x"})
        assert r.status_code == 403 and isinstance(r.json()["error"], str)
        # Reads stay open to local pages (CORS is off: they cannot see the answer anyway).
        assert c.get("/v1/models", headers={"Origin": origin}).status_code == 200


def test_keyless_writes_from_our_own_origin_pass(home):
    with client(home) as c:
        for origin in ("http://127.0.0.1:11435", "HTTP://127.0.0.1:11435/"):
            r = c.post("/v1/conversations", headers={"Origin": origin}, json={"model": MODEL})
            assert r.status_code == 201, r.text
        # No Origin: not a browser; nothing to check.
        assert c.post("/v1/conversations", json={"model": MODEL}).status_code == 201
    with client(home, allowed_origins=("http://localhost:5173",)) as c:
        r = c.post("/v1/conversations", headers={"Origin": "http://localhost:5173"}, json={"model": MODEL})
        assert r.status_code == 201


# ---------------------------------------------------------------------------- a body cut short


def test_client_leaving_during_the_body_is_not_an_unhandled_error(home, caplog):
    app = build_app(Settings(home=home, threads=1))
    sent: list[dict] = []
    messages = [
        {"type": "http.request", "body": b'{"model": "tiny", "mess', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 11435),
        "headers": [(b"host", b"127.0.0.1:11435"), (b"content-type", b"application/json"),
                    (b"content-length", b"500")],
    }
    with caplog.at_level(logging.DEBUG, logger="openherd"):
        asyncio.run(app(scope, receive, send))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text and "unhandled" not in caplog.text
    assert not any(m.get("status", 0) >= 500 for m in sent)


# ---------------------------------------------------------------------------- slowloris


def test_slow_request_heads_are_cut_off(tmp_path, serve_gguf):
    with live_server(tmp_path, serve_gguf, env={"HERD_HEADER_TIMEOUT": "1.5"}) as srv:
        slow = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(s)
        t0 = time.monotonic()
        closed = 0
        while time.monotonic() - t0 < 8 and closed < len(slow):
            for s in list(slow):
                try:
                    s.sendall(b"X")  # one header byte a second
                except OSError:
                    pass
                s.settimeout(0.05)
                try:
                    if s.recv(1) == b"":
                        closed += 1
                        slow.remove(s)
                        s.close()
                except TimeoutError:
                    pass
                except OSError:
                    closed += 1
                    slow.remove(s)
                    s.close()
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        for s in slow:
            s.close()
        assert closed == 20 and elapsed < 6, (closed, elapsed)
        # Prompt clients are still served, on kept-alive connections too.
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            assert h.get("/health").status_code == 200
            time.sleep(0.5)
            assert h.get("/health").status_code == 200
