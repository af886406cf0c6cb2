"""Bastion: the Python SDK of a self-hosted sandboxed execution runtime.

    from bastion import Bastion

    with Bastion() as bastion:                       # $BASTION_URL, $BASTION_API_KEY
        sid = bastion.sessions.create()["session_id"]
        bastion.sessions.start(sid)
        bastion.files.upload(sid, b'print("hi")', "/main.py")
        result = bastion.jobs.run_and_wait(sid, ["python3", "/main.py"])
        print(result["output"]["console_output"])    # hi
        bastion.jobs.run_and_wait(sid, "make", on_stdout=print)   # live output
        with bastion.terminal.connect(session_id=sid, on_message=print) as term:
            term.exec("echo hello")                  # a live shell
        bastion.sessions.delete(sid)

Responses are plain dicts typed by the ``TypedDict``s re-exported here (defined in
:mod:`bastion.wire`); every exception derives from :class:`BastionError`.
"""

from ._base import __version__
from ._client import Bastion
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
    InvalidCommandError,
    InvalidRequestError,
    JobError,
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    NotFoundError,
    ServerError,
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
from ._resources.jobs import JobEventStream
from ._terminal import Terminal
from .wire import (
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
    "AuthenticationError",
    "Bastion",
    "BastionError",
    "CreateSessionRequest",
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
    "NetworkInfo",
    "NetworkRequest",
    "NotFoundError",
    "RunJobRequest",
    "ServerError",
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
