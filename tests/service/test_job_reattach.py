"""Jobs outlive a restart of the server: the next one takes them up again.

Both servers run in one event loop over one FakeRuntime (the sandboxes, and the jobs
they keep, outlive the first server as they do with real sandboxes); the first one is
closed as on SIGTERM (a kill -9 is tests/integration/test_job_restart.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from tests.service.conftest import OWNER

from bastion.wire import JobStatus
from bastion_server.config import ServerConfig
from bastion_server.runtime.fake import FakeProcess
from bastion_server.service.container import Services
from bastion_server.testing import FakeRuntime

Body = Callable[[ServerConfig, FakeRuntime], Awaitable[Any]]


def run_twice(config: ServerConfig, runtime: FakeRuntime, body: Body) -> Any:
    return asyncio.run(body(config, runtime))


def gated(runtime: FakeRuntime) -> asyncio.Event:
    """A program "gated" that prints, waits for the gate, prints again and exits 0."""
    gate = asyncio.Event()

    async def program(p: FakeProcess) -> int:
        p.write("before\n")
        p.write("err\n", "stderr")
        await gate.wait()
        p.write("after\n")
        return 0

    runtime.program("gated", program)
    return gate


async def started(s: Services, **kw: Any) -> tuple[str, str]:
    session = await s.sessions.create(OWNER)
    await s.sessions.start(OWNER, session.id)
    job = await s.jobs.run(OWNER, session.id, ["gated"], **kw)
    for _ in range(100):
        if s.jobs.get(OWNER, session.id, job.id).status == JobStatus.RUNNING:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # its first output is in the log
    return session.id, job.id


@contextlib.asynccontextmanager
async def across_a_restart(
    config: ServerConfig,
    runtime: FakeRuntime,
    while_down: Callable[[str], Awaitable[None]] | None = None,
    **run: Any,
) -> AsyncIterator[tuple[Services, str, str]]:
    """A job run by a first server, which is closed (as on SIGTERM); ``while_down(sid)``;
    then the second server, with the session and job ids."""
    first = await Services.start(config, runtime)
    sid, jid = await started(first, **run)
    await first.close()
    if while_down is not None:
        await while_down(sid)
    second = await Services.start(config, runtime)
    try:
        yield second, sid, jid
    finally:
        await second.close()


def opening(gate: asyncio.Event, wait: float = 0.05) -> Callable[[str], Awaitable[None]]:
    """While the server is down: the gate opens, and the job goes on with nobody there."""

    async def open_gate(sid: str) -> None:
        gate.set()
        await asyncio.sleep(wait)

    return open_gate


def test_a_job_that_ends_while_the_server_is_down_keeps_its_result_and_output(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    async def body(config: ServerConfig, runtime: FakeRuntime) -> Any:
        gate = gated(runtime)
        async with across_a_restart(config, runtime, opening(gate)) as (second, sid, jid):
            done = await second.jobs.wait(OWNER, sid, jid, timeout=10)
            events = [e async for e in second.jobs.follow(OWNER, sid, jid)]
            kept = jid in runtime.sandboxes[sid].jobs
            return done.status, done.exit_code, second.jobs.output(done), events, kept

    status, code, output, events, kept = run_twice(config, runtime, body)
    assert (status, code) == (JobStatus.COMPLETED, 0)
    assert output == ("before\nafter\n", "err\n")
    text = "".join(e["data"] for e in events if e["type"] == "stdout")
    assert text == "before\nafter\n"
    assert not kept  # recorded: the sandbox was told to forget it


def test_a_running_job_is_taken_up_again_and_goes_on_live(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    async def body(config: ServerConfig, runtime: FakeRuntime) -> Any:
        gate = gated(runtime)
        async with across_a_restart(config, runtime) as (second, sid, jid):
            assert second.jobs.get(OWNER, sid, jid).status == JobStatus.RUNNING
            assert second.jobs.has_running_jobs(sid)
            waiting = asyncio.create_task(second.jobs.wait(OWNER, sid, jid, timeout=10))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            gate.set()
            done = await waiting
            return done.status, second.jobs.output(done), done.started_at

    status, output, started_at = run_twice(config, runtime, body)
    assert status == JobStatus.COMPLETED
    assert output == ("before\nafter\n", "err\n")  # nothing twice, nothing lost
    assert started_at is not None


def test_a_job_whose_sandbox_died_while_the_server_was_down_is_sandbox_lost(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    async def crash(sid: str) -> None:
        runtime.crash(sid)

    async def body(config: ServerConfig, runtime: FakeRuntime) -> Any:
        gated(runtime)
        async with across_a_restart(config, runtime, crash) as (second, sid, jid):
            done = second.jobs.get(OWNER, sid, jid)
            return done.status, done.failure_reason, second.jobs.output(done)

    status, reason, (stdout, stderr) = run_twice(config, runtime, body)
    assert (status, reason) == (JobStatus.FAILED, "sandbox_lost")
    assert stdout == "before\n"  # what was recorded stays
    assert "sandbox stopped while the server was down" in stderr


def test_a_job_its_sandbox_no_longer_knows_is_sandbox_lost(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    async def restart_the_sandbox(sid: str) -> None:
        runtime.sandboxes[sid].jobs.clear()  # its new agent knows nothing of the job

    async def body(config: ServerConfig, runtime: FakeRuntime) -> Any:
        gated(runtime)
        async with across_a_restart(config, runtime, restart_the_sandbox) as (second, sid, jid):
            done = await second.jobs.wait(OWNER, sid, jid, timeout=10)
            return done.status, done.failure_reason

    assert run_twice(config, runtime, body) == (JobStatus.FAILED, "sandbox_lost")


def test_output_past_the_cap_while_the_server_was_down_is_counted(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    config = dataclasses.replace(config, max_output_bytes=10)

    async def body(config: ServerConfig, runtime: FakeRuntime) -> Any:
        gate = asyncio.Event()

        async def program(p: FakeProcess) -> int:
            p.write("12345")
            await gate.wait()
            p.write("67890abcdefghij")
            return 0

        runtime.program("gated", program)
        async with across_a_restart(config, runtime, opening(gate)) as (second, sid, jid):
            done = await second.jobs.wait(OWNER, sid, jid, timeout=10)
            return second.jobs.output(done)

    stdout, stderr = run_twice(config, runtime, body)
    assert stdout == "1234567890"
    assert "10 bytes of stdout dropped" in stderr


def test_the_exit_policy_still_ends_jobs_with_their_sessions(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    config = dataclasses.replace(config, on_shutdown="stop")

    async def body(config: ServerConfig, runtime: FakeRuntime) -> Any:
        gated(runtime)
        async with across_a_restart(config, runtime) as (second, sid, jid):
            done = second.jobs.get(OWNER, sid, jid)
            return done.status, done.failure_reason

    assert run_twice(config, runtime, body) == (JobStatus.FAILED, "session_stopped")


def test_a_job_that_timed_out_while_the_server_was_down_keeps_all_it_wrote(
    config: ServerConfig, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion_server.service import jobs

    monkeypatch.setattr(jobs, "TIMEOUT_BACKSTOP", 0.2)  # the server's own deadline passed too

    async def body(config: ServerConfig, runtime: FakeRuntime) -> Any:
        gate = asyncio.Event()

        async def program(p: FakeProcess) -> int:
            p.write("before\n")
            await gate.wait()
            p.write("while down\n")
            await asyncio.sleep(30)  # past its timeout
            return 0

        runtime.program("gated", program)
        down = opening(gate, wait=1.0)
        async with across_a_restart(config, runtime, down, timeout=0.5) as (second, sid, jid):
            done = await second.jobs.wait(OWNER, sid, jid, timeout=10)
            return done.failure_reason, second.jobs.output(done)[0]

    assert run_twice(config, runtime, body) == ("timeout", "before\nwhile down\n")
