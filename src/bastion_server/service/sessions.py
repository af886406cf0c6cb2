"""Sessions: the state machine, ownership, lifetimes, and reconciliation with the runtime.

States move only along ``created -> running <-> stopped`` and ``running <-> paused``
(a paused session's processes are frozen; it may also be stopped), and from any of
those to ``deleted``, which is final.  Create and delete are atomic across a crash: a session
is first recorded ``creating`` (an internal state no read shows) and becomes
``created`` once its storage is whole, and a delete is recorded before the sandbox is
removed; the next start rolls back the one and finishes the other.  Transitions of
one session are serialised by a per-session lock (service/session_locks.py), and each
is written as a compare-and-set on the status it was decided from: one decided on a
stale read (another process changed the session meanwhile) is refused, never written
over the newer state.  A session records where it is (its node and the runtime's name
for its sandbox) and when it was last active, so the idle clock outlives a restart.
A session belongs to the API key that created it; to any other key it does not exist
(not found, never forbidden: its existence is not revealed).

Nothing runs that nobody owns: a reaper stops or deletes sessions whose idle timeout
or maximum lifetime has passed, and removes sandboxes that no record owns (left by a
crash between two steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bastion.wire import MAX_METADATA_ITEMS, MAX_METADATA_LENGTH, ErrorCode, SessionStatus
from bastion_server import faults
from bastion_server.config import Limits, ServerConfig
from bastion_server.runtime.base import Runtime, SandboxError, SandboxLimits, SandboxUsage
from bastion_server.runtime.network import NetworkPolicy
from bastion_server.service.audit import AuditLog
from bastion_server.service.environment import merged_env, validate_env
from bastion_server.service.errors import ServiceError, invalid, session_not_found
from bastion_server.service.paging import Page, PageRequest, creation_key, take_page
from bastion_server.service.quotas import Quotas
from bastion_server.service.session_locks import LocalSessionLocks, SessionLocks
from bastion_server.store.sqlite import CREATING, SessionRecord, Store

if TYPE_CHECKING:
    from bastion_server.service.images import ChosenImage

log = logging.getLogger("bastion.sessions")

_NOT_DELETED: set[str] = {
    SessionStatus.CREATED,
    SessionStatus.RUNNING,
    SessionStatus.PAUSED,
    SessionStatus.STOPPED,
}
_ALLOWED: dict[str, set[str]] = {
    "start": {SessionStatus.CREATED, SessionStatus.STOPPED},
    "stop": {SessionStatus.RUNNING, SessionStatus.PAUSED},
    "pause": {SessionStatus.RUNNING},
    "resume": {SessionStatus.PAUSED},
    "restore": _NOT_DELETED,
    "delete": _NOT_DELETED,
}
_LIMIT_FIELDS = (
    ("memory_mb", 32, int),
    ("pids", 8, int),
    ("cpus", 0.01, float),
    ("disk_mb", 16, int),
)
_MAX_TIMEOUT = 365 * 24 * 3600.0
_MAX_ALLOW = 64
#: A CIDR / address (v4 or v6) or a DNS name; checked for real when the session starts.
_ALLOW_ENTRY = re.compile(r"[0-9A-Za-z.:\-/]{1,253}")
#: How often (in reaper rounds) the reaper also looks for unowned sandboxes.
_ORPHAN_SWEEP_EVERY = 60
#: Seconds between two writes of a session's last activity to the store: requests
#: touch a session on every call, and the store need not hear of each.  A restart
#: makes a session look idle for at most this much longer than it was.
ACTIVITY_WRITE_INTERVAL = 5.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _network_of(record: SessionRecord) -> NetworkPolicy:
    """The network policy a session's sandbox runs with."""
    return NetworkPolicy(
        enabled=bool(record.network.get("enabled")),
        allow=tuple(record.network.get("allow") or ()),
    )


def sandbox_failure(exc: SandboxError, code: ErrorCode, message: str) -> ServiceError:
    """``message`` as a ServiceError of the code the runtime gave the failure (an image
    no node holds: ``image_state``...), else of ``code``, the operation's own."""
    return ServiceError(ErrorCode(exc.code) if exc.code else code, message)


class StaleStatus(ServiceError):
    """A transition decided from a status the session no longer has: another process
    changed it meanwhile.  Nothing was written."""

    def __init__(self, session_id: str, expected: str, current: str | None) -> None:
        super().__init__(
            ErrorCode.SESSION_STATE,
            f"session {session_id!r} changed meanwhile: it is {current or 'gone'}, "
            f"no longer {expected}",
        )


