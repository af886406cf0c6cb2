"""Error mapping of the SDK: wire codes and HTTP statuses to exception classes."""

from __future__ import annotations

import asyncio
import io
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import bastion
import bastion._base
from bastion import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    Bastion,
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
    JobInfo,
    JobNotFoundError,
    JobTimeoutError,
    NotFoundError,
    QuotaExceededError,
    ServerError,
    ServerShutdownError,
    SessionError,
    SessionNotFoundError,
    SessionStartError,
    SessionStateError,
    TerminalConnectionError,
    TerminalSendError,
    _exceptions,
)
from bastion._base import error_class
from bastion.wire import ERROR_HTTP_STATUS, ErrorCode

Handler = Callable[[httpx.Request], httpx.Response]

#: What each wire code must become.  Written out here, independently of the SDK's own
#: table, and required to cover every ErrorCode: a new code fails this file until the
#: SDK maps it on purpose.
FILE = "by file operation"
EXPECTED: dict[ErrorCode, type[BastionError] | str] = {
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
    ErrorCode.SESSION_START_FAILED: SessionStartError,
    ErrorCode.SESSION_PAUSED: SessionStateError,
    ErrorCode.SNAPSHOT_NOT_FOUND: bastion.SnapshotNotFoundError,
    ErrorCode.SNAPSHOT_STATE: bastion.SnapshotStateError,
    ErrorCode.IMAGE_NOT_FOUND: bastion.ImageNotFoundError,
    ErrorCode.IMAGE_STATE: bastion.ImageStateError,
    ErrorCode.INVALID_RECIPE: bastion.InvalidRecipeError,
    ErrorCode.JOB_STATE: bastion.JobStateError,
    ErrorCode.LIMIT_EXCEEDED: InvalidRequestError,
    ErrorCode.JOB_NOT_FOUND: JobNotFoundError,
    ErrorCode.INVALID_COMMAND: InvalidCommandError,
    ErrorCode.INVALID_PATH: FILE,
    ErrorCode.FILE_NOT_FOUND: FILE,
    ErrorCode.NOT_A_DIRECTORY: FILE,
    ErrorCode.IS_A_DIRECTORY: FILE,
    ErrorCode.DIRECTORY_NOT_EMPTY: FILE,
    ErrorCode.DISK_FULL: FILE,
    ErrorCode.PERMISSION_DENIED: FILE,
    ErrorCode.FILE_TOO_LARGE: FILE,
    ErrorCode.FILE_OPERATION_FAILED: FILE,
}

#: What a missing path raises, by the operation's file class.
NOT_FOUND_BY_OPERATION: dict[type[BastionError] | None, type[BastionError]] = {
    FileUploadError: bastion.FileUploadNotFoundError,
    FileListError: bastion.FileListNotFoundError,
    FileDeleteError: bastion.FileDeleteNotFoundError,
    FileDownloadError: bastion.FileDownloadNotFoundError,
}

#: One SDK call per kind of operation, and the file class it must raise for file codes.
Operation = Callable[[Bastion], object]
OPERATIONS: dict[str, tuple[Operation, type[BastionError] | None]] = {
    "sessions.create": (lambda c: c.sessions.create(), None),
    "sessions.start": (lambda c: c.sessions.start("s1"), None),
    "jobs.run": (lambda c: c.jobs.run("s1", ["true"]), None),
    "jobs.wait": (lambda c: c.jobs.wait("s1", "j1", timeout=1), None),
    "files.upload": (lambda c: c.files.upload("s1", b"x", "/x"), FileUploadError),
    "files.upload_fileobj": (
        lambda c: c.files.upload("s1", io.BytesIO(b"x" * 10), "/x"),
        FileUploadError,
    ),
    "files.list": (lambda c: c.files.list("s1", "/"), FileListError),
    "files.delete": (lambda c: c.files.delete("s1", "/x"), FileDeleteError),
    "files.download": (lambda c: c.files.download("s1", "/x"), FileDownloadError),
    "files.iter_download": (lambda c: list(c.files.iter_download("s1", "/x")), FileDownloadError),
    "files.download_to": (
        lambda c: c.files.download_to("s1", "/x", io.BytesIO()),
        FileDownloadError,
    ),
}


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """5xx and transport errors are retried (test_sdk_transport.py): without waiting here."""
    monkeypatch.setattr(bastion._base, "INITIAL_RETRY_DELAY", 0.0)


