"""``bastion.jobs``: run commands in a session and follow them to their result.

What the requests are is in :mod:`.job_requests`, how a job is followed (deadlines,
status changes, events) in :mod:`.job_follow`; here is only the I/O around them, sync
and async.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Literal, cast

from .._base import await_result, docs_from
from .._exceptions import APITimeoutError, BastionError, JobStateError
from .._local_files import (
    AsyncUploadData,
    UploadData,
    async_upload_body,
    upload_body,
)
from .._pages import merge_pages, wants_every_page
from ..wire import (
    JOB_WAIT_MAX_HOLD,
    MAX_PAGE_SIZE,
    JobEvent,
    JobInfo,
    JobLimitsRequest,
    JobList,
    StdinResult,
)
from .job_follow import (
    EventCallback,
    JobFollower,
    LongPoll,
    OutputCallback,
    StatusTracker,
    check_job_result,
    is_final,
    job_timeout_error,
    parse_job_event,
    stream_ended_early,
    watch_hold,
)
from .job_requests import (
    get_job_request,
    job_events_request,
    job_stdin_request,
    kill_job_request,
    list_jobs_request,
    run_job_body,
    run_job_request,
    split_stdin,
    wait_job_request,
)

if TYPE_CHECKING:
    from .._client import AsyncBastion, Bastion


class Jobs:
    """Run commands in a running session (``bastion.jobs``)."""

    def __init__(self, client: Bastion) -> None:
        self._client = client

    def run(
        self,
        session_id: str,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bool | str | UploadData | None = None,
        limits: JobLimitsRequest | Mapping[str, int] | None = None,
        user: Literal["user", "root"] | None = None,
    ) -> JobInfo:
        """Start a command in the session and return at once (the job is queued).

        Not retried once the request may have reached the server (that could run the
        command twice), only when the connection could not be opened at all.

        Args:
            session_id: A running session's id.
            command: The argv, e.g. ``["python3", "/main.py"]``; a plain string is run
                by ``/bin/sh -c``.
            env: Extra environment variables for the command.
            cwd: Working directory inside the session.
            timeout: Seconds after which the server kills the job's processes and
                fails it (``failure_reason`` ``"timeout"``); ``None`` = no limit.
            stdin: The job's input: ``bytes``/``str`` or a binary file object is fed
                to it and then closed (up to 256 KiB of text goes in the run request;
                more, or a file, is streamed after it); ``True`` keeps it open for
                :meth:`write_stdin` / :meth:`close_stdin`; ``None``: no input.
            limits: The job's own limits, within the session's: ``memory_mb``,
                ``cpu_seconds``, ``pids``, ``output_bytes`` (failure reasons
                ``"oom"``, ``"cpu_time"``, ``"pids_limit"``, ``"output_limit"``).
            user: ``"root"`` runs it as the sandbox's root (root of the session's own
                user namespace, never the host's), e.g. for ``apt-get install``;
                default: the sandbox user.

        Returns:
            The new job's ``JobInfo`` (``job_id``, ``status``, ...).

        Raises:
            TypeError: ``command`` is not a string or a sequence of strings.
            InvalidCommandError: The server rejected the command (e.g. empty).
            SessionNotFoundError: No session has this id.
            SessionStateError: The session is not running.
        """
        inline, rest = split_stdin(stdin)
        body = run_job_body(command, env, cwd, timeout, inline, limits, user)
        job = cast(JobInfo, self._client._request(run_job_request(session_id, body)))
        if rest is not None:
            # A job may end without reading its input (or all of it): not an error.
            with contextlib.suppress(JobStateError):
                self.write_stdin(session_id, job["job_id"], cast(UploadData, rest), close=True)
        return job

    def write_stdin(
        self, session_id: str, job_id: str, data: str | UploadData, *, close: bool = False
    ) -> StdinResult:
        """Write to the stdin of a job run with ``stdin=True`` (a file object is
        streamed in chunks); with ``close`` its stdin is then closed.

        Returns:
            ``{"written": bytes handed to the job, "closed": whether stdin is closed}``.

        Raises:
            JobStateError: The job ended, or has no open stdin.
        """
        content = data.encode() if isinstance(data, str) else data
        request = job_stdin_request(session_id, job_id, upload_body(content), close=close)
        return cast(StdinResult, self._client._request(request))

    def close_stdin(self, session_id: str, job_id: str) -> StdinResult:
        """Close a job's stdin (it reads end of file).

        Returns:
            ``{"written": 0, "closed": True}``.

        Raises:
            JobStateError: The job ended, or has no open stdin.
        """
        request = job_stdin_request(session_id, job_id, None, close=True)
        return cast(StdinResult, self._client._request(request))

    def kill(self, session_id: str, job_id: str, signal: str | int = "SIGTERM") -> JobInfo:
        """Send ``signal`` to every process of a running job (``"SIGKILL"`` kills its
        whole tree at once).  Returns at once; the job then ends ``failed`` with
        ``failure_reason`` ``"killed"`` (and ``signal`` if the signal ended it).

        Returns:
            The job as it is when the signal is sent (still running).

        Raises:
            JobStateError: The job is not running.
            InvalidRequestError: No such signal.
        """
        request = kill_job_request(session_id, job_id, signal)
        return cast(JobInfo, self._client._request(request))

    def get(self, session_id: str, job_id: str) -> JobInfo:
        """Get a job's current state (``queued | running | completed | failed``).

        Args:
            session_id: The session's id.
            job_id: The job's id.

        Returns:
            The job's ``JobInfo``; ``output`` is ``None`` until it has finished.

        Raises:
            JobNotFoundError: No job has this id in this session.
            SessionNotFoundError: No session has this id.
        """
        return cast(JobInfo, self._client._request(get_job_request(session_id, job_id)))

    def wait(self, session_id: str, job_id: str, timeout: float | None = None) -> JobInfo:
        """Wait until the job is completed or failed.

        Uses the server's long-poll endpoint, so it returns as soon as the job ends
        without polling in a tight loop.

        Args:
            session_id: The session's id.
            job_id: The job's id.
            timeout: Seconds to wait at most; ``None`` waits for ever.

        Returns:
            The final ``JobInfo`` of a completed job, whose ``output`` holds
            ``console_output``, ``errout`` and ``status_code``.

        Raises:
            JobFailedError: The job failed; the exception carries the result.
            JobTimeoutError: The job was not final within ``timeout`` (also a
                ``TimeoutError``); the job keeps running on the server.
            JobNotFoundError: No job has this id in this session.
            ServerShutdownError: The server began to shut down while the job ran.
        """
        return check_job_result(self._wait_final(session_id, job_id, timeout))

    def run_and_wait(
        self,
        session_id: str,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        wait_timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        stdin: bool | str | UploadData | None = None,
        limits: JobLimitsRequest | Mapping[str, int] | None = None,
        user: Literal["user", "root"] | None = None,
    ) -> JobInfo:
        """Run a command and wait for its result, optionally watching its output live.

        Args:
            session_id: A running session's id.
            command: The argv, or a string run by ``/bin/sh -c``.
            env: Extra environment variables for the command.
            cwd: Working directory inside the session.
            timeout: Server-side limit in seconds; the server kills the job after it.
            wait_timeout: Seconds the client waits at most; ``None`` waits for ever.
                With output callbacks it is checked as each piece of output arrives,
                and a job silent for ``wait_timeout`` seconds is given up.
            on_stdout: Called in this thread with each chunk of standard output as
                it is produced (the job's event stream is followed).
            on_stderr: Likewise for standard error.  All chunks of both have been
                delivered, in order, before this returns or raises.
            stdin: The job's input, as for :meth:`run` (small text keeps this one
                round trip).
            limits: The job's own limits, as for :meth:`run`.
            user: ``"root"`` to run as the sandbox's root, as for :meth:`run`.

        Returns:
            The final ``JobInfo``; ``result["output"]["console_output"]`` is stdout
            (the whole of it, also when it was streamed to ``on_stdout``).

        Raises:
            JobFailedError: The job failed (non-zero exit, killed, timed out); the
                exception carries the result.
            JobTimeoutError: Not final within ``wait_timeout``.
            InvalidCommandError: The server rejected the command.
            SessionStateError: The session is not running.
        """
        inline, rest = split_stdin(stdin)
        if on_stdout is None and on_stderr is None and rest is None:
            # One round trip for a short job: the run request itself waits.
            poll = LongPoll(wait_timeout)
            hold = poll.next_hold(JOB_WAIT_MAX_HOLD)
            job = cast(
                JobInfo,
                self._client._request(
                    run_job_request(
                        session_id,
                        run_job_body(command, env, cwd, timeout, inline, limits, user),
                        hold,
                        self._client._long_poll_timeout(hold),
                    )
                ),
            )
            if is_final(job):
                return check_job_result(job)
            if poll.expired():
                raise job_timeout_error(job, wait_timeout)
            return check_job_result(self._wait_final(session_id, job["job_id"], wait_timeout, poll))
        if rest is None:
            job = self.run(
                session_id, command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, limits=limits
            )
            follower = JobFollower(job, wait_timeout, on_stdout=on_stdout, on_stderr=on_stderr)
            return check_job_result(self._follow(session_id, job["job_id"], follower))
        # Input streamed while the output is followed: a job answering line by line
        # (``cat | bastion exec``) is seen live, not once its input has ended.
        job = self.run(
            session_id, command, env=env, cwd=cwd, timeout=timeout, stdin=True, limits=limits
        )
        failure: list[BaseException] = []

        def feed() -> None:
            try:
                with contextlib.suppress(JobStateError):
                    self.write_stdin(session_id, job["job_id"], cast(UploadData, rest), close=True)
            except BaseException as exc:  # raised in the caller's thread, below
                failure.append(exc)

        feeder = threading.Thread(target=feed, name=f"stdin of {job['job_id']}", daemon=True)
        feeder.start()
        follower = JobFollower(job, wait_timeout, on_stdout=on_stdout, on_stderr=on_stderr)
        result = self._follow(session_id, job["job_id"], follower)
        feeder.join()
        if failure:
            raise failure[0]
        return check_job_result(result)

    def stream(self, session_id: str, job_id: str) -> JobEventStream:
        """Follow a job's events as they happen: status changes, output, the end.

        The server replays what happened before (so nothing is missed by starting
        late), then sends events live; the stream ends after the ``end`` event::

            with bastion.jobs.stream(sid, job["job_id"]) as events:
                for event in events:
                    if event["type"] == "stdout":
                        print(event["data"], end="")

        The request is sent when iteration starts, so errors are raised by the first
        ``next()``.  The connection is released when the stream is exhausted or
        closed (``with``, ``close()``); there is no read timeout, a job may be silent
        for as long as it runs.

        Args:
            session_id: The session's id.
            job_id: The job's id.

        Returns:
            An iterator (and context manager) of event dicts:
            ``{"type": "status", "status"}``, ``{"type": "stdout" | "stderr", "data"}``
            and last ``{"type": "end", "job": JobInfo}``.

        Raises:
            JobNotFoundError: No job has this id in this session.
            APIConnectionError: The connection broke, or the stream ended before
                ``end``.
            ServerShutdownError: The server began to shut down before the job
                ended (its last event said so).
        """
        return JobEventStream(self._iter_complete_events(session_id, job_id))

    def watch(
        self,
        session_id: str,
        job_id: str,
        on_update: Callable[[JobInfo], object],
        *,
        timeout: float | None = None,
        on_output: EventCallback | None = None,
    ) -> JobInfo:
        """Call ``on_update(job_info)`` for each status the job goes through.

        The first call reports the job's current status, then one call per change
        (``queued`` -> ``running`` -> ``completed``/``failed``); the last call is the
        final state.  A ``queued`` -> ``running`` change is seen within about a second;
        the final state as soon as it happens.

        Args:
            session_id: The session's id.
            job_id: The job's id.
            on_update: Called in this thread with each new ``JobInfo``; what it raises
                propagates and ends the watch.
            timeout: Seconds to watch at most; ``None`` watches until the job ends.
            on_output: Called in this thread with each ``{"type": "stdout" |
                "stderr", "data"}`` event, in order, all of them before the final
                ``on_update`` (the job's event stream is followed; output the job
                produced before the watch started is delivered too).

        Returns:
            The final ``JobInfo``.  A failed job is returned, not raised.

        Raises:
            JobTimeoutError: The job was not final within ``timeout``.
            JobNotFoundError: No job has this id in this session.
        """
        if on_output is not None:
            return self._watch_events(session_id, job_id, on_update, timeout, on_output)
        poll = LongPoll(timeout)
        tracker = StatusTracker()
        job = self.get(session_id, job_id)
        while True:
            if tracker.changed(job):
                on_update(job)
            if is_final(job):
                return job
            if poll.expired():
                raise job_timeout_error(job, timeout)
            job = self._poll(session_id, job_id, poll, cap=watch_hold(job))

    def list(
        self, session_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> JobList:
        """List the session's jobs, oldest first, without their output.

        Without ``limit`` and ``cursor``: every job, fetched page after page.  With
        either: one page, as the server answers it.

        Args:
            session_id: The session's id.
            limit: At most this many jobs (1 to 1000, ``bastion.wire.MAX_PAGE_SIZE``;
                the server's default 100).
            cursor: The ``next_cursor`` of the page before; none for the first page.

        Returns:
            ``{"jobs": [JobInfo, ...], "next_cursor": str | None}``: the cursor of the
            next page, None after the last (and always for the whole list).

        Raises:
            SessionNotFoundError: No session has this id.
            InvalidRequestError: ``limit`` is out of range, or ``cursor`` is not one of
                this list's (code ``invalid_cursor``).
        """
        if wants_every_page(limit, cursor):
            request_for = functools.partial(list_jobs_request, session_id, MAX_PAGE_SIZE)
            return cast(JobList, merge_pages(self._client._pages(request_for), "jobs"))
        return cast(JobList, self._client._request(list_jobs_request(session_id, limit, cursor)))

    def iter_all(self, session_id: str, *, page_size: int = MAX_PAGE_SIZE) -> Iterator[JobInfo]:
        """Every job of the session, oldest first, each page fetched as the loop
        reaches it (jobs started meanwhile come at the end).

        Args:
            session_id: The session's id.
            page_size: Jobs per request (1 to 1000, the default).

        Yields:
            ``JobInfo`` after ``JobInfo``, without the output.

        Raises:
            SessionNotFoundError: No session has this id.
        """
        request_for = functools.partial(list_jobs_request, session_id, page_size)
        for page in self._client._pages(request_for):
            yield from page["jobs"]

    def _watch_events(
        self,
        session_id: str,
        job_id: str,
        on_update: Callable[[JobInfo], object],
        timeout: float | None,
        on_output: EventCallback,
    ) -> JobInfo:
        """``watch()`` over the event stream, for callers that want the output too."""
        tracker = StatusTracker()
        job = self.get(session_id, job_id)
        if tracker.changed(job):
            on_update(job)

        def on_status(status: str) -> None:
            if not tracker.wants_snapshot(status):
                return
            snapshot = self.get(session_id, job_id)
            if not is_final(snapshot) and tracker.changed(snapshot):
                on_update(snapshot)

        follower = JobFollower(job, timeout, on_output=on_output)
        final = self._follow(session_id, job_id, follower, on_status=on_status)
        if tracker.changed(final):
            on_update(final)
        return final

    def _follow(
        self,
        session_id: str,
        job_id: str,
        follower: JobFollower,
        *,
        on_status: Callable[[str], object] | None = None,
    ) -> JobInfo:
        """Feed the job's event stream to ``follower`` until the final job arrives."""
        events = self._iter_events(session_id, job_id, follower.read_timeout())
        try:
            for event in events:
                for call in follower.feed(event):
                    call()
                if follower.final is not None:
                    return follower.final
                if on_status is not None and event["type"] == "status" and "status" in event:
                    on_status(event["status"])
                follower.check_deadline()
        except APITimeoutError as exc:
            # The read timeout is the time that was left: silence past the deadline.
            if follower.poll.expired():
                raise follower.timeout_error() from exc
            raise
        finally:
            events.close()
        # The stream ended without "end": the session was deleted meanwhile (the get
        # raises SessionNotFoundError), or the server went away.
        cut_short = stream_ended_early(job_id)
        try:
            self.get(session_id, job_id)
        except BastionError as exc:
            raise exc from cut_short
        raise cut_short

    def _iter_complete_events(
        self, session_id: str, job_id: str
    ) -> Generator[JobEvent, None, None]:
        """:meth:`_iter_events` without a deadline, raising if it ends before ``end``."""
        events = self._iter_events(session_id, job_id, None)
        last: JobEvent | None = None
        try:
            for last in events:
                yield last
        finally:
            events.close()  # at once, not when the garbage collector gets to it
        if last is None or last["type"] != "end":
            raise stream_ended_early(job_id)

    def _iter_events(
        self, session_id: str, job_id: str, read_timeout: float | None
    ) -> Generator[JobEvent, None, None]:
        """The NDJSON event stream, one parsed event at a time, ending after ``end``
        (or earlier, if the server ends the stream early)."""
        timeout = self._client._event_stream_timeout(read_timeout)
        with self._client._stream(job_events_request(session_id, job_id, timeout)) as response:
            for line in self._client._iter_lines(response):
                event = parse_job_event(line)
                if event is None:
                    continue
                yield event
                if event["type"] == "end":
                    return

    def _wait_final(
        self, session_id: str, job_id: str, timeout: float | None, poll: LongPoll | None = None
    ) -> JobInfo:
        poll = poll or LongPoll(timeout)
        while True:
            job = self._poll(session_id, job_id, poll)
            if is_final(job):
                return job
            if poll.expired():
                raise job_timeout_error(job, timeout)

    def _poll(
        self, session_id: str, job_id: str, poll: LongPoll, cap: float = JOB_WAIT_MAX_HOLD
    ) -> JobInfo:
        """One long-poll request: the server answers when the job is final or the hold ends."""
        hold = poll.next_hold(cap)
        started = time.monotonic()
        timeout = self._client._long_poll_timeout(hold)
        job = cast(
            JobInfo, self._client._request(wait_job_request(session_id, job_id, hold, timeout))
        )
        if not is_final(job):
            pause = poll.pause_after(hold, time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)
        return job


class JobEventStream(Iterator[JobEvent]):
    """The events of one job (what :meth:`Jobs.stream` returns).

    An iterator of ``JobEvent`` dicts that holds an HTTP response open while it is
    being read: exhaust it, or close it (``close()``, or use it in a ``with`` block)
    to release the connection.
    """

    def __init__(self, events: Generator[JobEvent, None, None]) -> None:
        self._events = events

    def __iter__(self) -> JobEventStream:
        return self

    def __next__(self) -> JobEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop reading and release the connection (idempotent)."""
        self._events.close()

    def __enter__(self) -> JobEventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@docs_from(Jobs)
class AsyncJobs:
    """Run commands in a running session (``bastion.jobs``).

    The async twin of :class:`Jobs`: the same methods, as coroutines; ``stream``
    returns an async iterator.  Callbacks may be plain or ``async def`` functions;
    each is called (and awaited) in the calling task, in order.
    """

    def __init__(self, client: AsyncBastion) -> None:
        self._client = client

    async def run(
        self,
        session_id: str,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bool | str | AsyncUploadData | None = None,
        limits: JobLimitsRequest | Mapping[str, int] | None = None,
        user: Literal["user", "root"] | None = None,
    ) -> JobInfo:
        inline, rest = split_stdin(stdin)
        body = run_job_body(command, env, cwd, timeout, inline, limits, user)
        job = cast(JobInfo, await self._client._request(run_job_request(session_id, body)))
        if rest is not None:
            with contextlib.suppress(JobStateError):
                await self.write_stdin(
                    session_id, job["job_id"], cast(AsyncUploadData, rest), close=True
                )
        return job

    async def write_stdin(
        self, session_id: str, job_id: str, data: str | AsyncUploadData, *, close: bool = False
    ) -> StdinResult:
        content = data.encode() if isinstance(data, str) else data
        request = job_stdin_request(session_id, job_id, async_upload_body(content), close=close)
        return cast(StdinResult, await self._client._request(request))

    async def close_stdin(self, session_id: str, job_id: str) -> StdinResult:
        request = job_stdin_request(session_id, job_id, None, close=True)
        return cast(StdinResult, await self._client._request(request))

    async def kill(self, session_id: str, job_id: str, signal: str | int = "SIGTERM") -> JobInfo:
        request = kill_job_request(session_id, job_id, signal)
        return cast(JobInfo, await self._client._request(request))

    async def get(self, session_id: str, job_id: str) -> JobInfo:
        return cast(JobInfo, await self._client._request(get_job_request(session_id, job_id)))

    async def wait(self, session_id: str, job_id: str, timeout: float | None = None) -> JobInfo:
        return check_job_result(await self._wait_final(session_id, job_id, timeout))

    async def run_and_wait(
        self,
        session_id: str,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        wait_timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        stdin: bool | str | AsyncUploadData | None = None,
        limits: JobLimitsRequest | Mapping[str, int] | None = None,
        user: Literal["user", "root"] | None = None,
    ) -> JobInfo:
        """Run a command and wait for its result, optionally watching its output live.

        As :meth:`Jobs.run_and_wait`; ``on_stdout`` and ``on_stderr`` may be ``async
        def`` functions, awaited in order before the next chunk is delivered.

        Args:
            session_id: A running session's id.
            command: The argv, or a string run by ``/bin/sh -c``.
            env: Extra environment variables for the command.
            cwd: Working directory inside the session.
            timeout: Server-side limit in seconds; the server kills the job after it.
            wait_timeout: Seconds the client waits at most; ``None`` waits for ever.
            on_stdout: Called with each chunk of standard output as it is produced.
            on_stderr: Likewise for standard error.

        Returns:
            The final ``JobInfo`` of a completed job.

        Raises:
            JobFailedError: The job failed; the exception carries the result.
            JobTimeoutError: Not final within ``wait_timeout``.
            InvalidCommandError: The server rejected the command.
            SessionStateError: The session is not running.
        """
        inline, rest = split_stdin(stdin)
        if on_stdout is None and on_stderr is None and rest is None:
            # One round trip for a short job: the run request itself waits.
            poll = LongPoll(wait_timeout)
            hold = poll.next_hold(JOB_WAIT_MAX_HOLD)
            job = cast(
                JobInfo,
                await self._client._request(
                    run_job_request(
                        session_id,
                        run_job_body(command, env, cwd, timeout, inline, limits, user),
                        hold,
                        self._client._long_poll_timeout(hold),
                    )
                ),
            )
            if is_final(job):
                return check_job_result(job)
            if poll.expired():
                raise job_timeout_error(job, wait_timeout)
            return check_job_result(
                await self._wait_final(session_id, job["job_id"], wait_timeout, poll)
            )
        if rest is None:
            job = await self.run(
                session_id, command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, limits=limits
            )
            follower = JobFollower(job, wait_timeout, on_stdout=on_stdout, on_stderr=on_stderr)
            return check_job_result(await self._follow(session_id, job["job_id"], follower))
        # As in Jobs.run_and_wait: the input is streamed while the output is followed.
        job = await self.run(
            session_id, command, env=env, cwd=cwd, timeout=timeout, stdin=True, limits=limits
        )

        async def feed() -> None:
            with contextlib.suppress(JobStateError):
                await self.write_stdin(
                    session_id, job["job_id"], cast(AsyncUploadData, rest), close=True
                )

        feeder = asyncio.create_task(feed())
        try:
            follower = JobFollower(job, wait_timeout, on_stdout=on_stdout, on_stderr=on_stderr)
            result = await self._follow(session_id, job["job_id"], follower)
        except BaseException:
            feeder.cancel()
            raise
        await feeder
        return check_job_result(result)

    def stream(self, session_id: str, job_id: str) -> AsyncJobEventStream:
        """Follow a job's events as they happen: status changes, output, the end.

        As :meth:`Jobs.stream`, as an async iterator that is also an async context
        manager (no request is sent until iteration starts)::

            async with bastion.jobs.stream(sid, job["job_id"]) as events:
                async for event in events:
                    if event["type"] == "stdout":
                        print(event["data"], end="")

        Args:
            session_id: The session's id.
            job_id: The job's id.

        Returns:
            An async iterator (and async context manager) of event dicts; the last
            is ``{"type": "end", "job": JobInfo}``.

        Raises:
            JobNotFoundError: No job has this id in this session.
            APIConnectionError: The connection broke, or the stream ended before
                ``end``.
            ServerShutdownError: The server began to shut down before the job
                ended (its last event said so).
        """
        return AsyncJobEventStream(self._iter_complete_events(session_id, job_id))

    async def watch(
        self,
        session_id: str,
        job_id: str,
        on_update: Callable[[JobInfo], object],
        *,
        timeout: float | None = None,
        on_output: EventCallback | None = None,
    ) -> JobInfo:
        """Call ``on_update(job_info)`` for each status the job goes through.

        As :meth:`Jobs.watch`; the callbacks may be ``async def`` functions, awaited
        in order.

        Args:
            session_id: The session's id.
            job_id: The job's id.
            on_update: Called with each new ``JobInfo``; what it raises propagates
                and ends the watch.
            timeout: Seconds to watch at most; ``None`` watches until the job ends.
            on_output: Called with each ``{"type": "stdout" | "stderr", "data"}``
                event, in order, all of them before the final ``on_update``.

        Returns:
            The final ``JobInfo``.  A failed job is returned, not raised.

        Raises:
            JobTimeoutError: The job was not final within ``timeout``.
            JobNotFoundError: No job has this id in this session.
        """
        if on_output is not None:
            return await self._watch_events(session_id, job_id, on_update, timeout, on_output)
        poll = LongPoll(timeout)
        tracker = StatusTracker()
        job = await self.get(session_id, job_id)
        while True:
            if tracker.changed(job):
                await await_result(on_update(job))
            if is_final(job):
                return job
            if poll.expired():
                raise job_timeout_error(job, timeout)
            job = await self._poll(session_id, job_id, poll, cap=watch_hold(job))

    async def list(
        self, session_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> JobList:
        if wants_every_page(limit, cursor):
            request_for = functools.partial(list_jobs_request, session_id, MAX_PAGE_SIZE)
            pages = [page async for page in self._client._pages(request_for)]
            return cast(JobList, merge_pages(pages, "jobs"))
        request = list_jobs_request(session_id, limit, cursor)
        return cast(JobList, await self._client._request(request))

    async def iter_all(
        self, session_id: str, *, page_size: int = MAX_PAGE_SIZE
    ) -> AsyncIterator[JobInfo]:
        request_for = functools.partial(list_jobs_request, session_id, page_size)
        async for page in self._client._pages(request_for):
            for job in page["jobs"]:
                yield job

    async def _watch_events(
        self,
        session_id: str,
        job_id: str,
        on_update: Callable[[JobInfo], object],
        timeout: float | None,
        on_output: EventCallback,
    ) -> JobInfo:
        tracker = StatusTracker()
        job = await self.get(session_id, job_id)
        if tracker.changed(job):
            await await_result(on_update(job))

        async def on_status(status: str) -> None:
            if not tracker.wants_snapshot(status):
                return
            snapshot = await self.get(session_id, job_id)
            if not is_final(snapshot) and tracker.changed(snapshot):
                await await_result(on_update(snapshot))

        follower = JobFollower(job, timeout, on_output=on_output)
        final = await self._follow(session_id, job_id, follower, on_status=on_status)
        if tracker.changed(final):
            await await_result(on_update(final))
        return final

    async def _follow(
        self,
        session_id: str,
        job_id: str,
        follower: JobFollower,
        *,
        on_status: Callable[[str], Awaitable[None]] | None = None,
    ) -> JobInfo:
        """As :meth:`Jobs._follow`."""
        events = self._iter_events(session_id, job_id, follower.read_timeout())
        try:
            async for event in events:
                for call in follower.feed(event):
                    await await_result(call())
                if follower.final is not None:
                    return follower.final
                if on_status is not None and event["type"] == "status" and "status" in event:
                    await on_status(event["status"])
                follower.check_deadline()
        except APITimeoutError as exc:
            if follower.poll.expired():
                raise follower.timeout_error() from exc
            raise
        finally:
            await events.aclose()
        cut_short = stream_ended_early(job_id)
        try:
            await self.get(session_id, job_id)
        except BastionError as exc:
            raise exc from cut_short
        raise cut_short

    async def _iter_complete_events(
        self, session_id: str, job_id: str
    ) -> AsyncGenerator[JobEvent, None]:
        events = self._iter_events(session_id, job_id, None)
        last: JobEvent | None = None
        try:
            async for last in events:
                yield last
        finally:
            await events.aclose()
        if last is None or last["type"] != "end":
            raise stream_ended_early(job_id)

    async def _iter_events(
        self, session_id: str, job_id: str, read_timeout: float | None
    ) -> AsyncGenerator[JobEvent, None]:
        timeout = self._client._event_stream_timeout(read_timeout)
        async with self._client._stream(
            job_events_request(session_id, job_id, timeout)
        ) as response:
            lines = self._client._iter_lines(response)
            try:
                async for line in lines:
                    event = parse_job_event(line)
                    if event is None:
                        continue
                    yield event
                    if event["type"] == "end":
                        return
            finally:
                await lines.aclose()

    async def _wait_final(
        self, session_id: str, job_id: str, timeout: float | None, poll: LongPoll | None = None
    ) -> JobInfo:
        poll = poll or LongPoll(timeout)
        while True:
            job = await self._poll(session_id, job_id, poll)
            if is_final(job):
                return job
            if poll.expired():
                raise job_timeout_error(job, timeout)

    async def _poll(
        self, session_id: str, job_id: str, poll: LongPoll, cap: float = JOB_WAIT_MAX_HOLD
    ) -> JobInfo:
        hold = poll.next_hold(cap)
        started = time.monotonic()
        timeout = self._client._long_poll_timeout(hold)
        request = wait_job_request(session_id, job_id, hold, timeout)
        job = cast(JobInfo, await self._client._request(request))
        if not is_final(job):
            pause = poll.pause_after(hold, time.monotonic() - started)
            if pause > 0:
                await asyncio.sleep(pause)
        return job


class AsyncJobEventStream(AsyncIterator[JobEvent]):
    """The events of one job (what :meth:`AsyncJobs.stream` returns).

    An async iterator of ``JobEvent`` dicts that holds an HTTP response open while it
    is being read: exhaust it, or close it (``await close()``, or use it in an
    ``async with`` block) to release the connection.
    """

    def __init__(self, events: AsyncGenerator[JobEvent, None]) -> None:
        self._events = events

    def __aiter__(self) -> AsyncJobEventStream:
        return self

    async def __anext__(self) -> JobEvent:
        return await anext(self._events)

    async def close(self) -> None:
        """Stop reading and release the connection (idempotent)."""
        await self._events.aclose()

    async def aclose(self) -> None:
        """Alias of :meth:`close`, for ``contextlib.aclosing``."""
        await self.close()

    async def __aenter__(self) -> AsyncJobEventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