class SessionService:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        config: ServerConfig,
        *,
        audit: AuditLog | None = None,
        base_env: dict[str, str] | None = None,
        locks: SessionLocks | None = None,
    ) -> None:
        self.store, self.runtime, self.config = store, runtime, config
        self.quotas = Quotas(store, config)
        self.audit = audit or AuditLog(None)
        #: The operator's --env-file: under every session's env.
        self.base_env = dict(base_env or {})
        #: This server's name, recorded on the sessions it creates (a cluster's runtime
        #: names the node of each instead).
        self.node = config.node_name or socket.gethostname()
        self.locks: SessionLocks = locks or LocalSessionLocks()
        #: Monotonic time of the last request or process that touched each session: a
        #: cache of the store's ``last_active_at``, written at most every
        #: ACTIVITY_WRITE_INTERVAL (the monotonic time of each's last write).
        self._last_active: dict[str, float] = {}
        self._activity_written: dict[str, float] = {}
        #: A paused session's idle seconds at its pause: its idle clock stands still
        #: while it is paused and goes on from there at its resume.  (Also told by the
        #: store: its last activity and updated_at, the time of the pause.)
        self._idle_at_pause: dict[str, float] = {}
        #: Called with (session_id, reason) before a session's sandbox goes away, so
        #: that running jobs and terminals end with that reason.
        self.before_sandbox_stops: list[Callable[[str, str], Awaitable[None]]] = []
        #: Called with each session's id once it is deleted (its sandbox removed).
        self.after_delete: list[Callable[[str], Awaitable[None]]] = []
        #: Each answers whether a session has work in progress (jobs, terminals): a
        #: busy session is never idle.
        self.busy_checks: list[Callable[[str], bool]] = []

    def owns(self, record: SessionRecord) -> bool:
        """Whether this server is the session's owner, the one whose reaper, restart and
        exit policy act on it: a cluster's gateway owns every session of its store (it
        places them on its nodes); another server those recorded with its node name
        (and those of servers that recorded none).  Another server's session is left
        to it: its sandbox is not this one's to see."""
        return self.config.ray is not None or record.node in (None, self.node)

    def touch(self, session_id: str) -> None:
        """Record activity on a session (it is not idle now); the store hears of it at
        most every ACTIVITY_WRITE_INTERVAL seconds."""
        now = time.monotonic()
        self._last_active[session_id] = now
        if now - self._activity_written.get(session_id, -math.inf) >= ACTIVITY_WRITE_INTERVAL:
            self._activity_written[session_id] = now
            self.store.set_last_active(session_id, time.time())

    def _last_activity(self, record: SessionRecord, now: float) -> float:
        """Monotonic time of the session's last activity: the later of this process's
        and the store's (written by an earlier server, or another process); ``now`` for
        a session of which neither knows (its clock starts now)."""
        last = self._last_active.get(record.id)
        if record.last_active_at is not None:
            stored = now - max(time.time() - record.last_active_at, 0.0)
            last = stored if last is None else max(last, stored)
        if last is None:
            last = self._last_active[record.id] = now
        return last

    def _forget_activity(self, session_id: str) -> None:
        self._last_active.pop(session_id, None)
        self._activity_written.pop(session_id, None)
        self._idle_at_pause.pop(session_id, None)

    # -- reads ----------------------------------------------------------------------

    def get(self, owner: str, session_id: str) -> SessionRecord:
        record = self.store.get_session(session_id)
        if record is None or record.owner != owner or record.status == CREATING:
            raise session_not_found(session_id)
        return record

    def list(self, owner: str, page: PageRequest) -> Page[SessionRecord]:
        """One page of the owner's sessions that are not deleted, oldest first."""
        rows = self.store.page_sessions(owner, page.after("sessions", 2), page.limit + 1)
        return take_page("sessions", rows, page.limit, creation_key)

    def require_running(self, owner: str, session_id: str) -> SessionRecord:
        record = self.get(owner, session_id)
        if record.status == SessionStatus.PAUSED:
            raise ServiceError(
                ErrorCode.SESSION_PAUSED,
                f"session {session_id!r} is paused; resume it first",
            )
        if record.status != SessionStatus.RUNNING:
            raise ServiceError(
                ErrorCode.SESSION_STATE,
                f"session {session_id!r} is {record.status}; it must be running for this "
                "operation (start it first)"
                if record.status != SessionStatus.DELETED
                else f"session {session_id!r} is deleted",
            )
        self.touch(session_id)
        return record

    async def usage(self, record: SessionRecord) -> SandboxUsage | None:
        if record.status not in (SessionStatus.RUNNING, SessionStatus.PAUSED):
            return None
        return await self.runtime.usage(record.id)

    # -- transitions ----------------------------------------------------------------

    def _limits(self, requested: dict[str, Any] | None) -> Limits:
        requested = dict(requested or {})
        d, m = self.config.default_limits, self.config.max_limits
        unknown = set(requested) - {name for name, _, _ in _LIMIT_FIELDS}
        if unknown:
            raise invalid(f"unknown limits: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, lowest, cast in _LIMIT_FIELDS:
            value = requested.get(name, getattr(d, name))
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise invalid(f"limits.{name} must be a number")
            if cast is int and value != int(value):
                raise invalid(f"limits.{name} must be a whole number")
            value = cast(value)
            if not math.isfinite(value) or value < lowest:
                raise invalid(f"limits.{name} must be at least {lowest}")
            if value > getattr(m, name):
                raise ServiceError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"limits.{name}={value} is above the server's maximum of {getattr(m, name)}",
                )
            values[name] = value
        return Limits(**values)

    def _network(self, requested: dict[str, Any]) -> NetworkPolicy:
        enabled = requested.get("enabled", False)
        allow = requested.get("allow") or []
        if not isinstance(enabled, bool):
            raise invalid("network.enabled must be true or false")
        if (
            not isinstance(allow, list)
            or len(allow) > _MAX_ALLOW
            or not all(isinstance(a, str) and _ALLOW_ENTRY.fullmatch(a) for a in allow)
        ):
            raise invalid(
                f"network.allow must be at most {_MAX_ALLOW} CIDRs or host names "
                '(such as "203.0.113.0/24" or "pypi.org")'
            )
        if allow and not enabled:
            raise invalid("network.allow needs network.enabled: true")
        if enabled and not self.config.allow_network:
            raise ServiceError(
                ErrorCode.LIMIT_EXCEEDED, "this server does not give sessions network access"
            )
        return NetworkPolicy(enabled=enabled, allow=tuple(allow))

    @staticmethod
    def _timeout(name: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"{name} must be a number of seconds or null")
        if not (math.isfinite(value) and 0 < value <= _MAX_TIMEOUT):
            raise invalid(f"{name} must be between 0 and {_MAX_TIMEOUT:.0f} seconds")
        return float(value)

    def _bounded_timeout(self, name: str, value: Any, default: float, most: float) -> float | None:
        """A session's timeout: its own within the server's maximum (``limit_exceeded``
        above it), else the server's default, else the maximum (0: none)."""
        chosen = self._timeout(name, value)
        if chosen is None:
            return default or most or None
        if most and chosen > most:
            raise ServiceError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{name}={chosen:g}s is above the server's maximum of {most:g}s",
            )
        return chosen

    async def create(
        self,
        owner: str,
        *,
        limits: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        idle_timeout: Any = None,
        max_lifetime: Any = None,
        on_timeout: str = "stop",
        network: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        paused_timeout: Any = None,
        snapshot: str | None = None,
        layers: Sequence[str] = (),
        image: ChosenImage | None = None,
    ) -> SessionRecord:
        """Create a session; with ``snapshot`` its files are that snapshot's, whose
        ``layers`` (top first) the caller has resolved (see SnapshotService)."""
        if idempotency_key is not None:
            if len(idempotency_key) > 255:
                raise invalid("Idempotency-Key must be at most 255 characters")
            existing = self.store.find_session_by_idempotency_key(owner, idempotency_key)
            if existing is not None and existing.status == CREATING:
                async with self.locks.hold(existing.id):  # its create is under way: wait
                    pass
                existing = self.store.find_session_by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return existing
        chosen = self._limits(limits)
        metadata = dict(metadata or {})
        if len(metadata) > MAX_METADATA_ITEMS or any(
            not isinstance(k, str)
            or not isinstance(v, str)
            or len(k) > MAX_METADATA_LENGTH
            or len(v) > MAX_METADATA_LENGTH
            for k, v in metadata.items()
        ):
            raise invalid(
                f"metadata must be at most {MAX_METADATA_ITEMS} string pairs "
                f"of at most {MAX_METADATA_LENGTH} characters"
            )
        if on_timeout not in ("stop", "delete"):
            raise invalid('on_timeout must be "stop" or "delete"')
        policy = self._network(network or {})
        validate_env(env)
        stamp = now_iso()
        record = SessionRecord(
            id=new_id("ses"),
            owner=owner,
            status=CREATING,
            limits=vars(chosen).copy(),
            metadata=metadata,
            created_at=stamp,
            updated_at=stamp,
            idempotency_key=idempotency_key,
            idle_timeout=self._bounded_timeout(
                "idle_timeout",
                idle_timeout,
                self.config.default_idle_timeout,
                self.config.max_idle_timeout,
            ),
            max_lifetime=self._bounded_timeout(
                "max_lifetime",
                max_lifetime,
                self.config.default_max_lifetime,
                self.config.max_session_lifetime,
            ),
            on_timeout=on_timeout,
            network={"enabled": policy.enabled, "allow": list(policy.allow)},
            paused_timeout=self._timeout("paused_timeout", paused_timeout),
            snapshot=snapshot,
            image=image.record if image is not None else None,
            node=self.node,  # its owner's, until the runtime says where it placed it
        )
        # All or nothing, across a crash too: the record comes first, as being created
        # (so nothing is made on the host that no record names), then the storage, then
        # one compare-and-set makes it a session.  A create that fails or is cut short
        # is rolled back: here, or by reconcile at the next start.
        self.quotas.check_new_session(owner)  # and no await until the insert
        async with self.locks.hold(record.id):
            self.store.insert_session(record)
            if env:  # part of the create: rolled back with it
                self.store.set_session_env(record.id, dict(env))
            faults.point("create.after_insert")
            try:
                await self.runtime.create(
                    record.id,
                    SandboxLimits(**record.limits),
                    image.sandbox if image is not None else None,
                    list(layers) if snapshot is not None else (),
                )
                faults.point("create.after_storage")
                record.node = self.runtime.node_of(record.id) or self.node
                record.sandbox = self.runtime.sandbox_ref(record.id)
            except BaseException as exc:
                await self._roll_back_create(record.id)
                if isinstance(exc, SandboxError):
                    message = f"could not allocate the session: {exc}"
                    raise sandbox_failure(exc, ErrorCode.SESSION_START_FAILED, message) from exc
                raise
            record.status, record.updated_at = SessionStatus.CREATED, now_iso()
            record.last_active_at = time.time()
            if not self.store.commit_created(
                record.id,
                record.updated_at,
                node=record.node,
                sandbox=record.sandbox,
                last_active_at=record.last_active_at,
            ):
                raise RuntimeError(f"session {record.id} left its creating state under its lock")
            faults.point("create.after_commit")
        self.audit.session_changed(record)
        self._last_active[record.id] = self._activity_written[record.id] = time.monotonic()
        log.info("session created", extra={"session_id": record.id})
        return record

    async def _roll_back_create(self, session_id: str) -> None:
        """Remove what an unfinished create made, then its record."""
        await self.runtime.delete(session_id)
        self.store.remove_creating_session(session_id)
        log.warning("session create rolled back", extra={"session_id": session_id})

    def _check_transition(self, record: SessionRecord, action: str) -> None:
        if record.status not in _ALLOWED[action]:
            raise ServiceError(
                ErrorCode.SESSION_STATE,
                f"cannot {action} session {record.id!r}: it is {record.status}",
            )

    def _set_status(
        self,
        record: SessionRecord,
        status: str,
        reason: str | None = None,
        *,
        active_at: float | None = None,
    ) -> None:
        """Record a transition from ``record.status`` (what it was decided from) to
        ``status``: a compare-and-set, StaleStatus if the session changed meanwhile.
        The session's last activity (monotonic ``active_at``, else what this process
        knows) is written with it."""
        if active_at is not None:
            self._last_active[record.id] = active_at
        now = time.monotonic()
        last = self._last_active.get(record.id)
        wall = None if last is None else time.time() - max(now - last, 0.0)
        updated_at = now_iso()
        if not self.store.update_session_status(
            record.id, status, updated_at, reason, expected=record.status, last_active_at=wall
        ):
            current = self.store.get_session(record.id)
            raise StaleStatus(record.id, record.status, current.status if current else None)
        if wall is not None:
            self._activity_written[record.id] = now
            record.last_active_at = wall
        record.status, record.status_reason, record.updated_at = status, reason, updated_at
        self.audit.session_changed(record, reason)

    def job_env(self, session_id: str, own: dict[str, str] | None = None) -> dict[str, str]:
        """What a job (or terminal) of the session runs with: the server's env file,
        the session's env, then its own, each overriding the one before."""
        return merged_env(self.base_env, self.store.session_env(session_id), own or {})

    async def start(self, owner: str, session_id: str) -> SessionRecord:
        async with self.locks.hold(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, "start")
            with self.quotas.starting(record.owner):
                await self._start_locked(record)
            return record

    async def _start_locked(self, record: SessionRecord) -> None:
        """Start the sandbox of a session whose lock is held, and record it running."""
        session_id = record.id
        try:
            await self.runtime.start(
                session_id, SandboxLimits(**record.limits), _network_of(record)
            )
        except SandboxError as exc:
            log.error("session start failed", extra={"session_id": session_id, "error": str(exc)})
            raise sandbox_failure(
                exc,
                ErrorCode.SESSION_START_FAILED,
                f"the sandbox of session {session_id!r} failed to start: {exc}",
            ) from exc
        faults.point("start.before_record")
        self._set_status(record, SessionStatus.RUNNING, active_at=time.monotonic())
        log.info("session started", extra={"session_id": session_id})

    async def _halt(self, session_id: str, reason: str) -> None:
        for hook in self.before_sandbox_stops:
            await hook(session_id, reason)

    async def _thaw_if_paused(self, record: SessionRecord) -> None:
        """Resume a paused session's processes before they are ended (a frozen agent
        could not end its jobs, and a frozen process dies only once thawed)."""
        self._idle_at_pause.pop(record.id, None)
        if record.status == SessionStatus.PAUSED:
            await self.runtime.resume(record.id)

    async def _stop_locked(self, record: SessionRecord, reason: str | None = None) -> None:
        await self._thaw_if_paused(record)
        await self._halt(record.id, "session_stopped")
        await self.runtime.stop(record.id)
        self._set_status(record, SessionStatus.STOPPED, reason)
        log.info("session stopped", extra={"session_id": record.id, "reason": reason})

    async def _delete_locked(self, record: SessionRecord, reason: str | None = None) -> None:
        # Recorded first: from here on the delete is carried through, across a crash
        # too (reap_orphans finishes what a deleted session left, at the next start).
        with contextlib.suppress(SandboxError):  # stop() thaws it anyway
            await self._thaw_if_paused(record)
        self._set_status(record, SessionStatus.DELETED, reason)
        self._forget_activity(record.id)
        faults.point("delete.after_record")
        try:
            await self._remove(record.id)
        except SandboxError as exc:  # recorded deleted: the sweep retries
            log.error(
                "session's sandbox not removed yet",
                extra={"session_id": record.id, "error": str(exc)},
            )
        log.info("session deleted", extra={"session_id": record.id, "reason": reason})

    async def _remove(self, session_id: str) -> None:
        """Everything of a deleted session: its jobs and terminals, then its sandbox."""
        await self._halt(session_id, "session_deleted")
        faults.point("delete.after_halt")
        await self.runtime.delete(session_id)

    async def stop(self, owner: str, session_id: str) -> SessionRecord:
        async with self.locks.hold(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, "stop")
            await self._stop_locked(record)
            return record

    async def pause(self, owner: str, session_id: str) -> SessionRecord:
        """Freeze every process of a running session: ``running`` -> ``paused``.

        Its jobs and terminals are kept, frozen where they are; new jobs, terminals
        and file operations are refused (``session_paused``) until it is resumed.
        Uploads and downloads already under way go on (the server moves their bytes,
        no process of the session)."""
        return await self._freeze_or_thaw(owner, session_id, "pause")

    async def resume(self, owner: str, session_id: str) -> SessionRecord:
        """Thaw a paused session: ``paused`` -> ``running``; what ran goes on."""
        return await self._freeze_or_thaw(owner, session_id, "resume")

    async def _freeze_or_thaw(self, owner: str, session_id: str, action: str) -> SessionRecord:
        """Pause or resume under the session's lock; its idle clock stands still between."""
        async with self.locks.hold(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, action)
            step = self.runtime.pause if action == "pause" else self.runtime.resume
            try:
                await step(session_id)
            except SandboxError as exc:
                raise sandbox_failure(
                    exc, ErrorCode.SESSION_STATE, f"cannot {action} session {session_id!r}: {exc}"
                ) from exc
            now = time.monotonic()
            if action == "pause":
                last = self._last_activity(record, now)
                self._set_status(record, SessionStatus.PAUSED, active_at=last)
                self._idle_at_pause[session_id] = now - last
            else:
                idle = self._idle_at_pause.pop(session_id, None)
                if idle is None:  # paused by an earlier server: the store tells
                    paused_at = _epoch(record.updated_at)
                    idle = max(paused_at - (record.last_active_at or paused_at), 0.0)
                self._set_status(record, SessionStatus.RUNNING, active_at=now - idle)
            log.info(f"session {action}d", extra={"session_id": session_id})
            return record

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        """Copy a session's files as snapshot ``snapshot_id`` (see Runtime.capture),
        under its lock: no start, stop or restore runs meanwhile.  Returns its size."""
        async with self.locks.hold(session_id):
            record = self.store.get_session(session_id)
            if record is None or record.status in (SessionStatus.DELETED, CREATING):
                raise session_not_found(session_id)
            return await self.runtime.capture(session_id, snapshot_id)

    async def restore(
        self, owner: str, session_id: str, snapshot_id: str, layers: Sequence[str]
    ) -> SessionRecord:
        """Reset a session's files to snapshot ``snapshot_id`` (``layers``, top first):
        a running or paused one is stopped (its jobs and terminals end, as at a stop),
        given the snapshot's files and started again; another keeps its state.  One the
        runtime refuses the layers for (``check_layers``: a snapshot on another node)
        is left as it was, not stopped."""
        async with self.locks.hold(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, "restore")
            was_up = record.status in (SessionStatus.RUNNING, SessionStatus.PAUSED)

            def refused(exc: SandboxError) -> ServiceError:
                return sandbox_failure(
                    exc,
                    ErrorCode.SESSION_START_FAILED,
                    f"session {session_id!r} could not be given snapshot {snapshot_id!r}'s "
                    f"files: {exc}",
                )

            try:
                await self.runtime.check_layers(session_id, list(layers))
            except SandboxError as exc:
                raise refused(exc) from exc
            if was_up:
                await self._restart_over(record, layers, refused)
            else:
                try:
                    await self.runtime.set_layers(session_id, list(layers))
                except SandboxError as exc:
                    raise refused(exc) from exc
            self.store.set_session_snapshot(session_id, snapshot_id)
            record.snapshot = snapshot_id
            log.info("session restored", extra={"session_id": session_id, "snapshot": snapshot_id})
            return record

    async def _restart_over(
        self,
        record: SessionRecord,
        layers: Sequence[str],
        refused: Callable[[SandboxError], ServiceError],
    ) -> None:
        """A running (or paused) session's restore, its lock held: its jobs and
        terminals end as at a stop, then the runtime starts its sandbox again over
        ``layers`` in one operation (``Runtime.restore``); it stays ``running`` (one
        store write), or is recorded ``stopped`` if that failed."""
        await self._thaw_if_paused(record)
        await self._halt(record.id, "session_stopped")
        try:
            with self.quotas.starting(record.owner):
                await self.runtime.restore(
                    record.id, list(layers), SandboxLimits(**record.limits), _network_of(record)
                )
        except SandboxError as exc:
            self._set_status(record, SessionStatus.STOPPED, "restore failed")
            raise refused(exc) from exc
        self._set_status(
            record, SessionStatus.RUNNING, "restored to a snapshot", active_at=time.monotonic()
        )

    async def delete(self, owner: str, session_id: str) -> SessionRecord:
        async with self.locks.hold(session_id):
            record = self.get(owner, session_id)
            self._check_transition(record, "delete")
            await self._delete_locked(record)
        self.locks.forget(session_id)
        for hook in self.after_delete:
            await hook(session_id)
        return record

    async def retire_all(self, action: str, reason: str) -> int:
        """Stop every running session (``action="stop"``) or delete every session
        (``"delete"``), each with ``reason``: the server's exit policy.  Returns how
        many it did."""
        done = 0
        for listed in filter(self.owns, self.store.list_sessions()):
            async with self.locks.hold(listed.id):
                record = self.store.get_session(listed.id)
                if record is None or record.status not in _ALLOWED[action]:
                    continue
                try:
                    if action == "delete":
                        await self._delete_locked(record, reason)
                    else:
                        await self._stop_locked(record, reason)
                except StaleStatus as exc:  # another process has it: its to retire
                    log.warning(
                        "session not retired", extra={"session_id": record.id, "error": str(exc)}
                    )
                    continue
                done += 1
        return done

    # -- lifetimes ------------------------------------------------------------------

    def _expiry_reason(self, record: SessionRecord, now_wall: float, now: float) -> str | None:
        if record.max_lifetime is not None and now_wall - _epoch(record.created_at) >= (
            record.max_lifetime
        ):
            return f"its maximum lifetime of {record.max_lifetime:g}s passed"
        if record.idle_timeout is not None and record.status == SessionStatus.RUNNING:
            if any(check(record.id) for check in self.busy_checks):
                self.touch(record.id)
                return None
            if now - self._last_activity(record, now) >= record.idle_timeout:
                return f"it was idle for {record.idle_timeout:g}s"
        if (
            record.paused_timeout is not None
            and record.status == SessionStatus.PAUSED
            # updated_at is when it was paused: a paused session changes no further.
            and now_wall - _epoch(record.updated_at) >= record.paused_timeout
        ):
            return f"it was paused for {record.paused_timeout:g}s"
        return None

    async def expire_sessions(self) -> None:
        """Stop or delete every session whose idle timeout or lifetime has passed."""
        now_wall, now = time.time(), time.monotonic()
        for record in filter(self.owns, self.store.list_expirable_sessions()):
            reason = self._expiry_reason(record, now_wall, now)
            if reason is None:
                continue
            async with self.locks.hold(record.id):
                current = self.store.get_session(record.id)
                if current is None or current.status in (SessionStatus.DELETED, CREATING):
                    continue
                try:
                    if current.on_timeout == "delete":
                        await self._delete_locked(current, f"deleted because {reason}")
                    elif current.status in _ALLOWED["stop"]:
                        await self._stop_locked(current, f"stopped because {reason}")
                except StaleStatus as exc:  # changed meanwhile: the next round looks again
                    log.warning(
                        "session not expired", extra={"session_id": record.id, "error": str(exc)}
                    )

    async def sandbox_lost(self, session_id: str, reason: str) -> None:
        """The session's sandbox went with its node (a cluster's node that died): its
        jobs and terminals end (``node_lost``) and it is recorded deleted, with
        ``reason`` saying so.  Should the node come back, what it left is removed
        (reap_orphans, as for any deleted session)."""
        async with self.locks.hold(session_id):
            record = self.store.get_session(session_id)
            if record is None or record.status in (SessionStatus.DELETED, CREATING):
                return
            await self._halt(session_id, "node_lost")
            self._set_status(record, SessionStatus.DELETED, reason)
            self._forget_activity(session_id)
        log.warning("session lost", extra={"session_id": session_id, "reason": reason})

    async def check_sandbox(self, session_id: str) -> None:
        """Mark a session stopped if its sandbox died under it (crash, OOM of PID 1)."""
        async with self.locks.hold(session_id):
            record = self.store.get_session(session_id)
            if record is None or record.status != SessionStatus.RUNNING:
                return
            if await self.runtime.is_running(session_id):
                return
            await self._halt(session_id, "session_stopped")
            await self.runtime.stop(session_id)
            self._set_status(
                record,
                SessionStatus.STOPPED,
                "the sandbox exited unexpectedly; start the session again (files are kept)",
            )
            log.warning("sandbox died", extra={"session_id": session_id})

    async def check_running_sandboxes(self) -> None:
        """check_sandbox for every session recorded running whose sandbox is not."""
        running = await self.runtime.running_sandboxes()
        for record in filter(self.owns, self.store.list_sessions()):
            if record.status == SessionStatus.RUNNING and record.id not in running:
                await self.check_sandbox(record.id)  # looks again, under the lock

    async def _adopt_freezer_state(self, record: SessionRecord) -> None:
        """Make an adopted sandbox frozen as its record says: a crash between a freeze
        and its record (or a thaw and its) left them apart.  One that cannot be put
        right is stopped."""
        try:
            if record.status == SessionStatus.PAUSED:
                await self.runtime.pause(record.id)
            else:
                await self.runtime.resume(record.id)
        except SandboxError as exc:
            log.error("sandbox freezer state not restored", extra={"session_id": record.id})
            await self._stop_locked(record, f"could not be adopted when the server started: {exc}")

    async def reap_orphans(self) -> None:
        """Remove sandboxes that no live record owns: what a crash mid-operation left
        (a create not finished, a delete cut short), or a sandbox of no record at all."""
        for sandbox_id in await self.runtime.list_sandboxes():
            if self.locks.is_held(sandbox_id):
                continue  # being created or deleted right now
            record = self.store.get_session(sandbox_id)
            if record is None:
                log.warning("removing unowned sandbox", extra={"session_id": sandbox_id})
                await self.runtime.delete(sandbox_id)
            elif record.status == CREATING:
                async with self.locks.hold(sandbox_id):
                    await self._roll_back_create(sandbox_id)
            elif record.status == SessionStatus.DELETED:
                log.warning("finishing a delete", extra={"session_id": sandbox_id})
                async with self.locks.hold(sandbox_id):
                    await self._remove(sandbox_id)
                self.locks.forget(sandbox_id)

    async def run_reaper(self) -> None:
        """Forever: expire sessions every round, sweep for orphans now and then, and
        give the store's space back after deletes (in a worker thread)."""
        rounds = 0
        while True:
            await asyncio.sleep(self.config.reaper_interval)
            rounds += 1
            try:
                await self.expire_sessions()
                if self.store.space_to_reclaim:
                    await asyncio.to_thread(self.store.reclaim_space)
                if rounds % _ORPHAN_SWEEP_EVERY == 0:
                    await self.reap_orphans()
                    await self.check_running_sandboxes()
            except Exception:  # the reaper must outlive any one bad round
                log.exception("reaper round failed")

    # -- restart --------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make records and sandboxes agree after a (re)start of the server.

        A session recorded as running whose sandbox still runs is adopted, once its
        network (rules and helper) is checked against its recorded policy and put back
        where missing: one whose network cannot be restored is stopped, never left
        running open.  One whose sandbox is gone is marked stopped (its files are kept),
        or lost with its machine (a cluster's node gone: ``Runtime.adopt_placements``).
        A sandbox running for a session recorded as stopped is stopped; one that no live
        record owns is removed.  A create the crash cut short is rolled back (the
        session is not there), and a delete it cut short is finished.
        """
        for record in filter(self.owns, self.store.list_creating_sessions()):
            await self._roll_back_create(record.id)  # cut short by the crash: not made
        # Where each session is, as recorded: a cluster's sessions of a node gone since
        # are reported lost (sandbox_lost) here, before they could be taken for stopped.
        owned = filter(self.owns, self.store.list_sessions())
        await self.runtime.adopt_placements({r.id: r.node for r in owned if r.node is not None})
        running_now = await self.runtime.running_sandboxes()
        started = await self.runtime.started_sandboxes()
        for record in filter(self.owns, self.store.list_sessions()):
            try:
                await self._reconcile_session(record, record.id in running_now, started)
            except StaleStatus as exc:  # another process changed it: that one has it
                log.warning(
                    "session not reconciled", extra={"session_id": record.id, "error": str(exc)}
                )
        await self.reap_orphans()

    async def _reconcile_session(
        self, record: SessionRecord, running: bool, started: set[str]
    ) -> None:
        """reconcile for one session (``running``: its sandbox runs)."""
        up = record.status in (SessionStatus.RUNNING, SessionStatus.PAUSED)
        if up and running:
            try:
                await self.runtime.restore_network(record.id, _network_of(record))
            except Exception as exc:  # any failure: the sandbox must not stay up
                log.error(
                    "session network not restored",
                    extra={"session_id": record.id, "error": str(exc)},
                )
                try:
                    await self.runtime.stop(record.id)
                except Exception as stop_exc:  # recorded stopped: the next start retries
                    log.error(
                        "session stop failed",
                        extra={"session_id": record.id, "error": str(stop_exc)},
                    )
                self._set_status(
                    record,
                    SessionStatus.STOPPED,
                    f"its network could not be restored when the server started: {exc}",
                )
                return
            await self._adopt_freezer_state(record)
            log.info("session adopted", extra={"session_id": record.id})
            return
        if up or record.id in started:
            # Unmount what a dead sandbox, or a start cut short, left.
            log.info(
                "stopping what a run left",
                extra={"session_id": record.id, "status": record.status},
            )
            await self.runtime.stop(record.id)
        if up:
            self._set_status(
                record,
                SessionStatus.STOPPED,
                "the sandbox was not running when the server started",
            )
            log.warning("session marked stopped", extra={"session_id": record.id})
