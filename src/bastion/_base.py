"""Everything the Bastion clients share that does no I/O.

:class:`bastion.Bastion` and :class:`bastion.AsyncBastion` only send requests, read
responses and sleep between retries; building URLs, headers and whole requests,
shaping request bodies, deciding whether and when to retry, parsing and mapping error
responses, translating transport errors, long-poll bookkeeping and job-result checks
all live here, once.  (Reading upload sources and writing download destinations is in
:mod:`bastion._local_files`.)
"""

from __future__ import annotations

import email.utils
import inspect
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypeVar, cast
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
    JobFailedError,
    JobNotFoundError,
    JobStateError,
    JobTimeoutError,
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
from ._pages import page_params
from .wire import (
    API_PREFIX,
    FINAL_JOB_STATUSES,
    IDEMPOTENCY_HEADER,
    JOB_WAIT_MAX_HOLD,
    MAX_INLINE_STDIN,
    CreateKeyRequest,
    CreateSessionRequest,
    ErrorCode,
    ExpiryAction,
    FileDeleteResult,
    JobEvent,
    JobInfo,
    JobLimitsRequest,
    KeyScopeName,
    NetworkRequest,
    RunJobRequest,
    SessionInfo,
    SessionLimits,
    SessionStatus,
)

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

#: Hold asked for while ``watch()`` sees a queued job.  The wait endpoint answers only
#: when the job is final or the hold ends, so the queued -> running change is seen at
#: most this late; once running, only the final change is left and holds are long.
WATCH_QUEUED_HOLD = 1.0

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


def _session_url(session_id: str, *rest: str) -> str:
    return BaseBastion._url("sessions", session_id, *rest)


def health_request() -> APIRequest:
    return APIRequest("GET", f"{API_PREFIX}/health")


def create_session_request(body: CreateSessionRequest, idempotency_key: str | None) -> APIRequest:
    """``POST /sessions``: safe to retry, the key makes the server create it once.

    The key is chosen here, once per call, so every attempt carries the same one.
    """
    return APIRequest(
        "POST",
        BaseBastion._url("sessions"),
        json=body,
        headers={IDEMPOTENCY_HEADER: idempotency_key or new_idempotency_key()},
    )


def get_session_request(session_id: str) -> APIRequest:
    return APIRequest("GET", _session_url(session_id))


def list_sessions_request(limit: int | None = None, cursor: str | None = None) -> APIRequest:
    return APIRequest("GET", BaseBastion._url("sessions"), params=page_params(limit, cursor))


def create_key_request(body: CreateKeyRequest) -> APIRequest:
    """``POST /keys``: not idempotent (a repeat would make a second key)."""
    return APIRequest("POST", BaseBastion._url("keys"), json=body, idempotent=False)


def list_keys_request() -> APIRequest:
    return APIRequest("GET", BaseBastion._url("keys"))


def revoke_key_request(key: str) -> APIRequest:
    return APIRequest("DELETE", BaseBastion._url("keys", key))


def create_key_body(scope: str, name: str | None, tenant: str | None) -> CreateKeyRequest:
    body: CreateKeyRequest = {"scope": cast(KeyScopeName, scope)}
    if name is not None:
        body["name"] = name
    if tenant is not None:
        body["tenant"] = tenant
    return body


SessionAction = Literal["start", "stop", "pause", "resume", "delete"]

#: The status each action leaves a session in.
SESSION_ACTION_TARGETS: dict[SessionAction, SessionStatus] = {
    "start": SessionStatus.RUNNING,
    "stop": SessionStatus.STOPPED,
    "pause": SessionStatus.PAUSED,
    "resume": SessionStatus.RUNNING,
    "delete": SessionStatus.DELETED,
}


def session_action_request(session_id: str, action: SessionAction) -> APIRequest:
    """``POST .../start``, ``POST .../stop`` or ``DELETE``: idempotent in effect.

    A repeat after a lost answer is refused as ``session_state`` (the session is
    already there); :func:`session_action_recovered` tells when that is success.
    """
    if action == "delete":
        return APIRequest("DELETE", _session_url(session_id))
    return APIRequest("POST", _session_url(session_id, action))


def session_action_recovered(error: BastionError, attempts: Attempts) -> bool:
    """Whether ``error`` may mean an earlier attempt of a session action did its work.

    If so, the caller reads the session and returns it when it is in the action's
    target state (:data:`SESSION_ACTION_TARGETS`), else raises ``error``.
    """
    return attempts.may_have_taken_effect and isinstance(error, SessionStateError)


def session_reached(action: SessionAction, info: SessionInfo) -> bool:
    return info["status"] == SESSION_ACTION_TARGETS[action]


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
        _session_url(session_id, "jobs"),
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
        _session_url(session_id, "jobs", job_id, "stdin"),
        params={"close": "true"} if close else None,
        body=body,
        idempotent=False,
    )


def kill_job_request(session_id: str, job_id: str, signal: str | int) -> APIRequest:
    return APIRequest(
        "POST",
        _session_url(session_id, "jobs", job_id, "kill"),
        json={"signal": signal},
        idempotent=False,
    )


def processes_request(session_id: str) -> APIRequest:
    return APIRequest("GET", _session_url(session_id, "processes"))


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


def get_job_request(session_id: str, job_id: str) -> APIRequest:
    return APIRequest("GET", _session_url(session_id, "jobs", job_id))


def list_jobs_request(
    session_id: str, limit: int | None = None, cursor: str | None = None
) -> APIRequest:
    return APIRequest("GET", _session_url(session_id, "jobs"), params=page_params(limit, cursor))