def make_client(handler: Handler) -> Bastion:
    return Bastion("http://bastion.test", "key", transport=httpx.MockTransport(handler))


def error_response(code: str, status: int, message: str = "boom") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()  # consume a streamed upload like a server would
        return httpx.Response(status, json={"error": {"code": code, "message": message}})

    return handler


def test_expected_table_covers_every_wire_code() -> None:
    assert set(EXPECTED) == set(ErrorCode)
    assert set(ERROR_HTTP_STATUS) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_wire_code_maps_to_a_class(code: ErrorCode) -> None:
    status = ERROR_HTTP_STATUS[code]
    expected = EXPECTED[code]
    if expected == FILE:
        missing = code == ErrorCode.FILE_NOT_FOUND  # also a NotFoundError, by cause
        assert error_class(code, status) is (bastion.PathNotFoundError if missing else FileError)
        for op, cls in (
            ("upload", FileUploadError),
            ("list", FileListError),
            ("delete", FileDeleteError),
            ("download", FileDownloadError),
        ):
            assert error_class(code, status, op) is (
                NOT_FOUND_BY_OPERATION[cls] if missing else cls
            )
    else:
        assert error_class(code, status) is expected
        # Non-file codes keep their class whatever the operation.
        assert error_class(code, status, "upload") is expected


@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_error_responses_raise_mapped_exception(code: ErrorCode, operation: str) -> None:
    call, file_class = OPERATIONS[operation]
    expected = EXPECTED[code]
    if expected == FILE:
        expected = file_class or FileError
        if code == ErrorCode.FILE_NOT_FOUND:  # the operation's class, and NotFoundError
            expected = NOT_FOUND_BY_OPERATION.get(file_class, bastion.PathNotFoundError)
    assert isinstance(expected, type)
    status = ERROR_HTTP_STATUS[code]
    with make_client(error_response(code, status, "it broke")) as client:
        with pytest.raises(expected) as info:
            call(client)
    err = info.value
    assert type(err) is expected
    assert err.code == code
    assert err.status_code == status
    assert err.message == "it broke" == str(err)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, b"", AuthenticationError),
        (403, b"forbidden", AuthenticationError),
        (404, b"<html>nope</html>", NotFoundError),
        (409, b'{"error": {"code": "from_the_future", "message": "new"}}', InvalidRequestError),
        (429, b"slow down", InvalidRequestError),
        (500, b"Internal Server Error", ServerError),
        (502, b"<html>bad gateway</html>", ServerError),
        (503, b"", ServerError),
    ],
)
def test_status_fallback_when_code_missing_or_unknown(
    status: int, body: bytes, expected: type[BastionError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"Content-Type": "text/html"})

    with make_client(handler) as client, pytest.raises(expected) as info:
        client.sessions.list()
    assert type(info.value) is expected
    assert info.value.status_code == status
    assert str(status) in info.value.message or info.value.message == "new"
    if body and not body.startswith(b"{"):
        assert body.decode() in info.value.message  # non-JSON bodies still give a message


def test_proxy_413_on_upload_is_an_upload_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(413, text="<html>Request Entity Too Large</html>")

    with make_client(handler) as client, pytest.raises(FileUploadError) as info:
        client.files.upload("s1", b"x" * 100, "/big")
    assert info.value.code is None
    assert "Too Large" in info.value.message


def test_framework_detail_body_gives_message() -> None:
    handler = lambda request: httpx.Response(422, json={"detail": [{"msg": "field required"}]})  # noqa: E731
    with make_client(handler) as client, pytest.raises(InvalidRequestError, match="field required"):
        client.sessions.create()


def test_non_json_success_body_is_a_bastion_error() -> None:
    handler = lambda request: httpx.Response(200, text="<html>login page</html>")  # noqa: E731
    with make_client(handler) as client, pytest.raises(BastionError, match="expected a JSON"):
        client.sessions.list()


# --------------------------------------------------------------------------- hierarchy


def test_every_exception_derives_from_bastion_error() -> None:
    for name in _exceptions.__all__:
        cls = getattr(_exceptions, name)
        assert issubclass(cls, BastionError), name
        assert getattr(bastion, name) is cls


