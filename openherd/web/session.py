"""Browser sessions: log in once with an API key, then a cookie carries the session.

    GET    /v1/session     {auth_required, authenticated, csrf_token}    (public: the app asks first)
    POST   /v1/session     {"api_key": KEY} -> Set-Cookie + {csrf_token}  (public: this is the login)
    DELETE /v1/session     log out

Why a cookie and not the key in localStorage: any script that ever ran in the page
could read localStorage; an ``HttpOnly`` cookie it cannot. The cookie holds only a
random 256-bit id; the server keeps ``sha256(id) -> session`` in memory (a restart
logs everyone out, which is the safe direction), with an idle and an absolute expiry.

Cookies are sent by the browser on its own, so a session-authenticated request
that changes state must prove it came from our page (CSRF):

* ``SameSite=Strict``: the browser does not attach the cookie to requests started
  by another site at all;
* the double-submit token: the page reads ``csrf_token`` from ``GET /v1/session``
  (readable only by same-origin script) and echoes it in ``X-CSRF-Token``; it is
  compared in constant time with the session's;
* ``Origin`` must be this server's own origin (or one listed in HERD_ORIGINS).

Requests with ``Authorization: Bearer`` carry no ambient credential and need
none of this. The server's auth middleware calls ``session_auth(request)`` when a
request has no bearer key, and ``check_csrf(request)`` when it then counts as
authenticated (see docs/web.md for the two-line hook).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import APIRouter
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from ..errors import AuthError, Forbidden, InvalidRequest, QueueFull
from ..settings import Settings

COOKIE = "herd_session"
SECURE_COOKIE = "__Host-herd_session"  # over TLS: the prefix forbids Domain and requires Secure + Path=/
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Paths the auth middleware must let through without a key: the app shell (so the
# login page can load) and the login endpoint itself. Everything else needs a key
# or a session.
PUBLIC_EXACT = frozenset({"/", "/health", "/v1/session"})
PUBLIC_PREFIXES = ("/static/",)


def is_public_path(path: str) -> bool:
    return path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)


@dataclass
class SessionConfig:
    idle_ttl: float = 12 * 3600.0  # seconds without a request before a session ends
    absolute_ttl: float = 7 * 24 * 3600.0  # no session lives longer than this, active or not
    max_sessions: int = 10_000  # oldest sessions are dropped beyond this (memory bound)
    login_failures: int = 10  # failed logins per client address per window before 429
    login_window: float = 60.0  # seconds

    def __post_init__(self):
        if not (0 < self.idle_ttl <= self.absolute_ttl):
            raise ValueError("SessionConfig: need 0 < idle_ttl <= absolute_ttl")
        if self.max_sessions < 1 or self.login_failures < 1 or self.login_window <= 0:
            raise ValueError("SessionConfig: max_sessions, login_failures and login_window must be positive")


@dataclass
class WebSession:
    csrf: str  # the double-submit token
    key_digest: str  # sha256 of the API key that logged in: the session dies if that key is removed
    created: float
    last_seen: float

    def expires_at(self, cfg: SessionConfig) -> float:
        return min(self.created + cfg.absolute_ttl, self.last_seen + cfg.idle_ttl)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", errors="replace")).hexdigest()


class SessionStore:
    """Sessions by sha256(id), in memory. Thread-safe: the auth middleware runs on the
    event loop, but nothing stops a caller from using it from a worker thread."""

    def __init__(self, settings: Settings, config: SessionConfig | None = None, clock=time.time):
        self.config = config or SessionConfig()
        self.keys = [k.encode("utf-8", errors="replace") for k in settings.api_keys]
        self.key_digests = {_digest(k) for k in settings.api_keys}
        self.allowed_origins = {o.strip().lower().rstrip("/") for o in settings.allowed_origins if "://" in o}
        self.clock = clock
        self._sessions: dict[str, WebSession] = {}
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def auth_required(self) -> bool:
        return bool(self.keys)

    def key_valid(self, key: str) -> bool:
        """Constant time over every key, like the bearer check: timing reveals nothing."""
        presented = key.encode("utf-8", errors="replace")
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(presented, k)
        return ok

    def create(self, key: str) -> tuple[str, WebSession]:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        session = WebSession(
            csrf=secrets.token_urlsafe(32), key_digest=_digest(key), created=now, last_seen=now
        )
        with self._lock:
            self._sweep(now)
            while len(self._sessions) >= self.config.max_sessions:
                self._sessions.pop(next(iter(self._sessions)))  # dicts keep insertion order: oldest first
            self._sessions[_digest(token)] = session
        return token, session

    def get(self, token: str | None, touch: bool = True) -> WebSession | None:
        if not token or len(token) > 128:
            return None
        now = self.clock()
        with self._lock:
            key = _digest(token)
            session = self._sessions.get(key)
            if session is None:
                return None
            if now >= session.expires_at(self.config) or session.key_digest not in self.key_digests:
                del self._sessions[key]
                return None
            if touch:
                session.last_seen = now
            return session

    def revoke(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._sessions.pop(_digest(token), None)

    def _sweep(self, now: float) -> None:
        dead = [k for k, s in self._sessions.items() if now >= s.expires_at(self.config)]
        for k in dead:
            del self._sessions[k]

    # ------------------------------------------------------------------ login rate limit

    def check_login_rate(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            q = self._failures.get(client)
            while q and now - q[0] > self.config.login_window:
                q.popleft()
            if q is not None and not q:
                del self._failures[client]
            elif q is not None and len(q) >= self.config.login_failures:
                retry = int(self.config.login_window - (now - q[0])) + 1
                err = QueueFull(
                    "too many failed logins from this address; wait a minute and try again", retry_after=retry
                )
                err.code = "login_rate_limited"
                raise err

    def record_failure(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:  # bound the table under a spray of addresses
                self._failures.clear()
            self._failures.setdefault(client, deque()).append(self.clock())


# ----------------------------------------------------------------------------- the hooks


def _store(conn: HTTPConnection) -> SessionStore | None:
    app = conn.scope.get("app")
    web = getattr(getattr(app, "state", None), "web", None)
    return getattr(web, "sessions", None)


def session_token(conn: HTTPConnection) -> str | None:
    cookies = conn.cookies
    return cookies.get(SECURE_COOKIE) or cookies.get(COOKIE)


def session_auth(request: HTTPConnection) -> bool:
    """True when the request carries a live session cookie of this server (and keys are set).
    The auth middleware calls this for requests without an Authorization header."""
    store = _store(request)
    if store is None or not store.auth_required:
        return False
    return store.get(session_token(request)) is not None


def own_origin(conn: HTTPConnection) -> str:
    """The origin the page was loaded from, as the browser writes it: scheme://host[:port]."""
    host = conn.headers.get("host", "")
    return f"{conn.url.scheme}://{host}".lower().rstrip("/")


