"""The reaper on the fake runtime: idle timeouts, lifetimes, orphans, dead sandboxes."""

from __future__ import annotations

import asyncio

from tests.service.conftest import OWNER, Run

from bastion.wire import SessionStatus
from bastion_server.runtime.base import SandboxLimits
from bastion_server.service.container import Services
from bastion_server.testing import FakeRuntime


async def _until(check: object, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def test_an_idle_session_is_stopped(run: Run) -> None:
    async def body(s: Services) -> tuple[str, str]:
        record = await s.sessions.create(OWNER, idle_timeout=0.1)
        await s.sessions.start(OWNER, record.id)
        await _until(lambda: s.sessions.get(OWNER, record.id).status == SessionStatus.STOPPED)
        current = s.sessions.get(OWNER, record.id)
        return current.status, current.status_reason or ""

    status, reason = run(body)
    assert status == SessionStatus.STOPPED
    assert "idle" in reason


def test_on_timeout_delete_deletes(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> str:
        record = await s.sessions.create(OWNER, max_lifetime=0.1, on_timeout="delete")
        # A delete is recorded first, then carried through: wait for both.
        await _until(
            lambda: (
                s.store.get_session(record.id).status == SessionStatus.DELETED  # type: ignore[union-attr]
                and record.id not in runtime.sandboxes
            )
        )
        return s.store.get_session(record.id).status_reason or ""  # type: ignore[union-attr]

    assert "lifetime" in run(body)


def test_activity_keeps_a_session_alive(run: Run) -> None:
    async def body(s: Services) -> str:
        record = await s.sessions.create(OWNER, idle_timeout=0.3)
        await s.sessions.start(OWNER, record.id)
        for _ in range(8):  # 0.8 s of activity, every 0.1 s
            s.sessions.require_running(OWNER, record.id)
            await asyncio.sleep(0.1)
        return s.sessions.get(OWNER, record.id).status

    assert run(body) == SessionStatus.RUNNING


def test_a_sandbox_no_record_owns_is_removed(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> tuple[set[str], str]:
        limits = SandboxLimits(64, 16, 1.0, 64)
        await runtime.create("ses_orphan", limits)
        await runtime.start("ses_orphan", limits)
        kept = await s.sessions.create(OWNER)
        await s.sessions.reap_orphans()
        return await runtime.list_sandboxes(), kept.id

    left, kept = run(body)
    assert left == {kept}


def test_a_dead_sandbox_is_recorded_stopped(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> str:
        record = await s.sessions.create(OWNER)
        await s.sessions.start(OWNER, record.id)
        runtime.crash(record.id)
        await s.sessions.check_running_sandboxes()
        return s.sessions.get(OWNER, record.id).status

    assert run(body) == SessionStatus.STOPPED
