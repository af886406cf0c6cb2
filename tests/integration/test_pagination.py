"""Lists in pages on a real server: 1200 jobs, 1500 files, sessions, the SDK and CLI.

The SDK's ``list()`` collects every page (sync and async), ``iter_all()`` walks them,
``limit``/``cursor`` give one page, and ``bastion ... list --limit`` prints one page and
where the rest starts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess

from bastion import AsyncBastion, Bastion
from bastion.wire import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOBS = 1200
BIN = Path(sys.executable).parent


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_URL"] = url
    return subprocess.run(
        [str(BIN / "bastion"), *args], env=env, capture_output=True, text=True, timeout=120
    )


async def _run_jobs(url: str, sid: str, count: int) -> None:
    async with AsyncBastion(base_url=url) as client:
        gate = asyncio.Semaphore(16)

        async def one() -> None:
            async with gate:
                await client.jobs.run(sid, ["true"])

        await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.timeout(600)
def test_1200_jobs_list_in_pages(server: ServerProcess, client: Bastion, sid: str) -> None:
    asyncio.run(_run_jobs(server.url, sid, JOBS))

    every = client.jobs.list(sid)
    jobs = every["jobs"]
    assert len(jobs) == JOBS and every["next_cursor"] is None
    assert len({j["job_id"] for j in jobs}) == JOBS
    keys = [(j["created_at"], j["job_id"]) for j in jobs]
    assert keys == sorted(keys)  # oldest first, ids breaking ties
    ids = [j["job_id"] for j in jobs]

    # One answer of the default size, then pages of 500 that add up to the whole.
    started = time.perf_counter()
    first = httpx.get(f"{server.url}/v1/sessions/{sid}/jobs", timeout=30)
    first_ms = (time.perf_counter() - started) * 1000
    assert len(first.json()["jobs"]) == DEFAULT_PAGE_SIZE and first.json()["next_cursor"]
    assert len(first.content) < 100_000, (len(first.content), first_ms)
    pages, cursor = [], None
    while True:
        page = client.jobs.list(sid, limit=500, cursor=cursor)
        pages.append([j["job_id"] for j in page["jobs"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [500, 500, 200]
    assert [i for p in pages for i in p] == ids
    assert [j["job_id"] for j in client.jobs.iter_all(sid, page_size=333)] == ids

    async def with_async() -> tuple[list[str], list[str]]:
        async with AsyncBastion(base_url=server.url) as aclient:
            collected = [j["job_id"] for j in (await aclient.jobs.list(sid))["jobs"]]
            walked = [
                j["job_id"] async for j in aclient.jobs.iter_all(sid, page_size=MAX_PAGE_SIZE)
            ]
            return collected, walked

    assert asyncio.run(with_async()) == (ids, ids)

    # The CLI: one page of 5, the cursor of the rest on stderr, and on from there.
    head = _cli(server.url, "jobs", "list", sid, "--limit", "5", "-q")
    assert head.returncode == 0, head.stderr
    assert head.stdout.split() == ids[:5]
    assert head.stderr.startswith("more: --cursor ")
    rest = _cli(
        server.url, "jobs", "list", sid, "--limit", "5", "-q", "--cursor", head.stderr.split()[-1]
    )
    assert rest.stdout.split() == ids[5:10]
    whole = _cli(server.url, "jobs", "list", sid, "-q")
    assert whole.stdout.split() == ids and not whole.stderr


def test_a_directory_of_1500_files_lists_whole_and_in_pages(client: Bastion, sid: str) -> None:
    made = client.jobs.run_and_wait(
        sid, "mkdir /tmp/many && cd /tmp/many && for i in $(seq 1500); do : > f$i; done"
    )
    assert made["output"] is not None and made["output"]["status_code"] == 0
    names = sorted(f"f{i}".encode() for i in range(1, 1501))

    listing = client.files.list(sid, "/tmp/many")
    assert [f["name"].encode() for f in listing["files"]] == names
    assert listing["next_cursor"] is None and listing["path"] == "/tmp/many"
    page = client.files.list(sid, "/tmp/many", limit=MAX_PAGE_SIZE)
    assert len(page["files"]) == MAX_PAGE_SIZE and page["next_cursor"]
    rest = client.files.list(sid, "/tmp/many", cursor=page["next_cursor"])
    assert len(rest["files"]) == DEFAULT_PAGE_SIZE
    assert rest["files"][0]["name"].encode() == names[MAX_PAGE_SIZE]
    cli = _cli(client.base_url, "files", "list", f"{sid}:/tmp/many", "--limit", "3")
    assert cli.returncode == 0 and cli.stderr.startswith("more: --cursor ")


def test_sessions_list_in_pages(server: ServerProcess, client: Bastion) -> None:
    mine = [client.sessions.create(metadata={"test": "pages"})["session_id"] for _ in range(3)]
    try:
        walked, cursor = [], None
        while True:
            page = client.sessions.list(limit=1, cursor=cursor)
            assert len(page["sessions"]) <= 1
            walked += [s["session_id"] for s in page["sessions"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [s for s in walked if s in mine] == mine
        assert walked == [s["session_id"] for s in client.sessions.list()["sessions"]]
        assert walked == [s["session_id"] for s in client.sessions.iter_all(page_size=2)]
    finally:
        for session_id in mine:
            client.sessions.delete(session_id)
