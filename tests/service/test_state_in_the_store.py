"""What a second process on the same store (or the next server) relies on finding in
the store, not in one process's memory: where a session is, status changes made as
compare-and-sets, a job's ``running``, and the idle clock."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from tests.service.conftest import OWNER, Run

from bastion.wire import ErrorCode, JobStatus, SessionStatus
from bastion_server.config import ServerConfig
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.service.sessions import now_iso
from bastion_server.store.sqlite import Store
from bastion_server.testing import FakeRuntime


async def _running(s: Services, **create: object) -> str:
    record = await s.sessions.create(OWNER, **create)  # type: ignore[arg-type]
    await s.sessions.start(OWNER, record.id)
    return record.id


def test_node_and_sandbox_are_recorded(config: ServerConfig, runtime: FakeRuntime) -> None:
    class Named(FakeRuntime):
        def sandbox_ref(self, session_id: str) -> str:
            return f"box-{session_id}"

    async def main() -> None:
        named = Named(runtime.root)
        for cfg, sandbox_runtime, node in (
            (replace(config, node_name="node-a"), named, "node-a"),
            (config, runtime, socket.gethostname()),  # by default: the host's name
        ):
            s = await Services.start(cfg, sandbox_runtime)
            try:
                record = await s.sessions.create(OWNER)
                stored = s.store.get_session(record.id)
                assert stored is not None and stored.node == node == record.node
                assert stored.sandbox == sandbox_runtime.sandbox_ref(record.id)
            finally:
                await s.close()
        assert stored.sandbox == stored.id  # the base runtime's: the session id

    asyncio.run(main())


def test_a_stale_transition_is_refused(config: ServerConfig, runtime: FakeRuntime) -> None:
    """Another process deletes the session while this one pauses it: the pause,
    decided from ``running``, must not write ``paused`` over the delete."""
    other = Store(config.data_dir / "bastion.db")  # another process's connection

    class Racing(FakeRuntime):
        async def pause(self, session_id: str) -> None:
            await super().pause(session_id)
            assert other.update_session_status(
                session_id, "deleted", now_iso(), "by another", expected="running"
            )

    async def main() -> None:
        s = await Services.start(config, Racing(runtime.root))
        try:
            sid = await _running(s)
            with pytest.raises(ServiceError) as caught:
                await s.sessions.pause(OWNER, sid)
            assert caught.value.code == ErrorCode.SESSION_STATE
            assert "changed meanwhile" in caught.value.message
            stored = s.store.get_session(sid)
            assert stored is not None
            assert (stored.status, stored.status_reason) == ("deleted", "by another")
            # The store's compare-and-set itself: a stale expectation writes nothing.
            assert not s.store.update_session_status(sid, "stopped", now_iso(), expected="running")
            assert s.store.get_session(sid).status == "deleted"  # type: ignore[union-attr]
        finally:
            await s.close()
            other.close()

    asyncio.run(main())


def test_running_is_written_to_the_store_at_the_start(run: Run, runtime: FakeRuntime) -> None:
    gate = asyncio.Event()

    async def held(process: object) -> int:
        await gate.wait()
        return 0

    runtime.program("held", held)  # type: ignore[arg-type]

    async def body(s: Services) -> tuple[str | None, str | None, str]:
        sid = await _running(s)
        job = await s.jobs.run(OWNER, sid, ["held"])
        async with asyncio.timeout(5):
            while s.jobs.get(OWNER, sid, job.id).status != JobStatus.RUNNING:
                await asyncio.sleep(0.01)
        stored = s.store.get_job(job.id)  # what another process reads
        assert stored is not None
        gate.set()
        done = await s.jobs.wait(OWNER, sid, job.id, 5)
        return stored.status, stored.started_at, done.status

    status, started_at, final = run(body)
    assert status == JobStatus.RUNNING and started_at is not None
    assert final == JobStatus.COMPLETED


def test_the_idle_clock_survives_a_restart(config: ServerConfig, runtime: FakeRuntime) -> None:
    # No reaper rounds of their own: each server is asked to expire sessions once.
    quiet = replace(config, reaper_interval=3600)

    async def main() -> str:
        s = await Services.start(quiet, runtime)
        try:
            sid = await _running(s, idle_timeout=0.5)
            await asyncio.sleep(0.6)  # idle past its timeout, but no round ran
        finally:
            await s.close()
        s = await Services.start(quiet, runtime)  # a new server over the same store
        try:
            await s.sessions.expire_sessions()
            record = s.sessions.get(OWNER, sid)
            assert record.status == SessionStatus.STOPPED, "the restart reset the idle clock"
            return record.status_reason or ""
        finally:
            await s.close()

    assert "idle for 0.5s" in asyncio.run(main())


def test_paused_time_does_not_count_across_a_restart(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    quiet = replace(config, reaper_interval=3600)

    async def main() -> tuple[str, str]:
        s = await Services.start(quiet, runtime)
        try:
            sid = await _running(s, idle_timeout=1.0)
            await asyncio.sleep(0.4)  # idle 0.4 s before the pause
            await s.sessions.pause(OWNER, sid)
        finally:
            await s.close()
        s = await Services.start(quiet, runtime)
        try:
            await asyncio.sleep(0.8)  # paused: neither activity nor idleness
            await s.sessions.resume(OWNER, sid)
            await s.sessions.expire_sessions()
            after_resume = s.sessions.get(OWNER, sid).status  # idle 0.4 s of 1.0
            await asyncio.sleep(0.7)
            await s.sessions.expire_sessions()
            return after_resume, s.sessions.get(OWNER, sid).status  # idle 1.1 s
        finally:
            await s.close()

    assert asyncio.run(main()) == (SessionStatus.RUNNING, SessionStatus.STOPPED)


def test_activity_reaches_the_store_at_most_every_few_seconds(run: Run) -> None:
    async def body(s: Services) -> tuple[float | None, float | None, float | None]:
        sid = await _running(s)
        at_start = s.store.get_session(sid).last_active_at  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        s.sessions.require_running(OWNER, sid)  # a request: activity, not yet written
        soon = s.store.get_session(sid).last_active_at  # type: ignore[union-attr]
        await s.sessions.stop(OWNER, sid)  # a transition writes what is known
        stopped = s.store.get_session(sid).last_active_at  # type: ignore[union-attr]
        return at_start, soon, stopped

    at_start, soon, stopped = run(body)
    assert at_start is not None and soon == at_start
    assert stopped is not None and stopped >= at_start + 0.05


def test_a_second_server_on_the_store_leaves_the_first_ones_sessions_alone(
    config: ServerConfig, runtime: FakeRuntime, tmp_path: Path
) -> None:
    """Two servers, two runtimes (neither sees the other's sandboxes), one store: the
    second's start, reaper and exit policy do not touch the first's sessions."""
    first = replace(config, node_name="node-a", reaper_interval=3600)
    second = replace(config, node_name="node-b", reaper_interval=3600, on_shutdown="delete")

    async def main() -> tuple[str, str]:
        a = await Services.start(first, runtime)
        try:
            idle = await _running(a, idle_timeout=0.05)
            made = await a.sessions.create(OWNER)
            await asyncio.sleep(0.1)  # idle past its timeout
            b = await Services.start(second, FakeRuntime(tmp_path / "b-sandboxes"))
            try:
                await b.sessions.expire_sessions()
                await b.sessions.check_running_sandboxes()
            finally:
                await b.close()  # deletes every session it owns: none
            assert [runtime.sandboxes[idle].running, made.id in runtime.sandboxes] == [True, True]
            return a.sessions.get(OWNER, idle).status, a.sessions.get(OWNER, made.id).status
        finally:
            await a.close()

    assert asyncio.run(main()) == (SessionStatus.RUNNING, SessionStatus.CREATED)


def test_a_restart_gives_the_runtime_each_sessions_recorded_node(
    config: ServerConfig, runtime: FakeRuntime
) -> None:
    class Placing(FakeRuntime):
        adopted: dict[str, str] | None = None

        async def adopt_placements(self, nodes: Mapping[str, str]) -> None:
            self.adopted = dict(nodes)

    async def main() -> None:
        named = replace(config, node_name="node-a")
        s = await Services.start(named, runtime)
        try:
            kept = await _running(s)
            gone = await s.sessions.create(OWNER)
            await s.sessions.delete(OWNER, gone.id)
        finally:
            await s.close()
        placing = Placing(runtime.root)
        s = await Services.start(named, placing)  # a new server over the same store
        await s.close()
        assert placing.adopted == {kept: "node-a"}  # the deleted one is nowhere

    asyncio.run(main())
