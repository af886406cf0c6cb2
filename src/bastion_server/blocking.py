"""Blocking calls in a worker thread that a cancellation never cuts short.

``asyncio.to_thread`` gives up waiting when its caller is cancelled, but the thread
goes on: a caller that then cleans up (closes the file the thread writes, unmounts
the disk it reads) races it, and a file descriptor closed under a thread may be
reused for another file before the thread's next ``write``.  :func:`run_to_end`
waits for the call to return (or raise) before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class OnEventLoop(RuntimeError):
    """A call that may block (sleeps, waits on the kernel) was made on the event loop's
    thread, where it would stall every request: a bug in the caller."""


def refuse_event_loop(what: str) -> None:
    """Raise :class:`OnEventLoop` if this thread runs an event loop.  Called first by
    functions that may block for long (an unmount's retries), so that a caller that
    forgets ``asyncio.to_thread`` fails its tests instead of freezing the server."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise OnEventLoop(f"{what} blocks: call it in a worker thread (asyncio.to_thread)")


async def run_to_end(
    fn: Callable[P, T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn(*args, **kwargs)`` in a worker thread; if the caller is cancelled meanwhile,
    the call still runs to its end first, and then the cancellation is raised.

    What a call cut short this way returned is lost to the caller: give it
    :func:`run_to_end_or_undo` when the result holds something to release.
    """
    return await run_to_end_or_undo(None, fn, *args, **kwargs)


async def run_to_end_or_undo(
    undo: Callable[[T], object] | None,
    fn: Callable[P, T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """As :func:`run_to_end`; a result the cancelled caller will never see is handed
    to ``undo`` (in a worker thread), e.g. to close the files it opened."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if future.exception() is None and undo is not None:
            await asyncio.to_thread(undo, future.result())
        raise
