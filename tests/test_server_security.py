"""Safe defaults of `herd serve`: loopback-only without keys, Bearer auth on every
route but /health (Ollama's too), the Host/Origin guard against DNS rebinding,
body and header limits, CORS off by default, and error bodies that never carry
a traceback or a server path.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import ollama
import openai
import pytest
from server_helpers import MODEL, REPO, free_port, live_server, register_model, server_env
from starlette.testclient import TestClient

from openherd.server.app import MAX_HEADER_BYTES, build_app
from openherd.settings import Settings

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-0123456789"


def app_client(home, **settings) -> TestClient:
    app = build_app(Settings(home=home, threads=1, **settings))
    return TestClient(app, base_url="http://127.0.0.1:11435", raise_server_exceptions=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory, serve_gguf):
    h = tmp_path_factory.mktemp("security") / "home"
    register_model(h, serve_gguf)
    return h


# ---------------------------------------------------------------------------- binding


@pytest.mark.parametrize("how", ["flag", "env"])
def test_refuses_public_bind_without_keys(tmp_path, how):
    port = free_port()
    args = ["--host", f"0.0.0.0:{port}"] if how == "flag" else []
    env = server_env(tmp_path / "home", {"HERD_HOST": f"0.0.0.0:{port}"} if how == "env" else {})
    r = subprocess.run(
        [sys.executable, "-m", "openherd", "serve", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to listen on 0.0.0.0 without API keys" in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "not-pulled"], "model 'not-pulled' not found"),
        (["--model", "../x.gguf"], "invalid model name"),
        (["--parallel", "0"], "--parallel must be between 1 and 256"),
        (["--ctx", "8"], "--ctx must be at least 16"),
        (["--host", "127.0.0.1:99999"], "bad port"),
        (["--api-key", " "], "--api-key must not be empty"),
    ],
)
def test_bad_serve_flags_are_one_line_errors(tmp_path, args, message):
    env = server_env(tmp_path / "home")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "openherd",
            "serve",
            "--host",
            f"127.0.0.1:{free_port()}",
            *args,
        ],  # a later --host wins
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("herd: preparing")]
    assert len(lines) == 1 and lines[0].startswith("herd: error:") and message in lines[0], r.stderr


def test_address_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "openherd", "serve", "--host", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=server_env(tmp_path / "home"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"herd: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_public_bind_with_key_serves_any_host_but_requires_auth(tmp_path, serve_gguf):
    with live_server(tmp_path, serve_gguf, host="0.0.0.0", args=("--api-key", KEY)) as s:
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{s.url}/v1/models", timeout=10).status_code == 401
        r = httpx.get(
            f"{s.url}/v1/models",
            headers={"Authorization": f"Bearer {KEY}", "Host": "myserver.lan:8080"},
            timeout=10,
        )
        assert r.status_code == 200


# ---------------------------------------------------------------------------- auth (live, both APIs)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, serve_gguf):
    with live_server(tmp_path_factory.mktemp("serve-keyed"), serve_gguf, api_key=f"other-key,{KEY}") as s:
        yield s


def test_openai_sdk_with_and_without_key(keyed):
    good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == [MODEL]
    r = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.role == "assistant"
    bad = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "authentication_error" and e.value.body["code"] == "invalid_api_key"


def test_every_route_but_health_needs_the_key(keyed):
    assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200
    routes = [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/metrics"),
        ("GET", "/api/tags"),
        ("POST", "/api/chat"),
        ("GET", "/api/ps"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/pull"),
        ("GET", "/api/version"),
        ("GET", "/no-such-route"),
    ]
    for method, path in routes:
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": KEY},
        ):
            r = httpx.request(method, f"{keyed.url}{path}", headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert isinstance(err, str) if path.startswith("/api/") else err["type"] == "authentication_error"
    r = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": f"bearer {KEY}"}, timeout=10)
    assert r.status_code == 200  # the scheme is case-insensitive; either configured key works


def test_ollama_client_with_key(keyed):
    good = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"})
    assert [m.model for m in good.list().models] == [MODEL]
    assert good.chat(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}
    ).done
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url).list()
    assert e.value.status_code == 401 and "API key" in e.value.error


# ---------------------------------------------------------------------------- Host / Origin


def test_host_guard(home):
    with app_client(home) as c:
        for host in ("127.0.0.1:11435", "localhost", "localhost:9999", "[::1]:11435", "app.localhost:3000"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:11435", "127.0.0.1.evil.example", "192.168.1.10"):
            r = c.get("/health", headers={"Host": host})
            assert r.status_code == 403, host
            assert r.json()["error"]["type"] == "permission_error"
        r = c.get("/api/tags", headers={"Host": "evil.example"})
        assert r.status_code == 403 and isinstance(r.json()["error"], str)
    with app_client(home, allowed_origins=("ollama.lan", "https://app.example.com")) as c:
        assert c.get("/health", headers={"Host": "ollama.lan:11435"}).status_code == 200
        assert c.get("/health", headers={"Host": "app.example.com"}).status_code == 200
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 403


def test_origin_guard_and_cors_off_by_default(home):
    with app_client(home) as c:
        for origin in ("http://localhost:5173", "https://127.0.0.1", "http://[::1]:8080"):
            r = c.get("/v1/models", headers={"Origin": origin})
            assert r.status_code == 200, origin
            assert "access-control-allow-origin" not in r.headers  # CORS stays off
        for origin in (
            "https://evil.example",
            "null",
            "http://localhost.evil.example",
            "chrome-extension://abc",
        ):
            r = c.post(
                "/v1/chat/completions", headers={"Origin": origin}, json={"model": MODEL, "messages": []}
            )
            assert r.status_code == 403, origin
        r = c.options(
            "/v1/models",
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"},
        )
        assert r.status_code == 403


def test_cors_for_configured_origins(home):
    with app_client(home, allowed_origins=("https://app.example.com",), api_keys=(KEY,)) as c:
        pre = c.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
        r = c.get(
            "/v1/models", headers={"Origin": "https://app.example.com", "Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert c.get("/v1/models", headers={"Origin": "https://app.example.com"}).status_code == 401
        assert (
            c.get(
                "/v1/models", headers={"Origin": "https://other.example", "Authorization": f"Bearer {KEY}"}
            ).status_code
            == 403
        )


# ---------------------------------------------------------------------------- size limits


def test_body_limit_in_process(home):
    with app_client(home, max_body=1024) as c:
        big = b'{"model": "tiny", "messages": [], "pad": "' + b"x" * 2000 + b'"}'
        r = c.post("/v1/chat/completions", content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks():
            for _ in range(8):
                yield b"x" * 512

        r = c.post("/v1/chat/completions", content=chunks())  # no Content-Length: chunked
        assert r.status_code == 413
        r = c.post("/api/generate", content=chunks())
        assert r.status_code == 413 and "HERD_MAX_BODY" in r.json()["error"]
        ok = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        )
        assert ok.status_code == 200


def test_body_and_header_limits_live(tmp_path, serve_gguf):
    with live_server(tmp_path, serve_gguf, env={"HERD_MAX_BODY": "4096"}) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", content=b"x" * 8000, timeout=10)
        assert r.status_code == 413

        def chunks():
            for _ in range(16):
                yield b"y" * 1000

        r = httpx.post(f"{s.url}/v1/chat/completions", content=chunks(), timeout=10)
        assert r.status_code == 413
        r = httpx.get(f"{s.url}/health", headers={"X-Padding": "a" * (MAX_HEADER_BYTES + 10)}, timeout=10)
        assert r.status_code == 431
        # ...and the server is unharmed.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=30).status_code == 200


# ---------------------------------------------------------------------------- error bodies


def test_error_bodies_are_shaped_and_clean(home):
    with app_client(home) as c:
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        for name in ("tiny/../../x", "../models/tiny.json", "tiny.gguf"):
            r = c.post(
                "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]}
            )
            assert r.status_code in (400, 404) and str(home) not in r.text and "blobs" not in r.text
        r = c.get("/v1/models/..%2F..%2Fetc%2Fpasswd")
        assert r.status_code == 404 and str(home) not in r.text


def test_unexpected_exceptions_become_a_generic_500(home, caplog):
    app = build_app(Settings(home=home, threads=1))

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError(f"secret detail in {home}/some/file.py")

    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        r = c.get("/v1/boom")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "secret" not in r.text and str(home) not in r.text
    assert any(
        "secret detail" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records
    )  # logged server-side
