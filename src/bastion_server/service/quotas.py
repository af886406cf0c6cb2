"""Quotas: how many sessions and jobs a tenant (and the whole server) may have at once.

Set by the operator (``bastion serve --max-sessions-per-key`` ...; 0 = no quota):

* ``max_sessions_per_key``: sessions a tenant has that are not deleted;
* ``max_running_sessions_per_key`` / ``max_running_sessions``: sessions running (or
  paused: they keep their memory) at once, per tenant and on the whole server;
* ``max_jobs_per_session`` / ``max_jobs_per_key``: jobs running (or queued) at once,
  per session and per tenant.

A request past one is refused ``429 quota_exceeded`` before anything happens: no
record is written, no sandbox started, no job queued.  Each check and the step it
guards happen with no ``await`` between them, or with the slot reserved across it
(a start), so requests racing each other cannot both take the last place.  Quotas
count per tenant: keys made for another key's tenant share its quotas.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from bastion.wire import ErrorCode, SessionStatus
from bastion_server.config import ServerConfig
from bastion_server.service.errors import ServiceError
from bastion_server.store.sqlite import Store

#: A session holds its place (memory, processes) while running or paused.
UP_STATUSES = (SessionStatus.RUNNING, SessionStatus.PAUSED)


def quota_exceeded(message: str) -> ServiceError:
    return ServiceError(ErrorCode.QUOTA_EXCEEDED, message)


class Quotas:
    def __init__(self, store: Store, config: ServerConfig) -> None:
        self.store, self.config = store, config
        #: Sessions being started right now, by tenant (not yet recorded running).
        self._starting: Counter[str] = Counter()
        #: Jobs admitted and not yet ended: job id -> (tenant, session).
        self._jobs: dict[str, tuple[str, str]] = {}

    def check_new_session(self, owner: str) -> None:
        """Refuse a create past ``max_sessions_per_key``."""
        most = self.config.max_sessions_per_key
        if most and self.store.count_sessions(owner) >= most:
            raise quota_exceeded(
                f"this key's tenant has {most} sessions, its quota (max_sessions_per_key): "
                "delete some (bastion sessions prune / delete --all) before creating more"
            )

    @contextmanager
    def starting(self, owner: str) -> Iterator[None]:
        """Hold a running place for a session of ``owner`` while it starts; refuse the
        start past ``max_running_sessions_per_key`` or ``max_running_sessions``."""
        per_key, total = self.config.max_running_sessions_per_key, self.config.max_running_sessions
        if per_key:
            mine = self.store.count_sessions(owner, UP_STATUSES) + self._starting[owner]
            if mine >= per_key:
                raise quota_exceeded(
                    f"this key's tenant has {per_key} sessions running, its quota "
                    "(max_running_sessions_per_key): stop one before starting another"
                )
        if total:
            everyone = self.store.count_sessions(status=UP_STATUSES) + sum(self._starting.values())
            if everyone >= total:
                raise quota_exceeded(
                    f"the server runs {total} sessions, as many as it may at once "
                    "(max_running_sessions): try again once one has stopped"
                )
        self._starting[owner] += 1
        try:
            yield
        finally:
            self._starting[owner] -= 1
            if not self._starting[owner]:
                del self._starting[owner]

    def admit_job(self, job_id: str, owner: str, session_id: str) -> None:
        """Count a new job, or refuse it past ``max_jobs_per_session``/``_per_key``."""
        per_session, per_key = self.config.max_jobs_per_session, self.config.max_jobs_per_key
        if per_session and sum(s == session_id for _, s in self._jobs.values()) >= per_session:
            raise quota_exceeded(
                f"session {session_id!r} has {per_session} jobs running, as many as it may "
                "(max_jobs_per_session): wait for one to end"
            )
        if per_key and sum(o == owner for o, _ in self._jobs.values()) >= per_key:
            raise quota_exceeded(
                f"this key's tenant has {per_key} jobs running, its quota "
                "(max_jobs_per_key): wait for one to end"
            )
        self._jobs[job_id] = (owner, session_id)

    def job_ended(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def job_tenant(self, job_id: str) -> str | None:
        """The tenant of a job still counted (for the audit line of its end)."""
        entry = self._jobs.get(job_id)
        return entry[0] if entry else None
