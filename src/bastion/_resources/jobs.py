"""``bastion.jobs``: run commands in a session and follow them to their result."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from .._base import (
    LongPoll,
    StatusTracker,
    check_job_result,
    format_hold,
    is_final,
    job_timeout_error,
    run_job_body,
    watch_hold,
)
from ..wire import JOB_WAIT_MAX_HOLD, JobInfo, JobList

if TYPE_CHECKING:
    from .._client import Bastion


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
    ) -> JobInfo:
        """Start a command in the session and return at once (the job is queued).

        Args:
            session_id: A running session's id.
            command: The argv, e.g. ``["python3", "/main.py"]``; a plain string is run
                by ``/bin/sh -c``.
            env: Extra environment variables for the command.
            cwd: Working directory inside the session.
            timeout: Seconds after which the server kills the job's processes and
                fails it (``failure_reason`` ``"timeout"``); ``None`` = no limit.

        Returns:
            The new job's ``JobInfo`` (``job_id``, ``status``, ...).

        Raises:
            TypeError: ``command`` is not a string or a sequence of strings.
            InvalidCommandError: The server rejected the command (e.g. empty).
            SessionNotFoundError: No session has this id.
            SessionStateError: The session is not running.
        """
        data = self._client._request(
            "POST",
            self._client._url("sessions", session_id, "jobs"),
            json=run_job_body(command, env, cwd, timeout),
        )
        return cast(JobInfo, data)

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
        url = self._client._url("sessions", session_id, "jobs", job_id)
        return cast(JobInfo, self._client._request("GET", url))

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
    ) -> JobInfo:
        """Run a command and wait for its result.

        Args:
            session_id: A running session's id.
            command: The argv, or a string run by ``/bin/sh -c``.
            env: Extra environment variables for the command.
            cwd: Working directory inside the session.
            timeout: Server-side limit in seconds; the server kills the job after it.
            wait_timeout: Seconds the client waits at most; ``None`` waits for ever.

        Returns:
            The final ``JobInfo``; ``result["output"]["console_output"]`` is stdout.

        Raises:
            JobFailedError: The job failed (non-zero exit, killed, timed out); the
                exception carries the result.
            JobTimeoutError: Not final within ``wait_timeout``.
            InvalidCommandError: The server rejected the command.
            SessionStateError: The session is not running.
        """
        job = self.run(session_id, command, env=env, cwd=cwd, timeout=timeout)
        return self.wait(session_id, job["job_id"], timeout=wait_timeout)

    def watch(
        self,
        session_id: str,
        job_id: str,
        on_update: Callable[[JobInfo], object],
        *,
        timeout: float | None = None,
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

        Returns:
            The final ``JobInfo``.  A failed job is returned, not raised.

        Raises:
            JobTimeoutError: The job was not final within ``timeout``.
            JobNotFoundError: No job has this id in this session.
        """
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

    def list(self, session_id: str) -> JobList:
        """List the session's jobs.

        Args:
            session_id: The session's id.

        Returns:
            ``{"jobs": [JobInfo, ...]}``.

        Raises:
            SessionNotFoundError: No session has this id.
        """
        data = self._client._request("GET", self._client._url("sessions", session_id, "jobs"))
        return cast(JobList, data)

    def _wait_final(self, session_id: str, job_id: str, timeout: float | None) -> JobInfo:
        poll = LongPoll(timeout)
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
        data = self._client._request(
            "GET",
            self._client._url("sessions", session_id, "jobs", job_id, "wait"),
            params={"timeout": format_hold(hold)},
            timeout=self._client._long_poll_timeout(hold),
        )
        job = cast(JobInfo, data)
        if not is_final(job):
            pause = poll.pause_after(hold, time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)
        return job
