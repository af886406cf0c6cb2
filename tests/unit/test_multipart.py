"""The streaming multipart/form-data reader of the original server's upload route."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import httpx
import pytest

from bastion_server.api.multipart import (
    MAX_HEADER_BYTES,
    MultipartError,
    MultipartReader,
    boundary_of,
)


def encoded(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    request = httpx.Request(
        "POST", "http://x", data=fields, files={k: (k, v) for k, v in files.items()}
    )
    return request.read(), request.headers["content-type"]


async def pieces(body: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), step):
        yield body[i : i + step]


async def read_all(body: bytes, content_type: str, step: int) -> dict[str, bytes]:
    reader = MultipartReader(pieces(body, step), boundary_of(content_type))
    return {part.name: b"".join([c async for c in part.chunks()]) async for part in reader.parts()}


def test_parts_come_out_whole_however_the_body_is_cut() -> None:
    rng = random.Random(7)
    for _ in range(300):
        # Data that looks like a delimiter's start, near its end and at its edges.
        data = rng.randbytes(rng.randint(0, 3000)) + b"\r\n--" + b"-" * rng.randint(0, 4)
        body, content_type = encoded({"metadata": '{"path": "a"}'}, {"file": data})
        got = asyncio.run(read_all(body, content_type, rng.randint(1, 400)))
        assert got == {"metadata": b'{"path": "a"}', "file": data}


def test_a_part_left_unread_is_skipped() -> None:
    body, content_type = encoded({"first": "x" * 5000, "second": "y"}, {"pad": b""})

    async def second() -> bytes:
        reader = MultipartReader(pieces(body, 64), boundary_of(content_type))
        async for part in reader.parts():
            if part.name == "second":
                return await part.read(10)
        raise AssertionError("no second part")

    assert asyncio.run(second()) == b"y"


@pytest.mark.parametrize(
    "content_type", ["application/json", "multipart/form-data", "multipart/form-data; x=1", None]
)
def test_a_content_type_without_a_boundary_is_refused(content_type: str | None) -> None:
    with pytest.raises(MultipartError):
        boundary_of(content_type)


def test_a_body_cut_short_is_an_error() -> None:
    body, content_type = encoded({}, {"file": b"0123456789" * 100})
    with pytest.raises(MultipartError, match="ends in the middle"):
        asyncio.run(read_all(body[:-20], content_type, 50))


def test_endless_headers_are_refused_without_reading_on() -> None:
    boundary = "b"
    body = b'--b\r\nContent-Disposition: form-data; name="f"\r\nX: ' + b"a" * (2 * MAX_HEADER_BYTES)
    with pytest.raises(MultipartError, match="headers are longer"):
        asyncio.run(read_all(body, f"multipart/form-data; boundary={boundary}", 1024))


def test_a_field_over_its_limit_is_refused() -> None:
    body, content_type = encoded({"metadata": "m" * 100}, {"pad": b""})

    async def read_metadata() -> bytes:
        reader = MultipartReader(pieces(body, 16), boundary_of(content_type))
        async for part in reader.parts():
            return await part.read(50)
        raise AssertionError("no part")

    with pytest.raises(MultipartError, match="longer than 50"):
        asyncio.run(read_metadata())
