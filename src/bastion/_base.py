"""Everything the Bastion clients share that does no I/O.

The sync :class:`bastion.Bastion` (and a later ``AsyncBastion``) only send requests
and read responses; building URLs and headers, shaping request bodies, parsing and
mapping error responses, translating transport errors, long-poll bookkeeping and
job-result checks all live here, once.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol, TypeAlias, cast
from urllib.parse import quote

import httpx

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
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    NotFoundError,
    ServerError,
    SessionNotFoundError,
    SessionStartError,
    SessionStateError,
)
from .wire import (
    API_PREFIX,
    FINAL_JOB_STATUSES,
    JOB_WAIT_MAX_HOLD,
    CreateSessionRequest,
    ErrorCode,
    ExpiryAction,
    JobEvent,
    JobInfo,
    NetworkRequest,
    RunJobRequest,
    SessionLimits,
)

#: Kept equal to ``project.version`` in pyproject.toml (a unit test checks).
__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://localhost:8080"
ENV_BASE_URL = "BASTION_URL"
ENV_API_KEY = "BASTION_API_KEY"
DEFAULT_TIMEOUT = 30.0

#: Uploads from file objects are read and sent in pieces of this size.
UPLOAD_CHUNK_SIZE = 1024 * 1024
DOWNLOAD_CHUNK_SIZE = 1024 * 1024

#: Hold asked for while ``watch()`` sees a queued job.  The wait endpoint answers only
#: when the job is final or the hold ends, so the queued -> running change is seen at
#: most this late; once running, only the final change is left and holds are long.
WATCH_QUEUED_HOLD = 1.0

#: The file operation a request performs: file error codes map to its exception class.
FileOperation = Literal["upload", "list", "delete", "download"]
TimeoutTypes: TypeAlias = float | httpx.Timeout | None


class SupportsReadBytes(Protocol):
    """A binary file object: ``read(n)`` returns at most ``n`` bytes, ``b""`` at EOF."""

    def read(self, size: int, /) -> bytes: ...


class SupportsWriteBytes(Protocol):
    def write(self, data: bytes, /) -> int: ...


UploadData: TypeAlias = bytes | bytearray | memoryview | SupportsReadBytes
DownloadDestination: TypeAlias = str | os.PathLike[str] | SupportsWriteBytes


# --------------------------------------------------------------------------- client config


class BaseBastion:
    """Configuration and request building shared by the sync and async clients."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
        if api_key is None:
            # An empty variable means "no key", not a key of "".
            api_key = os.environ.get(ENV_API_KEY) or None
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)

    def __repr__(self) -> str:
        # Never show the API key.
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _default_headers(self) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "User-Agent": f"bastion-py-sdk/{__version__}",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @staticmethod
    def _url(*segments: str) -> str:
        """Build an API path from path segments, each one URL-quoted.

        ``_url("sessions", sid, "jobs")`` gives ``/v1/sessions/<sid>/jobs``.  An id can
        never reach another endpoint: ``/`` is quoted, and ``.`` / ``..`` (which URL
        normalisation would collapse) are escaped as ``%2E``.

        Raises:
            ValueError: A segment is empty (``sessions.delete("")`` must not turn into
                a request on the collection).
        """
        quoted = []
        for segment in segments:
            if not isinstance(segment, str) or not segment:
                raise ValueError(f"URL path segment must be a non-empty string, got {segment!r}")
            if segment in (".", ".."):
                quoted.append(segment.replace(".", "%2E"))
            else:
                quoted.append(quote(segment, safe=""))
        return API_PREFIX + "/" + "/".join(quoted)

    def _event_stream_timeout(self, read: float | None) -> httpx.Timeout:
        """HTTP timeouts for an event stream: the client's, but ``read`` between lines.

        A job can be silent for as long as it runs, so a stream followed without a
        deadline has no read timeout at all (``read=None``).
        """
        base = self.timeout
        return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)

    def _long_poll_timeout(self, hold: float) -> httpx.Timeout:
        """HTTP timeouts for a request the server holds up to ``hold`` seconds.

        The read timeout is the hold plus the client's usual read timeout, the margin
        the server gets to answer once the hold ends.
        """
        base = self.timeout
        read = None if base.read is None else hold + base.read
        return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


# --------------------------------------------------------------------------- errors

