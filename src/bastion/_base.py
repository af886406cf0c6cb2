"""What the Bastion clients share, whatever the endpoint, and that does no I/O.

:class:`bastion.Bastion` and :class:`bastion.AsyncBastion` only send requests, read
responses and sleep between retries; the client's configuration (URL, key, timeouts,
pool), an API call as data (:class:`APIRequest`) and its encoding for ``httpx``,
deciding whether and when to retry, parsing and mapping error responses and
translating transport errors all live here, once.  What each endpoint sends and how
its answer is read sits beside its resource, in :mod:`bastion._resources`; reading
upload sources and writing download destinations is in :mod:`bastion._local_files`.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypeVar
from urllib.parse import quote, urlencode

import httpx

from ._exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BastionError,
    FileDeleteError,
    FileDeleteNotFoundError,
    FileDownloadError,
    FileDownloadNotFoundError,
    FileError,
    FileListError,
    FileListNotFoundError,
    FileUploadError,
    FileUploadNotFoundError,
    ImageNotFoundError,
    ImageStateError,
    InsufficientScopeError,
    InvalidCommandError,
    InvalidRecipeError,
    InvalidRequestError,
    JobNotFoundError,
    JobStateError,
    NotFoundError,
    PathNotFoundError,
    QuotaExceededError,
    ServerError,
    ServerShutdownError,
    SessionNotFoundError,
    SessionStartError,
    SessionStateError,
    SnapshotNotFoundError,
    SnapshotStateError,
)
from .wire import API_PREFIX, ErrorCode

if TYPE_CHECKING:
    from ._local_files import UploadBody

#: Kept equal to ``project.version`` in pyproject.toml (a unit test checks).
__version__ = "1.1.0"

DEFAULT_BASE_URL = "http://localhost:8080"
ENV_BASE_URL = "BASTION_URL"
ENV_API_KEY = "BASTION_API_KEY"
DEFAULT_TIMEOUT = 30.0
#: Connect timeout when only ``timeout`` is given (never more than ``timeout``): an
#: unreachable server is reported, or retried, in seconds rather than half a minute.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_RETRIES = 2
#: The connection pool.  ``bastion serve`` (uvicorn) drops a connection after 5 s idle;
#: letting idle connections go a second earlier means the client never picks one the
#: server is closing at that moment (a request on it would fail and need a retry).
DEFAULT_LIMITS = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0
)

#: Uploads from file objects are read and sent in pieces of this size.
UPLOAD_CHUNK_SIZE = 1024 * 1024
DOWNLOAD_CHUNK_SIZE = 1024 * 1024

#: The file operation a request performs: file error codes map to its exception class.
FileOperation = Literal["upload", "list", "delete", "download"]
TimeoutTypes: TypeAlias = float | httpx.Timeout | None


class NotGiven:
    """The default of an argument whose ``None`` already means something.

    ``connect_timeout=None`` disables the connect timeout; leaving it out takes it
    from ``timeout``.
    """

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> Literal[False]:
        return False


NOT_GIVEN: Final = NotGiven()


def build_timeout(timeout: TimeoutTypes, connect_timeout: float | NotGiven | None) -> httpx.Timeout:
    """The client's ``httpx.Timeout`` from its ``timeout`` and ``connect_timeout``.

    An ``httpx.Timeout`` is taken as it is (``connect_timeout``, if given, replaces its
    connect part).  A number is the read, write and pool timeout, and the connect
    timeout is ``connect_timeout``, else the smaller of that number and
    :data:`DEFAULT_CONNECT_TIMEOUT`.  ``None`` disables the timeouts (all but the
    connect timeout, if ``connect_timeout`` is given).
    """
    if isinstance(timeout, httpx.Timeout):
        if isinstance(connect_timeout, NotGiven):
            return timeout
        return httpx.Timeout(
            connect=connect_timeout, read=timeout.read, write=timeout.write, pool=timeout.pool
        )
    if isinstance(connect_timeout, NotGiven):
        connect_timeout = None if timeout is None else min(timeout, DEFAULT_CONNECT_TIMEOUT)
    return httpx.Timeout(timeout, connect=connect_timeout)


# --------------------------------------------------------------------------- client config


class BaseBastion:
    """Configuration and request building shared by the sync and async clients."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int
    limits: httpx.Limits

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        *,
        connect_timeout: float | NotGiven | None = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
        if api_key is None:
            # An empty variable means "no key", not a key of "".
            api_key = os.environ.get(ENV_API_KEY) or None
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = build_timeout(timeout, connect_timeout)
        self.max_retries = max_retries
        self.limits = DEFAULT_LIMITS if limits is None else limits

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

    def _http_options(self) -> dict[str, Any]:
        """The keyword arguments of the ``httpx`` client, sync or async."""
        return {
            "base_url": self.base_url,
            "headers": self._default_headers(),
            "timeout": self.timeout,
            "limits": self.limits,
        }

    def _attempts(self, request: APIRequest) -> Attempts:
        """Fresh retry bookkeeping for one call of ``request``."""
        return Attempts(request, self.max_retries)

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


