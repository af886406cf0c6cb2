"""Exceptions raised by the Bastion SDK.

Every exception the SDK raises on purpose derives from :class:`BastionError`, which
carries the server's machine-readable error ``code`` (a :class:`bastion.wire.ErrorCode`
value, or ``None`` when the failure did not come from an error response) and the HTTP
``status_code``.  Classes that also derive from a built-in say so in brackets::

    BastionError
    ├── APIConnectionError            server unreachable, connection dropped mid-request
    │   └── APITimeoutError           [TimeoutError] connect/read/write/pool timeout
    ├── AuthenticationError           unauthorized, forbidden_host (401, 403)
    ├── InsufficientScopeError        insufficient_scope (403): the key's scope forbids it
    ├── QuotaExceededError            quota_exceeded (429): a session or job quota is full
    ├── InvalidRequestError           invalid_request, malformed_json, method_not_allowed,
    │                                 limit_exceeded, request_too_large, request_timeout,
    │                                 too_many_requests, invalid_cursor, any other 4xx
    ├── NotFoundError                 not_found (unknown URL); base of the two *NotFound below
    ├── ServerError                   internal_error, other 5xx, non-JSON error pages
    │   └── ServerShutdownError       [APIConnectionError] server_shutdown (503)
    ├── SessionError                  any session_* code, whatever the operation
    │   ├── SessionNotFoundError      [NotFoundError] session_not_found
    │   ├── SessionStateError         session_state: wrong state for the operation;
    │   │                             session_stopped: a transfer's session stopped;
    │   │                             session_paused: the session is paused
    │   └── SessionStartError         session_start_failed
    ├── SnapshotError
    │   ├── SnapshotNotFoundError     [NotFoundError] snapshot_not_found
    │   └── SnapshotStateError        snapshot_state: not ready (being made, or failed)
    ├── JobError
    │   ├── JobNotFoundError          [NotFoundError] job_not_found
    │   ├── InvalidCommandError       invalid_command
    │   ├── JobStateError             job_state: stdin or kill of a job not running
    │   ├── JobFailedError            [Mapping] the job ended "failed"; it *is* the result
    │   └── JobTimeoutError           [TimeoutError] wait()/watch() deadline passed
    ├── FileError                     file codes, as the class of the operation performed
    │   ├── FileUploadError
    │   ├── FileListError
    │   ├── FileDeleteError
    │   ├── FileDownloadError
    │   ├── PathNotFoundError     [NotFoundError] file_not_found, whatever the operation;
    │   │                         raised as File{Upload,List,Delete,Download}NotFoundError,
    │   │                         each both the operation's class and this one
    │   └── LocalFileError        [OSError] a local file of upload()/download_to() failed
    └── TerminalError
        ├── TerminalConnectionError   the WebSocket could not be opened, or broke
        │   ├── TerminalAuthenticationError  [AuthenticationError] close 4001, HTTP 401/403
        │   ├── TerminalForbiddenError       [InsufficientScopeError] close 4003 (a viewer)
        │   ├── TerminalSessionNotFoundError [SessionNotFoundError] close 4004, HTTP 404
        │   └── TerminalSessionStateError    [SessionStateError] close 4009, HTTP 409
        ├── TerminalSendError         input sent after close or on a broken connection
        └── TerminalTimeoutError      [TimeoutError] Terminal.wait() deadline passed

Low-level errors never escape the SDK: ``httpx`` errors are translated to
:class:`APIConnectionError` / :class:`APITimeoutError` at one choke point (after the
retries the request allows), ``websockets`` errors to :class:`TerminalError`
subclasses, undecodable JSON to :class:`BastionError`, and an ``OSError`` from a local
file handed to ``files.upload`` / ``files.download_to`` to :class:`LocalFileError`
(still an ``OSError``); the original exception is chained as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .wire import JobInfo

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "BastionError",
    "FileDeleteError",
    "FileDeleteNotFoundError",
    "FileDownloadError",
    "FileDownloadNotFoundError",
    "FileError",
    "FileListError",
    "FileListNotFoundError",
    "FileUploadError",
    "FileUploadNotFoundError",
    "ImageBuildError",
    "ImageError",
    "ImageNotFoundError",
    "ImageStateError",
    "InsufficientScopeError",
    "InvalidCommandError",
    "InvalidRecipeError",
    "InvalidRequestError",
    "JobError",
    "JobFailedError",
    "JobNotFoundError",
    "JobStateError",
    "JobTimeoutError",
    "LocalFileError",
    "NotFoundError",
    "PathNotFoundError",
    "QuotaExceededError",
    "ServerError",
    "ServerShutdownError",
    "SessionError",
    "SessionNotFoundError",
    "SessionStartError",
    "SessionStateError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "SnapshotStateError",
    "TerminalAuthenticationError",
    "TerminalConnectionError",
    "TerminalError",
    "TerminalForbiddenError",
    "TerminalSendError",
    "TerminalSessionNotFoundError",
    "TerminalSessionStateError",
    "TerminalTimeoutError",
]


class BastionError(Exception):
    """Base class of every exception the SDK raises.

    Attributes:
        message: Human-readable description (also what ``str(exc)`` returns).
        code: The server's machine-readable error code (see ``bastion.wire.ErrorCode``),
            or ``None`` when the error did not come from an error response.
        status_code: The HTTP status of the error response, or ``None``.  (Except on
            :class:`JobFailedError`, where no HTTP error happened: there it is the
            job's exit status, which is also, unambiguously, its ``exit_status``.)
    """

    message: str
    code: str | None
    status_code: int | None

    def __init__(
        self, message: str, *, code: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!r}, "
            f"status_code={self.status_code!r})"
        )


# --------------------------------------------------------------------------- transport


class APIConnectionError(BastionError):
    """The server could not be reached, or the connection failed mid-request."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """An HTTP request timed out (connect, read, write or connection-pool timeout)."""


# --------------------------------------------------------------------------- generic API


class AuthenticationError(BastionError):
    """The API key is missing or wrong (``unauthorized``)."""


class InsufficientScopeError(BastionError):
    """The key is valid, but its scope does not allow the request
    (``insufficient_scope``, 403): a ``viewer`` key writing or opening a terminal, an
    ``agent`` key managing keys."""


class QuotaExceededError(BastionError):
    """A quota of the key's tenant or of the server is full (``quota_exceeded``, 429):
    sessions, running sessions or running jobs.  Nothing was created or started;
    delete or stop sessions, or wait for jobs to end, and try again."""


class InvalidRequestError(BastionError):
    """The server rejected the request as malformed or over a limit."""


class NotFoundError(BastionError):
    """Something addressed by the request does not exist."""


class ServerError(BastionError):
    """The server failed (``internal_error`` or any other 5xx answer)."""


class ServerShutdownError(ServerError, APIConnectionError):
    """The server began to shut down before it could answer (``server_shutdown``, 503).

    Raised for a job ``wait`` or an event stream the server was holding when it began
    to shut down, and for a job it refused to start then; not retried (the
    server is going away).  A job that was running runs on in its sandbox: once the
    server is back, it is taken up again (wait for it or stream it again).
    It is also an :class:`APIConnectionError`, as a connection the server cut.
    """


# --------------------------------------------------------------------------- images


class ImageError(BastionError):
    """An image operation failed."""


class ImageNotFoundError(ImageError, NotFoundError):
    """The key has no image of this name, and none is shared."""


class ImageStateError(ImageError):
    """The image cannot do this now: not ready for a session, or still in use (by
    sessions, or images built over it) for a delete."""


class InvalidRecipeError(ImageError, InvalidRequestError):
    """The recipe cannot be built as written; the message names the key."""


class ImageBuildError(ImageError):
    """A build failed (a step's exit status, its timeout); nothing of it was kept.

    Attributes:
        image: The image's info (``status`` ``"failed"``, ``status_reason``); its log
            (``images.log(name)``) has the failing step's output.
    """

    def __init__(self, image: Mapping[str, object]) -> None:
        super().__init__(
            f"image {image.get('name')!r} failed to build: {image.get('status_reason')}",
            code="image_build_failed",
        )
        self.image = image


# --------------------------------------------------------------------------- sessions


class SessionError(BastionError):
    """A session operation failed."""


class SessionNotFoundError(SessionError, NotFoundError):
    """No session has this id (it may have been deleted)."""


class SessionStateError(SessionError):
    """The session is not in a state that allows the operation (e.g. not running)."""


class SessionStartError(SessionError):
    """The server could not start the session's sandbox."""


# --------------------------------------------------------------------------- snapshots


class SnapshotError(BastionError):
    """A snapshot operation failed."""


class SnapshotNotFoundError(SnapshotError, NotFoundError):
    """No snapshot of this key has this id (it may have been deleted)."""


class SnapshotStateError(SnapshotError):
    """The snapshot is not ready for the operation (still being made, or failed)."""


# --------------------------------------------------------------------------- jobs


class JobError(BastionError):
    """A job operation failed."""


class JobNotFoundError(JobError, NotFoundError):
    """No job has this id in this session."""


class InvalidCommandError(JobError):
    """The command is empty or otherwise unusable."""


class JobStateError(JobError):
    """The job cannot do this now: it ended, or has no open stdin to write to."""


class JobFailedError(JobError, Mapping[str, object]):
    """A job finished with status ``"failed"``.

    The exception *is* the job's result: it is a read-only ``Mapping`` over the job's
    ``JobInfo`` dict, so ``err["output"]["errout"]`` and ``dict(err)`` work, and the
    usual fields are attributes too.  (It cannot subclass ``dict``: ``dict`` and
    ``Exception`` have incompatible C layouts.)  Equality and hashing stay those of an
    exception (identity); compare ``dict(err)`` to compare results.

    Attributes:
        result: The final ``JobInfo`` dict.
        job_id: The job's id.
        exit_status: The process's exit status (``output["status_code"]`` of the
            result), or ``None`` when the job produced no output (it never started,
            or was killed before reporting one).  Prefer it to ``status_code``.
        status_code: The same exit status, kept for compatibility (the result names
            it ``status_code`` too).  Unlike every other error's ``status_code`` it
            is not an HTTP status: no HTTP error happened here.  Code that handles
            any :class:`BastionError` by its HTTP status should test for
            :class:`JobFailedError` first, or read ``exit_status`` here.
        console_output: Captured standard output (``""`` when there is no output).
        errout: Captured standard error (``""`` when there is no output).
        failure_reason: Why the server failed the job when it is not its own exit
            status (``"timeout"``, ``"not_found"``, ...), else ``None``.
    """

    result: JobInfo

    def __init__(self, result: JobInfo, message: str | None = None) -> None:
        output = result.get("output")
        exit_status = output["status_code"] if output else None
        super().__init__(
            message if message is not None else _describe_failure(result, exit_status),
            status_code=exit_status,
        )
        # ``args`` is what pickling passes back to ``__init__``; keep it rebuildable.
        self.args = (result, self.message)
        self.result = result
        self._mapping: Mapping[str, object] = result

    @property
    def job_id(self) -> str:
        return self.result["job_id"]

    @property
    def exit_status(self) -> int | None:
        output = self.result.get("output")
        return output["status_code"] if output else None

    @property
    def console_output(self) -> str:
        output = self.result.get("output")
        return output["console_output"] if output else ""

    @property
    def errout(self) -> str:
        output = self.result.get("output")
        return output["errout"] if output else ""

    @property
    def failure_reason(self) -> str | None:
        return self.result.get("failure_reason")

    def __getitem__(self, key: str) -> object:
        return self._mapping[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)

    # Mapping defines value equality and so sets __hash__ to None; an exception must
    # stay hashable (logging, traceback and task frameworks put them in sets).
    __eq__ = object.__eq__
    __hash__ = object.__hash__


class JobTimeoutError(JobError, TimeoutError):
    """A job did not reach a final state before the caller's deadline.

    Only the client stopped waiting: the job itself keeps running on the server (pass
    ``timeout=`` to ``jobs.run`` for a server-side limit that kills it).

    Attributes:
        job_id: The job's id.
        job: The last ``JobInfo`` the server returned, or ``None``.
        timeout: The deadline in seconds that passed.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        job: JobInfo | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(message, code=code, status_code=status_code)
        self.job = job
        self.job_id = job["job_id"] if job is not None else None
        self.timeout = timeout


# --------------------------------------------------------------------------- files


class FileError(BastionError):
    """A file operation failed."""


class FileUploadError(FileError):
    """Uploading a file failed (bad path, too large, parent is a file, ...)."""


class FileListError(FileError):
    """Listing a directory failed (no such directory, not a directory, ...)."""


class FileDeleteError(FileError):
    """Deleting a path failed (no such path, non-empty directory, ...)."""


class FileDownloadError(FileError):
    """Downloading a file failed (no such file, is a directory, ...)."""


class PathNotFoundError(FileError, NotFoundError):
    """The path does not exist in the session (``file_not_found``).

    Whatever the operation, a missing path is also a :class:`NotFoundError`: the
    operation's own class below says what was being done, this one says why it failed,
    so ``except NotFoundError`` catches a missing file as it catches a missing session.
    """


class FileUploadNotFoundError(FileUploadError, PathNotFoundError):
    """Uploading where a path the upload needs does not exist."""


class FileListNotFoundError(FileListError, PathNotFoundError):
    """Listing a directory that does not exist."""


class FileDeleteNotFoundError(FileDeleteError, PathNotFoundError):
    """Deleting a path that does not exist."""


class FileDownloadNotFoundError(FileDownloadError, PathNotFoundError):
    """Downloading a file (or a tree) that does not exist."""


class LocalFileError(FileError, OSError):
    """A local file given to the SDK could not be read or written.

    Raised when ``files.upload`` cannot read its file object, or ``files.download_to``
    cannot open or write its destination.  It is also an ``OSError`` with the
    original's ``errno``, ``strerror`` and ``filename``, so ``except OSError`` keeps
    working; the original is its ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        strerror: str | None = None,
        filename: str | None = None,
    ) -> None:
        super().__init__(message)
        self.errno = errno
        self.strerror = strerror
        self.filename = filename

    @classmethod
    def wrap(cls, exc: OSError, doing: str) -> LocalFileError:
        """The error for ``exc``, raised while ``doing`` (``"reading the upload"``)."""
        filename = exc.filename if isinstance(exc.filename, str) else None
        where = f" {filename!r}" if filename else ""
        return cls(
            f"{doing}{where} failed: {exc.strerror or exc}",
            errno=exc.errno,
            strerror=exc.strerror,
            filename=filename,
        )

    def __reduce__(self) -> tuple[object, ...]:
        # errno/strerror/filename are OSError slots, not in __dict__: pickle them too.
        state = {
            **self.__dict__,
            "errno": self.errno,
            "strerror": self.strerror,
            "filename": self.filename,
        }
        return (type(self), (self.message,), state)


# --------------------------------------------------------------------------- terminal


class TerminalError(BastionError):
    """A terminal operation failed."""


class TerminalConnectionError(TerminalError):
    """The terminal WebSocket could not be opened, or it closed unexpectedly.

    Attributes:
        close_code: The WebSocket close code the server sent (see
            ``bastion.wire.TerminalCloseCode``), or ``None`` when the connection was
            refused before the WebSocket opened or broke without a close frame.
        status_code: The HTTP status when the server refused the WebSocket handshake.
    """

    close_code: int | None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        close_code: int | None = None,
    ) -> None:
        super().__init__(message, code=code, status_code=status_code)
        self.close_code = close_code


