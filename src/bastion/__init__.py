"""Bastion: the Python SDK of a self-hosted sandboxed execution runtime.

    from bastion import Bastion

    with Bastion() as bastion:                       # $BASTION_URL, $BASTION_API_KEY
        sid = bastion.sessions.create()["session_id"]
        bastion.sessions.start(sid)
        bastion.files.upload(sid, b'print("hi")', "/main.py")
        result = bastion.jobs.run_and_wait(sid, ["python3", "/main.py"])
        print(result["output"]["console_output"])    # hi
        bastion.jobs.run_and_wait(sid, "ls -la", on_stdout=print)   # live output
        with bastion.terminal.connect(session_id=sid, on_message=print) as term:
            term.exec("echo hello")                  # a live shell
        bastion.sessions.delete(sid)

The same with asyncio: :class:`AsyncBastion` has every method of :class:`Bastion`
with the same names, arguments and results, as coroutines and async iterators::

    async with AsyncBastion() as bastion:
        sid = (await bastion.sessions.create())["session_id"]
        await bastion.sessions.start(sid)
        result = await bastion.jobs.run_and_wait(sid, "ls -la", on_stdout=print)
        async with bastion.terminal.connect(session_id=sid) as term:
            await term.exec("echo hello; exit")
            async for message in term:
                print(message)
        async with bastion.jobs.stream(sid, result["job_id"]) as events:
            async for event in events:
                print(event)

Responses are plain dicts typed by the ``TypedDict``s re-exported here (defined in
:mod:`bastion.wire`); every exception derives from :class:`BastionError`.

Timeouts and retries
--------------------
``Bastion(timeout=30.0, connect_timeout=5.0, max_retries=2)`` (the defaults; the
connect timeout is never more than ``timeout`` unless given).  ``timeout`` may be an
``httpx.Timeout``.  A failed request is retried, at most ``max_retries`` times, after
0.5 s, 1 s, 2 s ... (at most 8 s; up to a quarter less at random; a ``Retry-After``
of up to 60 s is followed instead) when repeating it is safe:

==============================================  =====================================
request                                         retried on
==============================================  =====================================
GETs (get, list, wait, health, download,        connection errors and 502/503/504
stream's first answer)
``sessions.create``                             the same, with one ``Idempotency-Key``
                                                for all attempts: one session at most
``sessions.start`` / ``stop`` / ``delete``      the same; a retry refused with
                                                ``session_state`` while the session is
                                                in the target state (the lost attempt
                                                did it) returns that state as success
``files.delete``                                the same; ``file_not_found`` after a
                                                lost attempt is success
``files.upload`` of bytes / bytearray /         the same (a PUT replaces the file)
memoryview
``files.upload`` of a file object or            only when the connection could not be
async iterable                                  opened (nothing was read or sent)
``jobs.run`` (POST .../jobs)                    only when the connection could not be
                                                opened: a repeat could run it twice
terminal connect, reads of a body in progress   never
==============================================  =====================================

"Connection errors" are refused or reset connections, a server that closed a kept
alive connection, connect and write timeouts.  A read timeout is not retried:
``timeout`` bounds how long a call waits for a slow answer.  Once retries are spent
(or not allowed) the error is raised as :class:`APIConnectionError`,
:class:`APITimeoutError` or the error response's class.
"""

from ._async_terminal import AsyncTerminal
from ._base import __version__
from ._client import AsyncBastion, Bastion
from ._exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BastionError,
    FileDeleteError,
    FileDownloadError,
    FileError,
    FileListError,
    FileUploadError,
    InsufficientScopeError,
    InvalidCommandError,
    InvalidRequestError,
    JobError,
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    LocalFileError,
    NotFoundError,
    QuotaExceededError,
    ServerError,
    ServerShutdownError,
    SessionError,
    SessionNotFoundError,
    SessionStartError,
    SessionStateError,
    TerminalAuthenticationError,
    TerminalConnectionError,
    TerminalError,
    TerminalSendError,
    TerminalSessionNotFoundError,
    TerminalSessionStateError,
    TerminalTimeoutError,
)
from ._resources.jobs import AsyncJobEventStream, JobEventStream
from ._terminal import Terminal
from .wire import (
    CreatedKey,
    CreateKeyRequest,
    CreateSessionRequest,
    ErrorBody,
    ErrorCode,
    ErrorDetail,
    FileDeleteResult,
    FileEntry,
    FileList,
    FileUploadResult,
    HealthInfo,
    JobEvent,
    JobInfo,
    JobList,
    JobOutput,
    JobResult,
    JobStatus,
    KeyInfo,
    KeyList,
    KeyScope,
    NetworkInfo,
    NetworkRequest,
    RunJobRequest,
    SessionInfo,
    SessionLimits,
    SessionList,
    SessionStatus,
    SessionUsage,
    TerminalExit,
    TerminalInit,
    TerminalMessage,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncBastion",
    "AsyncJobEventStream",
    "AsyncTerminal",
    "AuthenticationError",
    "Bastion",
    "BastionError",
    "CreateKeyRequest",
    "CreateSessionRequest",
    "CreatedKey",
    "ErrorBody",
    "ErrorCode",
    "ErrorDetail",
    "FileDeleteError",
    "FileDeleteResult",
    "FileDownloadError",
    "FileEntry",
    "FileError",
    "FileList",
    "FileListError",
    "FileUploadError",
    "FileUploadResult",
    "HealthInfo",
    "InsufficientScopeError",
    "InvalidCommandError",
    "InvalidRequestError",
    "JobError",
    "JobEvent",
    "JobEventStream",
    "JobFailedError",
    "JobInfo",
    "JobList",
    "JobNotFoundError",
    "JobOutput",
    "JobResult",
    "JobStatus",
    "JobTimeoutError",
    "KeyInfo",
    "KeyList",
    "KeyScope",
    "LocalFileError",
    "NetworkInfo",
    "NetworkRequest",
    "NotFoundError",
    "QuotaExceededError",
    "RunJobRequest",
    "ServerError",
    "ServerShutdownError",
    "SessionError",
    "SessionInfo",
    "SessionLimits",
    "SessionList",
    "SessionNotFoundError",
    "SessionStartError",
    "SessionStateError",
    "SessionStatus",
    "SessionUsage",
    "Terminal",
    "TerminalAuthenticationError",
    "TerminalConnectionError",
    "TerminalError",
    "TerminalExit",
    "TerminalInit",
    "TerminalMessage",
    "TerminalSendError",
    "TerminalSessionNotFoundError",
    "TerminalSessionStateError",
    "TerminalTimeoutError",
    "__version__",
]
