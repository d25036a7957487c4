"""uvicorn's h11 protocol with a deadline on the request head.

uvicorn bounds the *size* of a request head (h11_max_incomplete_event_size) and the idle
time between requests (timeout_keep_alive), but not the time a head may take to arrive:
every received byte cancels the keep-alive timer, so a client sending a header byte a
second holds a connection, and its buffers, for ever ("slowloris"). Here each request
head, the first on a connection and each one after a response, must be complete within
``header_timeout`` seconds of the connection opening or of the previous response,
however the bytes trickle in. A late head closes the connection.

Imported only by ``herd serve`` (uvicorn is not needed to build the app).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def with_header_timeout(seconds: float) -> type[H11Protocol]:
    """An H11Protocol subclass whose request heads must arrive within ``seconds``."""

    class H11WithHeaderTimeout(H11Protocol):
        header_timeout = seconds
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Past IDLE, h11 has parsed a whole request line and headers: the head is in.
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request's head, on this kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return H11WithHeaderTimeout
