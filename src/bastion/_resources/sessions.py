"""``bastion.sessions``: the lifecycle of sessions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from .._base import create_session_body, new_idempotency_key
from ..wire import (
    IDEMPOTENCY_HEADER,
    ExpiryAction,
    NetworkRequest,
    SessionInfo,
    SessionLimits,
    SessionList,
)

if TYPE_CHECKING:
    from .._client import Bastion


class Sessions:
    """Create, inspect, start, stop and delete sessions (``bastion.sessions``)."""

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
    ) -> SessionInfo:
        """Create a session (status ``"created"``; call :meth:`start` to run it).

        Args:
            limits: Resource limits (``memory_mb``, ``pids``, ``cpus``, ``disk_mb``);
                omitted fields take the server's defaults.
            metadata: Free-form string labels stored with the session.
            idle_timeout: Seconds without activity (no job, terminal or request) after
                which the server stops the session (or deletes it, see ``on_timeout``).
            max_lifetime: Seconds after creation when the same happens regardless.
            on_timeout: ``"stop"`` (default; files kept) or ``"delete"``.
            network: Outbound network, off by default: ``{"enabled": True}`` and
                optionally ``"allow": ["203.0.113.0/24", "pypi.org"]``.  A session never
                reaches the host's own addresses.
            idempotency_key: Sent as the ``Idempotency-Key`` header; a fresh one is made
                per call.  Pass your own to retry a create whose answer was lost (for
                example after :class:`APIConnectionError`) without making a second
                session.

        Returns:
            The new session's ``SessionInfo``.

        Raises:
            InvalidRequestError: The limits are invalid or over the server's maximum.
            APIConnectionError: The server cannot be reached.
        """
        data = self._client._request(
            "POST",
            self._client._url("sessions"),
            json=create_session_body(
                limits,
                metadata,
                idle_timeout=idle_timeout,
                max_lifetime=max_lifetime,
                on_timeout=on_timeout,
                network=network,
            ),
            headers={IDEMPOTENCY_HEADER: idempotency_key or new_idempotency_key()},
        )
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
        data = self._client._request("GET", self._client._url("sessions", session_id))
        return cast(SessionInfo, data)

    def status(self, session_id: str) -> SessionInfo:
        """Alias of :meth:`get`: the session's info, whose ``"status"`` is its state."""
        return self.get(session_id)

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
        return self._post_action(session_id, "start")

    def stop(self, session_id: str) -> SessionInfo:
        """Stop a running session; its files are kept, its processes are killed.

        Args:
            session_id: The session's id.

        Returns:
            The session's ``SessionInfo`` (status ``"stopped"``).

        Raises:
            SessionNotFoundError: No session has this id.
            SessionStateError: The session cannot be stopped from its state.
        """
        return self._post_action(session_id, "stop")

    def delete(self, session_id: str) -> SessionInfo:
        """Delete a session and everything in it.  This cannot be undone.

        Args:
            session_id: The session's id.

        Returns:
            The session's final ``SessionInfo`` (status ``"deleted"``).

        Raises:
            SessionNotFoundError: No session has this id.
        """
        data = self._client._request("DELETE", self._client._url("sessions", session_id))
        return cast(SessionInfo, data)

    def list(self) -> SessionList:
        """List the sessions.

        Returns:
            ``{"sessions": [SessionInfo, ...]}``.
        """
        return cast(SessionList, self._client._request("GET", self._client._url("sessions")))

    def _post_action(self, session_id: str, action: str) -> SessionInfo:
        data = self._client._request("POST", self._client._url("sessions", session_id, action))
        return cast(SessionInfo, data)
