"""Per-session locks: one transition (create, start, stop, delete, ...) of a session at
a time, so that, say, a stop and a delete racing each other both see a consistent state.

They are per owner: the process that owns a session (its server, recorded on the
session as its ``node``; a cluster's gateway for the sessions it placed) is the one
that changes it, so a lock in that process's memory serialises every change of it;
no lease in the store is needed, and none is paid for on the hot path.  What another
process might still do to a session it does not own (a second server on the same
store acting on a stale read) is refused by the store: every status change is a
compare-and-set on the status it was decided from.  A backend that moves sessions
between owners at run time implements :class:`SessionLocks` over a shared lease.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class SessionLocks(Protocol):
    def hold(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Hold the session's lock for the ``async with`` block (waiting for it)."""

    def is_held(self, session_id: str) -> bool:
        """Whether the session is being changed right now (its lock is held)."""

    def forget(self, session_id: str) -> None:
        """Drop the lock of a session that is gone (no one waits for it)."""


class LocalSessionLocks:
    """:class:`SessionLocks` in this process's memory: an ``asyncio.Lock`` per session."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def hold(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def is_held(self, session_id: str) -> bool:
        lock = self._locks.get(session_id)
        return lock is not None and lock.locked()

    def forget(self, session_id: str) -> None:
        self._locks.pop(session_id, None)