_T = TypeVar("_T", bound=type)


def docs_from(sync_class: type) -> Callable[[_T], _T]:
    """Class decorator: give each public method of an async class that has no
    docstring the docstring of its sync twin (same name, same arguments; the parity
    test keeps them so).  Methods whose behaviour differs keep their own."""

    def decorate(async_class: _T) -> _T:
        for name, member in vars(async_class).items():
            if name.startswith("_") or not callable(member) or member.__doc__:
                continue
            twin = getattr(sync_class, name, None)
            if twin is not None and twin.__doc__:
                member.__doc__ = twin.__doc__
        if not async_class.__doc__ and sync_class.__doc__:
            async_class.__doc__ = sync_class.__doc__
        return async_class

    return decorate


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def given_fields(**fields: object) -> dict[str, Any]:
    """The fields that are not ``None``, in order: a request body leaves out what the
    caller did not give, so the server's defaults apply."""
    return {name: value for name, value in fields.items() if value is not None}


async def await_result(result: object) -> None:
    """Await what a callback returned, if it is awaitable (the async client's callbacks
    may be plain or ``async def`` functions)."""
    if inspect.isawaitable(result):
        await result


# --------------------------------------------------------------------------- errors

_CODE_ERRORS: dict[str, type[BastionError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequestError,
    ErrorCode.MALFORMED_JSON: InvalidRequestError,
    ErrorCode.UNAUTHORIZED: AuthenticationError,
    ErrorCode.FORBIDDEN_HOST: AuthenticationError,
    ErrorCode.REQUEST_TOO_LARGE: InvalidRequestError,
    ErrorCode.REQUEST_TIMEOUT: InvalidRequestError,
    ErrorCode.TOO_MANY_REQUESTS: InvalidRequestError,
    ErrorCode.INSUFFICIENT_SCOPE: InsufficientScopeError,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceededError,
    ErrorCode.INVALID_CURSOR: InvalidRequestError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.METHOD_NOT_ALLOWED: InvalidRequestError,
    ErrorCode.INTERNAL_ERROR: ServerError,
    ErrorCode.SERVER_SHUTDOWN: ServerShutdownError,
    ErrorCode.SESSION_NOT_FOUND: SessionNotFoundError,
    ErrorCode.SESSION_STATE: SessionStateError,
    ErrorCode.SESSION_STOPPED: SessionStateError,
    ErrorCode.SESSION_PAUSED: SessionStateError,
    ErrorCode.SNAPSHOT_NOT_FOUND: SnapshotNotFoundError,
    ErrorCode.SNAPSHOT_STATE: SnapshotStateError,
    ErrorCode.SESSION_START_FAILED: SessionStartError,
    ErrorCode.IMAGE_NOT_FOUND: ImageNotFoundError,
    ErrorCode.IMAGE_STATE: ImageStateError,
    ErrorCode.INVALID_RECIPE: InvalidRecipeError,
    ErrorCode.LIMIT_EXCEEDED: InvalidRequestError,
    ErrorCode.JOB_NOT_FOUND: JobNotFoundError,
    ErrorCode.INVALID_COMMAND: InvalidCommandError,
    ErrorCode.JOB_STATE: JobStateError,
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
        ErrorCode.PERMISSION_DENIED,
    }
)

_FILE_OPERATION_ERRORS: dict[FileOperation, type[FileError]] = {
    "upload": FileUploadError,
    "list": FileListError,
    "delete": FileDeleteError,
    "download": FileDownloadError,
}


