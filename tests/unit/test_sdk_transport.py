"""Transport behaviour of both clients: timeouts, retries, pooling, errors, no leaks.

Most tests run twice, against :class:`Bastion` and :class:`AsyncBastion`, with an
``httpx.MockTransport`` whose handler answers from a script (an async handler for the
async client).  The last section uses real sockets: a local ``http.server`` and the
clients' own connection pools.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.server
import inspect
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import bastion._base
import bastion._client
from bastion import (
    APIConnectionError,
    APITimeoutError,
    AsyncBastion,
    Bastion,
    BastionError,
    FileDeleteError,
    FileDownloadError,
    LocalFileError,
    ServerError,
    ServerShutdownError,
    SessionStateError,
)
from bastion._base import (
    DEFAULT_LIMITS,
    MAX_RETRY_DELAY,
    parse_retry_after,
    retry_delay,
)
from bastion._terminal_base import open_timeout_for
from bastion.wire import IDEMPOTENCY_HEADER

pytestmark = pytest.mark.timeout(60)

Client = Bastion | AsyncBastion
Factory = Callable[[httpx.Request], httpx.Response]
Outcome = Factory | Exception


def answer(status: int = 200, body: Any = None, **headers: str) -> Factory:
    """A fresh JSON response per request (a response object is not reusable)."""

    def make(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return make


def error(code: str, status: int) -> Factory:
    return answer(status, {"error": {"code": code, "message": code}})


def session(status: str = "running") -> dict[str, Any]:
    return {"session_id": "s1", "status": status}


class Script:
    """A MockTransport handler answering from a list of outcomes (the last repeats)."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.content)  # MockTransport has read the body
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome(request)

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        return self(request)

    @property
    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


