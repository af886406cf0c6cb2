"""Warm pools: sandboxes started ahead of need, handed to sessions as they are created.

:class:`WarmPool` is a :class:`Runtime` wrapping another (any backend that can
:meth:`~Runtime.hand_over` a sandbox and :meth:`~Runtime.connect` it afterwards).  It
keeps, per layer set (:func:`pool_key`), a few sandboxes created and started with the
server's default limits and no network.  A session created with those limits over an
image of those layers gets one: the backend renames it to the session (crash-safe, see
its ``hand_over``) and ``start`` then only gives it its network.  Any other create goes
to the backend as it is.

Standbys, for the RL "reset" (a restore to one snapshot again and again): once a
running session was restored to a snapshot (:meth:`Runtime.restore`), the wrapper
keeps one sandbox of that snapshot's files started ahead, of the session's own limits
(at most one a session, :data:`STANDBY_CAP` in all, dropped with the session).  The
next restore of that session to the same snapshot takes it: the session's old
sandbox's processes are killed, it is renamed to a ``trash_*`` name and removed in
the background, the standby renamed to the session (both crash-safe hand-overs) and
connected to the session's network.  A restore that finds no standby ready (back to
back, the one before still starting) is the backend's own restore, and the standby
being prepared for those layers stays for the next.

The pool's own sandboxes, standbys and trash belong to no session: they are never
listed as sandboxes (an earlier run's leftovers are in no pool, so they are listed,
and reaped).  Filling is an optimisation: a sandbox that cannot be prepared is logged,
never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bastion_server.runtime.base import (
    ExecSpec,
    Process,
    Runtime,
    SandboxError,
    SandboxLimits,
    SandboxNotRunning,
    SandboxProcess,
    SandboxUsage,
)
from bastion_server.runtime.boundary import sandbox_errors_only
from bastion_server.tasks import spawn

if TYPE_CHECKING:
    from bastion_server.runtime.files import SandboxFiles
    from bastion_server.runtime.network import NetworkPolicy
    from bastion_server.runtime.sandbox_image import SandboxImage

log = logging.getLogger("bastion.runtime")

#: What a pool is kept for: the layers a sandbox's root stands on (top first) and the
#: host id their files' container id 0 is.  Images of one layer set share a pool.
PoolKey = tuple[tuple[str, ...], int]
#: The name a pool's sandbox is created under (until a session gets it).
POOL_PREFIX = "pool_"
#: The name a session's old sandbox takes when a standby replaced it, until removed.
TRASH_PREFIX = "trash_"
#: At most this many standby sandboxes at once (each is a running sandbox).
STANDBY_CAP = 8


@dataclass
class _Standby:
    """A sandbox started ahead with a session's limits over a snapshot's files."""

    name: str
    layers: tuple[str, ...]
    limits: SandboxLimits
    #: Creating, giving it the layers and starting it: True once it runs.
    ready: asyncio.Task[bool]

    def is_ready(self, layers: tuple[str, ...]) -> bool:
        """Whether it runs, started over ``layers``, now."""
        task = self.ready
        done = task.done() and not task.cancelled() and task.exception() is None
        return done and task.result() and self.layers == layers


def pool_key(image: SandboxImage) -> PoolKey:
    """The pool a sandbox of ``image`` can come from: one per layer set."""
    return image.layers, image.uid_shift


@sandbox_errors_only
class WarmPool(Runtime):
    """``inner`` with pools of sandboxes started ahead, of ``limits`` (a session's
    default limits): ``size`` of ``image`` (the default image), more by :meth:`add_pool`."""

    def __init__(self, inner: Runtime, image: SandboxImage, limits: SandboxLimits, size: int):
        self.inner = inner
        self.name = inner.name
        self.home = inner.home
        self.reattaches_jobs = inner.reattaches_jobs
        self.image = image
        self.limits = limits
        default = pool_key(image)
        self._pools: dict[PoolKey, list[str]] = {default: []}
        self._sizes: dict[PoolKey, int] = {default: size}
        self._images: dict[PoolKey, SandboxImage] = {default: image}
        #: Being created and started for a pool: no session's either.
        self._preparing: set[str] = set()
        #: Sessions given a started sandbox (a pool's, a standby) not started yet, with
        #: the limits that sandbox runs with.
        self._prestarted: dict[str, SandboxLimits] = {}
        self._filler: asyncio.Task[None] | None = None
        #: Per session, the standby for its next restore (see the module's docstring).
        self._standbys: dict[str, _Standby] = {}
        #: Old sandboxes being removed in the background.
        self._trash: set[str] = set()
        #: Closed (or closing): no pool is filled and no standby prepared any more.
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        """What the backend offers beyond the contract (an OCI runtime's ``with_upper``,
        ``private``...) is reached through the pool as it is."""
        if name == "inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- the pools ----------------------------------------------------------------------

    def add_pool(self, image: SandboxImage, size: int) -> None:
        """Keep ``size`` sandboxes of ``image``'s layers started ahead of need (default
        limits): a session of that image then starts as fast as one of the default."""
        key = pool_key(image)
        if key == pool_key(self.image):
            return
        self._pools.setdefault(key, [])
        self._images.setdefault(key, image)
        self._sizes[key] = size
        self._refill()

    def pooled(self) -> set[str]:
        """The ids of every sandbox that is the pools' (ready or being prepared)."""
        standbys = {standby.name for standby in self._standbys.values()}
        pools = {name for pool in self._pools.values() for name in pool}
        return pools | self._preparing | standbys | self._trash

    def _refill(self) -> None:
        if self._closing:  # (a claim in flight at shutdown) nothing new after close
            return
        if any(self._sizes.values()) and (self._filler is None or self._filler.done()):
            self._filler = spawn(self._fill(), name="sandbox pool")

    async def _fill(self) -> None:
        for key, size in list(self._sizes.items()):
            pool = self._pools[key]
            while len(pool) < size:
                name = f"{POOL_PREFIX}{os.urandom(8).hex()}"
                self._preparing.add(name)
                try:
                    await self.inner.create(name, self.limits, self._images[key])
                    await self.inner.start(name, self.limits)
                except asyncio.CancelledError:
                    await self.inner.delete(name)  # shutting down mid-way: leave nothing
                    raise
                except Exception as exc:  # the pool is an optimisation: never fatal
                    log.warning("warm pool: could not prepare a sandbox: %s", exc)
                    await self.inner.delete(name)
                    break
                finally:
                    self._preparing.discard(name)
                pool.append(name)

    async def _claim(self, session_id: str, pool: list[str], image: SandboxImage) -> None:
        name = pool.pop()
        try:
            await self.inner.hand_over(name, session_id, image)
        except BaseException:
            # Either name may hold it now: a delete of both leaves nothing behind.
            with contextlib.suppress(SandboxError):
                await self.inner.delete(name)
                await self.inner.delete(session_id)
            raise
        finally:
            self._refill()
        self._prestarted[session_id] = self.limits

    # -- standbys -----------------------------------------------------------------------

    def _keep_standby(
        self, session_id: str, layers: tuple[str, ...], limits: SandboxLimits
    ) -> None:
        """Start preparing the session's standby of ``layers`` (if under the cap, and
        it has none: one of these layers is still being prepared)."""
        if self._closing or session_id in self._standbys or len(self._standbys) >= STANDBY_CAP:
            return
        name = f"{POOL_PREFIX}{os.urandom(8).hex()}"
        image = self.inner.image_of(session_id)
        ready = spawn(self._prepare_standby(name, layers, limits, image), name="standby")
        self._standbys[session_id] = _Standby(name, layers, limits, ready)

    async def _prepare_standby(
        self,
        name: str,
        layers: tuple[str, ...],
        limits: SandboxLimits,
        image: SandboxImage | None,
    ) -> bool:
        try:
            await self.inner.create(name, limits, image, layers)
            await self.inner.start(name, limits)
        except asyncio.CancelledError:
            await self.inner.delete(name)
            raise
        except Exception as exc:  # an optimisation: never fatal
            log.warning("warm pool: could not prepare a standby: %s", exc)
            await self.inner.delete(name)
            return False
        return True

    async def _drop_standby(self, session_id: str) -> None:
        """Remove the session's standby, whatever state its preparation is in."""
        standby = self._standbys.pop(session_id, None)
        if standby is None:
            return
        standby.ready.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await standby.ready
        await self.inner.delete(standby.name)

    async def _take_standby(
        self,
        session_id: str,
        layers: tuple[str, ...],
        limits: SandboxLimits,
        network: NetworkPolicy | None,
    ) -> bool:
        """Put the session's standby of ``layers`` and ``limits``, if it runs, in place
        of its sandbox (killed, renamed away and removed in the background) and connect
        it; False: none is ready (one still being prepared stays for the next restore)
        or it could not be put in place, and the session's sandbox is where it was
        (its processes maybe killed: the backend's restore ends them anyway)."""
        standby = self._standbys.get(session_id)
        if standby is None or not standby.ready.done():
            # Still being prepared: waiting for it costs more than a restore of the
            # backend's own (back-to-back restores).
            return False
        image = self.inner.image_of(standby.name)
        old_image = self.inner.image_of(session_id)
        if not standby.is_ready(layers) or image is None or old_image is None:
            await self._drop_standby(session_id)
            return False
        del self._standbys[session_id]
        trash = f"{TRASH_PREFIX}{os.urandom(8).hex()}"
        self._trash.add(trash)
        try:
            await self.inner.kill_all(session_id)  # the rest of its stop: the trash's delete
            # Two crash-safe renames (see the backend's hand_over): a crash leaves
            # trash_* and pool_* sandboxes that no session owns (reaped at the next
            # start) and the session's sandbox either the standby or none at all (a
            # restore cut short: its next start fails cleanly, "no storage").
            await self.inner.hand_over(session_id, trash, old_image)
            try:
                await self.inner.hand_over(standby.name, session_id, image)
            except SandboxError as exc:
                log.warning("warm pool: could not take a standby: %s", exc)
                await self.inner.hand_over(trash, session_id, old_image)  # put back
                self._trash.discard(trash)
                await self.inner.delete(standby.name)
                return False
        except BaseException:
            self._trash.discard(trash)
            with contextlib.suppress(SandboxError):
                await self.inner.delete(standby.name)
            raise
        spawn(self._remove_trash(trash), name="old sandbox removal")
        try:
            await self.inner.connect(session_id, network)
        except SandboxNotRunning:  # it died since it was started: start it as any other
            await self.inner.stop(session_id)
            await self.inner.start(session_id, limits, network)
        return True

    async def _remove_trash(self, name: str) -> None:
        try:
            await self.inner.delete(name)
        finally:
            self._trash.discard(name)

    # -- the contract -------------------------------------------------------------------

    async def prepare_host(self) -> None:
        await self.inner.prepare_host()

    async def warm_up(self) -> None:
        await self.inner.warm_up()
        self._refill()

    async def close(self) -> None:
        """Remove the pools' sandboxes (they belong to no session), then close the
        backend.  From here on nothing is prepared ahead any more."""
        self._closing = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        for pool in self._pools.values():
            while pool:
                await self.inner.delete(pool.pop())
        for session_id in list(self._standbys):
            await self._drop_standby(session_id)
        await self.inner.close()

    async def create(
        self,
        session_id: str,
        limits: SandboxLimits,
        image: SandboxImage | None = None,
        layers: Sequence[str] = (),
    ) -> None:
        image = image or self.image
        pool = self._pools.get(pool_key(image))
        if limits == self.limits and pool and not layers:  # a pool's runs the image alone
            await self._claim(session_id, pool, image)
            return
        await self.inner.create(session_id, limits, image, layers)

    def image_of(self, session_id: str) -> SandboxImage | None:
        return self.inner.image_of(session_id)

    async def start(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None = None
    ) -> None:
        prestarted = self._prestarted.pop(session_id, None)
        if prestarted == limits:
            try:
                await self.inner.connect(session_id, network)
            except SandboxNotRunning:
                prestarted = None  # it died since it was started: start it as any other
            except BaseException:
                await self.inner.stop(session_id)
                raise
        elif prestarted is not None:  # started with other limits: start it anew
            await self.inner.stop(session_id)
            prestarted = None
        if prestarted is None:
            await self.inner.start(session_id, limits, network)

    async def restore_network(self, session_id: str, network: NetworkPolicy) -> None:
        await self.inner.restore_network(session_id, network)

    async def stop(self, session_id: str) -> None:
        self._prestarted.pop(session_id, None)
        await self.inner.stop(session_id)

    async def restore(
        self,
        session_id: str,
        layers: list[str],
        limits: SandboxLimits,
        network: NetworkPolicy | None = None,
    ) -> None:
        """The session's standby, if one of these layers and limits runs; else the
        backend's restore (the standby being prepared for them stays).  Either way the
        next restore to these layers can find one ready."""
        wanted = tuple(layers)
        self._prestarted.pop(session_id, None)
        standby = self._standbys.get(session_id)
        if standby is not None and (standby.layers, standby.limits) != (wanted, limits):
            await self._drop_standby(session_id)  # of other layers: of no use
        try:
            if not await self._take_standby(session_id, wanted, limits, network):
                await self.inner.restore(session_id, layers, limits, network)
        except SandboxError:
            with contextlib.suppress(SandboxError):  # a restore that fails leaves it stopped
                await self.inner.stop(session_id)
            raise
        self._keep_standby(session_id, wanted, limits)

    async def delete(self, session_id: str) -> None:
        self._prestarted.pop(session_id, None)
        await self._drop_standby(session_id)
        await self.inner.delete(session_id)

    async def pause(self, session_id: str) -> None:
        await self.inner.pause(session_id)

    async def resume(self, session_id: str) -> None:
        await self.inner.resume(session_id)

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        return await self.inner.capture(session_id, snapshot_id)

    async def check_layers(self, session_id: str, layers: Sequence[str]) -> None:
        await self.inner.check_layers(session_id, layers)

    async def set_layers(self, session_id: str, layers: list[str]) -> None:
        if session_id in self._prestarted:  # a pool's sandbox: running over the image
            await self.stop(session_id)
        # A stopped session's new files: a standby (started for a running one) goes.
        await self._drop_standby(session_id)
        await self.inner.set_layers(session_id, layers)

    async def remove_snapshot(self, snapshot_id: str) -> None:
        await self.inner.remove_snapshot(snapshot_id)

    async def snapshot_ids(self) -> set[str]:
        return await self.inner.snapshot_ids()

    async def is_running(self, session_id: str) -> bool:
        return await self.inner.is_running(session_id)

    async def running_sandboxes(self) -> set[str]:
        return await self.inner.running_sandboxes() - self.pooled()

    async def list_sandboxes(self) -> set[str]:
        return await self.inner.list_sandboxes() - self.pooled()

    async def started_sandboxes(self) -> set[str]:
        return await self.inner.started_sandboxes() - self.pooled()

    async def usage(self, session_id: str) -> SandboxUsage:
        return await self.inner.usage(session_id)

    async def exec(self, session_id: str, spec: ExecSpec) -> Process:
        return await self.inner.exec(session_id, spec)

    async def attach(
        self, session_id: str, job_id: str, stdout_offset: int, stderr_offset: int
    ) -> Process:
        return await self.inner.attach(session_id, job_id, stdout_offset, stderr_offset)

    async def processes(self, session_id: str) -> list[SandboxProcess]:
        return await self.inner.processes(session_id)

    def files(self, session_id: str) -> SandboxFiles:
        return self.inner.files(session_id)

    def node_of(self, session_id: str) -> str | None:
        return self.inner.node_of(session_id)

    def sandbox_ref(self, session_id: str) -> str:
        return self.inner.sandbox_ref(session_id)

    async def hand_over(self, sandbox_id: str, session_id: str, image: SandboxImage) -> None:
        await self.inner.hand_over(sandbox_id, session_id, image)

    async def connect(self, session_id: str, network: NetworkPolicy | None) -> None:
        await self.inner.connect(session_id, network)
