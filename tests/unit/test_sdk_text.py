"""The SDK refuses, before sending, text that JSON over UTF-8 cannot carry."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bastion import AsyncBastion, Bastion, InvalidRequestError


def _refusing(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"nothing must be sent: {request.method} {request.url}")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.jobs.run("ses_x", ["echo", "\ud800"]),
        lambda c: c.jobs.run("ses_x", ["true"], env={"\udfff": "x"}),
        lambda c: c.sessions.create(metadata={"k": "\ud800"}),
    ],
    ids=["command", "env-key", "metadata"],
)
def test_a_lone_surrogate_is_an_invalid_request_not_a_unicode_error(call: object) -> None:
    with Bastion("http://bastion.test", transport=httpx.MockTransport(_refusing)) as client:
        with pytest.raises(InvalidRequestError, match="not valid Unicode") as info:
            call(client)  # type: ignore[operator]
    assert isinstance(info.value.__cause__, UnicodeEncodeError)


def test_the_async_client_refuses_it_too() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return _refusing(request)

    async def main() -> None:
        transport = httpx.MockTransport(handler)
        async with AsyncBastion("http://bastion.test", transport=transport) as client:
            with pytest.raises(InvalidRequestError, match="not valid Unicode"):
                await client.sessions.create(metadata={"k": "\ud800"})

    asyncio.run(main())


def test_valid_text_goes_out_as_utf8_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json={"error": {"code": "session_not_found", "message": "x"}})

    with Bastion("http://bastion.test", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(Exception, match="x"):
            client.jobs.run("ses_x", ["echo", "h\u00e9llo \U0001f600"])
    assert seen[0].headers["content-type"] == "application/json"
    assert json.loads(seen[0].content)["command"] == ["echo", "h\u00e9llo \U0001f600"]
    assert "\U0001f600".encode() in seen[0].content