def test_product_page_hierarchy() -> None:
    assert issubclass(SessionStateError, SessionError)
    assert issubclass(SessionNotFoundError, SessionError)
    assert issubclass(SessionNotFoundError, NotFoundError)
    assert issubclass(JobFailedError, JobError)
    assert issubclass(JobNotFoundError, JobError)
    assert issubclass(InvalidCommandError, JobError)
    for cls in (FileUploadError, FileListError, FileDeleteError, FileDownloadError):
        assert issubclass(cls, FileError)
    for cls in (TerminalConnectionError, TerminalSendError):
        assert issubclass(cls, BastionError)
    assert issubclass(APITimeoutError, APIConnectionError)


def test_timeouts_are_builtin_timeout_errors() -> None:
    err = JobTimeoutError("late", timeout=1.0)
    assert isinstance(err, TimeoutError)
    assert isinstance(err, JobError)
    assert str(err) == "late"
    assert err.timeout == 1.0
    assert isinstance(APITimeoutError("slow"), TimeoutError)
    with pytest.raises(TimeoutError):
        raise JobTimeoutError("late")


def test_exceptions_pickle() -> None:
    err = SessionStateError("not running", code="session_state", status_code=409)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is SessionStateError
    assert (copy.message, copy.code, copy.status_code) == ("not running", "session_state", 409)
    timeout = pickle.loads(pickle.dumps(JobTimeoutError("late", job=failed_job(), timeout=2.0)))
    assert timeout.job_id == "j1"
    assert timeout.timeout == 2.0


# --------------------------------------------------------------------------- JobFailedError


def failed_job(**output: Any) -> JobInfo:
    return {
        "job_id": "j1",
        "session_id": "s1",
        "status": "failed",
        "command": ["python3", "/main.py"],
        "created_at": "2024-01-01T00:00:00Z",
        "started_at": "2024-01-01T00:00:01Z",
        "finished_at": "2024-01-01T00:00:02Z",
        "failure_reason": None,
        "output": {
            "console_output": "partial\n",
            "errout": "Traceback...\nNameError: name 'x' is not defined\n",
            "status_code": 1,
            **output,
        },
    }


def test_job_failed_error_is_the_result() -> None:
    result = failed_job()
    err = JobFailedError(result)
    assert err.result is result
    assert err.job_id == "j1"
    assert err.exit_status == 1
    assert err.status_code == 1  # the same, kept for compatibility
    assert err.console_output == "partial\n"
    assert err.errout.endswith("not defined\n")
    assert err.failure_reason is None
    assert err["status"] == "failed"
    assert err["output"] == result["output"]
    assert dict(err) == result
    assert set(err) == set(result)
    assert len(err) == len(result)
    assert "output" in err
    assert err.get("nope") is None
    assert "NameError" in str(err) and "exit status 1" in str(err)
    assert hash(err) == hash(err) and err == err and err != JobFailedError(result)
    copy = pickle.loads(pickle.dumps(err))
    assert dict(copy) == result and copy.message == err.message
    assert copy.exit_status == 1


def test_job_failed_error_without_output() -> None:
    result = failed_job()
    result["output"] = None
    result["failure_reason"] = "timeout"
    err = JobFailedError(result)
    assert err.exit_status is None and err.status_code is None
    assert err.console_output == "" and err.errout == ""
    assert err.failure_reason == "timeout"
    assert str(err) == "job j1 failed (timeout)"


