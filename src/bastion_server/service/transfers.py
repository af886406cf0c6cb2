"""Uploads and downloads in flight, per session: a stop or delete ends them at once.

A transfer holds files open on the session's disk, and a disk with open files cannot
be unmounted: a stop would wait for the slowest client, then detach the disk with the
transfer still writing to it, and answer it ``200`` for a file in a disk that is gone.
So before a session's sandbox goes away (stop, delete, expiry, a dead sandbox), every
transfer of that session is ended, and the stop goes on once their files are closed:

* one waiting on its client (an upload for the next bytes, a download for the client
  to take the last ones) stops waiting at once;
* one in a worker thread (a write or read of at most a batch) ends when that returns,
  never while the thread still uses its file descriptors.

It then fails with ``409 session_stopped`` (an upload writes nothing; a download whose
answer has begun is cut short).  A transfer that begins while its session's run is
ending is refused the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

from bastion.wire import ErrorCode
from bastion_server.service.errors import ServiceError

log = logging.getLogger("bastion.files")

P = ParamSpec("P")
T = TypeVar("T")

#: How long a session's ending run is remembered (far longer than any stop takes).
_ENDING_KEPT = 600.0
#: How long a stop waits for transfers to close their files (a worker thread stuck in
#: the kernel); past it the stop goes on and the disk is detached lazily.
END_TIMEOUT = 10.0


def _ended_error(session_id: str, reason: str) -> ServiceError:
    what = "deleted" if reason == "session_deleted" else "stopped"
    return ServiceError(
        ErrorCode.SESSION_STOPPED,
        f"session {session_id!r} was {what} during the transfer, which did not complete",
    )


class Transfer:
    """One upload or download of a session; :meth:`finish` it when its files are closed."""

    def __init__(self, registry: Transfers, session_id: str, run: str) -> None:
        self.registry, self.session_id, self.run = registry, session_id, run
        self.ended_by: str | None = None
        self.finished = asyncio.Event()
        self._waiter: asyncio.Task[object] | None = None
        self._interrupted = False

    def raise_if_ended(self) -> None:
        if self.ended_by is not None:
            raise _ended_error(self.session_id, self.ended_by)

    async def wait(self, step: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``step``, something that only waits on the client: ending the transfer
        interrupts it (ServiceError ``session_stopped``)."""
        self.raise_if_ended()
        task = asyncio.current_task()
        self._waiter = task
        try:
            return await step(*args, **kwargs)
        except asyncio.CancelledError:
            if not self._interrupted or task is None:
                raise
            self._interrupted = False
            task.uncancel()
            raise _ended_error(self.session_id, self.ended_by or "session_stopped") from None
        finally:
            self._waiter = None

    async def guard(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``chunks`` (a request body), each awaited with :meth:`wait`; a body that is
        complete only as its session stops fails too (nothing of it is written)."""
        source = aiter(chunks)
        while True:
            try:
                chunk = await self.wait(anext, source)
            except StopAsyncIteration:
                break
            yield chunk
        self.raise_if_ended()

    def end(self, reason: str) -> None:
        if self.ended_by is None:
            self.ended_by = reason
        if self._waiter is not None and not self._interrupted:
            self._interrupted = True
            self._waiter.cancel()

    def finish(self) -> None:
        self.registry._forget(self)
        self.finished.set()


class Transfers:
    """The transfers in flight, by session."""

    def __init__(self) -> None:
        self._live: dict[str, set[Transfer]] = {}
        #: Sessions whose sandbox is going away: the run (see :meth:`begin`) ending,
        #: and when (monotonic).
        self._ending: dict[str, tuple[str, float]] = {}

    def begin(self, session_id: str, run: str) -> Transfer:
        """A new transfer of ``session_id`` in its run ``run`` (a mark that tells one
        running spell of the session from the next, e.g. when it last started)."""
        ending = self._ending.get(session_id)
        if ending is not None:
            if ending[0] == run:
                raise _ended_error(session_id, "session_stopped")
            del self._ending[session_id]  # an earlier run's: the session started again
        transfer = Transfer(self, session_id, run)
        self._live.setdefault(session_id, set()).add(transfer)
        return transfer

    def _forget(self, transfer: Transfer) -> None:
        live = self._live.get(transfer.session_id)
        if live is not None:
            live.discard(transfer)
            if not live:
                del self._live[transfer.session_id]

    def active(self, session_id: str) -> bool:
        return bool(self._live.get(session_id))

    async def end_session(self, session_id: str, reason: str, run: str | None) -> None:
        """End every transfer of ``session_id`` and wait until their files are closed;
        refuse new ones in this run (``None``: the session has none, nothing to refuse)."""
        now = time.monotonic()
        for old in [sid for sid, (_, at) in self._ending.items() if now - at > _ENDING_KEPT]:
            del self._ending[old]  # long stopped or deleted: its record refuses transfers
        if run is not None:
            self._ending[session_id] = (run, now)
        transfers = list(self._live.get(session_id, ()))
        for transfer in transfers:
            transfer.end(reason)
        if not transfers:
            return
        waits = [asyncio.create_task(t.finished.wait()) for t in transfers]
        _, pending = await asyncio.wait(waits, timeout=END_TIMEOUT)
        for task in pending:
            task.cancel()
        log.info(
            "transfers ended",
            extra={"session_id": session_id, "reason": reason, "count": len(transfers)},
        )
