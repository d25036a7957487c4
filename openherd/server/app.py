"""``build_app(settings)``: the FastAPI application, its guards and its error handlers.

The request path, outermost first::

    catch-all      anything unexpected -> logged here, generic 500 to the client
    metrics        requests by route/method/status, response durations
    host/origin    DNS-rebinding guard: foreign Host or Origin -> 403
    CORS           only when HERD_ORIGINS lists browser origins (off by default)
    auth           Bearer API key on every route but /health, when keys are set
    size limits    headers (431); Content-Length checked up front, streamed bodies counted (413)
    body check     JSON too deep, numbers too long, lone surrogates -> 400 (untrusted.check_json)
    routes         /v1 (openai.py, moderations.py, personas.api), /api (ollama.py), /health, /metrics

Every error leaves through ``error_response``: OpenAI's ``{"error": {message,
type, param, code}}`` everywhere except under ``/api/``, where Ollama clients
expect ``{"error": "message"}``. Messages come from ``HerdError``s, which are
written for users; nothing else (tracebacks, paths) reaches a client.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import (
    AuthError,
    Forbidden,
    HerdError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    SandboxUnavailable,
    Unavailable,
)
from ..personas.api import router as personas_router
from ..settings import Settings
from ..untrusted import check_json
from ..web import check_csrf, is_public_path, mount_web, session_auth
from . import metrics as _metrics
from .models import router as models_router
from .moderation import Shields
from .moderations import router as moderation_router
from .ollama import router as ollama_router
from .openai import router as openai_router
from .protocol import KEEP_FOREVER
from .serving import ClientGone, ServerState

log = logging.getLogger("openherd.server")

MAX_HEADER_BYTES = 32 * 1024  # request line + headers (uvicorn's h11_max_incomplete_event_size)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


# ----------------------------------------------------------------------------
# Errors, in one place
# ----------------------------------------------------------------------------


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, err: HerdError) -> dict:
    return {"error": err.message} if is_ollama_path(path) else err.to_openai()


# Seconds a client should wait after a transient 503: a model loading or unloading, every
# loaded model busy, an interrupted generation. These clear within seconds, and the official
# SDKs (openai, ollama) and proxies honour Retry-After rather than hammering the server.
UNAVAILABLE_RETRY_AFTER = 2


def retry_after(err: HerdError) -> int | None:
    """Retry-After seconds for an error: its own (429 QueueFull), the transient-503 default
    for Unavailable, or None. A host that cannot sandbox code will not fix itself in
    seconds, so SandboxUnavailable gets none."""
    own = getattr(err, "retry_after", None)
    if own is not None:
        return int(own)
    if isinstance(err, Unavailable) and not isinstance(err, SandboxUnavailable):
        return UNAVAILABLE_RETRY_AFTER
    return None


def error_headers(err: HerdError) -> dict[str, str]:
    headers = {}
    seconds = retry_after(err)
    if seconds is not None:
        headers["Retry-After"] = str(seconds)
    if isinstance(err, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_response(path: str, err: HerdError) -> Response:
    return JSONResponse(error_body(path, err), status_code=err.status, headers=error_headers(err))


async def send_error(scope: Scope, send: Send, err: HerdError) -> None:
    """For the pure-ASGI guards below, which answer before any route runs."""
    await error_response(scope.get("path", ""), err)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


INTERNAL_ERROR = HerdError("internal server error; the server log has the details")


async def _herd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HerdError)
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(request.url.path, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    # Only path/query parameters reach FastAPI's own validation: bodies are parsed by protocol.py.
    errors = getattr(exc, "errors", lambda: [])()
    first = errors[0] if errors else {}
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    msg = f"{param}: {first.get('msg', 'invalid')}" if param else "invalid request"
    return error_response(request.url.path, InvalidRequest(msg, param=param))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err: HerdError = NotFound(
            f"no route {request.method} {request.url.path[:200]}; see /v1 (OpenAI) and /api (Ollama)"
        )
    elif exc.status_code == 405:
        err = InvalidRequest(
            f"method {request.method} is not allowed on {request.url.path[:200]}", code="method_not_allowed"
        )
        err.status = 405
    else:
        err = HerdError(str(exc.detail)[:200])
        err.status = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    response = error_response(request.url.path, err)
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening; nginx's "client closed request"


class CatchAllMiddleware:
    """The last line: an unexpected exception is logged with its traceback here and
    the client gets a generic 500 (no traceback, no paths). Registering a handler
    for ``Exception`` would not do: Starlette re-raises after calling it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(scope, send, INTERNAL_ERROR)