_CODE_ERRORS: dict[str, type[BastionError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequestError,
    ErrorCode.MALFORMED_JSON: InvalidRequestError,
    ErrorCode.UNAUTHORIZED: AuthenticationError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.METHOD_NOT_ALLOWED: InvalidRequestError,
    ErrorCode.INTERNAL_ERROR: ServerError,
    ErrorCode.SESSION_NOT_FOUND: SessionNotFoundError,
    ErrorCode.SESSION_STATE: SessionStateError,
    ErrorCode.SESSION_START_FAILED: SessionStartError,
    ErrorCode.LIMIT_EXCEEDED: InvalidRequestError,
    ErrorCode.JOB_NOT_FOUND: JobNotFoundError,
    ErrorCode.INVALID_COMMAND: InvalidCommandError,
}

#: Codes whose class depends on the operation (an upload fails with FileUploadError...).
_FILE_CODES: frozenset[str] = frozenset(
    {
        ErrorCode.INVALID_PATH,
        ErrorCode.FILE_NOT_FOUND,
        ErrorCode.NOT_A_DIRECTORY,
        ErrorCode.IS_A_DIRECTORY,
        ErrorCode.DIRECTORY_NOT_EMPTY,
        ErrorCode.FILE_TOO_LARGE,
        ErrorCode.DISK_FULL,
        ErrorCode.FILE_OPERATION_FAILED,
    }
)

_FILE_OPERATION_ERRORS: dict[FileOperation, type[FileError]] = {
    "upload": FileUploadError,
    "list": FileListError,
    "delete": FileDeleteError,
    "download": FileDownloadError,
}


def error_class(
    code: str | None, status_code: int, file_op: FileOperation | None = None
) -> type[BastionError]:
    """The exception class for an error response: by ``code`` first, then HTTP status.

    Args:
        code: The ``error.code`` of the body, or ``None`` when the body had none.
        status_code: The HTTP status of the response.
        file_op: The file operation the request performed, if any.
    """
    if code is not None:
        if code in _FILE_CODES:
            return _FILE_OPERATION_ERRORS[file_op] if file_op else FileError
        if code in _CODE_ERRORS:
            return _CODE_ERRORS[code]
    # An unknown code (a newer server) or no code at all (a proxy's error page).
    if status_code == 413 and file_op is not None:
        return _FILE_OPERATION_ERRORS[file_op]
    if status_code in (401, 403):
        return AuthenticationError
    if status_code == 404:
        return NotFoundError
    if 400 <= status_code < 500:
        return InvalidRequestError
    if status_code >= 500:
        return ServerError
    return BastionError


def parse_error_body(status_code: int, content: bytes, reason: str = "") -> tuple[str | None, str]:
    """``(code, message)`` from an error body; a non-JSON body still gives a message."""
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            message = error.get("message")
            return (
                code if isinstance(code, str) else None,
                message if isinstance(message, str) and message else f"HTTP {status_code}",
            )
        detail = body.get("detail")  # a framework's own error shape, if one slips through
        if detail is not None:
            return None, f"HTTP {status_code}: {detail}"
    text = content.decode("utf-8", "replace").strip()
    if len(text) > 500:
        text = text[:500] + "..."
    summary = f"HTTP {status_code} {reason}".rstrip()
    return None, f"{summary}: {text}" if text else summary


def make_api_error(response: httpx.Response, file_op: FileOperation | None = None) -> BastionError:
    """The exception for an error response whose body has been read."""
    code, message = parse_error_body(response.status_code, response.content, response.reason_phrase)
    cls = error_class(code, response.status_code, file_op)
    return cls(message, code=code, status_code=response.status_code)


def parse_json(response: httpx.Response) -> Any:
    """The JSON body of a successful response."""
    try:
        return response.json()
    except ValueError as exc:
        raise BastionError(
            f"expected a JSON response from {response.request.url}, got "
            f"{response.headers.get('content-type', 'no content type')!r}",
            status_code=response.status_code,
        ) from exc


@contextmanager
def translate_transport_errors() -> Iterator[None]:
    """The one place where ``httpx`` transport errors become SDK exceptions."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"request timed out: {exc or type(exc).__name__}") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(
            f"connection to the Bastion server failed: {exc or type(exc).__name__}"
        ) from exc


# --------------------------------------------------------------------------- request bodies


def create_session_body(
    limits: SessionLimits | None,
    metadata: Mapping[str, str] | None,
    *,
    idle_timeout: float | None = None,
    max_lifetime: float | None = None,
    on_timeout: ExpiryAction | None = None,
    network: NetworkRequest | None = None,
) -> CreateSessionRequest:
    body: CreateSessionRequest = {}
    if limits is not None:
        body["limits"] = limits
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if idle_timeout is not None:
        body["idle_timeout"] = idle_timeout
    if max_lifetime is not None:
        body["max_lifetime"] = max_lifetime
    if on_timeout is not None:
        body["on_timeout"] = on_timeout
    if network is not None:
        body["network"] = network
    return body


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
) -> RunJobRequest:
    body: RunJobRequest = {"command": normalize_command(command)}
    if env is not None:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout"] = timeout
    return body


def upload_body(
    data: UploadData, chunk_size: int = UPLOAD_CHUNK_SIZE
) -> tuple[bytes | Iterator[bytes], dict[str, str]]:
    """Request content and headers for an upload, never holding a file in memory.

    ``bytes`` go as they are; other buffers are sent in slices (no copy of the whole
    buffer) with their length; file objects are read ``chunk_size`` bytes at a time
    and sent with chunked transfer encoding.

    Raises:
        TypeError: ``data`` is a ``str``, a text file or no binary data at all.
    """
    headers = {"Content-Type": "application/octet-stream"}
    if isinstance(data, bytes):
        return data, headers
    if isinstance(data, bytearray | memoryview):
        view = memoryview(data).cast("B")
        # httpx sends the generator with this Content-Length instead of chunked encoding.
        headers["Content-Length"] = str(view.nbytes)
        return _iter_buffer(view, chunk_size), headers
    if isinstance(data, str):
        raise TypeError("upload data must be bytes or a binary file object, not str")
    if isinstance(data, io.TextIOBase):
        raise TypeError("upload needs a file opened in binary mode ('rb'), not a text file")
    if not callable(getattr(data, "read", None)):
        raise TypeError(
            f"upload data must be bytes or a binary file object, not {type(data).__name__}"
        )
    return _iter_file(data, chunk_size), headers


def _iter_buffer(view: memoryview, chunk_size: int) -> Iterator[bytes]:
    for start in range(0, view.nbytes, chunk_size):
        yield bytes(view[start : start + chunk_size])


def _iter_file(fileobj: SupportsReadBytes, chunk_size: int) -> Iterator[bytes]:
    while True:
        chunk: bytes | None = fileobj.read(chunk_size)
        if chunk is None:
            # A non-blocking file with no data ready; treating it as EOF would
            # silently truncate the upload.
            raise ValueError(
                "upload file object returned None: non-blocking files are not supported"
            )
        if not chunk:
            return
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError(f"upload file object returned {type(chunk).__name__}, not bytes")
        yield bytes(chunk)


# --------------------------------------------------------------------------- jobs


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


def format_hold(hold: float) -> str:
    """The ``timeout`` query value for a hold: seconds, millisecond precision."""
    return f"{round(hold, 3):g}"


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


# --------------------------------------------------------------------------- job events

#: Media type of the job event stream (one JSON object per line).
NDJSON_MEDIA_TYPE = "application/x-ndjson"

OutputCallback: TypeAlias = Callable[[str], object]
EventCallback: TypeAlias = Callable[[JobEvent], object]


def parse_job_event(line: str) -> JobEvent | None:
    """One line of the NDJSON job event stream; ``None`` for a blank (keep-alive) line.

    Events of a type this SDK does not know are returned as they are, so a newer
    server can add some; callers ignore what they do not handle.

    Raises:
        BastionError: The line is not a JSON object with a string ``type``, or an
            ``end`` event carries no job.
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
    return cast(JobEvent, event)


class JobFollower:
    """Follows one job through its event stream, without doing any I/O.

    The I/O side feeds each event to :meth:`feed` (which calls the output callbacks,
    in order) and stops once :attr:`final` is set; between events it calls
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

    def feed(self, event: JobEvent) -> None:
        kind = event["type"]
        if kind == "stdout" or kind == "stderr":
            data = event.get("data", "")
            callback = self._on_stdout if kind == "stdout" else self._on_stderr
            if callback is not None and data:
                callback(data)
            if self._on_output is not None:
                self._on_output(event)
        elif kind == "status":
            status = event.get("status")
            if status is not None:
                self.job = cast(JobInfo, {**self.job, "status": status})
        elif kind == "end":
            self.final = event["job"]
            self.job = self.final

    def check_deadline(self) -> None:
        """Raise :class:`JobTimeoutError` if the deadline passed before the end."""
        if self.final is None and self.poll.expired():
            raise self.timeout_error()

    def timeout_error(self) -> JobTimeoutError:
        return job_timeout_error(self.job, self.poll.timeout)


def stream_ended_early(job_id: str) -> APIConnectionError:
    """The stream closed without its ``end`` event (the server went away mid-stream)."""
    return APIConnectionError(f"the event stream of job {job_id} ended before the job did")
