"""Following a job to its result, without any I/O: the long-poll deadlines of
``wait``/``watch``, the status changes ``watch`` reports, the job event stream's
lines and what they call back, and the result's checks.

:class:`~bastion._resources.jobs.Jobs` and :class:`~bastion._resources.jobs.AsyncJobs`
do the I/O around them, each in its own way; the decisions are made here, once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any, TypeAlias, cast

from .._exceptions import (
    APIConnectionError,
    BastionError,
    JobFailedError,
    JobTimeoutError,
    ServerShutdownError,
)
from ..wire import FINAL_JOB_STATUSES, JOB_WAIT_MAX_HOLD, ErrorCode, JobEvent, JobInfo

#: Hold asked for while ``watch()`` sees a queued job.  The wait endpoint answers only
#: when the job is final or the hold ends, so the queued -> running change is seen at
#: most this late; once running, only the final change is left and holds are long.
WATCH_QUEUED_HOLD = 1.0


def is_final(job: JobInfo) -> bool:
    return job["status"] in FINAL_JOB_STATUSES


def check_job_result(job: JobInfo) -> JobInfo:
    """Return a final job, or raise :class:`JobFailedError` (the result) if it failed."""
    if job["status"] == "failed":
        raise JobFailedError(job)
    return job


def job_timeout_error(job: JobInfo, timeout: float | None) -> JobTimeoutError:
    return JobTimeoutError(
        f"job {job['job_id']} still {job['status']} after {timeout} s "
        "(it keeps running on the server)",
        job=job,
        timeout=timeout,
    )


class LongPoll:
    """Deadline bookkeeping for loops of long-poll requests (``wait``/``watch``).

    Args:
        timeout: Seconds until the caller gives up, ``None`` for never.
        clock: Monotonic clock (tests may pass their own).
    """

    def __init__(
        self, timeout: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self._deadline = None if timeout is None else clock() + max(0.0, timeout)

    def remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._clock())

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0.0

    def next_hold(self, cap: float = JOB_WAIT_MAX_HOLD) -> float:
        """How long to ask the server to hold the next request."""
        remaining = self.remaining()
        return cap if remaining is None else min(cap, remaining)

    def pause_after(self, hold: float, elapsed: float) -> float:
        """Seconds to sleep before polling again after a non-final answer.

        A server answers a hold early only if it caps holds below ours or misbehaves;
        pausing then keeps a ``timeout=None`` loop from hammering it.
        """
        if hold <= 0.0 or elapsed >= hold / 2 or not math.isfinite(elapsed):
            return 0.0
        remaining = self.remaining()
        pause = min(0.5, hold - elapsed)
        return pause if remaining is None else min(pause, remaining)


def watch_hold(job: JobInfo) -> float:
    """The hold to ask for while ``watch()`` waits for the next change of ``job``."""
    return WATCH_QUEUED_HOLD if job["status"] == "queued" else JOB_WAIT_MAX_HOLD


#: The order of job states; a status never goes back to a lower rank.
_STATUS_RANK = {"queued": 0, "running": 1, "completed": 2, "failed": 2}


class StatusTracker:
    """Tells which job snapshots ``watch()`` must deliver: each change of status.

    Only forward changes count: an event stream replays a job's history from the
    start, so a follower that already saw ``running`` must not report ``queued``.
    """

    def __init__(self) -> None:
        self._last: str | None = None

    def is_new(self, status: str) -> bool:
        if status == self._last:
            return False
        if self._last is None:
            return True
        rank, last_rank = _STATUS_RANK.get(status), _STATUS_RANK.get(self._last)
        return rank is None or last_rank is None or rank > last_rank

    def changed(self, job: JobInfo) -> bool:
        if not self.is_new(job["status"]):
            return False
        self._last = job["status"]
        return True

    def wants_snapshot(self, status: str) -> bool:
        """Whether a ``status`` event calls for the job's full info, to report it.

        Status events carry only the name; the snapshot callers get is the job's full
        ``JobInfo``.  The final one comes with ``end``, after all output.
        """
        return status not in FINAL_JOB_STATUSES and self.is_new(status)


#: Callbacks return nothing of use; the async client awaits what they return if it
#: is awaitable, so ``async def`` callbacks work there.
OutputCallback: TypeAlias = Callable[[str], object]
EventCallback: TypeAlias = Callable[[JobEvent], object]
#: A callback call to make: the callback with its argument bound.
CallbackCall: TypeAlias = Callable[[], object]


def parse_job_event(line: str) -> JobEvent | None:
    """One line of the NDJSON job event stream; ``None`` for a blank (keep-alive) line.

    Events of a type this SDK does not know are returned as they are, so a newer
    server can add some; callers ignore what they do not handle.

    Raises:
        BastionError: The line is not a JSON object with a string ``type``, or an
            ``end`` event carries no job.
        ServerShutdownError: The ``end`` event says the server ended the stream
            because it is shutting down (before the job ended).
    """
    text = line.strip()
    if not text:
        return None
    try:
        event = json.loads(text)
    except ValueError as exc:
        raise BastionError(f"malformed job event (not JSON): {text[:200]!r}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise BastionError(f"malformed job event (no type): {text[:200]!r}")
    if event["type"] == "end" and not isinstance(event.get("job"), dict):
        raise BastionError(f"malformed job event (end without job): {text[:200]!r}")
    if event["type"] in ("stdout", "stderr") and not isinstance(event.get("data"), str):
        raise BastionError(f"malformed job event (output without data): {text[:200]!r}")
    if event["type"] == "end" and event.get("reason") == ErrorCode.SERVER_SHUTDOWN:
        job = event["job"]
        raise ServerShutdownError(
            f"the server is shutting down: the event stream of job {job.get('job_id')} "
            f"ended while the job was {job.get('status')}",
            code=ErrorCode.SERVER_SHUTDOWN,
        )
    return cast(JobEvent, event)


class JobFollower:
    """Follows one job through its event stream, without doing any I/O.

    The I/O side feeds each event to :meth:`feed`, makes the callback calls it returns,
    in order, and stops once :attr:`final` is set; between events it calls
    :meth:`check_deadline`.

    Args:
        job: The job as last known (from ``run()`` or ``get()``); its status follows
            the stream's ``status`` events, for the timeout error.
        timeout: Seconds the caller follows at most, ``None`` for ever.
        on_stdout: Called with each stdout chunk.
        on_stderr: Called with each stderr chunk.
        on_output: Called with each ``stdout``/``stderr`` event as a whole.
    """

    def __init__(
        self,
        job: JobInfo,
        timeout: float | None,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_output: EventCallback | None = None,
    ) -> None:
        self.job = job
        self.poll = LongPoll(timeout)
        self.final: JobInfo | None = None
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_output = on_output

    def read_timeout(self) -> float | None:
        """The read timeout for the stream: the time left (a silent stream is given up
        once the deadline has passed), ``None`` without a deadline."""
        return self.poll.remaining()

    def feed(self, event: JobEvent) -> list[CallbackCall]:
        """Take note of ``event``; return the callback calls it asks for, in order."""
        calls: list[CallbackCall] = []
        kind = event["type"]
        if kind == "stdout" or kind == "stderr":
            data = event.get("data", "")
            callback = self._on_stdout if kind == "stdout" else self._on_stderr
            if callback is not None and data:
                calls.append(_bind(callback, data))
            if self._on_output is not None:
                calls.append(_bind(self._on_output, event))
        elif kind == "status":
            status = event.get("status")
            if status is not None:
                self.job = cast(JobInfo, {**self.job, "status": status})
        elif kind == "end":
            self.final = event["job"]
            self.job = self.final
        return calls

    def check_deadline(self) -> None:
        """Raise :class:`JobTimeoutError` if the deadline passed before the end."""
        if self.final is None and self.poll.expired():
            raise self.timeout_error()

    def timeout_error(self) -> JobTimeoutError:
        return job_timeout_error(self.job, self.poll.timeout)


def _bind(callback: Callable[[Any], object], argument: object) -> CallbackCall:
    return lambda: callback(argument)


def stream_ended_early(job_id: str) -> APIConnectionError:
    """The stream closed without its ``end`` event (the server went away mid-stream)."""
    return APIConnectionError(f"the event stream of job {job_id} ended before the job did")