def _normalise_origin(origin: str) -> str:
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    default = {"http": ":80", "https": ":443"}[parts.scheme]
    netloc = parts.netloc.removesuffix(default)
    return f"{parts.scheme}://{netloc}"


def origin_allowed(conn: HTTPConnection, store: SessionStore | None) -> bool:
    """Origin (or, failing that, Referer) names this server or an origin in HERD_ORIGINS."""
    origin = conn.headers.get("origin")
    if origin is None:
        referer = conn.headers.get("referer")
        if not referer:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    o = _normalise_origin(origin)
    if not o:
        return False
    if o == _normalise_origin(own_origin(conn)):
        return True
    return store is not None and o in {_normalise_origin(a) for a in store.allowed_origins}


def check_csrf(request: HTTPConnection) -> None:
    """For a session-authenticated request: state-changing methods need the session's
    token in X-CSRF-Token and a same-origin Origin. Raises Forbidden otherwise."""
    method = request.scope.get("method", "GET")
    if method in SAFE_METHODS:
        return
    store = _store(request)
    session = store.get(session_token(request), touch=False) if store is not None else None
    if session is None:
        raise AuthError("your session has expired; log in again")
    if not origin_allowed(request, store):
        raise Forbidden("cross-origin request refused: the Origin header does not match this server")
    presented = request.headers.get(CSRF_HEADER, "")
    if not presented or not hmac.compare_digest(presented.encode(), session.csrf.encode()):
        raise Forbidden("missing or invalid CSRF token (X-CSRF-Token); reload the page", code="csrf_failed")


