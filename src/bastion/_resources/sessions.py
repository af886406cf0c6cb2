"""``bastion.sessions``: the lifecycle of sessions (sync and async).

The requests of the session endpoints come first, shared by :class:`Sessions` and
:class:`AsyncSessions`; the two classes only send them.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Literal, cast

from .._base import (
    APIRequest,
    Attempts,
    BaseBastion,
    docs_from,
    given_fields,
    new_idempotency_key,
)
from .._exceptions import BastionError, SessionStateError
from .._pages import merge_pages, page_params, wants_every_page
from ..wire import (
    IDEMPOTENCY_HEADER,
    MAX_PAGE_SIZE,
    CreateSessionRequest,
    ExpiryAction,
    ForkResult,
    NetworkRequest,
    ProcessInfo,
    ProcessList,
    SessionInfo,
    SessionLimits,
    SessionList,
    SessionStatus,
    SnapshotInfo,
)
from .snapshots import fork_request, restore_request, take_snapshot_request

if TYPE_CHECKING:
    from .._client import AsyncBastion, Bastion


def session_url(session_id: str, *rest: str) -> str:
    """The path of session ``session_id``, or of ``rest`` below it (jobs, files...)."""
    return BaseBastion._url("sessions", session_id, *rest)


def create_session_body(
    limits: SessionLimits | None,
    metadata: Mapping[str, str] | None,
    *,
    idle_timeout: float | None = None,
    max_lifetime: float | None = None,
    on_timeout: ExpiryAction | None = None,
    network: NetworkRequest | None = None,
    env: Mapping[str, str] | None = None,
    paused_timeout: float | None = None,
    snapshot: str | None = None,
    image: str | None = None,
) -> CreateSessionRequest:
    """The body of ``POST /sessions``: only what was given."""
    fields = given_fields(
        limits=limits,
        metadata=None if metadata is None else dict(metadata),
        idle_timeout=idle_timeout,
        max_lifetime=max_lifetime,
        on_timeout=on_timeout,
        network=network,
        env=None if env is None else dict(env),
        paused_timeout=paused_timeout,
        snapshot=snapshot,
        image=image,
    )
    return cast(CreateSessionRequest, fields)


def create_session_request(body: CreateSessionRequest, idempotency_key: str | None) -> APIRequest:
    """``POST /sessions``: safe to retry, the key makes the server create it once.

    The key is chosen here, once per call, so every attempt carries the same one.
    """
    return APIRequest(
        "POST",
        BaseBastion._url("sessions"),
        json=body,
        headers={IDEMPOTENCY_HEADER: idempotency_key or new_idempotency_key()},
    )


def get_session_request(session_id: str) -> APIRequest:
    return APIRequest("GET", session_url(session_id))


def list_sessions_request(limit: int | None = None, cursor: str | None = None) -> APIRequest:
    return APIRequest("GET", BaseBastion._url("sessions"), params=page_params(limit, cursor))


SessionAction = Literal["start", "stop", "pause", "resume", "delete"]

#: The status each action leaves a session in.
SESSION_ACTION_TARGETS: dict[SessionAction, SessionStatus] = {
    "start": SessionStatus.RUNNING,
    "stop": SessionStatus.STOPPED,
    "pause": SessionStatus.PAUSED,
    "resume": SessionStatus.RUNNING,
    "delete": SessionStatus.DELETED,
}


def session_action_request(session_id: str, action: SessionAction) -> APIRequest:
    """``POST .../start``, ``POST .../stop`` or ``DELETE``: idempotent in effect.

    A repeat after a lost answer is refused as ``session_state`` (the session is
    already there); :func:`session_action_recovered` tells when that is success.
    """
    if action == "delete":
        return APIRequest("DELETE", session_url(session_id))
    return APIRequest("POST", session_url(session_id, action))


def session_action_recovered(error: BastionError, attempts: Attempts) -> bool:
    """Whether ``error`` may mean an earlier attempt of a session action did its work.

    If so, the caller reads the session and returns it when it is in the action's
    target state (:data:`SESSION_ACTION_TARGETS`), else raises ``error``.
    """
    return attempts.may_have_taken_effect and isinstance(error, SessionStateError)


def session_reached(action: SessionAction, info: SessionInfo) -> bool:
    return info["status"] == SESSION_ACTION_TARGETS[action]


def processes_request(session_id: str) -> APIRequest:
    return APIRequest("GET", session_url(session_id, "processes"))


class Sessions:
    """Create, inspect, start, stop, pause, resume and delete sessions
    (``bastion.sessions``).

    ``start``, ``stop``, ``pause``, ``resume`` and ``delete`` are retried like reads
    after a lost answer: if the retry is refused because the session is already where
    the action takes it (an earlier attempt did the work), the session's info is
    returned as success.
    """

    def __init__(self, client: Bastion) -> None:
        self._client = client

    def create(
        self,
        *,
        limits: SessionLimits | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        on_timeout: ExpiryAction | None = None,
        network: NetworkRequest | None = None,
        env: Mapping[str, str] | None = None,
        paused_timeout: float | None = None,
        snapshot: str | None = None,
        image: str | None = None,
    ) -> SessionInfo:
        """Create a session (status ``"created"``; call :meth:`start` to run it).

        Args:
            limits: Resource limits (``memory_mb``, ``pids``, ``cpus``, ``disk_mb``);
                omitted fields take the server's defaults.
            metadata: Free-form string labels stored with the session.
            idle_timeout: Seconds without activity (no job, terminal or request) after
                which the server stops the session (or deletes it, see ``on_timeout``).
            max_lifetime: Seconds after creation when the same happens regardless.
            snapshot: Start from this snapshot's files (a ``"ready"`` snapshot of this
                key: see :meth:`snapshot`); its image too.
            image: The image to run (``bastion.images``: a ready image of this key,
                or a shared one such as ``"python"``); default: the server's default.
            paused_timeout: Seconds a paused session may stay paused before the same
                happens (none by default).  Paused time is not idle time: the idle
                clock stands still while the session is paused.
            on_timeout: ``"stop"`` (default; files kept) or ``"delete"``.
            network: Outbound network, off by default: ``{"enabled": True}`` and
                optionally ``"allow": ["203.0.113.0/24", "pypi.org"]``.  A session never
                reaches the host's own addresses.
            env: Environment variables every job and terminal of the session gets
                (over the server's ``--env-file``; a job's own ``env`` overrides them).
                Kept secret: the session's info never shows them.
            idempotency_key: Sent as the ``Idempotency-Key`` header; a fresh one is made
                per call and kept across its retries, so a retry never makes a second
                session.  Pass your own to retry a create yourself after an error
                (for example :class:`APIConnectionError`).  A create is all or
                nothing, even if the server dies in the middle of it: after its
                restart the session is there whole or not at all (a retry with the
                same key then makes it).

        Returns:
            The new session's ``SessionInfo``.

        Raises:
            InvalidRequestError: The limits are invalid or over the server's maximum.
            QuotaExceededError: The key's tenant has as many sessions as it may.
            SnapshotNotFoundError: ``snapshot`` is no snapshot of this key.
            SnapshotStateError: ``snapshot`` is not ready (being made, or failed).
            ImageNotFoundError: No image of that name for this key.
            ImageStateError: The image is not ready (building, or failed).
            APIConnectionError: The server cannot be reached.
        """
        body = create_session_body(
            limits,
            metadata,
            idle_timeout=idle_timeout,
            max_lifetime=max_lifetime,
            on_timeout=on_timeout,
            network=network,
            env=env,
            paused_timeout=paused_timeout,
            snapshot=snapshot,
            image=image,
        )
        data = self._client._request(create_session_request(body, idempotency_key))
        return cast(SessionInfo, data)

    def get(self, session_id: str) -> SessionInfo:
        """Get one session.

        Args:
            session_id: The session's id.

        Returns:
            The session's ``SessionInfo``.

        Raises:
            SessionNotFoundError: No session has this id.
        """
        return cast(SessionInfo, self._client._request(get_session_request(session_id)))

    def status(self, session_id: str) -> SessionInfo:
        """Alias of :meth:`get`: the session's info, whose ``"status"`` is its state."""
        return self.get(session_id)

    def processes(self, session_id: str) -> list[ProcessInfo]:
        """Every process of a running session now: ``pid``, ``ppid``, ``user``,
        ``command``, ``cpu_seconds``, ``memory_bytes`` and the ``job_id`` of the
        running job it belongs to (None for the sandbox's own).

        Returns:
            The processes, each a ``ProcessInfo``, in pid order.

        Raises:
            SessionStateError: The session is not running.
        """
        answer = cast(ProcessList, self._client._request(processes_request(session_id)))
        return answer["processes"]

    def start(self, session_id: str) -> SessionInfo:
        """Start a created or stopped session; its status becomes ``"running"``.

        Args:
            session_id: The session's id.

        Returns:
            The session's ``SessionInfo`` after the start.

        Raises:
            SessionNotFoundError: No session has this id.
            SessionStateError: The session cannot be started from its state (deleted).
            SessionStartError: The server could not start the sandbox.
        """
        return self._act(session_id, "start")

    def stop(self, session_id: str) -> SessionInfo:
        """Stop a running session; its files are kept, its processes are killed.

        Uploads and downloads in progress end at once, unfinished (an upload writes
        nothing and raises SessionStateError, code ``session_stopped``; a download
        is cut short); the stop does not wait for their clients.

        Args:
            session_id: The session's id.

        Returns:
            The session's ``SessionInfo`` (status ``"stopped"``).

        Raises:
            SessionNotFoundError: No session has this id.
            SessionStateError: The session cannot be stopped from its state.
        """
        return self._act(session_id, "stop")

    def pause(self, session_id: str) -> SessionInfo:
        """Freeze every process of a running session; its status becomes ``"paused"``.

        Memory is kept and no CPU is used; a job running at the pause stands still
        (its timers do not fire) and goes on at :meth:`resume` with its whole output.
        While paused, new jobs, terminals and file operations are refused with
        SessionStateError (code ``session_paused``); the session may be stopped or
        deleted.  Its idle timeout does not run while paused (see ``paused_timeout``).

        Args:
            session_id: The session's id.

        Returns:
            The session's ``SessionInfo`` (status ``"paused"``).

        Raises:
            SessionNotFoundError: No session has this id.
            SessionStateError: The session is not running.
        """
        return self._act(session_id, "pause")

    def resume(self, session_id: str) -> SessionInfo:
        """Thaw a paused session; its status becomes ``"running"`` again.

        Args:
            session_id: The session's id.

        Returns:
            The session's ``SessionInfo`` (status ``"running"``).

        Raises:
            SessionNotFoundError: No session has this id.
            SessionStateError: The session is not paused.
        """
        return self._act(session_id, "resume")

    def snapshot(
        self, session_id: str, *, name: str | None = None, wait: bool = True
    ) -> SnapshotInfo:
        """Snapshot a session's files: the image plus everything written since.

        Consistent while it runs: its processes are frozen for the copy (typically
        milliseconds to a few hundred for 100 MB), so a write in flight is in the
        snapshot or not, never torn; memory and processes are not part of it (see
        :meth:`pause`).  Works on created, running, paused and stopped sessions.  The
        snapshot belongs to this key and outlives the session.

        Args:
            session_id: The session's id.
            name: A label of your own.
            wait: Return once the snapshot is ``"ready"`` (or ``"failed"``, with
                ``status_reason``); with False at once, ``"creating"``: poll
                ``bastion.snapshots.get``.

        Returns:
            The snapshot's ``SnapshotInfo``.

        Raises:
            SessionNotFoundError: No session has this id.
            QuotaExceededError: The key's snapshots take their quota of disk.
            InvalidRequestError: The session stands on too many snapshots already.
        """
        request = take_snapshot_request(session_id, name, wait)
        return cast(SnapshotInfo, self._client._request(request))

    def fork(self, session_id: str, count: int = 1, *, name: str | None = None) -> ForkResult:
        """Snapshot a session and start ``count`` running copies of it, in one call.

        The copies have the session's files, limits, timeouts, network, metadata and
        env; each one's writes are its own.  All are made, or none (and an error).

        Args:
            session_id: The session's id.
            count: How many copies (1 to ``bastion.wire.MAX_FORK_COUNT``).
            name: The snapshot's name.

        Returns:
            ``{"snapshot": SnapshotInfo, "sessions": [SessionInfo, ...]}``; the
            snapshot is kept (delete it with ``bastion.snapshots.delete`` when done).

        Raises:
            SessionNotFoundError: No session has this id.
            SnapshotStateError: The snapshot failed.
            QuotaExceededError: The copies would pass a session quota.
        """
        return cast(ForkResult, self._client._request(fork_request(session_id, count, name)))

    def restore(self, session_id: str, snapshot_id: str) -> SessionInfo:
        """Reset a session's files to a snapshot's: the RL "reset".

        A running (or paused) session's jobs and terminals are ended first, as at a
        stop, and it is started again on the snapshot's files; a created or stopped
        session keeps its state.  Any ready snapshot of this key will do, not only
        one of this session.

        Returns:
            The session's ``SessionInfo`` (``"snapshot"`` is ``snapshot_id``).

        Raises:
            SessionNotFoundError: No session has this id.
            SnapshotNotFoundError: No snapshot of this key has ``snapshot_id``.
            SnapshotStateError: The snapshot is not ready.
        """
        request = restore_request(session_id, snapshot_id)
        return cast(SessionInfo, self._client._request(request))

    def delete(self, session_id: str) -> SessionInfo:
        """Delete a session and everything in it.  This cannot be undone.

        Uploads and downloads in progress end at once, as with :meth:`stop`.  Once
        the server has begun, the delete is carried through: the session shows
        ``"deleted"`` from then on, and if the server dies mid-way it removes the
        rest when it starts again.

        Args:
            session_id: The session's id.

        Returns:
            The session's final ``SessionInfo`` (status ``"deleted"``).

        Raises:
            SessionNotFoundError: No session has this id.
            SessionStateError: The session is already deleted.
        """
        return self._act(session_id, "delete")

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> SessionList:
        """List the sessions that are not deleted, oldest first.

        Without ``limit`` and ``cursor``: every session, fetched page after page.  With
        either: one page, as the server answers it.

        Args:
            limit: At most this many sessions (1 to 1000, ``bastion.wire.MAX_PAGE_SIZE``;
                the server's default 100).
            cursor: The ``next_cursor`` of the page before; none for the first page.

        Returns:
            ``{"sessions": [SessionInfo, ...], "next_cursor": str | None}``: the cursor
            of the next page, None after the last (and always for the whole list).

        Raises:
            InvalidRequestError: ``limit`` is out of range, or ``cursor`` is not one of
                this list's (code ``invalid_cursor``).
        """
        if wants_every_page(limit, cursor):
            pages = self._client._pages(functools.partial(list_sessions_request, MAX_PAGE_SIZE))
            return cast(SessionList, merge_pages(pages, "sessions"))
        return cast(SessionList, self._client._request(list_sessions_request(limit, cursor)))

    def iter_all(self, *, page_size: int = MAX_PAGE_SIZE) -> Iterator[SessionInfo]:
        """Every session that is not deleted, oldest first, each page fetched as the
        loop reaches it (sessions created meanwhile come at the end).

        Args:
            page_size: Sessions per request (1 to 1000, the default).

        Yields:
            ``SessionInfo`` after ``SessionInfo``.
        """
        for page in self._client._pages(functools.partial(list_sessions_request, page_size)):
            yield from page["sessions"]

    def _act(self, session_id: str, action: SessionAction) -> SessionInfo:
        request = session_action_request(session_id, action)
        attempts = self._client._attempts(request)
        try:
            return cast(SessionInfo, self._client._request(request, attempts=attempts))
        except BastionError as exc:
            if not session_action_recovered(exc, attempts):
                raise
            info = self.get(session_id)
            if not session_reached(action, info):
                raise
            return info


