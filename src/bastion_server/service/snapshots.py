"""Snapshots: a session's files captured whole, to start new sessions from (create,
fork) or to reset one to (restore).

A snapshot is a layer like an image's (runtime/snapshots.py): the session's writable
layer, copied while its processes are frozen, above the layers the session stood on
(its ``parent`` snapshot's, then the image).  It belongs to the API key that took it
(to another key it does not exist) and outlives its session.  It is ``creating``
until the copy is whole, then ``ready`` (or ``failed``, with the reason); a server
that stops mid-copy finds it ``failed`` at its next start, and no part of it on disk.

A deleted snapshot is gone at once for its key, but its layer stays on disk while a
session or another snapshot still stands on it, and is removed when the last one
goes (:meth:`SnapshotService.collect`).  The disk its snapshots take is reported per
snapshot (``size_bytes``) and limited per key (``max_snapshot_mb_per_key``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bastion.wire import (
    MAX_FORK_COUNT,
    MAX_METADATA_LENGTH,
    ErrorCode,
    SessionStatus,
    SnapshotStatus,
)
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import Runtime, SandboxError
from bastion_server.service.errors import ServiceError, invalid
from bastion_server.service.images import recorded_image
from bastion_server.service.paging import Page, PageRequest, creation_key, take_page
from bastion_server.service.quotas import quota_exceeded
from bastion_server.service.sessions import SessionService, new_id, now_iso
from bastion_server.store.sqlite import SNAPSHOT_DELETED, SessionRecord, SnapshotRecord, Store
from bastion_server.tasks import spawn

log = logging.getLogger("bastion.snapshots")

#: Most snapshots one session's files may stand on (a snapshot of a session started
#: from a snapshot of a session started from one...): each is a layer of its overlay.
MAX_SNAPSHOT_DEPTH = 100
_MIB = 1024 * 1024
#: Snapshot ids, top first: the layers a session's files stand on.
Layers = list[str]
Copies = list[SessionRecord]


def snapshot_not_found(snapshot_id: str) -> ServiceError:
    return ServiceError(ErrorCode.SNAPSHOT_NOT_FOUND, f"snapshot {snapshot_id!r} not found")


class SnapshotService:
    def __init__(
        self, store: Store, runtime: Runtime, sessions: SessionService, config: ServerConfig
    ) -> None:
        self.store, self.runtime, self.sessions, self.config = store, runtime, sessions, config
        self._captures: dict[str, asyncio.Task[None]] = {}
        sessions.after_delete.append(lambda _session_id: self.collect())

    # -- reads ----------------------------------------------------------------------

    def get(self, owner: str, snapshot_id: str) -> SnapshotRecord:
        record = self.store.get_snapshot(snapshot_id)
        if record is None or record.owner != owner or record.status == SNAPSHOT_DELETED:
            raise snapshot_not_found(snapshot_id)
        return record

    def list(self, owner: str, page: PageRequest) -> Page[SnapshotRecord]:
        """One page of the owner's snapshots, oldest first."""
        rows = self.store.page_snapshots(owner, page.after("snapshots", 2), page.limit + 1)
        return take_page("snapshots", rows, page.limit, creation_key)

    def ready(self, owner: str, snapshot_id: str) -> SnapshotRecord:
        """The owner's snapshot, which must be ready to start from."""
        record = self.get(owner, snapshot_id)
        if record.status != SnapshotStatus.READY:
            raise ServiceError(
                ErrorCode.SNAPSHOT_STATE,
                f"snapshot {snapshot_id!r} is {record.status}"
                + (f" ({record.status_reason})" if record.status_reason else "")
                + "; only a ready snapshot can be started from",
            )
        return record

    def layers(self, snapshot_id: str | None) -> Layers:
        """The snapshots a session of ``snapshot_id`` stands on, top first."""
        chain: Layers = []
        while snapshot_id is not None:
            chain.append(snapshot_id)
            record = self.store.get_snapshot(snapshot_id)
            snapshot_id = record.parent if record is not None else None
        return chain

    # -- taking one -----------------------------------------------------------------

    async def snapshot(
        self, owner: str, session_id: str, name: Any = None, *, wait: bool = True
    ) -> SnapshotRecord:
        """Snapshot a session (created, running, paused or stopped).  Returns once it
        is ready or failed with ``wait``, else at once (status ``creating``)."""
        if name is not None and (not isinstance(name, str) or len(name) > MAX_METADATA_LENGTH):
            raise invalid(f"name must be a string of at most {MAX_METADATA_LENGTH} characters")
        session = self.sessions.get(owner, session_id)
        if session.status == SessionStatus.DELETED:
            raise ServiceError(
                ErrorCode.SESSION_STATE, f"session {session_id!r} is {session.status}"
            )
        if len(self.layers(session.snapshot)) >= MAX_SNAPSHOT_DEPTH:
            raise ServiceError(
                ErrorCode.LIMIT_EXCEEDED,
                f"session {session_id!r} stands on {MAX_SNAPSHOT_DEPTH} snapshots, the most "
                "a snapshot may: start a session from an image to begin a new chain",
            )
        self._check_quota(owner, 0)
        stamp = now_iso()
        record = SnapshotRecord(
            id=new_id("snap"),
            owner=owner,
            session_id=session_id,
            name=name,
            status=SnapshotStatus.CREATING,
            created_at=stamp,
            updated_at=stamp,
            parent=session.snapshot,
        )
        self.store.insert_snapshot(record)
        task = spawn(self._capture(record), name=f"snapshot {record.id}")
        self._captures[record.id] = task
        task.add_done_callback(lambda _: self._captures.pop(record.id, None))
        if wait:
            await asyncio.shield(task)
        return record

    def _check_quota(self, owner: str, adding: int) -> None:
        most = self.config.max_snapshot_mb_per_key * _MIB
        if most and self.store.snapshot_bytes(owner) + adding > most:
            raise quota_exceeded(
                f"this key's snapshots would take more than {self.config.max_snapshot_mb_per_key}"
                " MiB, its quota (max_snapshot_mb_per_key): delete some first"
            )

    async def _capture(self, record: SnapshotRecord) -> None:
        try:
            size = await self.sessions.capture(record.session_id, record.id)
        except (SandboxError, ServiceError) as exc:
            reason = exc.message if isinstance(exc, ServiceError) else str(exc)
            self._finish(record, SnapshotStatus.FAILED, f"the copy failed: {reason}")
            log.warning("snapshot failed", extra={"snapshot_id": record.id, "error": reason})
            return
        try:
            self._check_quota(record.owner, size)
        except ServiceError as exc:
            await self.runtime.remove_snapshot(record.id)
            self._finish(record, SnapshotStatus.FAILED, exc.message)
            return
        record.size_bytes = size
        self._finish(record, SnapshotStatus.READY)
        log.info("snapshot ready", extra={"snapshot_id": record.id, "bytes": size})

    def _finish(self, record: SnapshotRecord, status: str, reason: str | None = None) -> None:
        record.status, record.status_reason, record.updated_at = status, reason, now_iso()
        self.store.update_snapshot(record)

    # -- using one ------------------------------------------------------------------

    async def create_session(self, owner: str, snapshot_id: str, **create: Any) -> SessionRecord:
        """A new session (status ``created``) whose files are the snapshot's, over the
        image the snapshot's session ran."""
        source = self.store.get_session(self.ready(owner, snapshot_id).session_id)
        if source is not None and source.image is not None:
            create["image"] = await recorded_image(self.config.images_dir, source.image)
        return await self.sessions.create(
            owner, snapshot=snapshot_id, layers=self.layers(snapshot_id), **create
        )

    async def restore(self, owner: str, session_id: str, snapshot_id: Any) -> SessionRecord:
        if not isinstance(snapshot_id, str):
            raise invalid("snapshot_id must be a snapshot's id")
        self.sessions.get(owner, session_id)  # an unknown session is reported first
        self.ready(owner, snapshot_id)
        record = await self.sessions.restore(
            owner, session_id, snapshot_id, self.layers(snapshot_id)
        )
        await self.collect()  # what the session stood on before may be free now
        return record

    async def fork(
        self, owner: str, session_id: str, count: Any = 1, name: Any = None
    ) -> tuple[SnapshotRecord, Copies]:
        """Snapshot a session and start ``count`` sessions from it, like it (limits,
        timeouts, network, metadata, env): all of them, or none (and an error)."""
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 1 <= count <= MAX_FORK_COUNT
        ):
            raise invalid(f"count must be a whole number from 1 to {MAX_FORK_COUNT}")
        source = self.sessions.get(owner, session_id)
        snapshot = await self.snapshot(owner, session_id, name, wait=True)
        if snapshot.status != SnapshotStatus.READY:
            raise ServiceError(
                ErrorCode.SNAPSHOT_STATE,
                f"snapshot of {session_id!r} failed: {snapshot.status_reason}",
            )
        env = self.store.session_env(session_id)
        results = await asyncio.gather(
            *(self._start_copy(owner, snapshot.id, source, env) for _ in range(count)),
            return_exceptions=True,
        )
        made = [r for r in results if isinstance(r, SessionRecord)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for record in made:
                await self.sessions.delete(owner, record.id)
            raise failure
        return snapshot, made

    async def _start_copy(
        self, owner: str, snapshot_id: str, source: SessionRecord, env: dict[str, str]
    ) -> SessionRecord:
        record = await self.create_session(
            owner,
            snapshot_id,
            limits=dict(source.limits),
            metadata=dict(source.metadata),
            idle_timeout=source.idle_timeout,
            max_lifetime=source.max_lifetime,
            paused_timeout=source.paused_timeout,
            on_timeout=source.on_timeout,
            network=dict(source.network),
            env=env or None,
        )
        try:
            return await self.sessions.start(owner, record.id)
        except BaseException:
            await self.sessions.delete(owner, record.id)
            raise

    # -- removing -------------------------------------------------------------------

    async def delete(self, owner: str, snapshot_id: str) -> SnapshotRecord:
        """Delete a snapshot (not one still being made); sessions started from it keep
        their files."""
        record = self.get(owner, snapshot_id)
        if record.status == SnapshotStatus.CREATING:
            raise ServiceError(
                ErrorCode.SNAPSHOT_STATE,
                f"snapshot {snapshot_id!r} is still being made; delete it once it is ready",
            )
        shown = SnapshotRecord(**vars(record))
        self._finish(record, SNAPSHOT_DELETED)
        await self.collect()
        return shown

    async def collect(self) -> None:
        """Remove the layers of deleted snapshots that nothing stands on any more."""
        needed = set(self.store.snapshots_in_use())
        frontier = list(needed)
        while frontier:  # and every layer under those
            record = self.store.get_snapshot(frontier.pop())
            if record is not None and record.parent and record.parent not in needed:
                needed.add(record.parent)
                frontier.append(record.parent)
        for record in self.store.list_snapshots(SNAPSHOT_DELETED):
            if record.id in needed:
                continue
            try:
                await self.runtime.remove_snapshot(record.id)
            except SandboxError as exc:  # kept: the next collect retries
                log.error(
                    "snapshot not removed", extra={"snapshot_id": record.id, "error": str(exc)}
                )
                continue
            self.store.remove_snapshot(record.id)

    async def reconcile(self) -> None:
        """After a (re)start: a snapshot the last run left being made failed (and no
        part of it is kept); layers no snapshot owns are removed."""
        for record in self.store.list_snapshots(SnapshotStatus.CREATING):
            if record.id in self._captures:
                continue
            await self.runtime.remove_snapshot(record.id)
            self._finish(
                record, SnapshotStatus.FAILED, "the server stopped while it was being made"
            )
            log.warning("snapshot cut short", extra={"snapshot_id": record.id})
        known = {r.id for r in self.store.list_snapshots() if r.status != SnapshotStatus.FAILED}
        for snapshot_id in await self.runtime.snapshot_ids() - known:
            log.warning("removing an unowned snapshot layer", extra={"snapshot_id": snapshot_id})
            await self.runtime.remove_snapshot(snapshot_id)
        await self.collect()

    async def shutdown(self) -> None:
        """Let copies under way finish (each is short), so that none is cut off."""
        if self._captures:
            await asyncio.wait(list(self._captures.values()), timeout=30)
