"""The warm pool as a wrapper (runtime/warm_pool.py), over the in-memory backend.

The real thing over the OCI backend (the rename, the id-range hand-over, a crash in
the middle) is covered by tests/integration/test_crash_consistency.py and
test_images.py; here, what the wrapper itself decides: which creates take a pooled
sandbox, what a start of one does, what is listed, what close leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion_server.runtime.base import SandboxError, SandboxLimits, SandboxNotRunning
from bastion_server.runtime.fake import FakeRuntime
from bastion_server.runtime.network import NetworkPolicy
from bastion_server.runtime.sandbox_image import SandboxImage
from bastion_server.runtime.warm_pool import POOL_PREFIX, STANDBY_CAP, WarmPool, pool_key

LIMITS = SandboxLimits(memory_mb=512, pids=256, cpus=1.0, disk_mb=1024)
IMAGE = SandboxImage(("/layers/base",), 100000, 1000, 1000, "/home/user")
OTHER = SandboxImage(("/layers/python", "/layers/base"), 100000, 1000, 1000, "/home/user",
                     name="python")  # fmt: skip


class HandingOver(FakeRuntime):
    """The in-memory backend, able to hand a sandbox over as a pooled backend must."""

    async def hand_over(self, sandbox_id: str, session_id: str, image: SandboxImage) -> None:
        self.calls.append(("hand_over", sandbox_id))
        self.sandboxes[session_id] = self.sandboxes.pop(sandbox_id)
        self.images.pop(sandbox_id, None)
        self.images[session_id] = image

    async def kill_all(self, session_id: str) -> None:
        self._enter("kill_all", session_id)
        await self.stop(session_id)

    async def connect(self, session_id: str, network: NetworkPolicy | None) -> None:
        self.calls.append(("connect", session_id))
        sandbox = self.sandboxes.get(session_id)
        if sandbox is None or not sandbox.running:
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        sandbox.network = network


@pytest.fixture
def inner(tmp_path: Path) -> Iterator[HandingOver]:
    yield HandingOver(tmp_path / "fake")


async def _filled(pool: WarmPool) -> WarmPool:
    await pool.prepare_host()
    await pool.warm_up()
    if pool._filler is not None:
        await pool._filler
    return pool


def _pooled(inner: FakeRuntime) -> set[str]:
    return {name for name in inner.sandboxes if name.startswith(POOL_PREFIX)}


def test_the_pool_fills_and_its_sandboxes_are_no_sessions(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 2))
        assert len(_pooled(inner)) == 2
        assert all(inner.sandboxes[name].running for name in _pooled(inner))
        assert await pool.list_sandboxes() == set()
        assert await pool.running_sandboxes() == set()
        assert await pool.started_sandboxes() == set()
        await pool.close()
        assert _pooled(inner) == set()

    asyncio.run(run())


def test_a_create_with_the_default_limits_takes_a_started_sandbox(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 1))
        (ready,) = _pooled(inner)
        inner.calls.clear()
        await pool.create("s1", LIMITS)
        assert inner.calls == [("hand_over", ready)]
        network = NetworkPolicy(enabled=True, allow=())
        await pool.start("s1", LIMITS, network)
        assert ("start", "s1") not in inner.calls
        assert ("connect", "s1") in inner.calls
        assert inner.sandboxes["s1"].network == network
        assert await pool.list_sandboxes() == {"s1"}
        assert pool._filler is not None
        await pool._filler  # taken: the pool fills again
        assert len(_pooled(inner)) == 1 and ready not in inner.sandboxes
        await pool.close()
        assert set(inner.sandboxes) == {"s1"}  # a session's sandbox is never the pool's

    asyncio.run(run())


def test_other_limits_or_other_layers_get_a_sandbox_of_their_own(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 1))
        inner.calls.clear()
        await pool.create("big", dataclasses.replace(LIMITS, memory_mb=1024))
        await pool.create("py", LIMITS, OTHER)
        assert inner.calls == [("create", "big"), ("create", "py")]
        await pool.start("py", LIMITS)
        assert ("start", "py") in inner.calls
        await pool.close()

    asyncio.run(run())


def test_images_of_one_layer_set_share_a_pool(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 1))
        pool.add_pool(OTHER, 1)
        assert pool._filler is not None
        await pool._filler
        renamed = dataclasses.replace(OTHER, name="my-python", env=(("A", "1"),))
        assert pool_key(renamed) == pool_key(OTHER) != pool_key(IMAGE)
        inner.calls.clear()
        await pool.create("s2", LIMITS, renamed)
        assert inner.calls[0][0] == "hand_over"
        assert pool.image_of("s2") == renamed  # its own name and environment
        await pool.close()

    asyncio.run(run())


def test_a_handed_over_sandbox_that_died_is_started_afresh(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 1))
        await pool.create("s3", LIMITS)
        inner.crash("s3")
        await pool.start("s3", LIMITS)
        assert ("start", "s3") in inner.calls
        assert inner.sandboxes["s3"].running
        await pool.close()

    asyncio.run(run())


def test_snapshot_layers_stop_a_handed_over_sandbox_first(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 1))
        await pool.create("s4", LIMITS)
        assert inner.sandboxes["s4"].running  # started ahead, over the image alone
        await pool.set_layers("s4", [])
        assert ("stop", "s4") in inner.calls
        await pool.close()

    asyncio.run(run())


def test_without_a_pool_every_create_is_the_backends(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 0))
        await pool.create("s5", LIMITS)
        assert inner.calls[-1] == ("create", "s5")
        assert _pooled(inner) == set()
        await pool.close()

    asyncio.run(run())


# Standbys: a restore of a running session (Runtime.restore, as service/sessions.py's
# restore asks it, after check_layers) to the snapshot of its last restore.

BIG = dataclasses.replace(LIMITS, memory_mb=2048)
NO_NETWORK = NetworkPolicy(enabled=False, allow=())


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


async def _restore(
    pool: WarmPool, sid: str, layers: list[str], network: NetworkPolicy = NO_NETWORK
) -> None:
    await pool.check_layers(sid, layers)
    await pool.restore(sid, layers, BIG, network)


async def _running_with_snapshots(
    inner: HandingOver, sid: str, *snapshots: str, network: NetworkPolicy = NO_NETWORK
) -> WarmPool:
    """A pool (of no size) with the running session ``sid`` of limits BIG and the
    snapshots of it named, then restored to the first (which keeps a standby)."""
    pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 0))
    await pool.create(sid, BIG, IMAGE)
    await pool.start(sid, BIG, network)
    for name in snapshots:
        await pool.capture(sid, name)
    await _restore(pool, sid, [snapshots[0]], network)
    return pool


async def _trash_removed(pool: WarmPool) -> None:
    for _ in range(100):
        if not pool._trash:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"old sandboxes not removed: {pool._trash}")


def test_a_restore_to_the_same_snapshot_takes_its_standby(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 0))
        network = NetworkPolicy(enabled=True, allow=())
        await pool.create("s6", BIG, IMAGE)
        await pool.start("s6", BIG, network)
        (inner.sandboxes["s6"].root / "home" / "user" / "state").write_text("snapshot")
        await pool.capture("s6", "snap1")
        expected = _files(inner.sandboxes["s6"].root)
        await _restore(pool, "s6", ["snap1"], network)  # the first: cold, keeps a standby
        for _ in range(2):
            standby = pool._standbys["s6"]
            assert await standby.ready
            assert standby.name not in await pool.list_sandboxes()  # no session's
            root = inner.sandboxes["s6"].root
            (root / "home" / "user" / "state").write_text("a later write")
            (root / "tmp" / "more").write_text("another")
            inner.calls.clear()
            await _restore(pool, "s6", ["snap1"], network)
            assert ("hand_over", standby.name) in inner.calls
            assert inner.calls[1] == ("kill_all", "s6")  # stopped at once, unmounted later
            assert ("restore", "s6") not in inner.calls  # not the backend's own
            assert ("start", "s6") not in inner.calls and ("connect", "s6") in inner.calls
            restored = inner.sandboxes["s6"]
            assert _files(restored.root) == expected  # the snapshot's, no later write
            assert restored.running and restored.limits == BIG  # the session's limits
            assert restored.network == network
            await _trash_removed(pool)
            assert await pool.list_sandboxes() == {"s6"}
        standby = pool._standbys["s6"]
        assert await standby.ready
        await pool.delete("s6")
        assert inner.sandboxes == {}  # its standby went with it
        assert pool._standbys == {}
        await pool.close()

    asyncio.run(run())


def test_a_restore_of_a_stopped_session_or_to_other_layers_takes_no_standby(
    inner: HandingOver,
) -> None:
    async def run() -> None:
        pool = await _running_with_snapshots(inner, "s7", "snap1", "snap2")
        first = pool._standbys["s7"]
        assert await first.ready
        inner.calls.clear()
        await _restore(pool, "s7", ["snap2"])  # other layers: the backend's restore
        assert ("start", "s7") in inner.calls and first.name not in inner.sandboxes
        assert ("kill_all", "s7") not in inner.calls
        second = pool._standbys["s7"]
        assert await second.ready and second.layers == ("snap2",)
        await pool.stop("s7")  # stopped, then given the same layers again
        inner.calls.clear()
        await pool.set_layers("s7", ["snap2"])
        assert not any(call[0] == "hand_over" for call in inner.calls)
        assert not inner.sandboxes["s7"].running  # stays stopped
        assert second.name not in inner.sandboxes and pool._standbys == {}
        await pool.close()
        assert set(inner.sandboxes) == {"s7"}

    asyncio.run(run())


def test_close_leaves_no_standby(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _running_with_snapshots(inner, "s8", "snap1")
        assert "s8" in pool._standbys  # being prepared: close cancels it
        await pool.close()
        assert set(inner.sandboxes) == {"s8"}

    asyncio.run(run())


def test_a_restore_before_its_standby_is_up_starts_afresh_and_keeps_it(
    inner: HandingOver,
) -> None:
    async def run() -> None:
        pool = await _running_with_snapshots(inner, "s9", "snap1")
        preparing = pool._standbys["s9"]
        assert not preparing.ready.done()
        inner.calls.clear()
        await _restore(pool, "s9", ["snap1"])  # back to back: no waiting
        assert ("start", "s9") in inner.calls and ("kill_all", "s9") not in inner.calls
        assert pool._standbys["s9"] is preparing and await preparing.ready
        inner.calls.clear()
        await _restore(pool, "s9", ["snap1"])  # the next one takes it
        assert ("hand_over", preparing.name) in inner.calls
        await pool.close()
        assert set(inner.sandboxes) == {"s9"}

    asyncio.run(run())


def test_standbys_are_capped(inner: HandingOver) -> None:
    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 0))
        sessions = [f"c{n}" for n in range(STANDBY_CAP + 2)]
        for sid in sessions:
            await pool.create(sid, BIG, IMAGE)
            await pool.start(sid, BIG)
            await pool.capture(sid, f"snap-{sid}")
            await _restore(pool, sid, [f"snap-{sid}"])
        assert len(pool._standbys) == STANDBY_CAP
        await pool.close()
        assert set(inner.sandboxes) == set(sessions)

    asyncio.run(run())


def test_a_standby_restore_that_fails_leaves_no_standby_and_the_session_stopped(
    inner: HandingOver,
) -> None:
    async def run() -> None:
        pool = await _running_with_snapshots(inner, "s10", "snap1")
        standby = pool._standbys["s10"]
        assert await standby.ready
        inner.fail("kill_all", SandboxError("processes stuck"))
        with pytest.raises(SandboxError, match="processes stuck"):
            await _restore(pool, "s10", ["snap1"])
        assert standby.name not in inner.sandboxes  # removed, not leaked
        assert not inner.sandboxes["s10"].running
        assert pool._trash == set()
        await pool.close()
        assert set(inner.sandboxes) == {"s10"}

    asyncio.run(run())


def test_a_claim_in_flight_at_close_starts_no_new_sandbox(inner: HandingOver) -> None:
    """A create that takes a pooled sandbox while the server shuts down: its refill
    would make a sandbox after close removed the pool's, left running for nobody."""
    gate = asyncio.Event()
    hand_over = inner.hand_over

    async def slow_hand_over(sandbox_id: str, session_id: str, image: SandboxImage) -> None:
        await gate.wait()  # the rename still under way when close comes
        await hand_over(sandbox_id, session_id, image)

    async def run() -> None:
        pool = await _filled(WarmPool(inner, IMAGE, LIMITS, 1))
        inner.hand_over = slow_hand_over  # type: ignore[method-assign]
        claim = asyncio.create_task(pool.create("late", LIMITS))
        await asyncio.sleep(0.01)
        await pool.close()
        gate.set()
        await claim  # ends with the claim's refill
        for _ in range(20):
            await asyncio.sleep(0.01)  # a filler, had one been started, would fill now
        assert _pooled(inner) == set()

    asyncio.run(run())
