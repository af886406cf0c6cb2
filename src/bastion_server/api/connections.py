"""Connection-level limits uvicorn does not have: a header-read deadline and a cap.

uvicorn closes an idle kept-alive connection after ``timeout_keep_alive``, but a
connection that has sent part of a request line or of its headers is never timed
out: 200 such half-open connections stayed open indefinitely, and enough of them take
every file descriptor.  :func:`guarded_protocol` subclasses uvicorn's httptools
protocol (the one ``uvicorn[standard]`` uses) with

* a **header deadline**: from the moment a connection opens, and again after each
  response when no other request is already waiting, the client has
  ``header_timeout`` seconds to finish the next request's line and headers; the
  deadline is not moved by bytes that keep trickling in (a slowloris), and a
  connection that misses it is closed without an answer.  Once the headers are in,
  the body has its own, progress-based timeout (:mod:`bastion_server.api.bodies`).
* a **connection cap**: past ``max_connections`` open connections (WebSockets
  included), a new one is answered ``429 too_many_requests`` and closed at once, so
  the server never runs out of descriptors for its sandboxes and its store.
* **one send per response**: uvicorn writes a response's head and its body apart, two
  sends for a small answer, each waking the client (on a small machine such a send
  costs more than routing the request); what a response writes in one step of the
  event loop goes out as one (:class:`JoinedWrites`).
"""

from __future__ import annotations

import asyncio
import json
from asyncio import TimerHandle
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bastion.wire import ErrorCode
from bastion_server.config import ServerConfig, connection_cap


def _too_many_connections() -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": ErrorCode.TOO_MANY_REQUESTS.value,
                "message": "the server has as many connections open as it may; retry shortly",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 429 Too Many Requests\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "retry-after: 1\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class JoinedWrites:
    """A transport as one response sees it: the writes made in one step of the event
    loop are sent together at the end of that step (in order, before a close)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(bytes(data))

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection cap."""

    header_timeout: float = 10.0
    max_connections: int = 0  # 0: no cap
    _refusal = _too_many_connections()

    _header_timer: TimerHandle | None = None
    #: Requests whose headers are in and whose response is not finished yet.
    _in_flight = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections and len(self.connections) > self.max_connections:
            transport.write(self._refusal)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_flight += 1
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not None and self.cycle is not before:
            self.cycle.transport = JoinedWrites(self.transport, self.loop)  # type: ignore[assignment]

    def on_response_complete(self) -> None:
        if self.cycle is not None and isinstance(self.cycle.transport, JoinedWrites):
            self.cycle.transport.flush()  # the whole response is written: send it now
        self._in_flight = max(self._in_flight - 1, 0)
        super().on_response_complete()
        if self._in_flight == 0 and not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._in_flight == 0 and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(config: ServerConfig) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to hand to uvicorn (``http=``), with ``config``'s limits."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "header_timeout": config.header_timeout,
            "max_connections": connection_cap(config.max_connections),
        },
    )
