"""``mount_web(app, settings)``: the browser app on the server's own port.

    GET /                  index.html (to browsers; anything else still gets "openherd is running")
    GET /static/<file>     the built assets of web/ (committed in openherd/web/static)
    /v1/session            login with an API key -> session cookie (session.py)
    /v1/conversations      persisted chats, the same SQLite stores as `herd chat` (conversations.py)
    /v1/jobs               tune and eval jobs run as subprocesses (jobs.py)

Assets are indexed once, at mount time, into a dict of relative path -> bytes
(plus the .br/.gz twins that ``npm run build`` writes next to each). A request
is a dict lookup: no path from a URL ever reaches the filesystem, so there is
nothing to traverse. Files under ``assets/`` carry a content hash in their name
and are cached for a year (``immutable``); index.html is revalidated on every
load (``no-cache`` + ETag), so a new release is picked up at once.

Every page and asset carries a strict Content-Security-Policy: scripts and
styles only from this origin (no inline script, no eval, no inline style
attributes), no plugins, no framing, no <base> tricks. The app renders model
output, persona fields and document names as untrusted (DOMPurify or
textContent); the CSP is the second wall if that ever slips.
"""

from __future__ import annotations

import hashlib
import mimetypes
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from ..errors import NotFound
from ..settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
HASHED_PREFIX = "assets/"  # vite writes content-hashed names here (web/vite.config.ts)
ENCODINGS = (("br", ".br"), ("gzip", ".gz"))  # preferred first

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",  # data: for the tiny SVG icons uPlot and the app inline
        "font-src 'self'",
        "connect-src 'self'",
        "media-src 'none'",
        "object-src 'none'",
        "worker-src 'none'",
        "frame-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate CSP 2
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"

TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass
class Asset:
    """One file and its precompressed twins, in memory (the whole app is a few hundred KB)."""

    body: bytes
    content_type: str
    etag: str
    immutable: bool
    encoded: dict[str, bytes] = field(default_factory=dict)  # "br" / "gzip" -> bytes

    def pick(self, accept_encoding: str) -> tuple[str | None, bytes]:
        accepted = _accepted_encodings(accept_encoding)
        for name, _ in ENCODINGS:
            if name in self.encoded and name in accepted:
                return name, self.encoded[name]
        return None, self.body


def _accepted_encodings(header: str) -> set[str]:
    """Codings the client accepts with q > 0 ('gzip, deflate, br;q=0.5' -> {gzip, deflate, br})."""
    out = set()
    for part in header.lower().split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if name and q > 0:
            out.add(name.strip())
    return out


def _content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def load_assets(root: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every file under ``root`` by its relative POSIX path; .br/.gz twins attach to their original."""
    assets: dict[str, Asset] = {}
    if not root.is_dir():
        return assets
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    twins = {rel for rel in (p.relative_to(root).as_posix() for p in files) if rel.endswith((".br", ".gz"))}
    for p in files:
        rel = p.relative_to(root).as_posix()
        if rel in twins or any(part.startswith(".") for part in rel.split("/")):
            continue
        body = p.read_bytes()
        asset = Asset(
            body=body,
            content_type=_content_type(rel),
            etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
            immutable=rel.startswith(HASHED_PREFIX),
        )
        for name, suffix in ENCODINGS:
            twin = p.with_name(p.name + suffix)
            if twin.is_file() and not twin.is_symlink():
                encoded = twin.read_bytes()
                if len(encoded) < len(body):  # never serve a "compressed" file larger than the original
                    asset.encoded[name] = encoded
        assets[rel] = asset
    return assets


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return etag in tags


def asset_response(request: Request, asset: Asset) -> Response:
    encoding, body = asset.pick(request.headers.get("accept-encoding", ""))
    # One ETag per representation: a cache must not answer a gzip client with brotli bytes.
    etag = asset.etag if encoding is None else asset.etag[:-1] + "-" + encoding + '"'
    headers = {
        **SECURITY_HEADERS,
        "Cache-Control": IMMUTABLE if asset.immutable else REVALIDATE,
        "ETag": etag,
        "Vary": "Accept-Encoding",
    }
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(body))
        return Response(status_code=200, headers=headers, media_type=asset.content_type)
    return Response(body, headers=headers, media_type=asset.content_type)


def wants_html(request: Request) -> bool:
    """Browsers navigating to / send Accept: text/html. Health checks written for Ollama
    (curl, the ollama client) do not, and keep getting the plain-text answer."""
    return "text/html" in request.headers.get("accept", "").lower()


def _missing_build() -> Response:
    return Response(
        "openherd is running; the web app is not built (run `npm run build` in web/)",
        media_type="text/plain",
        headers=SECURITY_HEADERS,
    )


def mount_web(app: FastAPI, settings: Settings) -> FastAPI:
    """Add the web app, its session login, conversations and jobs to ``app``. Idempotent."""
    if getattr(app.state, "web", None) is not None:
        return app
    from .conversations import router as conversations_router
    from .jobs import JobManager
    from .jobs import router as jobs_router
    from .session import SessionStore
    from .session import router as session_router

    assets = load_assets()
    jobs = JobManager(settings)
    app.state.web = WebState(settings=settings, assets=assets, sessions=SessionStore(settings), jobs=jobs)

    async def index(request: Request) -> Response:
        if not wants_html(request):
            return Response("openherd is running", media_type="text/plain")
        asset = assets.get("index.html")
        return asset_response(request, asset) if asset is not None else _missing_build()

    async def static(request: Request) -> Response:
        asset = assets.get(request.path_params["path"])
        if asset is None:
            raise NotFound("no such file in the web app")
        return asset_response(request, asset)

    before = len(app.router.routes)
    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/static/{path:path}", static, methods=["GET", "HEAD"], include_in_schema=False)
    # First match wins in Starlette: the Ollama router answers "/" with plain text, and
    # the browser must get the app instead (wants_html keeps that answer for the rest).
    added: list[BaseRoute] = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[:0] = added

    app.include_router(session_router)
    app.include_router(conversations_router)
    app.include_router(jobs_router)

    # Jobs are child processes: start the manager with the app and stop them with it, so
    # a server shutdown never leaves a fine-tune running unattended.
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as value:
            await jobs.start()
            try:
                yield value
            finally:
                await jobs.close()

    app.router.lifespan_context = lifespan
    return app


@dataclass
class WebState:
    """What the web routes share, on ``app.state.web``."""

    settings: Settings
    assets: dict[str, Asset]
    sessions: object  # session.SessionStore
    jobs: object  # jobs.JobManager