class TerminalAuthenticationError(TerminalConnectionError, AuthenticationError):
    """The server refused the terminal: missing or invalid API key (close code 4001)."""


class TerminalForbiddenError(TerminalConnectionError, InsufficientScopeError):
    """The key's scope does not allow terminals: a viewer key (close code 4003)."""


class TerminalSessionNotFoundError(TerminalConnectionError, SessionNotFoundError):
    """No session has this id, or it belongs to another key (close code 4004)."""


class TerminalSessionStateError(TerminalConnectionError, SessionStateError):
    """The session is not running, or was stopped or deleted while attached (4009)."""


class TerminalSendError(TerminalError):
    """Input could not be sent: the terminal is closed or its connection broke."""


class TerminalTimeoutError(TerminalError, TimeoutError):
    """``Terminal.wait()`` gave up before the shell exited (the shell keeps running)."""


def _describe_failure(result: JobInfo, exit_status: int | None) -> str:
    parts = [f"job {result['job_id']} failed"]
    if exit_status is not None:
        parts.append(f"with exit status {exit_status}")
    reason = result.get("failure_reason")
    if reason:
        parts.append(f"({reason})")
    message = " ".join(parts)
    output = result.get("output")
    # The tail of stderr is what a reader of a traceback needs first.
    tail = output["errout"].strip()[-300:] if output else ""
    return f"{message}: {tail}" if tail else message
