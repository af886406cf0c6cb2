"""Word that a job changed (its status, new output), for those who wait on it.

A ``wait`` or an event stream listens on its job and reads the job again (its record,
its log) each time it is woken; the runner notifies on every change.  The word carries
no data, so a missed or extra wake costs a read, never a wrong answer (and listeners
look again every few seconds anyway).  :class:`LocalJobEvents` works within this
process, where a job's runner lives; an implementation over a shared channel would let
a listener in another process be woken by the runner's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class JobEvents(Protocol):
    def listen(self, job_id: str) -> AbstractContextManager[asyncio.Event]:
        """An event set whenever the job changes, for the duration of the block (the
        listener clears it before each read of the job)."""

    def notify(self, job_id: str) -> None:
        """Wake every listener of the job."""


class LocalJobEvents:
    """:class:`JobEvents` in this process's memory: an ``asyncio.Event`` per listener."""

    def __init__(self) -> None:
        self._listeners: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def listen(self, job_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        listeners = self._listeners.setdefault(job_id, set())
        listeners.add(event)
        try:
            yield event
        finally:
            listeners.discard(event)
            if not listeners and self._listeners.get(job_id) is listeners:
                del self._listeners[job_id]

    def notify(self, job_id: str) -> None:
        for event in self._listeners.get(job_id, ()):
            event.set()