# ----------------------------------------------------------------------------- the endpoints

router = APIRouter()


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _cookie_header(request: Request, token: str, max_age: int) -> str:
    secure = request.url.scheme == "https"
    name = SECURE_COOKIE if secure else COOKIE
    parts = [f"{name}={token}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _expired_cookies(request: Request) -> list[str]:
    out = [f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"]
    if request.url.scheme == "https":
        out.append(f"{SECURE_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict; Secure")
    return out


def _no_store(resp: Response) -> Response:
    resp.headers["Cache-Control"] = "no-store"
    return resp


@router.get("/v1/session")
async def get_session(request: Request) -> Response:
    store: SessionStore = request.app.state.web.sessions
    body: dict = {
        "object": "session",
        "auth_required": store.auth_required,
        "authenticated": False,
        "csrf_token": None,
        "expires_at": None,
    }
    if not store.auth_required:
        body["authenticated"] = True
    else:
        bearer = _bearer(request)
        session = store.get(session_token(request))
        if session is not None:
            body.update(
                authenticated=True, csrf_token=session.csrf, expires_at=int(session.expires_at(store.config))
            )
        elif bearer is not None and store.key_valid(bearer):
            body["authenticated"] = True
    return _no_store(JSONResponse(body))


@router.post("/v1/session")
async def login(request: Request) -> Response:
    store: SessionStore = request.app.state.web.sessions
    if not store.auth_required:
        raise InvalidRequest(
            "this server has no API keys configured (HERD_API_KEYS), so there is nothing to log in to"
        )
    # Login CSRF: a foreign page must not be able to log the browser into its own session.
    if request.headers.get("origin") is not None and not origin_allowed(request, store):
        raise Forbidden("cross-origin login refused: the Origin header does not match this server")
    client = request.client.host if request.client else "unknown"
    store.check_login_rate(client)
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        data = None
    key = data.get("api_key") if isinstance(data, dict) else None
    if not isinstance(key, str) or not key:
        raise InvalidRequest('send {"api_key": "..."}', param="api_key")
    if not store.key_valid(key):
        store.record_failure(client)
        raise AuthError("invalid API key")
    old = session_token(request)
    store.revoke(old)  # a fresh id at every login: no session fixation
    token, session = store.create(key)
    body = {
        "object": "session",
        "auth_required": True,
        "authenticated": True,
        "csrf_token": session.csrf,
        "expires_at": int(session.expires_at(store.config)),
    }
    resp = _no_store(JSONResponse(body))
    resp.headers.append("Set-Cookie", _cookie_header(request, token, int(store.config.absolute_ttl)))
    return resp


@router.delete("/v1/session")
async def logout(request: Request) -> Response:
    store: SessionStore = request.app.state.web.sessions
    token = session_token(request)
    if token is not None and store.get(token, touch=False) is not None:
        check_csrf(request)  # a foreign page must not be able to log the user out either
        store.revoke(token)
    resp = _no_store(JSONResponse({"object": "session", "authenticated": False}))
    for cookie in _expired_cookies(request):
        resp.headers.append("Set-Cookie", cookie)
    return resp


__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "SessionConfig",
    "SessionStore",
    "WebSession",
    "check_csrf",
    "is_public_path",
    "router",
    "session_auth",
]
