"""`herd serve`: the OpenAI- and Ollama-compatible HTTP server.

Safe by default: it listens on 127.0.0.1:11435, and refuses any other address
unless API keys are configured (HERD_API_KEYS or --api-key), because a model
server on a network interface without keys is an open compute relay.

SIGTERM (or Ctrl-C) shuts down gracefully: the listening socket closes at once,
requests in flight (streams included) run to completion, models are unloaded,
and the process exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over OpenAI- and Ollama-compatible HTTP APIs",
        description="Serve models over HTTP: the OpenAI API under /v1 and the Ollama API under /api, "
        "with continuous batching. Models load on demand and stay loaded for keep_alive (HERD_KEEP_ALIVE). "
        "Listens on 127.0.0.1:11435 unless --host/HERD_HOST says otherwise; a non-loopback address "
        "requires API keys.",
    )
    p.add_argument(
        "--host",
        default=None,
        metavar="HOST:PORT",
        help="address to listen on (default HERD_HOST or 127.0.0.1:11435)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (repeatable; adds to HERD_API_KEYS)",
    )
    p.add_argument(
        "--model", default=None, help="model to load at startup (pulled first if it is a catalog name)"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="sequences decoded together per model (default HERD_NUM_PARALLEL=8)",
    )
    p.add_argument(
        "--ctx",
        type=int,
        default=None,
        metavar="N",
        help="context tokens per sequence (default HERD_NUM_CTX=4096)",
    )
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def serve_settings(args: argparse.Namespace):
    """Settings from the environment, overridden by flags, checked for safety."""
    import dataclasses

    from ..errors import InvalidRequest
    from ..settings import get_settings, parse_host

    settings = get_settings()
    changes: dict = {}
    if args.host:
        changes["host"], changes["port"] = parse_host(args.host)
    keys = tuple(k.strip() for k in args.api_key if k.strip())
    if args.api_key and not keys:
        raise InvalidRequest("--api-key must not be empty")
    if keys:
        changes["api_keys"] = settings.api_keys + keys
    if args.parallel is not None:
        if not 1 <= args.parallel <= 256:
            raise InvalidRequest("--parallel must be between 1 and 256")
        changes["num_parallel"] = args.parallel
    if args.ctx is not None:
        if args.ctx < 16:
            raise InvalidRequest("--ctx must be at least 16 tokens")
        changes["num_ctx"] = args.ctx
    settings = dataclasses.replace(settings, **changes)
    if settings.max_body < 1:
        raise InvalidRequest("HERD_MAX_BODY must be a positive number of bytes")
    if not settings.header_timeout > 0 or not settings.keep_alive_timeout > 0:
        raise InvalidRequest("HERD_HEADER_TIMEOUT and HERD_KEEP_ALIVE_TIMEOUT must be positive seconds")
    if not is_loopback(settings.host) and not settings.api_keys:
        raise InvalidRequest(
            f"refusing to listen on {settings.host} without API keys; set HERD_API_KEYS or pass --api-key KEY "
            "(or listen on 127.0.0.1)"
        )
    return settings


def _bind(host: str, port: int):
    """Bind the listening socket ourselves, so 'address in use' is one clear line."""
    import socket

    from ..errors import HerdError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HerdError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise HerdError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import sys

    settings = serve_settings(args)
    if args.model:
        from ..store import Store
        from ..store.manifest import validate_name

        validate_name(args.model)  # the server serves store names; import files with `herd pull PATH`
        print(f"herd: preparing {args.model}", file=sys.stderr)
        Store(settings).ensure(args.model)
    sock = _bind(settings.host, settings.port)

    import uvicorn

    from ..server.app import MAX_HEADER_BYTES, build_app
    from ..server.h11_timeouts import with_header_timeout

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(settings, preload=args.model)
    config = uvicorn.Config(
        app,
        # h11, because h11_max_incomplete_event_size bounds the size of the request line + headers
        # and with_header_timeout the time they may take to arrive (slowloris).
        http=with_header_timeout(settings.header_timeout),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=settings.keep_alive_timeout,
        ws="none",
        lifespan="on",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=None,  # finish every in-flight request
        log_level="info",
    )
    server = uvicorn.Server(config)

    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown) and, once done,
    # restores the previous handlers and re-raises the signal. Handlers that
    # merely note it make that re-raise a no-op, so a clean shutdown exits 0.
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"herd: serving on http://{host}:{settings.port} (OpenAI: /v1, Ollama: /api)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        return 1
    return 0
