"""Pause and resume on the fake runtime: the ``paused`` state, what it refuses, and the
idle, paused and restart rules around it."""

from __future__ import annotations

import asyncio

import pytest
from tests.service.conftest import OWNER, Run

from bastion.wire import ErrorCode, SessionStatus
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import SandboxError
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.service.paging import PageRequest
from bastion_server.testing import FakeRuntime


async def _until(check: object, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def _running(s: Services, **create: object) -> str:
    record = await s.sessions.create(OWNER, **create)  # type: ignore[arg-type]
    await s.sessions.start(OWNER, record.id)
    return record.id


def test_pause_freezes_the_sandbox_and_resume_thaws_it(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> list[str]:
        sid = await _running(s)
        seen = [(await s.sessions.pause(OWNER, sid)).status]
        assert runtime.sandboxes[sid].paused
        assert s.sessions.get(OWNER, sid).status == SessionStatus.PAUSED
        seen.append((await s.sessions.resume(OWNER, sid)).status)
        assert not runtime.sandboxes[sid].paused
        assert [op for op, who in runtime.calls if who == sid][-2:] == ["pause", "resume"]
        return seen

    assert run(body) == ["paused", "running"]


@pytest.mark.parametrize(
    ("steps", "refused"),
    [
        ((), "pause"),  # created: nothing runs
        (("start", "stop"), "pause"),
        (("start", "pause"), "pause"),
        (("start",), "resume"),
        (("start", "pause"), "start"),
    ],
)
def test_pause_and_resume_outside_the_machine_are_409(
    run: Run, steps: tuple[str, ...], refused: str
) -> None:
    async def body(s: Services) -> None:
        record = await s.sessions.create(OWNER)
        for step in steps:
            await getattr(s.sessions, step)(OWNER, record.id)
        with pytest.raises(ServiceError) as caught:
            await getattr(s.sessions, refused)(OWNER, record.id)
        assert caught.value.code == ErrorCode.SESSION_STATE

    run(body)


def test_a_paused_session_refuses_jobs_files_and_terminals(run: Run) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        await s.sessions.pause(OWNER, sid)
        attempts = [
            s.jobs.run(OWNER, sid, ["echo", "hi"]),
            s.files.list(OWNER, sid, "/"),
            s.terminals.open(OWNER, sid, 24, 80),
        ]
        for attempt in attempts:
            with pytest.raises(ServiceError) as caught:
                await attempt
            assert caught.value.code == ErrorCode.SESSION_PAUSED
            assert "resume" in caught.value.message
        await s.sessions.resume(OWNER, sid)
        job = await s.jobs.run(OWNER, sid, ["echo", "hi"])
        assert job.session_id == sid

    run(body)


def test_a_paused_session_is_thawed_then_stopped_or_deleted(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        for action, final in (("stop", "stopped"), ("delete", "deleted")):
            sid = await _running(s)
            await s.sessions.pause(OWNER, sid)
            record = await getattr(s.sessions, action)(OWNER, sid)
            assert record.status == final
            ops = [op for op, who in runtime.calls if who == sid]
            assert ops.index("resume") < ops.index("stop" if action == "stop" else "delete")

    run(body)


def test_a_job_running_at_the_pause_is_kept(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> str:
        sid = await _running(s)
        job = await s.jobs.run(OWNER, sid, ["sleep", "0.2"])
        await s.sessions.pause(OWNER, sid)
        await s.sessions.resume(OWNER, sid)
        done = await s.jobs.wait(OWNER, sid, job.id, 5)
        return done.status

    assert run(body) == "completed"


def test_paused_time_is_neither_activity_nor_idleness(run: Run) -> None:
    async def body(s: Services) -> tuple[str, float]:
        sid = await _running(s, idle_timeout=0.5)
        await asyncio.sleep(0.3)  # 0.3 s idle before the pause
        await s.sessions.pause(OWNER, sid)
        await asyncio.sleep(0.8)  # past the idle timeout, but paused: not idle
        assert s.sessions.get(OWNER, sid).status == SessionStatus.PAUSED
        await s.sessions.resume(OWNER, sid)
        clock = asyncio.get_running_loop().time
        resumed = clock()
        await _until(lambda: s.sessions.get(OWNER, sid).status == SessionStatus.STOPPED)
        return s.sessions.get(OWNER, sid).status_reason or "", clock() - resumed

    reason, after_resume = run(body)
    assert "idle" in reason
    # The 0.3 s idle before the pause still count: stopped ~0.2 s after the resume,
    # not a whole idle timeout later (the pause was no activity).
    assert after_resume < 0.45


def test_paused_timeout_stops_a_paused_session(run: Run) -> None:
    async def body(s: Services) -> str:
        sid = await _running(s, paused_timeout=0.2)
        await asyncio.sleep(0.4)  # running: the paused timeout does not apply
        assert s.sessions.get(OWNER, sid).status == SessionStatus.RUNNING
        await s.sessions.pause(OWNER, sid)
        await _until(lambda: s.store.get_session(sid).status == SessionStatus.STOPPED)  # type: ignore[union-attr]
        return s.store.get_session(sid).status_reason or ""  # type: ignore[union-attr]

    assert "paused for 0.2s" in run(body)


def test_paused_timeout_must_be_a_positive_number(run: Run) -> None:
    async def body(s: Services) -> None:
        for bad in (-1, "soon", 0):
            with pytest.raises(ServiceError) as caught:
                await s.sessions.create(OWNER, paused_timeout=bad)
            assert caught.value.code == ErrorCode.INVALID_REQUEST
        record = await s.sessions.create(OWNER, paused_timeout=30)
        assert s.sessions.get(OWNER, record.id).paused_timeout == 30.0

    run(body)


def test_a_failed_pause_leaves_the_session_running(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> str:
        sid = await _running(s)
        runtime.fail("pause", SandboxError("freezer busy"))
        with pytest.raises(ServiceError) as caught:
            await s.sessions.pause(OWNER, sid)
        assert caught.value.code == ErrorCode.SESSION_STATE
        return s.sessions.get(OWNER, sid).status

    assert run(body) == SessionStatus.RUNNING


def test_a_paused_session_holds_its_running_place(
    tmp_path: object, config: ServerConfig, runtime: FakeRuntime
) -> None:
    from dataclasses import replace

    limited = replace(config, max_running_sessions_per_key=1)

    async def main() -> None:
        s = await Services.start(limited, runtime)
        try:
            sid = await _running(s)
            await s.sessions.pause(OWNER, sid)
            other = await s.sessions.create(OWNER)
            with pytest.raises(ServiceError) as caught:
                await s.sessions.start(OWNER, other.id)
            assert caught.value.code == ErrorCode.QUOTA_EXCEEDED
        finally:
            await s.close()

    asyncio.run(main())


def test_restart_keeps_a_paused_session_paused(config: ServerConfig, runtime: FakeRuntime) -> None:
    async def main() -> tuple[str, str]:
        s = await Services.start(config, runtime)
        try:
            paused = await _running(s)
            await s.sessions.pause(OWNER, paused)
            gone = await _running(s)
            await s.sessions.pause(OWNER, gone)
            runtime.sandboxes[paused].paused = False  # as if thawed behind our back
        finally:
            await s.close()
        runtime.crash(gone)
        s = await Services.start(config, runtime)  # a new server on the same data
        try:
            assert runtime.sandboxes[paused].paused  # frozen again, as recorded
            listed = {r.id: r.status for r in s.sessions.list(OWNER, PageRequest()).items}
            return listed[paused], listed[gone]
        finally:
            await s.close()

    assert asyncio.run(main()) == (SessionStatus.PAUSED, SessionStatus.STOPPED)