def run(mode: str, script: Script, op: Callable[[Any], Any], **options: Any) -> Any:
    """``op(client)`` with a sync or an async client (awaiting what it returns)."""
    options.setdefault("base_url", "http://bastion.test")
    if mode == "sync":
        with Bastion(transport=httpx.MockTransport(script), **options) as client:
            return op(client)

    async def main() -> Any:
        transport = httpx.MockTransport(script.handle_async)
        async with AsyncBastion(transport=transport, **options) as client:
            result = op(client)
            return await result if inspect.isawaitable(result) else result

    return asyncio.run(main())


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retries without waiting; the delays asked for are recorded."""
    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)

    async def async_sleep(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(bastion._client, "time", SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(bastion._client, "asyncio", SimpleNamespace(sleep=async_sleep))
    return delays


# --------------------------------------------------------------------------- timeouts


def test_default_timeouts_split_connect_from_read() -> None:
    with Bastion("http://bastion.test") as client:
        assert client.timeout == httpx.Timeout(30.0, connect=5.0)
    assert inspect.signature(Bastion).parameters["timeout"].default == 30.0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"timeout": 30.0, "connect_timeout": 5.0}, httpx.Timeout(30.0, connect=5.0)),
        ({"timeout": 60.0, "connect_timeout": 20.0}, httpx.Timeout(60.0, connect=20.0)),
        ({"timeout": 2.0}, httpx.Timeout(2.0)),  # connect never longer unless asked
        ({"timeout": None}, httpx.Timeout(None)),
        ({"timeout": None, "connect_timeout": 3.0}, httpx.Timeout(None, connect=3.0)),
        ({"timeout": 10.0, "connect_timeout": None}, httpx.Timeout(10.0, connect=None)),
        ({"timeout": httpx.Timeout(7.0, read=70.0)}, httpx.Timeout(7.0, read=70.0)),
        (
            {"timeout": httpx.Timeout(7.0, read=70.0), "connect_timeout": 1.0},
            httpx.Timeout(7.0, read=70.0, connect=1.0),
        ),
    ],
)
def test_timeout_configuration(mode: str, kwargs: dict[str, Any], expected: httpx.Timeout) -> None:
    script = Script(answer(200, {"sessions": []}))
    run(mode, script, lambda c: c.sessions.list(), **kwargs)
    assert script.requests[0].extensions["timeout"] == expected.as_dict()


def test_long_polls_keep_the_connect_timeout(mode: str) -> None:
    script = Script(answer(200, {"job_id": "j1", "status": "completed", "output": None}))
    run(mode, script, lambda c: c.jobs.wait("s1", "j1"), timeout=30.0, connect_timeout=4.0)
    timeouts = script.requests[0].extensions["timeout"]
    assert timeouts["connect"] == 4.0
    assert timeouts["read"] == 60.0 + 30.0  # the server's hold plus the read timeout


def test_terminal_open_timeout_defaults_to_the_longer_of_connect_and_read() -> None:
    assert open_timeout_for(httpx.Timeout(30.0, connect=5.0), None) == 30.0
    assert open_timeout_for(httpx.Timeout(2.0, connect=9.0), None) == 9.0
    assert open_timeout_for(httpx.Timeout(None), None) == 30.0
    assert open_timeout_for(httpx.Timeout(30.0), 1.5) == 1.5


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_max_retries_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_retries"):
        Bastion("http://bastion.test", max_retries=bad)
    with pytest.raises(ValueError, match="max_retries"):
        AsyncBastion("http://bastion.test", max_retries=bad)


def test_connection_pool_limits() -> None:
    assert DEFAULT_LIMITS.keepalive_expiry is not None
    assert DEFAULT_LIMITS.keepalive_expiry < 5.0  # below uvicorn's idle timeout
    limits = httpx.Limits(max_connections=3, max_keepalive_connections=1)
    with Bastion("http://bastion.test", limits=limits) as client:
        assert client.limits is limits
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert pool._max_connections == 3 and pool._max_keepalive_connections == 1
    with Bastion("http://bastion.test") as client:
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert pool._max_connections == DEFAULT_LIMITS.max_connections
        assert pool._keepalive_expiry == DEFAULT_LIMITS.keepalive_expiry


# --------------------------------------------------------------------------- backoff


def test_backoff_doubles_up_to_a_cap_with_jitter() -> None:
    assert [retry_delay(n, rng=lambda: 0.0) for n in range(6)] == [0.5, 1, 2, 4, 8, 8]
    assert retry_delay(0, rng=lambda: 1.0) == 0.375  # up to a quarter less
    assert retry_delay(50, rng=lambda: 0.0) == MAX_RETRY_DELAY
    delays = {retry_delay(1) for _ in range(50)}
    assert len(delays) > 1 and all(0.75 <= d <= 1.0 for d in delays)


def test_retry_after_is_followed_when_reasonable() -> None:
    assert retry_delay(3, 1.5) == 1.5
    assert retry_delay(0, 0.0) == 0.0
    assert retry_delay(0, 3600.0, rng=lambda: 0.0) == 0.5  # too long: usual backoff
    assert retry_delay(0, -5.0, rng=lambda: 0.0) == 0.5
    assert parse_retry_after(httpx.Headers({"Retry-After": "2"})) == 2.0
    assert parse_retry_after(httpx.Headers({})) is None
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    date = email.utils.formatdate(1_000_010.0, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": date}), now=1_000_000.0) == 10.0


def test_retry_after_header_sets_the_delay(mode: str, no_backoff: list[float]) -> None:
    script = Script(answer(503, **{"Retry-After": "0.25"}), answer(200, {"sessions": []}))
    run(mode, script, lambda c: c.sessions.list())
    assert no_backoff == [0.25]


def test_delays_grow_between_attempts(
    mode: str, no_backoff: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bastion._base, "random", SimpleNamespace(random=lambda: 0.0))
    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(APIConnectionError):
        run(mode, script, lambda c: c.health(), max_retries=3)
    assert len(script.requests) == 4
    assert no_backoff == [0.5, 1.0, 2.0]


# --------------------------------------------------------------------------- what is retried

TRANSIENT = [
    httpx.ConnectError("refused"),
    httpx.ConnectTimeout("slow connect"),
    httpx.ReadError("reset"),
    httpx.WriteError("broken pipe"),
    httpx.RemoteProtocolError("server disconnected without sending a response"),
    httpx.WriteTimeout("slow write"),
]


@pytest.mark.parametrize("failure", TRANSIENT, ids=lambda e: type(e).__name__)
def test_reads_are_retried_on_transient_errors(mode: str, failure: Exception) -> None:
    script = Script(failure, failure, answer(200, session()))
    assert run(mode, script, lambda c: c.sessions.get("s1"))["status"] == "running"
    assert script.paths == ["GET /v1/sessions/s1"] * 3


@pytest.mark.parametrize("status", [502, 503, 504])
def test_reads_are_retried_on_gateway_errors(mode: str, status: int) -> None:
    script = Script(answer(status), answer(200, {"sessions": []}))
    assert run(mode, script, lambda c: c.sessions.list()) == {"sessions": []}
    assert len(script.requests) == 2


def test_retries_stop_after_max_retries(mode: str) -> None:
    script = Script(answer(503))
    with pytest.raises(ServerError) as info:
        run(mode, script, lambda c: c.sessions.list())
    assert info.value.status_code == 503
    assert len(script.requests) == 3  # the first attempt and max_retries=2

    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(APIConnectionError) as conn:
        run(mode, script, lambda c: c.sessions.list(), max_retries=0)
    assert len(script.requests) == 1
    assert isinstance(conn.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (httpx.ReadTimeout("slow answer"), APITimeoutError),
        (httpx.PoolTimeout("pool busy"), APITimeoutError),
        (httpx.UnsupportedProtocol("ftp"), APIConnectionError),
        (answer(500, {"error": {"code": "internal_error", "message": "x"}}), ServerError),
        (error("session_not_found", 404), BastionError),
        (error("server_shutdown", 503), ServerShutdownError),  # the server is going away
    ],
    ids=["read-timeout", "pool-timeout", "unsupported-protocol", "500", "404", "shutdown"],
)
def test_what_is_never_retried(mode: str, outcome: Outcome, expected: type[Exception]) -> None:
    script = Script(outcome, answer(200, session()))
    with pytest.raises(expected):
        run(mode, script, lambda c: c.sessions.get("s1"))
    assert len(script.requests) == 1


def test_create_keeps_its_idempotency_key_across_retries(mode: str) -> None:
    script = Script(httpx.ReadError("reset"), answer(503), answer(201, session("created")))
    run(mode, script, lambda c: c.sessions.create(metadata={"a": "b"}))
    keys = {r.headers[IDEMPOTENCY_HEADER] for r in script.requests}
    assert len(script.requests) == 3 and len(keys) == 1
    assert all(json.loads(body) == {"metadata": {"a": "b"}} for body in script.bodies)


@pytest.mark.parametrize(
    "failure",
    [answer(502), answer(503), httpx.ReadError("reset"), httpx.RemoteProtocolError("gone")],
    ids=["502", "503", "read-error", "disconnected"],
)
def test_job_run_is_not_retried_once_it_may_have_been_sent(mode: str, failure: Outcome) -> None:
    script = Script(failure, answer(202, {"job_id": "j1", "status": "queued"}))
    with pytest.raises(BastionError):
        run(mode, script, lambda c: c.jobs.run("s1", ["true"]))
    assert script.paths == ["POST /v1/sessions/s1/jobs"]


@pytest.mark.parametrize(
    "failure", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")], ids=str
)
def test_job_run_is_retried_when_it_never_left(mode: str, failure: Exception) -> None:
    script = Script(failure, answer(202, {"job_id": "j1", "status": "queued"}))
    assert run(mode, script, lambda c: c.jobs.run("s1", ["true"]))["job_id"] == "j1"
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    "make", [bytes, bytearray, memoryview], ids=["bytes", "bytearray", "memoryview"]
)
def test_buffered_uploads_are_retried_whole(mode: str, make: Callable[[bytes], Any]) -> None:
    data = b"0123456789" * 1000
    script = Script(httpx.ReadError("reset"), answer(503), answer(201, {"path": "/f", "size": 1}))
    run(mode, script, lambda c: c.files.upload("s1", make(data), "/f"))
    assert script.bodies == [data, data, data]


def test_streamed_uploads_are_not_retried_after_a_send(mode: str) -> None:
    source = io.BytesIO(b"x" * 5000)
    script = Script(answer(503), answer(201, {"path": "/f", "size": 5000}))
    with pytest.raises(ServerError):
        run(mode, script, lambda c: c.files.upload("s1", source, "/f"))
    assert len(script.requests) == 1


def test_a_stream_already_read_is_never_sent_again(mode: str) -> None:
    # MockTransport reads the body before its handler raises: even a "not sent"
    # error cannot make the SDK send a half-read stream again.
    source = io.BytesIO(b"x" * 5000)
    script = Script(httpx.ConnectError("refused"), answer(201, {"path": "/f", "size": 5000}))
    with pytest.raises(APIConnectionError):
        run(mode, script, lambda c: c.files.upload("s1", source, "/f"))
    assert len(script.requests) == 1


class RefuseFirst(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Refuses the first connection before touching the body, as a real one does."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.bodies and not getattr(self, "refused", False):
            self.refused = True
            raise httpx.ConnectError("refused")
        self.bodies.append(request.read())
        return httpx.Response(201, json={"path": "/f", "size": len(self.bodies[-1])})

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.bodies and not getattr(self, "refused", False):
            self.refused = True
            raise httpx.ConnectError("refused")
        self.bodies.append(await request.aread())
        return httpx.Response(201, json={"path": "/f", "size": len(self.bodies[-1])})


def test_streamed_upload_is_retried_when_the_connection_was_refused() -> None:
    data = b"abc" * 100_000
    transport = RefuseFirst()
    with Bastion("http://bastion.test", transport=transport) as client:
        assert client.files.upload("s1", io.BytesIO(data), "/f")["size"] == len(data)
    assert transport.bodies == [data]

    async def main() -> None:
        transport = RefuseFirst()

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        async with AsyncBastion("http://bastion.test", transport=transport) as client:
            await client.files.upload("s1", io.BytesIO(data), "/f")
            transport.refused = False
            transport.bodies.clear()
            await client.files.upload("s1", chunks(), "/g")
        assert transport.bodies == [data]

    asyncio.run(main())


# --------------------------------------------------------------------------- idempotent in effect


@pytest.mark.parametrize(
    ("action", "method", "target"),
    [("start", "POST", "running"), ("stop", "POST", "stopped"), ("delete", "DELETE", "deleted")],
)
def test_retried_session_action_whose_answer_was_lost(
    mode: str, action: str, method: str, target: str
) -> None:
    # The first attempt did the work but its answer was lost; the retry is refused
    # because the session is already there; the SDK reads it and reports success.
    script = Script(
        httpx.ReadError("reset"), error("session_state", 409), answer(200, session(target))
    )
    info = run(mode, script, lambda c: getattr(c.sessions, action)("s1"))
    assert info["status"] == target
    assert [r.method for r in script.requests] == [method, method, "GET"]


def test_retried_action_still_fails_when_the_session_is_elsewhere(mode: str) -> None:
    script = Script(
        httpx.ReadError("reset"), error("session_state", 409), answer(200, session("deleted"))
    )
    with pytest.raises(SessionStateError):
        run(mode, script, lambda c: c.sessions.start("s1"))


def test_action_refused_without_a_lost_attempt_is_an_error(mode: str) -> None:
    # A refused connection did nothing: the 409 of the retry is the real answer.
    script = Script(httpx.ConnectError("refused"), error("session_state", 409))
    with pytest.raises(SessionStateError):
        run(mode, script, lambda c: c.sessions.stop("s1"))
    assert [r.method for r in script.requests] == ["POST", "POST"]
    script = Script(error("session_state", 409), answer(200, session("stopped")))
    with pytest.raises(SessionStateError):
        run(mode, script, lambda c: c.sessions.stop("s1"))
    assert len(script.requests) == 1


def test_retried_file_delete_whose_answer_was_lost(mode: str) -> None:
    script = Script(answer(504), error("file_not_found", 404))
    result = run(mode, script, lambda c: c.files.delete("s1", "/tmp/x"))
    assert result == {"path": "/tmp/x", "deleted": True}
    script = Script(httpx.ConnectError("refused"), error("file_not_found", 404))
    with pytest.raises(FileDeleteError):
        run(mode, script, lambda c: c.files.delete("s1", "/tmp/x"))


# --------------------------------------------------------------------------- typed errors


def test_no_raw_library_exception_escapes(mode: str, tmp_path: Path) -> None:
    cases: list[tuple[Outcome, Callable[[Any], Any], type[BastionError]]] = [
        (httpx.DecodingError("bad gzip"), lambda c: c.sessions.list(), APIConnectionError),
        (httpx.TooManyRedirects("loop"), lambda c: c.sessions.list(), BastionError),
        (
            lambda r: httpx.Response(200, text="<html>"),
            lambda c: c.sessions.list(),
            BastionError,
        ),
        (
            lambda r: httpx.Response(200, content=b"{not json\n"),
            lambda c: _drain(c.jobs.stream("s1", "j1")),
            BastionError,
        ),
        (
            lambda r: httpx.Response(200, content=b"data"),
            lambda c: c.files.download_to("s1", "/f", tmp_path / "missing" / "out"),
            LocalFileError,
        ),
    ]
    for outcome, op, expected in cases:
        with pytest.raises(expected) as info:
            run(mode, Script(outcome), op, max_retries=0)
        assert isinstance(info.value, BastionError)


def _drain(stream: Any) -> Any:
    if hasattr(stream, "__anext__"):

        async def drain() -> list[Any]:
            async with stream:
                return [event async for event in stream]

        return drain()
    with stream:
        return list(stream)


def test_local_file_errors_are_bastion_and_os_errors(mode: str, tmp_path: Path) -> None:
    dest = tmp_path / "no-such-dir" / "out.bin"
    with pytest.raises(LocalFileError) as info:
        run(
            mode,
            Script(lambda r: httpx.Response(200, content=b"x")),
            lambda c: c.files.download_to("s1", "/f", dest),
        )
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, BastionError)
    assert err.errno == 2 and err.filename == str(dest)
    assert isinstance(err.__cause__, FileNotFoundError)

    class Unreadable(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            raise OSError(5, "Input/output error")

    with pytest.raises(LocalFileError, match="Input/output error"):
        run(mode, Script(answer(201, {})), lambda c: c.files.upload("s1", Unreadable(), "/f"))


# --------------------------------------------------------------------------- no leaks


class Counter:
    """How many response bodies are open right now."""

    def __init__(self) -> None:
        self.open = 0
        self.made = 0


class TrackedBody(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self, counter: Counter, chunks: list[bytes], fail_after: int | None) -> None:
        self.counter, self.chunks, self.fail_after = counter, chunks, fail_after
        self.closed = False
        counter.open += 1
        counter.made += 1

    def _chunks(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if self.fail_after is not None and index >= self.fail_after:
                raise httpx.ReadError("connection reset mid-body")
            yield chunk

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks():
            await asyncio.sleep(0)
            yield chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.counter.open -= 1

    async def aclose(self) -> None:
        self.close()


def tracked(
    counter: Counter,
    status: int,
    chunks: list[bytes],
    fail_after: int | None = None,
    content_type: str = "application/json",
) -> Factory:
    def make(request: httpx.Request) -> httpx.Response:
        body = TrackedBody(counter, chunks, fail_after)
        return httpx.Response(status, stream=body, headers={"Content-Type": content_type})

    return make


ERROR_BODY = [b'{"error": {"code": "file_not_found", ', b'"message": "no such file"}}']
EVENTS = [
    b'{"type": "status", "status": "running"}\n',
    b'{"type": "stdout", "data": "hi\\n"}\n',
    b'{"type": "end", "job": {"job_id": "j1", "status": "completed"}}\n',
]


@pytest.mark.parametrize(
    ("outcomes", "op"),
    [
        (["503"], lambda c: c.sessions.list()),
        (["503", "ok"], lambda c: c.sessions.list()),
        (["404"], lambda c: c.files.download("s1", "/x")),
        (["404-broken"], lambda c: c.files.download("s1", "/x")),
        (["404-broken"], lambda c: _collect(c.files.iter_download("s1", "/x"))),
        (["404"], lambda c: c.files.download_to("s1", "/x", io.BytesIO())),
        (["503", "404"], lambda c: _collect(c.files.iter_download("s1", "/x"))),
        (["broken"], lambda c: c.files.download_to("s1", "/x", io.BytesIO())),
        (["broken"], lambda c: _collect(c.files.iter_download("s1", "/x"))),
        (["broken"], lambda c: c.files.download("s1", "/x")),
        (["events-broken"], lambda c: _drain(c.jobs.stream("s1", "j1"))),
        (
            ["job", "events-broken", "job"],
            lambda c: c.jobs.run_and_wait("s1", "x", on_stdout=print),
        ),
    ],
    ids=[
        "retries-exhausted",
        "retry-then-ok",
        "download-404",
        "download-404-broken",
        "iter_download-404-broken",
        "download_to-404",
        "iter_download-503-404",
        "download_to-broken",
        "iter_download-broken",
        "download-broken",
        "stream-broken",
        "run_and_wait-broken",
    ],
)
def test_no_response_is_left_open_after_an_error(
    mode: str, outcomes: list[str], op: Callable[[Any], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    counter = Counter()
    by_name: dict[str, Outcome] = {
        "503": tracked(counter, 503, [b"busy"], content_type="text/plain"),
        "404": tracked(counter, 404, ERROR_BODY),
        "404-broken": tracked(counter, 404, ERROR_BODY, fail_after=1),
        "ok": tracked(counter, 200, [b'{"sessions": []}']),
        "broken": tracked(counter, 200, [b"a" * 10, b"b" * 10], fail_after=1),
        "events-broken": tracked(counter, 200, EVENTS, fail_after=2),
        "job": answer(200, {"job_id": "j1", "status": "running"}),
    }
    script = Script(*(by_name[name] for name in outcomes))
    try:
        run(mode, script, op)
    except BastionError:
        pass
    assert counter.made >= 1
    assert counter.open == 0


def _collect(chunks: Any) -> Any:
    if hasattr(chunks, "__anext__"):

        async def collect() -> list[bytes]:
            return [chunk async for chunk in chunks]

        return collect()
    return list(chunks)


def test_abandoned_streams_are_released(mode: str) -> None:
    counter = Counter()
    script = Script(tracked(counter, 200, [b"a" * 10, b"b" * 10, b"c" * 10]))

    def sync_op(client: Bastion) -> None:
        chunks = client.files.iter_download("s1", "/x", chunk_size=10)
        assert next(chunks) == b"a" * 10
        assert counter.open == 1
        chunks.close()
        assert counter.open == 0
        with client.jobs.stream("s1", "j1") as events:
            next(events)
            assert counter.open == 1
        assert counter.open == 0

    async def async_op(client: AsyncBastion) -> None:
        chunks = client.files.iter_download("s1", "/x", chunk_size=10)
        assert await anext(chunks) == b"a" * 10
        assert counter.open == 1
        await chunks.aclose()  # type: ignore[attr-defined]
        assert counter.open == 0
        async with client.jobs.stream("s1", "j1") as events:
            await anext(events)
            assert counter.open == 1
        assert counter.open == 0

    events = Script(tracked(counter, 200, EVENTS))
    script.outcomes.append(events.outcomes[0])
    run(mode, script, sync_op if mode == "sync" else async_op)
    assert counter.open == 0


def test_cancelled_download_releases_the_response_and_the_file(tmp_path: Path) -> None:
    counter = Counter()
    started = asyncio.Event

    async def main() -> None:
        gate = started()

        class Slow(TrackedBody):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                yield b"first"
                gate.set()
                await asyncio.sleep(3600)
                yield b"never"

        def make(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, stream=Slow(counter, [], None))

        async def handler(request: httpx.Request) -> httpx.Response:
            return make(request)

        dest = tmp_path / "partial.bin"
        async with AsyncBastion("http://x", transport=httpx.MockTransport(handler)) as client:
            task = asyncio.create_task(client.files.download_to("s1", "/f", dest))
            await gate.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert counter.open == 0
            assert not dest.exists()

    asyncio.run(main())


# --------------------------------------------------------------------------- real sockets


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: LocalServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.connections.add(self.client_address)
        path = self.path.split("?")[0]
        self.server.hits[path] = self.server.hits.get(path, 0) + 1
        if path == "/v1/sessions":
            self._json(200, {"sessions": []})
        elif path == "/v1/sessions/missing":
            self._json(404, {"error": {"code": "session_not_found", "message": "no"}})
        elif path == "/v1/sessions/busy":
            self._json(503, {"error": {"code": "unavailable", "message": "busy"}})
        elif path == "/v1/sessions/flaky":
            if self.server.hits[path] % 2:
                self._json(502, {"error": {"code": "bad_gateway", "message": "x"}})
            else:
                self._json(200, session())
        elif path == "/v1/sessions/s1/files/content" and self.path.endswith("path=%2Fother"):
            self._json(404, {"error": {"code": "file_not_found", "message": "no such file"}})
        elif path == "/v1/sessions/s1/files/content":
            # Promise a megabyte, send ten bytes, hang up.
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
        elif path == "/v1/sessions/slow":
            time.sleep(1.0)
            self._json(200, session())
        elif path == "/v1/sessions/hangup":
            self.close_connection = True  # no answer at all
        else:
            self._json(404, {"error": {"code": "not_found", "message": path}})


class LocalServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections: set[tuple[str, int]] = set()
        self.hits: dict[str, int] = {}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout tests) breaks the pipe: expected

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    server = LocalServer()
    try:
        yield server
    finally:
        server.stop()


def pool_is_clean(client: Client) -> bool:
    """No request in flight and no connection held: everything went back or closed."""
    pool = client._http._transport._pool  # type: ignore[attr-defined]
    return not pool._requests and all(c.is_idle() or c.is_closed() for c in pool.connections)


SOCKET_FAILURES: list[tuple[Callable[[Any], Any], type[BastionError]]] = [
    (lambda c: c.sessions.get("missing"), BastionError),
    (lambda c: c.sessions.get("busy"), ServerError),
    (lambda c: c.sessions.get("hangup"), APIConnectionError),
    (lambda c: c.sessions.get("slow"), APITimeoutError),
    (lambda c: c.files.download("s1", "/f"), APIConnectionError),
    (lambda c: c.files.download_to("s1", "/f", io.BytesIO()), APIConnectionError),
    (lambda c: _collect(c.files.iter_download("s1", "/f")), APIConnectionError),
    (lambda c: c.files.download("s1", "/other"), FileDownloadError),
]


def test_sync_pool_is_clean_after_errors(local_server: LocalServer) -> None:
    with Bastion(local_server.url, timeout=0.3) as client:
        for op, expected in SOCKET_FAILURES:
            with pytest.raises(expected):
                op(client)
            assert pool_is_clean(client), op
        # Still usable, and connections are reused (keep-alive).
        local_server.connections.clear()
        for _ in range(5):
            client.sessions.list()
        assert len(local_server.connections) == 1
        assert pool_is_clean(client)
        assert client.sessions.get("flaky")["status"] == "running"  # a 502, retried
    assert local_server.hits["/v1/sessions/busy"] == 3  # retried twice, then raised
    assert local_server.hits["/v1/sessions/missing"] == 1


def test_async_pool_is_clean_after_errors(local_server: LocalServer) -> None:
    async def main() -> None:
        async with AsyncBastion(local_server.url, timeout=0.3) as client:
            for op, expected in SOCKET_FAILURES:
                with pytest.raises(expected):
                    await op(client)
                assert pool_is_clean(client), op
            local_server.connections.clear()
            for _ in range(5):
                await client.sessions.list()
            assert len(local_server.connections) == 1
            results = await asyncio.gather(*(client.sessions.list() for _ in range(10)))
            assert results == [{"sessions": []}] * 10
            assert pool_is_clean(client)
            # A request cancelled mid-flight gives its connection back too.
            task = asyncio.create_task(client.sessions.get("slow"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool_is_clean(client)

    asyncio.run(main())


def test_unreachable_server_is_retried_then_reported(mode: str, no_backoff: list[float]) -> None:
    # Port 1 on loopback: the connect is refused at once, three times.
    async def async_health() -> BaseException:
        async with AsyncBastion("http://127.0.0.1:1", timeout=5) as client:
            with pytest.raises(APIConnectionError) as caught:
                await client.health()
            assert pool_is_clean(client)
            return caught.value

    if mode == "sync":
        with Bastion("http://127.0.0.1:1", timeout=5) as client:
            with pytest.raises(APIConnectionError) as info:
                client.health()
            assert pool_is_clean(client)
        err: BaseException = info.value
    else:
        err = asyncio.run(async_health())
    assert isinstance(err.__cause__, httpx.ConnectError)
    assert len(no_backoff) == 2
