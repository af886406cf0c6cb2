"""Snapshots on the fake runtime: taking, starting from, forking, restoring, deleting,
ownership, quotas and a restart mid-copy."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from tests.service.conftest import OTHER, OWNER, Run

from bastion.wire import ErrorCode, SessionStatus, SnapshotStatus
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import SandboxError
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.service.paging import PageRequest
from bastion_server.store.sqlite import SNAPSHOT_DELETED
from bastion_server.testing import FakeRuntime


async def _running(s: Services, **create: object) -> str:
    record = await s.sessions.create(OWNER, **create)  # type: ignore[arg-type]
    await s.sessions.start(OWNER, record.id)
    return record.id


def _root(runtime: FakeRuntime, session_id: str) -> Path:
    return runtime.sandboxes[session_id].root


def test_a_session_from_a_snapshot_has_its_files(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        (_root(runtime, sid) / "tmp" / "state").write_text("one")
        snap = await s.snapshots.snapshot(OWNER, sid, "first")
        assert snap.status == SnapshotStatus.READY and snap.size_bytes == 3
        assert snap.name == "first" and snap.session_id == sid and snap.parent is None
        (_root(runtime, sid) / "tmp" / "state").write_text("two")  # after: not in it
        copy = await s.snapshots.create_session(OWNER, snap.id)
        assert copy.snapshot == snap.id and copy.status == SessionStatus.CREATED
        assert (_root(runtime, copy.id) / "tmp" / "state").read_text() == "one"
        # A snapshot of the copy stands on the first one.
        assert (await s.snapshots.snapshot(OWNER, copy.id)).parent == snap.id

    run(body)


def test_snapshot_of_a_stopped_or_paused_session(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        await s.sessions.pause(OWNER, sid)
        assert (await s.snapshots.snapshot(OWNER, sid)).status == SnapshotStatus.READY
        assert s.sessions.get(OWNER, sid).status == SessionStatus.PAUSED  # still
        await s.sessions.stop(OWNER, sid)
        assert (await s.snapshots.snapshot(OWNER, sid)).status == SnapshotStatus.READY

    run(body)


def test_snapshot_without_wait_returns_creating_at_once(run: Run) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid, wait=False)
        assert snap.status == SnapshotStatus.CREATING
        with pytest.raises(ServiceError) as caught:
            await s.snapshots.create_session(OWNER, snap.id)  # not ready yet
        assert caught.value.code == ErrorCode.SNAPSHOT_STATE
        async with asyncio.timeout(5):
            while s.snapshots.get(OWNER, snap.id).status == SnapshotStatus.CREATING:
                await asyncio.sleep(0.01)
        assert s.snapshots.get(OWNER, snap.id).status == SnapshotStatus.READY

    run(body)


def test_a_failed_copy_is_reported_failed(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        runtime.fail("capture", SandboxError("No space left on device"))
        snap = await s.snapshots.snapshot(OWNER, sid)
        assert snap.status == SnapshotStatus.FAILED
        assert "No space left" in (snap.status_reason or "")
        with pytest.raises(ServiceError) as caught:
            await s.snapshots.restore(OWNER, sid, snap.id)
        assert caught.value.code == ErrorCode.SNAPSHOT_STATE
        assert s.sessions.get(OWNER, sid).status == SessionStatus.RUNNING  # untouched

    run(body)


def test_snapshots_belong_to_their_key(run: Run) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid)
        for attempt in (
            lambda: s.snapshots.create_session(OTHER, snap.id),
            lambda: s.snapshots.delete(OTHER, snap.id),
        ):
            with pytest.raises(ServiceError) as caught:
                await attempt()
            assert caught.value.code == ErrorCode.SNAPSHOT_NOT_FOUND
        with pytest.raises(ServiceError) as caught:
            s.snapshots.get(OTHER, snap.id)
        assert caught.value.code == ErrorCode.SNAPSHOT_NOT_FOUND
        with pytest.raises(ServiceError) as caught:
            await s.snapshots.snapshot(OTHER, sid)  # nor another key's session
        assert caught.value.code == ErrorCode.SESSION_NOT_FOUND
        assert s.snapshots.list(OTHER, PageRequest()).items == []
        assert [r.id for r in s.snapshots.list(OWNER, PageRequest()).items] == [snap.id]

    run(body)


def test_restore_resets_files_and_stops_jobs_first(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        (_root(runtime, sid) / "tmp" / "state").write_text("start")
        snap = await s.snapshots.snapshot(OWNER, sid)
        (_root(runtime, sid) / "tmp" / "state").write_text("changed")
        (_root(runtime, sid) / "tmp" / "extra").write_text("new")
        job = await s.jobs.run(OWNER, sid, ["sleep", "60"])
        record = await s.snapshots.restore(OWNER, sid, snap.id)
        assert record.status == SessionStatus.RUNNING and record.snapshot == snap.id
        assert (_root(runtime, sid) / "tmp" / "state").read_text() == "start"
        assert not (_root(runtime, sid) / "tmp" / "extra").exists()
        ended = s.jobs.get(OWNER, sid, job.id)
        assert ended.status == "failed" and ended.failure_reason == "session_stopped"
        # A stopped session stays stopped.
        await s.sessions.stop(OWNER, sid)
        assert (await s.snapshots.restore(OWNER, sid, snap.id)).status == SessionStatus.STOPPED

    run(body)


def test_a_running_session_is_restored_in_one_runtime_operation(
    run: Run, runtime: FakeRuntime
) -> None:
    """Runtime.restore, not a stop then a start: a backend keeps what it can (the OCI
    runtime its disk and mounts, the warm pool a standby); the session stays running."""

    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid)
        await s.sessions.pause(OWNER, sid)  # a paused one is thawed, then restored
        runtime.calls.clear()
        record = await s.snapshots.restore(OWNER, sid, snap.id)
        assert record.status == SessionStatus.RUNNING
        assert ("restore", sid) in runtime.calls
        assert runtime.calls.index(("resume", sid)) < runtime.calls.index(("restore", sid))
        assert s.sessions.get(OWNER, sid).status == SessionStatus.RUNNING

    run(body)


def test_a_restore_that_fails_leaves_the_session_stopped(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid)
        runtime.fail("restore", SandboxError("the disk went away"))
        with pytest.raises(ServiceError) as caught:
            await s.snapshots.restore(OWNER, sid, snap.id)
        assert caught.value.code == ErrorCode.SESSION_START_FAILED
        assert "the disk went away" in caught.value.message
        stopped = s.sessions.get(OWNER, sid)
        assert stopped.status == SessionStatus.STOPPED
        assert stopped.status_reason == "restore failed"
        assert not runtime.sandboxes[sid].running
        await s.sessions.start(OWNER, sid)  # and it can be started again
        assert s.sessions.get(OWNER, sid).status == SessionStatus.RUNNING

    run(body)


def test_fork_starts_copies_that_diverge(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s, metadata={"task": "7"}, env={"SECRET": "s"})
        (_root(runtime, sid) / "tmp" / "state").write_text("base")
        snap, copies = await s.snapshots.fork(OWNER, sid, 3)
        assert len({c.id for c in copies}) == 3
        for n, copy in enumerate(copies):
            assert copy.status == SessionStatus.RUNNING and copy.snapshot == snap.id
            assert copy.metadata == {"task": "7"}
            assert s.store.session_env(copy.id) == {"SECRET": "s"}
            (_root(runtime, copy.id) / "tmp" / "state").write_text(f"copy {n}")
        for n, copy in enumerate(copies):
            assert (_root(runtime, copy.id) / "tmp" / "state").read_text() == f"copy {n}"
        assert (_root(runtime, sid) / "tmp" / "state").read_text() == "base"

    run(body)


def test_fork_count_is_checked_and_a_failed_copy_leaves_none(
    run: Run, runtime: FakeRuntime
) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        for bad in (0, 65, "3", True):
            with pytest.raises(ServiceError) as caught:
                await s.snapshots.fork(OWNER, sid, bad)
            assert caught.value.code == ErrorCode.INVALID_REQUEST
        runtime.fail("start", SandboxError("no room"))
        with pytest.raises(ServiceError):
            await s.snapshots.fork(OWNER, sid, 3)
        live = [r.id for r in s.sessions.list(OWNER, PageRequest()).items]
        assert live == [sid]  # the two copies that started were deleted again

    run(body)


def test_deleted_snapshots_keep_their_layer_while_used(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid)
        copy = await s.snapshots.create_session(OWNER, snap.id)
        await s.snapshots.delete(OWNER, snap.id)
        with pytest.raises(ServiceError) as caught:
            s.snapshots.get(OWNER, snap.id)
        assert caught.value.code == ErrorCode.SNAPSHOT_NOT_FOUND
        assert snap.id in await runtime.snapshot_ids()  # the copy stands on it
        await s.sessions.delete(OWNER, copy.id)
        assert snap.id not in await runtime.snapshot_ids()
        assert s.store.get_snapshot(snap.id) is None

    run(body)


def test_a_snapshot_outlives_its_session(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        (_root(runtime, sid) / "tmp" / "kept").write_text("yes")
        snap = await s.snapshots.snapshot(OWNER, sid)
        await s.sessions.delete(OWNER, sid)
        assert s.snapshots.get(OWNER, snap.id).status == SnapshotStatus.READY
        copy = await s.snapshots.create_session(OWNER, snap.id)
        assert (_root(runtime, copy.id) / "tmp" / "kept").read_text() == "yes"

    run(body)


def test_snapshot_disk_is_limited_per_key(config: ServerConfig, runtime: FakeRuntime) -> None:
    limited = replace(config, max_snapshot_mb_per_key=1)

    async def main() -> None:
        s = await Services.start(limited, runtime)
        try:
            sid = await _running(s)
            (_root(runtime, sid) / "tmp" / "big").write_bytes(b"x" * 700_000)
            first = await s.snapshots.snapshot(OWNER, sid)
            assert first.status == SnapshotStatus.READY
            second = await s.snapshots.snapshot(OWNER, sid)  # 1.4 MB in all: over
            assert second.status == SnapshotStatus.FAILED
            assert "max_snapshot_mb_per_key" in (second.status_reason or "")
            assert second.id not in await runtime.snapshot_ids()
            assert s.store.snapshot_bytes(OWNER) == first.size_bytes
            await s.snapshots.delete(OWNER, first.id)
            assert (await s.snapshots.snapshot(OWNER, sid)).status == SnapshotStatus.READY
        finally:
            await s.close()

    asyncio.run(main())


def test_a_restart_mid_snapshot_leaves_none(config: ServerConfig, runtime: FakeRuntime) -> None:
    async def main() -> None:
        s = await Services.start(config, runtime)
        try:
            sid = await _running(s)
            whole = await s.snapshots.snapshot(OWNER, sid)
            # As a crash leaves it: the record says creating, the layer may be whole.
            cut = await s.snapshots.snapshot(OWNER, sid)
            s.store._db.execute("UPDATE snapshots SET status = 'creating' WHERE id = ?", (cut.id,))
        finally:
            await s.close()
        s = await Services.start(config, runtime)
        try:
            assert s.snapshots.get(OWNER, whole.id).status == SnapshotStatus.READY
            after = s.snapshots.get(OWNER, cut.id)
            assert after.status == SnapshotStatus.FAILED and "stopped" in (
                after.status_reason or ""
            )
            assert await runtime.snapshot_ids() == {whole.id}
        finally:
            await s.close()

    asyncio.run(main())


def test_deleting_a_snapshot_being_made_is_refused(run: Run) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid, wait=False)
        with pytest.raises(ServiceError) as caught:
            await s.snapshots.delete(OWNER, snap.id)
        assert caught.value.code == ErrorCode.SNAPSHOT_STATE
        await asyncio.sleep(0.2)
        assert (await s.snapshots.delete(OWNER, snap.id)).id == snap.id
        assert s.store.get_snapshot(snap.id) is None or (
            s.store.get_snapshot(snap.id).status == SNAPSHOT_DELETED  # type: ignore[union-attr]
        )

    run(body)


class _OnAnotherNode(SandboxError):
    code = ErrorCode.SNAPSHOT_STATE


def test_a_restore_the_runtime_refuses_leaves_the_session_running(
    run: Run, runtime: FakeRuntime
) -> None:
    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid)
        job = await s.jobs.run(OWNER, sid, ["sleep", "60"])
        async with asyncio.timeout(5):
            while s.jobs.get(OWNER, sid, job.id).status != "running":
                await asyncio.sleep(0.01)
        runtime.fail("check_layers", _OnAnotherNode("snapshot on the node b, session on a"))
        with pytest.raises(ServiceError) as caught:
            await s.snapshots.restore(OWNER, sid, snap.id)
        assert caught.value.code == ErrorCode.SNAPSHOT_STATE
        assert "snapshot on the node b, session on a" in caught.value.message
        assert s.sessions.get(OWNER, sid).status == SessionStatus.RUNNING
        assert ("stop", sid) not in runtime.calls
        assert s.jobs.get(OWNER, sid, job.id).status == "running"

    run(body)


def test_a_session_from_a_snapshot_is_created_with_its_layers(
    run: Run, runtime: FakeRuntime
) -> None:
    """One create, given the layers (a cluster places it by them), no set_layers after."""

    async def body(s: Services) -> None:
        sid = await _running(s)
        snap = await s.snapshots.snapshot(OWNER, sid)
        copy = await s.snapshots.create_session(OWNER, snap.id)
        assert [c for c in runtime.calls if c[1] == copy.id] == [("create", copy.id)]

    run(body)
