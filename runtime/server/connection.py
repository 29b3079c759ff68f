"""The HTTP connection: uvicorn's h11 protocol plus a header read timeout.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and then sends its
request line and headers slowly or never (a connection held for as long as the client likes). This protocol
gives every request ``header_timeout_s`` from its first byte (or from the connection's opening) to deliver its
complete headers, then answers ``408`` and closes. The body has its own deadline in the app
(:func:`~.body.read_json`). Only ``asyncio.Protocol``'s interface is overridden; the request state is read
from the h11 connection (``h11.Connection.their_state``).
"""
from __future__ import annotations

import asyncio
import json
import uuid

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError


def header_timeout_response(seconds: float) -> bytes:
    err = APIError(408, f"the request headers did not arrive within {seconds:g}s (--header-timeout)",
                   code="request_timeout")
    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nx-request-id: {uuid.uuid4().hex}\r\n\r\n")
    return head.encode() + body


class HeaderTimeoutH11Protocol(H11Protocol):
    """h11 with a deadline for each request's headers; subclass with ``header_timeout_s`` set
    (:func:`with_header_timeout`)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:      # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:      # (part of) a new request's headers: they must complete in time
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(header_timeout_response(self.header_timeout_s))
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for uvicorn's ``Config(http=...)``."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(seconds)})