def wait_job_request(
    session_id: str, job_id: str, hold: float, timeout: httpx.Timeout
) -> APIRequest:
    """One long poll: the server answers when the job is final or ``hold`` ends."""
    return APIRequest(
        "GET",
        _session_url(session_id, "jobs", job_id, "wait"),
        params={"timeout": format_hold(hold)},
        timeout=timeout,
    )


def job_events_request(session_id: str, job_id: str, timeout: httpx.Timeout) -> APIRequest:
    return APIRequest(
        "GET",
        _session_url(session_id, "jobs", job_id, "events"),
        headers={"Accept": NDJSON_MEDIA_TYPE},
        timeout=timeout,
    )


def _file_params(path: str, user: str, **more: str) -> dict[str, str]:
    params = {"path": path, **more}
    if user != "user":
        params["user"] = user
    return params


def upload_request(
    session_id: str, path: str, body: UploadBody, *, mode: int | None = None, user: str = "user"
) -> APIRequest:
    """``PUT .../files``: replaces the file, so idempotent when the body can be resent."""
    if mode is not None and not (isinstance(mode, int) and 0 <= mode <= 0o777):
        raise ValueError(f"mode must be permission bits between 0o000 and 0o777, not {mode!r}")
    extra = {"mode": format(mode, "o")} if mode is not None else {}
    return APIRequest(
        "PUT",
        _session_url(session_id, "files"),
        params=_file_params(path, user, **extra),
        body=body,
        file_op="upload",
        idempotent=body.buffered,
    )


def delete_file_request(
    session_id: str, path: str, recursive: bool, *, user: str = "user"
) -> APIRequest:
    params = _file_params(path, user)
    if recursive:
        params["recursive"] = "true"
    return APIRequest("DELETE", _session_url(session_id, "files"), params=params, file_op="delete")


def file_delete_recovered(
    path: str, error: BastionError, attempts: Attempts
) -> FileDeleteResult | None:
    """The result of a retried delete whose earlier attempt may have deleted ``path``.

    A ``file_not_found`` answer after such an attempt is the mark of its success.
    """
    if attempts.may_have_taken_effect and error.code == ErrorCode.FILE_NOT_FOUND:
        return {"path": path, "deleted": True}
    return None


def download_request(session_id: str, path: str, *, user: str = "user") -> APIRequest:
    return APIRequest(
        "GET",
        _session_url(session_id, "files", "content"),
        params=_file_params(path, user),
        file_op="download",
    )


def upload_archive_request(
    session_id: str, path: str, body: UploadBody, *, user: str
) -> APIRequest:
    """``POST .../files/archive``: a tar stream extracted into directory ``path``
    (a stream: retried only if the connection could not be opened)."""
    return APIRequest(
        "POST",
        _session_url(session_id, "files", "archive"),
        params=_file_params(path, user),
        body=body,
        file_op="upload",
        idempotent=False,
    )


def download_archive_request(session_id: str, path: str, *, user: str) -> APIRequest:
    """``GET .../files/archive``: directory ``path`` as a tar stream."""
    return APIRequest(
        "GET",
        _session_url(session_id, "files", "archive"),
        params=_file_params(path, user),
        file_op="download",
    )


def list_files_request(
    session_id: str,
    path: str,
    *,
    user: str = "user",
    limit: int | None = None,
    cursor: str | None = None,
) -> APIRequest:
    return APIRequest(
        "GET",
        _session_url(session_id, "files"),
        params=_file_params(path, user, **page_params(limit, cursor)),
        file_op="list",
    )


# --------------------------------------------------------------------------- request bodies


def create_session_body(
    limits: SessionLimits | None,
    metadata: Mapping[str, str] | None,
    *,
    idle_timeout: float | None = None,
    max_lifetime: float | None = None,
    on_timeout: ExpiryAction | None = None,
    network: NetworkRequest | None = None,
    env: Mapping[str, str] | None = None,
    paused_timeout: float | None = None,
    snapshot: str | None = None,
    image: str | None = None,
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
    if env is not None:
        body["env"] = dict(env)
    if paused_timeout is not None:
        body["paused_timeout"] = paused_timeout
    if snapshot is not None:
        body["snapshot"] = snapshot
    if image is not None:
        body["image"] = image
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
    stdin: bool | str | None = None,
    limits: JobLimitsRequest | Mapping[str, int] | None = None,
    user: Literal["user", "root"] | None = None,
) -> RunJobRequest:
    body: RunJobRequest = {"command": normalize_command(command)}
    if user is not None:
        body["user"] = user
    if stdin is not None and stdin is not False:
        body["stdin"] = stdin
    if limits is not None:
        body["limits"] = cast(JobLimitsRequest, dict(limits))
    if env is not None:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout"] = timeout
    return body


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

    def wants_snapshot(self, status: str) -> bool:
        """Whether a ``status`` event calls for the job's full info, to report it.

        Status events carry only the name; the snapshot callers get is the job's full
        ``JobInfo``.  The final one comes with ``end``, after all output.
        """
        return status not in FINAL_JOB_STATUSES and self.is_new(status)


# --------------------------------------------------------------------------- job events

#: Media type of the job event stream (one JSON object per line).
NDJSON_MEDIA_TYPE = "application/x-ndjson"

#: Callbacks return nothing of use; the async client awaits what they return if it
#: is awaitable, so ``async def`` callbacks work there.
OutputCallback: TypeAlias = Callable[[str], object]
EventCallback: TypeAlias = Callable[[JobEvent], object]
#: A callback call to make: the callback with its argument bound.
CallbackCall: TypeAlias = Callable[[], object]


async def await_result(result: object) -> None:
    """Await what a callback returned, if it is awaitable (the async client's callbacks
    may be plain or ``async def`` functions)."""
    if inspect.isawaitable(result):
        await result


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