@docs_from(Sessions)
class AsyncSessions:
    """Create, inspect, start, stop and delete sessions (``bastion.sessions``).

    The async twin of :class:`Sessions`: the same methods, as coroutines.
    """

    def __init__(self, client: AsyncBastion) -> None:
        self._client = client

    async def create(
        self,
        *,
        limits: SessionLimits | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        on_timeout: ExpiryAction | None = None,
        network: NetworkRequest | None = None,
        env: Mapping[str, str] | None = None,
        paused_timeout: float | None = None,
        snapshot: str | None = None,
        image: str | None = None,
    ) -> SessionInfo:
        body = create_session_body(
            limits,
            metadata,
            idle_timeout=idle_timeout,
            max_lifetime=max_lifetime,
            on_timeout=on_timeout,
            network=network,
            env=env,
            paused_timeout=paused_timeout,
            snapshot=snapshot,
            image=image,
        )
        data = await self._client._request(create_session_request(body, idempotency_key))
        return cast(SessionInfo, data)

    async def get(self, session_id: str) -> SessionInfo:
        return cast(SessionInfo, await self._client._request(get_session_request(session_id)))

    async def status(self, session_id: str) -> SessionInfo:
        return await self.get(session_id)

    async def processes(self, session_id: str) -> list[ProcessInfo]:
        answer = cast(ProcessList, await self._client._request(processes_request(session_id)))
        return answer["processes"]

    async def start(self, session_id: str) -> SessionInfo:
        return await self._act(session_id, "start")

    async def stop(self, session_id: str) -> SessionInfo:
        return await self._act(session_id, "stop")

    async def pause(self, session_id: str) -> SessionInfo:
        return await self._act(session_id, "pause")

    async def resume(self, session_id: str) -> SessionInfo:
        return await self._act(session_id, "resume")

    async def snapshot(
        self, session_id: str, *, name: str | None = None, wait: bool = True
    ) -> SnapshotInfo:
        request = take_snapshot_request(session_id, name, wait)
        return cast(SnapshotInfo, await self._client._request(request))

    async def fork(self, session_id: str, count: int = 1, *, name: str | None = None) -> ForkResult:
        data = await self._client._request(fork_request(session_id, count, name))
        return cast(ForkResult, data)

    async def restore(self, session_id: str, snapshot_id: str) -> SessionInfo:
        request = restore_request(session_id, snapshot_id)
        return cast(SessionInfo, await self._client._request(request))

    async def delete(self, session_id: str) -> SessionInfo:
        return await self._act(session_id, "delete")

    async def list(self, *, limit: int | None = None, cursor: str | None = None) -> SessionList:
        if wants_every_page(limit, cursor):
            request_for = functools.partial(list_sessions_request, MAX_PAGE_SIZE)
            pages = [page async for page in self._client._pages(request_for)]
            return cast(SessionList, merge_pages(pages, "sessions"))
        return cast(SessionList, await self._client._request(list_sessions_request(limit, cursor)))

    async def iter_all(self, *, page_size: int = MAX_PAGE_SIZE) -> AsyncIterator[SessionInfo]:
        request_for = functools.partial(list_sessions_request, page_size)
        async for page in self._client._pages(request_for):
            for session in page["sessions"]:
                yield session

    async def _act(self, session_id: str, action: SessionAction) -> SessionInfo:
        request = session_action_request(session_id, action)
        attempts = self._client._attempts(request)
        try:
            return cast(SessionInfo, await self._client._request(request, attempts=attempts))
        except BastionError as exc:
            if not session_action_recovered(exc, attempts):
                raise
            info = await self.get(session_id)
            if not session_reached(action, info):
                raise
            return info
