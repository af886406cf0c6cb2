"""Exit statuses of the ``bastion`` command line and the error each one stands for.

One table, :class:`ExitCode`, is the contract scripts rely on; docs/CLI.md shows it
(a test keeps the two equal).  :func:`describe` turns any exception a command lets
escape into that status and the one line printed on stderr,
``bastion: <message> (<code>)``: the code is the server's error code when there is
one, else a code of the command line's own (``connection_error``, ``timeout``,
``job_failed``, an errno name for local files...).
"""

from __future__ import annotations

import errno
from enum import IntEnum

from .._exceptions import (
    APIConnectionError,
    AuthenticationError,
    BastionError,
    InvalidCommandError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    SessionStateError,
    TerminalConnectionError,
)
from ..wire import ErrorCode

__all__ = ["ExitCode", "UsageError", "describe"]


class UsageError(Exception):
    """A command line that parses but cannot work (exit status 2, code ``usage``)."""


class ExitCode(IntEnum):
    """Exit statuses of every ``bastion`` client command (``exec`` and ``shell`` exit
    with the remote command's status instead)."""

    #: Success.
    OK = 0
    #: The job failed (``jobs run``, ``jobs wait``), or another error: the server failed,
    #: a session could not start, a local file could not be read or written...
    FAILED = 1
    #: Usage: a bad command line, or a value the server rejected (``invalid_request``,
    #: ``limit_exceeded``, ``invalid_command``, ``invalid_path``, ``file_too_large``),
    #: or a command whose extra is not installed.
    USAGE = 2
    #: Not found: no such session, job or file (remote or local).
    NOT_FOUND = 3
    #: Conflict: the session is in the wrong state (e.g. not running), or a path is of
    #: the wrong kind (a directory where a file was expected, a non-empty directory).
    CONFLICT = 4
    #: Authentication: the API key is missing or not accepted, or its scope does not
    #: allow the command (``insufficient_scope``).
    AUTH = 5
    #: Connection: the server cannot be reached, or the connection broke.
    CONNECTION = 6
    #: Timeout: a request timed out, or ``--timeout``/``--wait-timeout`` passed while
    #: waiting for a job (the job keeps running).
    TIMEOUT = 7
    #: Interrupted by Ctrl-C (128 + SIGINT, as a shell reports it).
    INTERRUPTED = 130


_USAGE_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.MALFORMED_JSON,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.INVALID_COMMAND,
        ErrorCode.INVALID_PATH,
        ErrorCode.FILE_TOO_LARGE,
        ErrorCode.INVALID_RECIPE,
    }
)
_NOT_FOUND_CODES = frozenset(
    {
        ErrorCode.NOT_FOUND,
        ErrorCode.SESSION_NOT_FOUND,
        ErrorCode.JOB_NOT_FOUND,
        ErrorCode.FILE_NOT_FOUND,
        ErrorCode.IMAGE_NOT_FOUND,
        ErrorCode.SNAPSHOT_NOT_FOUND,
    }
)
_CONFLICT_CODES = frozenset(
    {
        ErrorCode.SESSION_STATE,
        ErrorCode.SESSION_PAUSED,
        ErrorCode.IMAGE_STATE,
        ErrorCode.SNAPSHOT_STATE,
        ErrorCode.NOT_A_DIRECTORY,
        ErrorCode.IS_A_DIRECTORY,
        ErrorCode.DIRECTORY_NOT_EMPTY,
    }
)

_LOCAL_ERRNO_EXIT = {
    errno.ENOENT: ExitCode.NOT_FOUND,
    errno.EISDIR: ExitCode.CONFLICT,
    errno.ENOTDIR: ExitCode.CONFLICT,
    errno.EEXIST: ExitCode.CONFLICT,
}


def exit_code(exc: BaseException) -> ExitCode:
    """The exit status for an exception a command did not handle."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, UsageError):
        return ExitCode.USAGE
    if isinstance(exc, JobFailedError):
        return ExitCode.FAILED
    if isinstance(exc, BastionError) and exc.code:
        # By the server's code first: it is the most precise.
        code = exc.code
        if code in _USAGE_CODES:
            return ExitCode.USAGE
        if code in _NOT_FOUND_CODES:
            return ExitCode.NOT_FOUND
        if code in _CONFLICT_CODES:
            return ExitCode.CONFLICT
        if code in (ErrorCode.UNAUTHORIZED, ErrorCode.INSUFFICIENT_SCOPE):
            return ExitCode.AUTH
    if isinstance(exc, TimeoutError):  # before OSError, of which it is one
        return ExitCode.TIMEOUT
    if isinstance(exc, OSError):  # a local file (also the SDK's LocalFileError)
        return _LOCAL_ERRNO_EXIT.get(exc.errno or 0, ExitCode.FAILED)
    # Then by class: client-side errors, terminal close codes, codes unknown here.
    if isinstance(exc, AuthenticationError):
        return ExitCode.AUTH
    if isinstance(exc, NotFoundError):
        return ExitCode.NOT_FOUND
    if isinstance(exc, SessionStateError):
        return ExitCode.CONFLICT
    if isinstance(exc, APIConnectionError | TerminalConnectionError):
        return ExitCode.CONNECTION
    if isinstance(exc, InvalidRequestError | InvalidCommandError):
        return ExitCode.USAGE
    return ExitCode.FAILED


def error_code(exc: BaseException) -> str:
    """The code shown in brackets: the server's, or one of the command line's own."""
    if isinstance(exc, BastionError) and exc.code:
        return exc.code
    if isinstance(exc, UsageError):
        return "usage"
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(exc, JobFailedError):
        return "job_failed"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, AuthenticationError):
        return "unauthorized"
    if isinstance(exc, APIConnectionError | TerminalConnectionError):
        return "connection_error"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, "os_error")
    if isinstance(exc, BastionError):
        return "error"
    if isinstance(exc, OSError):
        return "os_error"
    return "internal_error"


def error_message(exc: BaseException, base_url: str | None = None) -> str:
    if isinstance(exc, APIConnectionError) and not isinstance(exc, TimeoutError):
        # The SDK's message names the server and the request it tried; this older
        # form (an httpx error raised without its request) gets the server named here.
        prefix = "connection to the Bastion server failed: "
        if exc.message.startswith(prefix):
            where = f" at {base_url}" if base_url else ""
            return f"cannot reach the Bastion server{where}: {exc.message[len(prefix) :]}"
        return exc.message
    if isinstance(exc, OSError) and not isinstance(exc, BastionError):
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}"
        return exc.strerror or str(exc)
    if isinstance(exc, BastionError):
        return exc.message
    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


def describe(exc: BaseException, base_url: str | None = None) -> tuple[ExitCode, str]:
    """``(exit status, the stderr line)`` for an exception."""
    return exit_code(exc), f"bastion: {error_message(exc, base_url)} ({error_code(exc)})"
