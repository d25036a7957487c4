"""A stand-in for the Hugging Face Hub's file endpoint, on 127.0.0.1.

Just enough of the protocol that ``huggingface_hub.hf_hub_download`` (2.x) uses:

    HEAD|GET /{owner}/{repo}/resolve/{revision}/{path}

answered with ``X-Repo-Commit``, ``ETag`` (and for LFS files ``X-Linked-Etag`` =
the sha256, ``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges`` and
``Range: bytes=N-`` support (the client resumes interrupted downloads with it).
Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo) as the real hub does, which is how the client picks its exception.

Knobs for tests: ``rate`` (bytes/second, to be killed mid-download),
``corrupt`` (serve bytes that don't match the advertised sha256), ``gated``.
Every request is recorded in ``requests`` so tests can assert what was asked.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class HubFile:
    data: bytes
    lfs: bool = True

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        # A git blob id, which the hub sends as the ETag of non-LFS files.
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class HubRepo:
    commit: str
    files: dict[str, HubFile] = field(default_factory=dict)
    branches: tuple[str, ...] = ("main",)
    gated: bool = False


class HubServer:
    def __init__(self, rate: int | None = None, corrupt: bool = False):
        self.repos: dict[str, HubRepo] = {}
        self.rate = rate  # bytes per second for GET bodies; None = as fast as possible
        self.corrupt = corrupt  # flip a byte of every body (headers still advertise the true sha256)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_file(
        self, repo_id: str, path: str, data: bytes, *, lfs: bool = True, gated: bool = False
    ) -> HubFile:
        repo = self.repos.get(repo_id)
        if repo is None:
            repo = self.repos[repo_id] = HubRepo(
                commit=hashlib.sha1(repo_id.encode()).hexdigest(), gated=gated
            )
        f = repo.files[path] = HubFile(data, lfs)
        return f

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                server._handle(self, body=False)

            def do_GET(self) -> None:
                server._handle(self, body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ protocol

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path, dict(h.headers)))
        parts = unquote(urlsplit(h.path).path).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, None, "Not Found")
        repo_id, revision, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound", "Repository not found")
        if repo.gated:
            return self._error(h, 401, "GatedRepo", "Access to model is restricted")
        if revision not in repo.branches and revision != repo.commit:
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id")
        f = repo.files.get(path)
        if f is None:
            return self._error(h, 404, "EntryNotFound", "Entry not found")

        data = f.data
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng[6:].endswith("-"):
            start = int(rng[6:-1])
        status = 206 if start else 200
        h.send_response(status)
        h.send_header("X-Repo-Commit", repo.commit)
        if f.lfs:
            h.send_header("ETag", f'"{f.git_oid}"')
            h.send_header("X-Linked-Etag", f'"{f.sha256}"')
            h.send_header("X-Linked-Size", str(len(data)))
        else:
            h.send_header("ETag", f'"{f.git_oid}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        payload = data[start:]
        if self.corrupt and payload:
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        self._send(h, payload)

    def _send(self, h: BaseHTTPRequestHandler, payload: bytes) -> None:
        chunk = 16 << 10 if self.rate else 1 << 20
        try:
            for i in range(0, len(payload), chunk):
                h.wfile.write(payload[i : i + chunk])
                h.wfile.flush()
                if self.rate:
                    time.sleep(chunk / self.rate)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a test killed it)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str | None, message: str) -> None:
        body = f'{{"error": "{message}"}}'.encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
