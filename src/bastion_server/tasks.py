"""Background tasks whose failures are never lost.

``asyncio.create_task`` keeps only a weak reference to its task, and an exception
nobody retrieves surfaces (if ever) as "Task exception was never retrieved" when the
task is garbage collected, with no word of what it was doing.  Every task the server
starts without awaiting it right there goes through :func:`spawn`: the task is held
until it ends, and what it raised is logged at once, under the task's name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("bastion.tasks")

T = TypeVar("T")

#: Strong references to the running tasks (the event loop holds only weak ones).
_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Run ``coro`` as a task; if it fails, its exception is logged (and so retrieved).

    Whoever awaits the task still gets its result or exception as usual.
    """
    task = asyncio.create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_reap)
    return task


def _reap(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error(
            "background task failed: %s: %s",
            type(exc).__name__,
            exc,
            exc_info=exc,
            extra={"task": task.get_name()},
        )
