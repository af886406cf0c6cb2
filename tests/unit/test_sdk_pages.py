"""Both clients walk a paged list for the caller, over a mock transport.

``list()`` fetches every page (with the largest page size) and answers them as one,
``iter_all()`` fetches a page only when the loop gets to it, ``list(limit=, cursor=)``
is one page as the server answered it, and a server that does not page (an older
one) or that hands back the cursor it was sent is handled.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bastion import AsyncBastion, Bastion, ServerError
from bastion.cli.common import page_size
from bastion.wire import MAX_PAGE_SIZE

Handler = Callable[[httpx.Request], httpx.Response]


class PagedServer:
    """Answers GET .../jobs from ``items`` in pages of the requested ``limit``."""

    def __init__(self, count: int, *, cursor_for: Callable[[int], str] | None = None) -> None:
        self.items = [{"job_id": f"j{i}"} for i in range(count)]
        self.requests: list[httpx.Request] = []
        self.cursor_for = cursor_for or (lambda end: f"c{end}")

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        limit = int(request.url.params.get("limit", "100"))
        cursor = request.url.params.get("cursor")
        start = int(cursor[1:]) if cursor else 0
        end = start + limit
        more = end < len(self.items)
        return httpx.Response(
            200,
            json={
                "jobs": self.items[start:end],
                "next_cursor": self.cursor_for(end) if more else None,
            },
        )


def _sync(handler: Handler) -> Bastion:
    return Bastion("http://bastion.test", transport=httpx.MockTransport(handler), max_retries=0)


def _async(handler: Handler) -> AsyncBastion:
    async def answer(request: httpx.Request) -> httpx.Response:
        return handler(request)

    return AsyncBastion("http://bastion.test", transport=httpx.MockTransport(answer), max_retries=0)


def _collect_async(handler: Handler, call: Callable[[AsyncBastion], Any]) -> Any:
    async def main() -> Any:
        async with _async(handler) as client:
            return await call(client)

    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_list_collects_every_page(mode: str) -> None:
    server = PagedServer(2 * MAX_PAGE_SIZE + 1)
    if mode == "sync":
        with _sync(server) as client:
            result = client.jobs.list("s1")
    else:
        result = _collect_async(server, lambda c: c.jobs.list("s1"))
    assert result == {"jobs": server.items, "next_cursor": None}
    sent = [dict(r.url.params) for r in server.requests]
    assert sent == [
        {"limit": str(MAX_PAGE_SIZE)},
        {"limit": str(MAX_PAGE_SIZE), "cursor": f"c{MAX_PAGE_SIZE}"},
        {"limit": str(MAX_PAGE_SIZE), "cursor": f"c{2 * MAX_PAGE_SIZE}"},
    ]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_iter_all_fetches_a_page_when_the_loop_gets_to_it(mode: str) -> None:
    server = PagedServer(7)
    seen: list[tuple[str, int]] = []
    if mode == "sync":
        with _sync(server) as client:
            for job in client.jobs.iter_all("s1", page_size=3):
                seen.append((job["job_id"], len(server.requests)))
    else:

        async def walk(client: AsyncBastion) -> None:
            async for job in client.jobs.iter_all("s1", page_size=3):
                seen.append((job["job_id"], len(server.requests)))

        _collect_async(server, walk)
    assert seen == [(f"j{i}", i // 3 + 1) for i in range(7)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_page_is_the_servers_answer(mode: str) -> None:
    server = PagedServer(10)
    if mode == "sync":
        with _sync(server) as client:
            page = client.jobs.list("s1", limit=4, cursor="c2")
    else:
        page = _collect_async(server, lambda c: c.jobs.list("s1", limit=4, cursor="c2"))
    assert page == {"jobs": server.items[2:6], "next_cursor": "c6"}
    assert [dict(r.url.params) for r in server.requests] == [{"limit": "4", "cursor": "c2"}]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_without_pages_is_asked_once(mode: str) -> None:
    requests: list[httpx.Request] = []

    def old_server(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"sessions": [{"session_id": "s1"}]})

    if mode == "sync":
        with _sync(old_server) as client:
            result = client.sessions.list()
    else:
        result = _collect_async(old_server, lambda c: c.sessions.list())
    assert result == {"sessions": [{"session_id": "s1"}]} and len(requests) == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cursor_that_does_not_move_on_stops_the_walk(mode: str) -> None:
    # Always the first page again: without the check, the walk would never end.
    server = PagedServer(2 * MAX_PAGE_SIZE, cursor_for=lambda end: "c0")
    with pytest.raises(ServerError, match="next_cursor"):
        if mode == "sync":
            with _sync(server) as client:
                client.jobs.list("s1")
        else:
            _collect_async(server, lambda c: c.jobs.list("s1"))
    assert len(server.requests) == 2


def test_files_list_sends_its_path_with_every_page() -> None:
    requests: list[httpx.Request] = []

    def files(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        first = "cursor" not in request.url.params
        return httpx.Response(
            200,
            json={
                "path": "/d",
                "files": [{"name": "a" if first else "b"}],
                "next_cursor": "next" if first else None,
            },
        )

    with _sync(files) as client:
        listing = client.files.list("s1", "/d", user="root")
    assert listing == {"path": "/d", "files": [{"name": "a"}, {"name": "b"}], "next_cursor": None}
    assert [dict(r.url.params) for r in requests] == [
        {"path": "/d", "user": "root", "limit": str(MAX_PAGE_SIZE)},
        {"path": "/d", "user": "root", "limit": str(MAX_PAGE_SIZE), "cursor": "next"},
    ]


def test_the_cli_limit_is_a_page_size() -> None:
    assert page_size("1") == 1 and page_size(str(MAX_PAGE_SIZE)) == MAX_PAGE_SIZE
    for bad in ("0", "-3", str(MAX_PAGE_SIZE + 1), "ten", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            page_size(bad)