#: A missing path, by operation: the operation's class that is also a NotFoundError.
_FILE_NOT_FOUND_ERRORS: dict[FileOperation, type[FileError]] = {
    "upload": FileUploadNotFoundError,
    "list": FileListNotFoundError,
    "delete": FileDeleteNotFoundError,
    "download": FileDownloadNotFoundError,
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
        if code == ErrorCode.FILE_NOT_FOUND:
            return _FILE_NOT_FOUND_ERRORS[file_op] if file_op else PathNotFoundError
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


def map_http_error(exc: httpx.HTTPError) -> BastionError:
    """The SDK exception for an ``httpx`` error (raise it ``from exc``).

    Timeouts become :class:`APITimeoutError`; every other failure to send a request
    or read a response (refused, reset, protocol and decoding errors) becomes
    :class:`APIConnectionError`.  The message names the server and the request tried
    (``cannot reach the Bastion server at http://localhost:8080 (GET /v1/sessions):
    [Errno 111] Connection refused``): a wrong ``base_url`` or ``$BASTION_URL`` is the
    usual cause, and nothing else would show which one was used.
    """
    detail = str(exc) or type(exc).__name__
    server, tried = _request_tried(exc)
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request to the Bastion server{server} timed out{tried}: {detail}")
    if isinstance(exc, httpx.ConnectError):
        return APIConnectionError(f"cannot reach the Bastion server{server}{tried}: {detail}")
    if isinstance(exc, httpx.RequestError):
        return APIConnectionError(
            f"connection to the Bastion server{server} failed{tried}: {detail}"
        )
    return BastionError(f"HTTP error{tried}: {detail}")


def _request_tried(exc: httpx.HTTPError) -> tuple[str, str]:
    """``(" at ORIGIN", " (METHOD PATH)")`` of the request that failed, or two ``""``."""
    try:
        request = exc.request
    except RuntimeError:  # raised without a request (only by hand-made transports)
        return "", ""
    url = request.url
    origin = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    return f" at {origin}", f" ({request.method} {url.path})"


@contextmanager
def translate_transport_errors() -> Iterator[None]:
    """The one place where ``httpx`` errors become SDK exceptions (see above)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise map_http_error(exc) from exc


# --------------------------------------------------------------------------- retries

#: Answers worth another attempt: a proxy or load balancer in front of the server
#: could not reach it.  Not the server's own ``server_shutdown`` (503): it is going
#: away, and a retry within the backoff would only find it gone.
RETRY_STATUSES: frozenset[int] = frozenset({502, 503, 504})
#: The request never left the client: retrying cannot do anything twice.
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
#: Transient failures of a request that may have been sent.  Read and pool timeouts
#: are not among them: ``timeout`` is the caller's bound on a slow answer, and a
#: retry would multiply it.  Local protocol errors and bad URLs do not go away.
_TRANSIENT_ERRORS = (
    httpx.NetworkError,  # ConnectError, ReadError, WriteError, CloseError
    httpx.RemoteProtocolError,  # e.g. a kept-alive connection the server just closed
    httpx.ConnectTimeout,
    httpx.WriteTimeout,
)
#: Backoff: 0.5 s, 1 s, 2 s, ... up to 8 s, each shortened by up to a quarter at
#: random so that many clients failing together do not retry together.
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
#: A ``Retry-After`` longer than this is ignored in favour of the usual backoff.
MAX_RETRY_AFTER = 60.0


def retry_delay(
    retries: int, retry_after: float | None = None, *, rng: Callable[[], float] | None = None
) -> float:
    """Seconds to wait before retry number ``retries + 1``.

    Args:
        retries: Retries made so far.
        retry_after: The answer's ``Retry-After`` in seconds, used when reasonable.
        rng: A ``random.random`` to draw the jitter from (tests pass their own).
    """
    if retry_after is not None and 0.0 <= retry_after <= MAX_RETRY_AFTER:
        return retry_after
    delay = min(INITIAL_RETRY_DELAY * 2.0**retries, MAX_RETRY_DELAY)
    return delay * (1.0 - 0.25 * (rng or random.random)())


def parse_retry_after(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """The ``Retry-After`` header in seconds (a number or an HTTP date), else ``None``."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - (time.time() if now is None else now)


class Attempts:
    """The retry bookkeeping of one call: whether, and after how long, to try again.

    The I/O loop asks :meth:`retry_after_error` after a failed send and
    :meth:`retry_after_response` after an error response; ``None`` means "give up and
    raise", a number the seconds to sleep before the next attempt.  The policy:

    * An idempotent request (``APIRequest.idempotent``: GETs, DELETEs, PUT of a
      buffered upload, start/stop, creates that carry an ``Idempotency-Key``) is
      retried on transient transport errors and on 502/503/504 (but for the
      server's own ``server_shutdown``).
    * Any other request (``POST .../jobs``, an upload streamed from a file object) is
      retried only when the connection could not be opened: it never left the client,
      so nothing can happen twice.
    * A streamed upload is never sent again once its source has been read from.

    Args:
        request: The request being sent.
        max_retries: Retries allowed after the first attempt.
    """

    def __init__(self, request: APIRequest, max_retries: int) -> None:
        self.request = request
        self.max_retries = max_retries
        self.retries = 0
        #: An attempt that was retried may have reached the server and taken effect
        #: (its answer was lost): a "wrong state" or "not found" answer to a later
        #: attempt may then be the mark of the earlier one's success.
        self.may_have_taken_effect = False

    def retry_after_error(self, exc: httpx.HTTPError) -> float | None:
        not_sent = isinstance(exc, _NOT_SENT_ERRORS)
        transient = isinstance(exc, _TRANSIENT_ERRORS) if self.request.idempotent else not_sent
        return self._next(transient, sent=not not_sent, retry_after=None)

    def retry_after_response(self, response: httpx.Response) -> float | None:
        transient = (
            self.request.idempotent
            and response.status_code in RETRY_STATUSES
            and parse_error_body(response.status_code, response.content)[0]
            != ErrorCode.SERVER_SHUTDOWN
        )
        return self._next(transient, sent=True, retry_after=parse_retry_after(response.headers))

    def _next(self, transient: bool, *, sent: bool, retry_after: float | None) -> float | None:
        if not transient or self.retries >= self.max_retries:
            return None
        body = self.request.body
        if body is not None and not body.can_resend():
            return None
        if sent:
            self.may_have_taken_effect = True
        delay = retry_delay(self.retries, retry_after)
        self.retries += 1
        return delay


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class APIRequest:
    """One API call as data: what both clients send, attempt after attempt.

    Attributes:
        timeout: ``None`` means the client's timeouts.
        body: The content of an upload (built anew for each attempt).
        file_op: The file operation, for the class of file errors.
        idempotent: Sending it twice has the effect of sending it once (see
            :class:`Attempts` for what is retried).
    """

    method: str
    url: str
    params: Mapping[str, str] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    timeout: httpx.Timeout | None = None
    body: UploadBody | None = None
    file_op: FileOperation | None = None
    idempotent: bool = True


def encode_json_body(body: Any) -> bytes:
    """``body`` as JSON in UTF-8, as httpx would encode it, but refusing here, as an
    :class:`InvalidRequestError`, what JSON cannot carry: text UTF-8 cannot encode (a
    lone surrogate such as ``"\\ud800"``) and numbers that are not finite."""
    try:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            "the request holds text that is not valid Unicode (a lone surrogate such as "
            f"'\\ud800' cannot be encoded as UTF-8): {exc}"
        ) from exc
    except ValueError as exc:
        raise InvalidRequestError(f"the request cannot be sent as JSON: {exc}") from exc


def build_http_request(
    http: httpx.Client | httpx.AsyncClient, request: APIRequest
) -> httpx.Request:
    """The ``httpx.Request`` for one attempt of ``request``."""
    headers = dict(request.headers or {})
    content = None
    if request.body is not None:
        headers.update(request.body.headers)
        content = request.body.content()
    elif request.json is not None:
        headers["Content-Type"] = "application/json"
        content = encode_json_body(request.json)
    url = request.url
    if request.params:
        # Encoded here, not by httpx: a path may name bytes that are not UTF-8 (a file
        # listed with such a name carries them as lone surrogates, PEP 383), and they
        # must reach the server as those very bytes.
        url += "?" + urlencode(
            [(k, v.encode("utf-8", "surrogateescape")) for k, v in request.params.items()]
        )
    return http.build_request(
        request.method,
        url,
        content=content,
        headers=headers,
        timeout=httpx.USE_CLIENT_DEFAULT if request.timeout is None else request.timeout,
    )
