"""Sessions: the state machine, ownership, and reconciliation with the runtime.

States move only along ``created -> running <-> stopped``, and from any of those to
``deleted``, which is final.  Transitions of one session are serialised by a
per-session lock so that, say, a stop and a delete racing each other both see a
consistent state.  A session belongs to the API key that created it; to any other key
it does not exist (not found, never forbidden: its existence is not revealed).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bastion.wire import ErrorCode, SessionStatus
from bastion_server.config import Limits, ServerConfig
from bastion_server.runtime.base import Runtime, SandboxError, SandboxLimits
from bastion_server.service.errors import ServiceError, invalid, session_not_found
from bastion_server.store.sqlite import SessionRecord, Store

log = logging.getLogger("bastion.sessions")

_ALLOWED: dict[str, set[str]] = {
    "start": {SessionStatus.CREATED, SessionStatus.STOPPED},
    "stop": {SessionStatus.RUNNING},
    "delete": {SessionStatus.CREATED, SessionStatus.RUNNING, SessionStatus.STOPPED},
}
_MAX_METADATA_ITEMS = 64
_MAX_METADATA_LENGTH = 1024


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class SessionService:
    def __init__(self, store: Store, runtime: Runtime, config: ServerConfig) -> None:
        self.store, self.runtime, self.config = store, runtime, config
        self._locks: dict[str, asyncio.Lock] = {}
        #: Called with (session_id, reason) before a session's sandbox goes away, so
        #: that running jobs end with that reason (set by the job service).
        self.before_sandbox_stops: list[Callable[[str, str], Awaitable[None]]] = []

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    # -- reads ----------------------------------------------------------------------

    def get(self, owner: str, session_id: str) -> SessionRecord:
        record = self.store.get_session(session_id)
        if record is None or record.owner != owner:
            raise session_not_found(session_id)
        return record

    def list(self, owner: str) -> list[SessionRecord]:
        return self.store.list_sessions(owner)

    def require_running(self, owner: str, session_id: str) -> SessionRecord:
        record = self.get(owner, session_id)
        if record.status != SessionStatus.RUNNING:
            raise ServiceError(
                ErrorCode.SESSION_STATE,
                f"session {session_id!r} is {record.status}; it must be running for this "
                "operation (start it first)"
                if record.status != SessionStatus.DELETED
                else f"session {session_id!r} is deleted",
            )
        return record

    # -- transitions ----------------------------------------------------------------

    def _limits(self, requested: dict[str, Any] | None) -> Limits:
        requested = dict(requested or {})
        d, m = self.config.default_limits, self.config.max_limits
        unknown = set(requested) - {"memory_mb", "pids", "cpus"}
        if unknown:
            raise invalid(f"unknown limits: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, lowest, cast in (("memory_mb", 32, int), ("pids", 8, int), ("cpus", 0.01, float)):
            value = requested.get(name, getattr(d, name))
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise invalid(f"limits.{name} must be a number")
            if cast is int and value != int(value):
                raise invalid(f"limits.{name} must be a whole number")
            value = cast(value)
            if value < lowest:
                raise invalid(f"limits.{name} must be at least {lowest}")
            if value > getattr(m, name):
                raise ServiceError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"limits.{name}={value} is above the server's maximum of {getattr(m, name)}",
                )
            values[name] = value
        return Limits(**values)

    async def create(
        self,
        owner: str,
        *,
        limits: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> SessionRecord:
        if idempotency_key is not None:
            if len(idempotency_key) > 255:
                raise invalid("Idempotency-Key must be at most 255 characters")
            existing = self.store.find_session_by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return existing
        chosen = self._limits(limits)
        metadata = dict(metadata or {})
        if len(metadata) > _MAX_METADATA_ITEMS or any(
            not isinstance(k, str)
            or not isinstance(v, str)
            or len(k) > _MAX_METADATA_LENGTH
            or len(v) > _MAX_METADATA_LENGTH
            for k, v in metadata.items()
        ):
            raise invalid(
                f"metadata must be at most {_MAX_METADATA_ITEMS} string pairs "
                f"of at most {_MAX_METADATA_LENGTH} characters"
            )
        stamp = now_iso()
        record = SessionRecord(
            id=new_id("ses"),
            owner=owner,
            status=SessionStatus.CREATED,
            limits={"memory_mb": chosen.memory_mb, "pids": chosen.pids, "cpus": chosen.cpus},
            metadata=metadata,
            created_at=stamp,
            updated_at=stamp,
            idempotency_key=idempotency_key,
        )
        await self.runtime.create(record.id)
        self.store.insert_session(record)
        log.info("session created", extra={"session_id": record.id})
        return record

    def _check_transition(self, record: SessionRecord, action: str) -> None:
        if record.status not in _ALLOWED[action]:
            raise ServiceError(
                ErrorCode.SESSION_STATE,
                f"cannot {action} session {record.id!r}: it is {record.status}",
            )

    def _set_status(self, record: SessionRecord, status: str, reason: str | None = None) -> None:
        record.status, record.status_reason, record.updated_at = status, reason, now_iso()
        self.store.update_session_status(record.id, status, record.updated_at, reason)

    async def start(self, owner: str, session_id: str) -> SessionRecord:
        async with self._lock(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, "start")
            limits = SandboxLimits(**record.limits)
            try:
                await self.runtime.start(session_id, limits)
            except (SandboxError, OSError) as exc:
                log.error(
                    "session start failed", extra={"session_id": session_id, "error": str(exc)}
                )
                raise ServiceError(
                    ErrorCode.SESSION_START_FAILED,
                    f"the sandbox of session {session_id!r} failed to start: {exc}",
                ) from exc
            self._set_status(record, SessionStatus.RUNNING)
            log.info("session started", extra={"session_id": session_id})
            return record

    async def _halt_jobs(self, session_id: str, reason: str) -> None:
        for hook in self.before_sandbox_stops:
            await hook(session_id, reason)

    async def stop(self, owner: str, session_id: str) -> SessionRecord:
        async with self._lock(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, "stop")
            await self._halt_jobs(session_id, "session_stopped")
            await self.runtime.stop(session_id)
            self._set_status(record, SessionStatus.STOPPED)
            log.info("session stopped", extra={"session_id": session_id})
            return record

    async def delete(self, owner: str, session_id: str) -> SessionRecord:
        async with self._lock(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, "delete")
            await self._halt_jobs(session_id, "session_deleted")
            await self.runtime.delete(session_id)
            self._set_status(record, SessionStatus.DELETED)
            log.info("session deleted", extra={"session_id": session_id})
        self._locks.pop(session_id, None)
        return record

    # -- restart --------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make records and sandboxes agree after a (re)start of the server.

        A session recorded as running whose sandbox still runs is adopted as it is; one
        whose sandbox is gone is marked stopped (its files are kept).  A sandbox that
        no live record owns (left by a crash mid-delete) is removed.
        """
        records = {r.id: r for r in self.store.list_sessions(include_deleted=True)}
        for record in records.values():
            if record.status != SessionStatus.RUNNING:
                continue
            if await self.runtime.is_running(record.id):
                log.info("session adopted", extra={"session_id": record.id})
                continue
            await self.runtime.stop(record.id)  # unmount what a dead sandbox left
            self._set_status(
                record, SessionStatus.STOPPED, "the sandbox was not running when the server started"
            )
            log.warning("session marked stopped", extra={"session_id": record.id})
        for sandbox_id in await self.runtime.list_sandboxes():
            owner_record = records.get(sandbox_id)
            if owner_record is None or owner_record.status == SessionStatus.DELETED:
                log.warning("removing unowned sandbox", extra={"session_id": sandbox_id})
                await self.runtime.delete(sandbox_id)
