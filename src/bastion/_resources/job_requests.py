"""The requests of ``bastion.jobs``' endpoints and their bodies, shared by
:class:`~bastion._resources.jobs.Jobs` and :class:`~bastion._resources.jobs.AsyncJobs`:
what each sends and whether it may be sent again (following a job to its result is in
:mod:`bastion._resources.job_follow`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, cast

import httpx

from .._base import APIRequest, given_fields
from .._pages import page_params
from ..wire import MAX_INLINE_STDIN, JobLimitsRequest, RunJobRequest
from .sessions import session_url

if TYPE_CHECKING:
    from .._local_files import UploadBody


#: Media type of the job event stream (one JSON object per line).
NDJSON_MEDIA_TYPE = "application/x-ndjson"


def normalize_command(command: str | Sequence[str]) -> list[str]:
    """A command as an argv list; a plain string runs through ``/bin/sh -c``.

    Raises:
        TypeError: ``command`` is neither a string nor a sequence of strings.
    """
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    if isinstance(command, bytes | bytearray) or not isinstance(command, Sequence):
        raise TypeError(f"command must be a str or a sequence of str, not {type(command).__name__}")
    argv = list(command)
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"command arguments must be str, got {arg!r}")
    return argv


def run_job_body(
    command: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    stdin: bool | str | None = None,
    limits: JobLimitsRequest | Mapping[str, int] | None = None,
    user: Literal["user", "root"] | None = None,
) -> RunJobRequest:
    fields = given_fields(
        user=user,
        stdin=None if stdin is False else stdin,
        limits=None if limits is None else dict(limits),
        env=None if env is None else dict(env),
        cwd=cwd,
        timeout=timeout,
    )
    return cast(RunJobRequest, {"command": normalize_command(command), **fields})


def split_stdin(stdin: object) -> tuple[bool | str | None, object]:
    """What a run request carries for ``stdin``, and what is left to stream after it:
    small text (or UTF-8 bytes) goes inline; other bytes, or a file object, go through
    the stdin endpoint (the job is run with an open stdin, ``True``, first)."""
    if stdin is None or isinstance(stdin, bool):
        return stdin, None
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    if isinstance(stdin, bytes | bytearray | memoryview):
        data = bytes(stdin)
        if len(data) <= MAX_INLINE_STDIN:
            try:
                return data.decode("utf-8"), None
            except UnicodeDecodeError:
                pass
        return True, data
    return True, stdin


def run_job_request(
    session_id: str,
    body: RunJobRequest,
    hold: float | None = None,
    timeout: httpx.Timeout | None = None,
) -> APIRequest:
    """``POST .../jobs``: not idempotent (a repeat would run the command twice).

    With ``hold`` the server keeps the answer until the job ends or ``hold`` seconds
    pass, so a short job's result comes back in this one round trip.
    """
    return APIRequest(
        "POST",
        session_url(session_id, "jobs"),
        json=body,
        idempotent=False,
        params={"wait": format_hold(hold)} if hold is not None else None,
        timeout=timeout,
    )


def job_stdin_request(
    session_id: str, job_id: str, body: UploadBody | None, *, close: bool
) -> APIRequest:
    """``POST .../stdin``: not retried (a repeat would feed the input twice)."""
    return APIRequest(
        "POST",
        session_url(session_id, "jobs", job_id, "stdin"),
        params={"close": "true"} if close else None,
        body=body,
        idempotent=False,
    )


def kill_job_request(session_id: str, job_id: str, signal: str | int) -> APIRequest:
    return APIRequest(
        "POST",
        session_url(session_id, "jobs", job_id, "kill"),
        json={"signal": signal},
        idempotent=False,
    )


def get_job_request(session_id: str, job_id: str) -> APIRequest:
    return APIRequest("GET", session_url(session_id, "jobs", job_id))


def list_jobs_request(
    session_id: str, limit: int | None = None, cursor: str | None = None
) -> APIRequest:
    return APIRequest("GET", session_url(session_id, "jobs"), params=page_params(limit, cursor))


def wait_job_request(
    session_id: str, job_id: str, hold: float, timeout: httpx.Timeout
) -> APIRequest:
    """One long poll: the server answers when the job is final or ``hold`` ends."""
    return APIRequest(
        "GET",
        session_url(session_id, "jobs", job_id, "wait"),
        params={"timeout": format_hold(hold)},
        timeout=timeout,
    )


def job_events_request(session_id: str, job_id: str, timeout: httpx.Timeout) -> APIRequest:
    return APIRequest(
        "GET",
        session_url(session_id, "jobs", job_id, "events"),
        headers={"Accept": NDJSON_MEDIA_TYPE},
        timeout=timeout,
    )


def format_hold(hold: float) -> str:
    """The ``timeout`` query value for a hold: seconds, millisecond precision."""
    return f"{round(hold, 3):g}"