# --------------------------------------------------------------------------- transport


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpx.ConnectError("refused"), APIConnectionError),
        (httpx.RemoteProtocolError("peer closed"), APIConnectionError),
        (httpx.ReadError("reset"), APIConnectionError),
        (httpx.ConnectTimeout("slow connect"), APITimeoutError),
        (httpx.ReadTimeout("slow read"), APITimeoutError),
    ],
)
def test_transport_errors_are_translated(
    raised: httpx.TransportError, expected: type[BastionError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    with make_client(handler) as client, pytest.raises(expected) as info:
        client.sessions.list()
    assert type(info.value) is expected
    assert info.value.__cause__ is raised
    if expected is APITimeoutError:
        assert isinstance(info.value, TimeoutError)


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (
            httpx.ConnectError("[Errno 111] Connection refused"),
            "cannot reach the Bastion server at {at} ({tried}): [Errno 111] Connection refused",
        ),
        (
            httpx.ReadError("reset"),
            "connection to the Bastion server at {at} failed ({tried}): reset",
        ),
        (
            httpx.ReadTimeout(""),
            "request to the Bastion server at {at} timed out ({tried}): ReadTimeout",
        ),
    ],
)
def test_connection_errors_name_the_url_tried(raised: httpx.TransportError, message: str) -> None:
    """A wrong base_url / $BASTION_URL shows in the message (sync and async clients)."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    async def async_handler(request: httpx.Request) -> httpx.Response:
        raise raised

    url = "http://bastion.test:9999/prefix"
    expected = message.format(at="http://bastion.test:9999", tried="GET /prefix/v1/sessions")
    with Bastion(url, transport=httpx.MockTransport(handler), max_retries=0) as client:
        with pytest.raises(bastion.APIConnectionError) as info:
            client.sessions.list()
    assert str(info.value) == expected

    async def run() -> bastion.APIConnectionError:
        transport = httpx.MockTransport(async_handler)
        async with bastion.AsyncBastion(url, transport=transport, max_retries=0) as client:
            with pytest.raises(bastion.APIConnectionError) as info:
                await client.sessions.list()
        return info.value

    assert str(asyncio.run(run())) == expected


def test_unreachable_server_is_a_connection_error() -> None:
    # Port 1 on loopback: nothing listens there, the connect is refused at once.
    with Bastion("http://127.0.0.1:1", timeout=5) as client:
        with pytest.raises(APIConnectionError) as info:
            client.health()
    assert isinstance(info.value.__cause__, httpx.TransportError)


# --------------------------------------------------------------------------- no leaks


class TrackedStream(httpx.SyncByteStream):
    """A response body that remembers whether it was closed."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if self.fail_after is not None and index >= self.fail_after:
                raise httpx.ReadError("connection reset mid-body")
            yield chunk

    def close(self) -> None:
        self.closed = True


def tracked_client(status: int, stream: TrackedStream) -> Bastion:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, stream=stream, headers={"Content-Type": "application/json"})

    return make_client(handler)


ERROR_BODY = [b'{"error": {"code": "file_not_found", ', b'"message": "no such file"}}']


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.sessions.get("s1"),
        lambda c: c.files.download("s1", "/x"),
        lambda c: list(c.files.iter_download("s1", "/x")),
        lambda c: c.files.download_to("s1", "/x", io.BytesIO()),
    ],
    ids=["json", "download", "iter_download", "download_to"],
)
def test_error_responses_are_closed(call: Operation) -> None:
    stream = TrackedStream(ERROR_BODY)
    with tracked_client(404, stream) as client, pytest.raises(BastionError):
        call(client)
    assert stream.closed


def test_abandoned_download_iterator_closes_response() -> None:
    stream = TrackedStream([b"a" * 10, b"b" * 10, b"c" * 10])
    with tracked_client(200, stream) as client:
        chunks = client.files.iter_download("s1", "/x", chunk_size=10)
        assert next(chunks) == b"a" * 10
        assert not stream.closed
        chunks.close()  # what contextlib.closing or garbage collection does
        assert stream.closed


def test_broken_download_is_translated_and_closed(tmp_path: Any) -> None:
    stream = TrackedStream([b"a" * 10, b"b" * 10], fail_after=1)
    dest = tmp_path / "out.bin"
    with tracked_client(200, stream) as client, pytest.raises(APIConnectionError):
        client.files.download_to("s1", "/x", dest)
    assert stream.closed
    assert not dest.exists()  # the partial file is removed


def test_download_error_leaves_existing_file_alone(tmp_path: Any) -> None:
    dest = tmp_path / "keep.txt"
    dest.write_bytes(b"precious")
    with make_client(error_response("file_not_found", 404)) as client:
        with pytest.raises(FileDownloadError):
            client.files.download_to("s1", "/x", dest)
    assert dest.read_bytes() == b"precious"


@pytest.mark.parametrize("operation", ["files.list", "files.delete", "files.download"])
def test_a_missing_path_is_also_a_not_found_error(operation: str) -> None:
    call, op_class = OPERATIONS[operation]
    with make_client(error_response("file_not_found", 404)) as client:
        with pytest.raises(NotFoundError) as caught:
            call(client)
    assert isinstance(caught.value, bastion.PathNotFoundError)
    assert op_class is not None and isinstance(caught.value, op_class)
    assert caught.value.code == "file_not_found"
