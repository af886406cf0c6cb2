"""A response leaves the server in one send: head and body together (api/connections.py).

uvicorn writes a response's head and body apart; each send wakes the client, so a
small answer took two.  Driven through the real protocol class uvicorn is given, with
a transport that records each write.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from bastion_server.api.connections import guarded_protocol
from bastion_server.config import ServerConfig


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def small(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def streamed(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for part in (b"one", b"two"):
        await send({"type": "http.response.body", "body": part, "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b""})


async def _serve(app: Any, request: bytes) -> RecordingTransport:
    config = uvicorn.Config(app, lifespan="off", log_level="error")
    config.load()
    protocol_class = guarded_protocol(ServerConfig())
    protocol = protocol_class(
        config=config, server_state=uvicorn.server.ServerState(), app_state={}
    )
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(100):
        await asyncio.sleep(0.005)
        if protocol.cycle is not None and protocol.cycle.response_complete:
            break
    protocol.connection_lost(None)
    return transport


def test_a_small_response_is_one_send() -> None:
    transport = asyncio.run(_serve(small, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"ok"


def test_a_streamed_response_goes_out_as_it_is_made_and_in_order() -> None:
    transport = asyncio.run(_serve(streamed, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
    sent = b"".join(transport.writes)
    assert sent.startswith(b"HTTP/1.1 200") and sent.endswith(b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")
    assert len(transport.writes) == 3  # the head with the first chunk, the second, the end


def test_a_response_that_closes_the_connection_is_sent_before_the_close() -> None:
    request = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    transport = asyncio.run(_serve(small, request))
    assert transport.closed
    assert b"".join(transport.writes).endswith(b"\r\n\r\nok")