# ----------------------------------------------------------------------------
# Guards
# ----------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _hostname(host_header: str) -> str:
    """'example.com:8080' -> 'example.com', '[::1]:11435' -> '::1' (lowercased)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def _is_local_name(hostname: str) -> bool:
    return hostname in LOOPBACK_NAMES or hostname.endswith(".localhost")


def _origin_key(origin: str) -> str:
    """'HTTP://LocalHost:80/' -> 'http://localhost' (default ports dropped); '' if not http(s)."""
    parts = urlsplit(origin.strip().lower().rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    try:
        port = parts.port
    except ValueError:
        return ""
    default = {"http": 80, "https": 443}[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


class HostOriginMiddleware:
    """Blocks DNS rebinding: a web page on evil.example that re-points its DNS name at
    127.0.0.1 reaches us with ``Host: evil.example``; a cross-site fetch carries its
    ``Origin``. Loopback names (any port), the bound host and HERD_ORIGINS pass;
    anything else is a 403 before a route runs. Non-browser clients send no Origin."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.keyless = not settings.api_keys
        bound = settings.host.lower()
        self.any_host = _is_wildcard(bound)  # 0.0.0.0 needs API keys, which stop rebinding anyway
        extra = [o.strip().lower().rstrip("/") for o in settings.allowed_origins if o.strip()]
        self.any_origin = "*" in extra
        self.origins = {o for o in extra if "://" in o}
        self.hosts = {bound} | {urlsplit(o).hostname or "" if "://" in o else _hostname(o) for o in extra}

    def host_ok(self, host: str | None) -> bool:
        if host is None or self.any_host or self.any_origin:
            return True
        name = _hostname(host)
        return _is_local_name(name) or name in self.hosts

    def origin_ok(self, origin: str | None) -> bool:
        if origin is None or self.any_origin:
            return True
        o = origin.strip().lower().rstrip("/")
        if o in self.origins:
            return True
        parts = urlsplit(o)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (file://, sandboxed frames), extensions...
        return _is_local_name(parts.hostname) or parts.hostname in self.hosts

    def writes_from_elsewhere(self, scope: Scope, host: str | None, origin: str | None) -> bool:
        """Without keys nothing else stops a page on another local port (a dev server, a
        notebook) or on *.localhost from posting here: there, a request that changes state
        must come from the origin herd itself serves, or from one HERD_ORIGINS lists. Reads
        stay open to local pages; CORS is off, so they cannot see the answers anyway."""
        if not self.keyless or origin is None or self.any_origin:
            return False
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return False
        o = _origin_key(origin)
        return not o or (o != _origin_key(f"{scope.get('scheme', 'http')}://{host or ''}")
                         and o not in {_origin_key(a) for a in self.origins})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if not self.host_ok(host):
                await send_error(
                    scope,
                    send,
                    Forbidden(f"host {(host or '')[:100]!r} is not allowed; add it to HERD_ORIGINS"),
                )
                return
            origin = _header(scope, b"origin")
            if not self.origin_ok(origin):
                await send_error(
                    scope,
                    send,
                    Forbidden(f"origin {(origin or '')[:100]!r} is not allowed; add it to HERD_ORIGINS"),
                )
                return
            if self.writes_from_elsewhere(scope, host, origin):
                await send_error(
                    scope,
                    send,
                    Forbidden(
                        f"cross-origin {scope.get('method')} from {(origin or '')[:100]!r} refused: without API keys "
                        "only this server's own pages may change state; add the origin to HERD_ORIGINS"
                    ),
                )
                return
        await self.app(scope, receive, send)


class AuthMiddleware:
    """``Authorization: Bearer KEY`` on every route but /health when keys are set.
    Compared in constant time against every key, so timing reveals neither the key
    nor which key matched."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], cors: bool):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.cors = cors

    def valid(self, token: str) -> bool:
        presented = token.encode("utf-8", errors="replace")
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(presented, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or is_public_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.cors and scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
            await self.app(scope, receive, send)  # CORS preflights carry no credentials by design
            return
        auth = _header(scope, b"authorization")
        if not auth:
            # The web app logs in once with a key and then sends a session cookie;
            # cookies ride along cross-site, so those requests also need a CSRF token.
            request = Request(scope)
            if session_auth(request):
                try:
                    check_csrf(request)
                except HerdError as e:
                    await send_error(scope, send, e)
                    return
                await self.app(scope, receive, send)
                return
            await send_error(
                scope, send,
                AuthError("missing API key: send the header 'Authorization: Bearer KEY' (or log in at /)"),
            )
            return
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not self.valid(token.strip()):
            await send_error(scope, send, AuthError("invalid API key"))
            return
        await self.app(scope, receive, send)


class SizeLimitMiddleware:
    """Request bodies over ``max_body`` bytes get a 413. A declared Content-Length is
    checked before reading anything; a chunked body is counted as it streams in and
    cut off as soon as it passes the limit, so an attacker cannot make us buffer it.

    Headers over MAX_HEADER_BYTES get a 431. uvicorn's h11 limit only bounds headers
    that arrive slowly (an incomplete event); a large block arriving in one read is
    parsed whole, so the total is checked here too."""

    def __init__(self, app: ASGIApp, max_body: int, max_headers: int = MAX_HEADER_BYTES):
        self.app = app
        self.max_body = max_body
        self.max_headers = max_headers

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the limit of {self.max_body} bytes (HERD_MAX_BODY)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ())) > self.max_headers:
            err = PayloadTooLarge(
                f"request headers are larger than the limit of {self.max_headers} bytes",
                code="headers_too_large",
            )
            err.status = 431
            await send_error(scope, send, err)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await send_error(scope, send, InvalidRequest("invalid Content-Length header"))
                return
            if int(declared) > self.max_body:
                await send_error(scope, send, self.too_large())
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise self.too_large()
            return message

        await self.app(scope, limited_receive, send)


class BodyCheckMiddleware:
    """Reads each request body whole (SizeLimitMiddleware, outside, has bounded it) and
    refuses, with a 400, JSON that no parser here should see: nested past MAX_DEPTH, a
    number past MAX_INT_DIGITS, a lone surrogate (``untrusted.check_json``). Then every
    route, whichever decoder it calls, parses only what is safe, and this is checked once.

    A client that disconnects while sending the body gets nothing and leaves one debug
    line: nobody is listening, and it is not a server error."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    log.debug("%s %s: client left while sending the body", scope.get("method"), scope.get("path"))
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except HerdError as e:  # the size limit, counted as the body streamed in
            await send_error(scope, send, e)
            return
        body = b"".join(chunks)
        try:
            if len(body) > 65536:  # megabytes of JSON take milliseconds; keep them off the event loop
                await run_in_threadpool(check_json, body)
            else:
                check_json(body)
        except HerdError as e:
            await send_error(scope, send, e)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, for streaming responses

        await self.app(scope, replay, send)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: _metrics.Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # The route template, not the raw path: unbounded label values would
            # let any client grow the metrics without limit.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.inc(route, scope["method"], str(status))
            self.metrics.request_duration.observe(time.perf_counter() - t0, route)


# ----------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------


def build_app(settings: Settings, manager=None, preload: str | None = None) -> FastAPI:
    """The server as an ASGI app. ``manager`` defaults to a ModelManager over the
    store in ``settings.home``; ``preload`` names a model to load at startup (kept
    loaded until evicted)."""
    if manager is None:
        from ..engine.manager import ModelManager

        manager = ModelManager(settings)
    # A bad HERD_SAFETY policy stops the server here, with the reason, rather than
    # serving without the shields the operator asked for.
    state = ServerState(settings=settings, manager=manager, shields=Shields.from_settings(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = getattr(manager, "start", None)
        if start is not None:
            await start()
        if preload:
            try:
                await state.engine(preload, keep_alive=KEEP_FOREVER)
                log.info("preloaded %s", preload)
            except HerdError as e:
                # Serving the other models is still useful; requests for this one
                # will report the same error.
                log.error("could not preload %s: %s", preload, e.message)
        try:
            yield
        finally:
            await manager.close()
            state.shields.close()

    app = FastAPI(
        title="openherd",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.herd = state

    app.add_exception_handler(HerdError, _herd_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientGone, _client_gone)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "models_loaded": len(manager.loaded())})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = state.metrics.render(state.engine_stats(), memory=manager.memory())
        return Response(text, media_type=_metrics.CONTENT_TYPE)

    app.include_router(openai_router)
    app.include_router(models_router)
    app.include_router(moderation_router)
    app.include_router(personas_router)  # /v1/personas: CRUD (personas are served as model ids above)
    app.include_router(ollama_router)
    mount_web(app, settings)  # the browser app at / (its GET / precedes Ollama's banner)

    # add_middleware wraps what is already there: add innermost first.
    app.add_middleware(BodyCheckMiddleware)
    app.add_middleware(SizeLimitMiddleware, max_body=settings.max_body)
    browser_origins = [o for o in settings.allowed_origins if "://" in o or o == "*"]
    app.add_middleware(AuthMiddleware, keys=settings.api_keys, cors=bool(browser_origins))
    if browser_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=browser_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],  # SDKs add their own (x-stainless-*, user-agent hints)
        )
    app.add_middleware(HostOriginMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(CatchAllMiddleware)
    return app
