"""AsyncBastion: the same requests and results as the sync client, with asyncio.

The HTTP side runs against ``httpx.MockTransport`` with async handlers; the terminal
against the local WebSocket server of ``test_sdk_terminal.py``.  Each test is a sync
function running its own event loop (``asyncio.run``): no plugin is needed, and
pytest's warnings-as-errors catch a coroutine never awaited or a transport left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from tests.unit.test_sdk_errors import NOT_FOUND_BY_OPERATION
from tests.unit.test_sdk_terminal import API_KEY, FakeTerminalServer

import bastion._base
from bastion import (
    APIConnectionError,
    AsyncBastion,
    AsyncJobEventStream,
    AsyncTerminal,
    AuthenticationError,
    BastionError,
    FileDownloadError,
    FileUploadError,
    JobEvent,
    JobFailedError,
    JobInfo,
    JobNotFoundError,
    JobTimeoutError,
    LocalFileError,
    SessionNotFoundError,
    SessionStateError,
    TerminalAuthenticationError,
    TerminalConnectionError,
    TerminalSendError,
    TerminalSessionNotFoundError,
    TerminalSessionStateError,
    TerminalTimeoutError,
)
from bastion._base import UPLOAD_CHUNK_SIZE
from bastion._resources.job_follow import WATCH_QUEUED_HOLD
from bastion._terminal_base import CLIENT_CLOSED
from bastion.wire import (
    ERROR_HTTP_STATUS,
    IDEMPOTENCY_HEADER,
    JOB_WAIT_MAX_HOLD,
    ErrorCode,
    TerminalMessage,
)

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
MiB = 1024 * 1024
Answer = httpx.Response | Callable[[httpx.Request], Any]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bastion._base, "INITIAL_RETRY_DELAY", 0.0)


class Recorder:
    """An async MockTransport handler: records requests, answers from a script."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, httpx.Response):
            return answer
        result = answer(request)
        return await result if isinstance(result, Awaitable) else result  # type: ignore[no-any-return]

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def client(self, **kwargs: Any) -> AsyncBastion:
        kwargs.setdefault("base_url", "http://bastion.test")
        return AsyncBastion(transport=httpx.MockTransport(self), **kwargs)


def ok(body: Any, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body)


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def session(status: str = "created", sid: str = "s1") -> dict[str, Any]:
    return {"session_id": sid, "status": status, "limits": {}, "metadata": {}}


def job(status: str, exit_status: int | None = 0, stdout: str = "", stderr: str = "") -> JobInfo:
    final = status in ("completed", "failed")
    return {
        "job_id": "j1",
        "session_id": "s1",
        "status": status,  # type: ignore[typeddict-item]
        "command": ["x"],
        "created_at": "t0",
        "started_at": None,
        "finished_at": None,
        "failure_reason": None,
        "output": (
            {"console_output": stdout, "errout": stderr, "status_code": exit_status}
            if final
            else None
        ),
    }


def ndjson(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def completed_events(code: int = 0) -> list[dict[str, Any]]:
    status = "completed" if code == 0 else "failed"
    return [
        {"type": "status", "status": "queued"},
        {"type": "status", "status": "running"},
        {"type": "stdout", "data": "one\n"},
        {"type": "stderr", "data": "warn\n"},
        {"type": "stdout", "data": "two\n"},
        {"type": "status", "status": status},
        {
            "type": "end",
            "job": job(status, exit_status=code, stdout="one\ntwo\n", stderr="warn\n"),
        },
    ]


# --------------------------------------------------------------------------- client


def test_configuration_and_context_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_URL", "http://from-env:9000/")
    monkeypatch.setenv("BASTION_API_KEY", "env-key")
    rec = Recorder(ok({"status": "ok", "version": "0.1.0", "runtime": "crun"}))

    async def main() -> AsyncBastion:
        async with AsyncBastion(transport=httpx.MockTransport(rec)) as client:
            assert client.sessions is client.sessions and client.files is client.files
            assert (await client.health())["runtime"] == "crun"
            assert not client.is_closed
            assert "env-key" not in repr(client)
        return client

    client = run(main())
    assert client.is_closed
    assert str(rec.last.url) == "http://from-env:9000/v1/health"
    assert rec.last.headers["Authorization"] == "Bearer env-key"
    assert rec.last.headers["User-Agent"].startswith("bastion-py-sdk/")


def test_session_lifecycle_requests() -> None:
    rec = Recorder(ok(session("created"), 201))

    async def main() -> None:
        async with rec.client(api_key="k") as client:
            assert (await client.sessions.create())["status"] == "created"
            assert (rec.last.method, rec.last.url.path) == ("POST", "/v1/sessions")
            assert body(rec.last) == {}
            uuid.UUID(rec.last.headers[IDEMPOTENCY_HEADER])
            await client.sessions.create(
                limits={"memory_mb": 256}, metadata={"team": "a"}, idempotency_key="mine"
            )
            assert body(rec.last) == {"limits": {"memory_mb": 256}, "metadata": {"team": "a"}}
            assert rec.last.headers[IDEMPOTENCY_HEADER] == "mine"
            for call, method, path in [
                (client.sessions.get("s1"), "GET", "/v1/sessions/s1"),
                (client.sessions.status("s1"), "GET", "/v1/sessions/s1"),
                (client.sessions.start("s1"), "POST", "/v1/sessions/s1/start"),
                (client.sessions.stop("s1"), "POST", "/v1/sessions/s1/stop"),
                (client.sessions.delete("s1"), "DELETE", "/v1/sessions/s1"),
                (client.sessions.list(), "GET", "/v1/sessions?limit=1000"),
                (client.sessions.get("a/b"), "GET", "/v1/sessions/a%2Fb"),
            ]:
                await call
                assert (rec.last.method, rec.last.url.raw_path.decode()) == (method, path)
            with pytest.raises(ValueError, match="non-empty"):
                await client.sessions.delete("")

    run(main())


def test_error_responses_map_like_the_sync_client() -> None:
    async def check(code: ErrorCode) -> None:
        status = ERROR_HTTP_STATUS[code]

        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(status, json={"error": {"code": code, "message": "it broke"}})

        rec = Recorder(answer)
        async with rec.client() as client:
            for call, file_class in [
                (client.sessions.start("s1"), None),
                (client.jobs.run("s1", ["true"]), None),
                (client.files.upload("s1", b"x", "/x"), FileUploadError),
                (client.files.download_to("s1", "/x", io.BytesIO()), FileDownloadError),
            ]:
                with pytest.raises(BastionError) as info:
                    await call
                expected = bastion._base.error_class(code, status, None)
                if file_class is not None and code == ErrorCode.FILE_NOT_FOUND:
                    expected = NOT_FOUND_BY_OPERATION[file_class]
                elif file_class is not None and code in bastion._base._FILE_CODES:
                    expected = file_class
                assert type(info.value) is expected, (code, call)
                assert info.value.code == code and info.value.message == "it broke"

    async def main() -> None:
        for code in ErrorCode:
            await check(code)

    run(main())


# --------------------------------------------------------------------------- jobs


def test_run_wait_and_results() -> None:
    rec = Recorder(ok(job("queued"), 202), ok(job("running")), ok(job("completed", stdout="hi\n")))

    async def main() -> None:
        async with rec.client(timeout=30) as client:
            queued = await client.jobs.run("s1", "echo hi", env={"A": "1"}, cwd="/tmp", timeout=2)
            assert queued["status"] == "queued"
            assert body(rec.last) == {
                "command": ["/bin/sh", "-c", "echo hi"],
                "env": {"A": "1"},
                "cwd": "/tmp",
                "timeout": 2,
            }
            result = await client.jobs.wait("s1", "j1")
            assert result["output"] is not None
            assert result["output"]["console_output"] == "hi\n"
            for request in rec.requests[1:]:
                assert request.url.path == "/v1/sessions/s1/jobs/j1/wait"
                assert float(request.url.params["timeout"]) == JOB_WAIT_MAX_HOLD
                assert request.extensions["timeout"]["read"] == JOB_WAIT_MAX_HOLD + 30
            rec.answers = [ok({"jobs": [job("running")]})]
            assert len((await client.jobs.list("s1"))["jobs"]) == 1
            rec.answers = [ok(job("running"))]
            assert (await client.jobs.get("s1", "j1"))["status"] == "running"
            with pytest.raises(TypeError):
                await client.jobs.run("s1", ["echo", 1])  # type: ignore[list-item]

    run(main())


def test_wait_timeout_and_failure() -> None:
    async def main() -> None:
        async with Recorder(ok(job("running"))).client() as client:
            with pytest.raises(JobTimeoutError) as info:
                await client.jobs.wait("s1", "j1", timeout=0.2)
            assert isinstance(info.value, TimeoutError) and info.value.job_id == "j1"
        failed = job("failed", exit_status=3, stderr="oops\n")
        async with Recorder(ok(job("queued"), 202), ok(failed)).client() as client:
            with pytest.raises(JobFailedError) as failure:
                await client.jobs.run_and_wait("s1", "exit 3")
            assert failure.value.status_code == 3 and failure.value.errout == "oops\n"
            assert failure.value["status"] == "failed"

    run(main())


def test_wait_does_not_block_the_event_loop() -> None:
    async def slow_answer(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return httpx.Response(200, json=job("completed"))

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> None:
        async with Recorder(slow_answer).client() as client:
            task = asyncio.create_task(ticker())
            await asyncio.gather(*(client.jobs.wait("s1", "j1") for _ in range(5)))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(main())
    assert ticks >= 10  # the loop kept running while five waits were pending


def test_run_and_wait_delivers_output_to_sync_and_async_callbacks_in_order() -> None:
    seen: list[tuple[str, str]] = []

    async def on_stderr(data: str) -> None:
        await asyncio.sleep(0)
        seen.append(("err", data))

    rec = Recorder(
        ok(job("queued"), 202),
        lambda r: httpx.Response(200, content=ndjson(*completed_events())),
    )

    async def main() -> JobInfo:
        async with rec.client() as client:
            return await client.jobs.run_and_wait(
                "s1", "x", on_stdout=lambda d: seen.append(("out", d)), on_stderr=on_stderr
            )

    result = run(main())
    assert seen == [("out", "one\n"), ("err", "warn\n"), ("out", "two\n")]
    assert result["output"] is not None and result["output"]["console_output"] == "one\ntwo\n"
    events = rec.requests[1]
    assert events.url.path == "/v1/sessions/s1/jobs/j1/events"
    assert events.headers["Accept"] == "application/x-ndjson"
    assert events.extensions["timeout"]["read"] is None  # silence is not an error


def test_stream_is_an_async_iterator_and_context_manager() -> None:
    arrived: list[float] = []

    async def live(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            for event in completed_events():
                await asyncio.sleep(0.01)
                yield ndjson(event)

        return httpx.Response(200, content=body())

    async def main() -> list[JobEvent]:
        async with Recorder(live).client() as client:
            stream = client.jobs.stream("s1", "j1")
            assert isinstance(stream, AsyncJobEventStream)
            events: list[JobEvent] = []
            async with stream:
                async for event in stream:
                    arrived.append(asyncio.get_running_loop().time())
                    events.append(event)
            await stream.close()  # idempotent
            return events

    events = run(main())
    assert [e["type"] for e in events] == [
        "status",
        "status",
        "stdout",
        "stderr",
        "stdout",
        "status",
        "end",
    ]
    assert arrived[-1] - arrived[0] > 0.03  # delivered as they came, not at the end


def test_stream_errors() -> None:
    async def main() -> None:
        async with Recorder(
            lambda r: httpx.Response(200, content=ndjson(*completed_events()[:3]))
        ).client() as client:
            with pytest.raises(APIConnectionError, match="ended before"):
                async for _ in client.jobs.stream("s1", "j1"):
                    pass
        missing = {"error": {"code": "job_not_found", "message": "no job"}}
        async with Recorder(lambda r: httpx.Response(404, json=missing)).client() as client:
            with pytest.raises(JobNotFoundError):
                await anext(client.jobs.stream("s1", "j1"))

    run(main())


def test_watch_reports_each_status_with_an_async_callback() -> None:
    rec = Recorder(
        ok(job("queued")),
        ok(job("queued")),
        ok(job("running")),
        ok(job("completed", stdout="done\n")),
    )
    seen: list[str] = []

    async def on_update(info: JobInfo) -> None:
        await asyncio.sleep(0)
        seen.append(info["status"])

    async def main() -> JobInfo:
        async with rec.client() as client:
            return await client.jobs.watch("s1", "j1", on_update)

    final = run(main())
    assert seen == ["queued", "running", "completed"] and final["status"] == "completed"
    holds = [float(r.url.params["timeout"]) for r in rec.requests[1:]]
    assert holds == [WATCH_QUEUED_HOLD, WATCH_QUEUED_HOLD, JOB_WAIT_MAX_HOLD]


def test_watch_with_output_follows_the_event_stream() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, content=ndjson(*completed_events(code=1)))
        return httpx.Response(200, json=job("queued"))

    rec = Recorder(ok(job("queued")), ok(job("running")), answer)
    order: list[str] = []

    async def main() -> JobInfo:
        async with Recorder(answer).client() as client:
            return await client.jobs.watch(
                "s1",
                "j1",
                lambda info: order.append(info["status"]),
                on_output=lambda event: order.append(event["type"]),
            )

    del rec
    final = run(main())
    assert final["status"] == "failed"  # returned, not raised
    assert order[0] == "queued" and order[-1] == "failed"
    assert order.index("stdout") < order.index("failed")
    assert order.count("stdout") == 2 and order.count("stderr") == 1


# --------------------------------------------------------------------------- files


class StreamingTransport(httpx.AsyncBaseTransport):
    """Reads an upload chunk by chunk as a server does (MockTransport reads it whole)."""

    def __init__(self, position: Callable[[], int] | None = None) -> None:
        self.position = position
        self.received: list[int] = []
        self.position_at_first_chunk: int | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for chunk in request.stream:
            if self.position_at_first_chunk is None and self.position is not None:
                self.position_at_first_chunk = self.position()
            self.received.append(len(chunk))
        size = sum(self.received)
        return httpx.Response(201, json={"path": request.url.params["path"], "size": size})


def test_upload_streams_a_sync_file_in_chunks() -> None:
    source = io.BytesIO(b"z" * (2 * MiB + 512 * 1024))
    transport = StreamingTransport(source.tell)

    async def main() -> Any:
        async with AsyncBastion("http://bastion.test", transport=transport) as client:
            return await client.files.upload("s1", source, "/big.bin")

    assert run(main()) == {"path": "/big.bin", "size": 2 * MiB + 512 * 1024}
    assert transport.received == [MiB, MiB, 512 * 1024]
    assert transport.position_at_first_chunk == UPLOAD_CHUNK_SIZE  # streamed, not buffered


def test_upload_async_sources() -> None:
    class AsyncFile:
        """Like aiofiles / anyio: ``async def read``."""

        def __init__(self, data: bytes) -> None:
            self.inner = io.BytesIO(data)
            self.sizes: list[int] = []

        async def read(self, size: int) -> bytes:
            self.sizes.append(size)
            await asyncio.sleep(0)
            return self.inner.read(size)

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"ab", bytearray(b"cd"), b"", memoryview(b"ef")):
            yield piece  # type: ignore[misc]

    transport = StreamingTransport()
    async_file = AsyncFile(b"q" * (MiB + 1))

    async def main() -> None:
        async with AsyncBastion("http://bastion.test", transport=transport) as client:
            assert (await client.files.upload("s1", async_file, "/a"))["size"] == MiB + 1
            transport.received.clear()
            assert (await client.files.upload("s1", pieces(), "/b"))["size"] == 6
            transport.received.clear()
            view = memoryview(b"m" * (MiB + 3))
            assert (await client.files.upload("s1", view, "/c"))["size"] == MiB + 3
            assert transport.received == [MiB, 3]

    run(main())
    assert set(async_file.sizes) == {UPLOAD_CHUNK_SIZE}


def test_upload_request_shape_and_rejections(tmp_path: Path) -> None:
    rec = Recorder(ok({"path": "/main.py", "size": 11}, 201))
    text_path = tmp_path / "t.txt"
    text_path.write_text("hello")

    async def main() -> None:
        async with rec.client() as client:
            await client.files.upload("s1", b'print("hi")', "/main.py")
            request = rec.last
            assert (request.method, request.url.path) == ("PUT", "/v1/sessions/s1/files")
            assert request.url.params["path"] == "/main.py"
            assert request.headers["Content-Type"] == "application/octet-stream"
            assert request.headers["Content-Length"] == "11"
            with pytest.raises(TypeError, match="not str"):
                await client.files.upload("s1", "print(1)", "/x")  # type: ignore[arg-type]
            with text_path.open() as text, pytest.raises(TypeError, match="binary mode"):
                await client.files.upload("s1", text, "/x")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await client.files.upload("s1", 42, "/x")  # type: ignore[arg-type]

            async def not_bytes() -> AsyncIterator[Any]:
                yield "text"

            with pytest.raises(TypeError, match="str, not bytes"):
                await client.files.upload("s1", not_bytes(), "/x")
        assert len(rec.requests) == 1

    run(main())


def test_downloads(tmp_path: Path) -> None:
    content = b"0123456789" * 100_000
    rec = Recorder(lambda request: httpx.Response(200, content=content))

    class AsyncWriter:
        def __init__(self) -> None:
            self.data = b""

        async def write(self, data: bytes) -> int:
            self.data += data
            return len(data)

    async def main() -> None:
        async with rec.client() as client:
            assert await client.files.download("s1", "/f") == content
            assert rec.last.url.path == "/v1/sessions/s1/files/content"
            assert rec.last.url.params["path"] == "/f"
            chunks = [c async for c in client.files.iter_download("s1", "/f", chunk_size=4096)]
            assert b"".join(chunks) == content and max(map(len, chunks)) <= 4096
            dest = tmp_path / "out.bin"
            assert await client.files.download_to("s1", "/f", dest) == len(content)
            assert dest.read_bytes() == content
            assert await client.files.download_to("s1", "/f", str(dest)) == len(content)
            buffer = io.BytesIO()
            assert await client.files.download_to("s1", "/f", buffer) == len(content)
            assert buffer.getvalue() == content
            writer = AsyncWriter()
            assert await client.files.download_to("s1", "/f", writer, chunk_size=MiB) == len(
                content
            )
            assert writer.data == content

    run(main())


def test_download_to_failures(tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_bytes(b"precious")
    partial = tmp_path / "partial.bin"
    missing = {"error": {"code": "file_not_found", "message": "no such file"}}

    async def broken(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"a" * 10
            raise httpx.ReadError("connection reset mid-body")

        return httpx.Response(200, content=body())

    async def main() -> None:
        async with Recorder(lambda r: httpx.Response(404, json=missing)).client() as client:
            with pytest.raises(FileDownloadError):
                await client.files.download_to("s1", "/x", keep)
        assert keep.read_bytes() == b"precious"  # never opened
        async with Recorder(broken).client() as client:
            with pytest.raises(APIConnectionError):
                await client.files.download_to("s1", "/x", partial)
        assert not partial.exists()  # the partial file is removed
        async with Recorder(lambda r: httpx.Response(200, content=b"x")).client() as client:
            with pytest.raises(LocalFileError) as info:
                await client.files.download_to("s1", "/x", tmp_path / "no" / "dir")
            assert isinstance(info.value, OSError)

    run(main())


def test_files_list_and_delete() -> None:
    rec = Recorder(ok({"path": "/", "files": []}))

    async def main() -> None:
        async with rec.client() as client:
            assert (await client.files.list("s1"))["files"] == []
            assert dict(rec.last.url.params) == {"path": "/", "limit": "1000"}
            rec.answers = [ok({"path": "/d", "deleted": True})]
            assert (await client.files.delete("s1", "/d", recursive=True))["deleted"] is True
            assert rec.last.method == "DELETE"
            assert dict(rec.last.url.params) == {"path": "/d", "recursive": "true"}

    run(main())


# --------------------------------------------------------------------------- terminal


@pytest.fixture
def server() -> Any:
    srv = FakeTerminalServer()
    try:
        yield srv
    finally:
        srv.close()


def terminal_client(server: FakeTerminalServer, key: str = API_KEY) -> AsyncBastion:
    return AsyncBastion(server.url, key, timeout=5.0)


def output(messages: list[TerminalMessage]) -> str:
    return "".join(str(m["payload"]["data"]) for m in messages if m["type"] == "term_output")


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def test_terminal_product_page_style(server: FakeTerminalServer) -> None:
    messages: list[TerminalMessage] = []

    async def main() -> None:
        async with terminal_client(server) as client:
            await client.terminal.connect(session_id="s1", on_message=messages.append)
            await client.terminal.send_input("ls -la\n")
            await client.terminal.exec("echo hello")
            await until(lambda: "echo hello\n" in output(messages))
            await client.terminal.close()
            assert client.terminal.current is not None and client.terminal.current.closed
        assert other_tasks() == set()

    run(main())
    assert [m["type"] for m in messages] == ["init", "term_output", "term_output"]
    assert output(messages) == "ls -la\necho hello\n"
    assert server.last().received == [
        {"type": "input", "payload": {"data": "ls -la\n"}},
        {"type": "input", "payload": {"data": "echo hello\n"}},
    ]


def test_terminal_async_callbacks_are_awaited_in_order(server: FakeTerminalServer) -> None:
    messages: list[TerminalMessage] = []
    tasks: set[str] = set()

    async def on_message(message: TerminalMessage) -> None:
        await asyncio.sleep(0)  # a slow consumer still sees everything in order
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task.get_name())
        messages.append(message)

    async def main() -> None:
        async with terminal_client(server) as client:
            async with client.terminal.connect("s1", on_message) as term:
                assert isinstance(term, AsyncTerminal)
                for i in range(50):
                    await term.send_input(f"{i},")
                await term.send_input("\n")
                await term.exec("flood")
                await until(lambda: "line 199\n" in output(messages))
            assert term.closed

    run(main())
    typed = "".join(f"{i}," for i in range(50)) + "\nflood\n"
    assert output(messages) == typed + "".join(f"line {i}\n" for i in range(200))
    assert tasks == {"bastion-terminal-t1"}


def test_terminal_iteration(server: FakeTerminalServer) -> None:
    async def main() -> None:
        async with terminal_client(server) as client:
            async with client.terminal.connect("s1", rows=30, cols=100) as term:
                assert term.info["rows"] == 30 and term.terminal_id == "t1"
                await term.resize(40, 120)
                await term.exec("echo hi")
                await term.exec("exit 7")
                seen = [message async for message in term]
                assert seen[0]["type"] == "init" and seen[-1]["type"] == "exit"
                assert "[resize 40x120]" in output(seen)
                assert await term.wait(5) == {"exit_code": 7, "reason": "exited"}
                assert term.exit_code == 7 and term.close_code == 1000 and term.closed
            term2 = await client.terminal.connect("s1", on_message=print)
            with pytest.raises(TypeError, match="on_message"):
                async for _ in term2:
                    pass
            await term2.close()

    run(main())
    assert server.connections[0].query == {"rows": "30", "cols": "100"}


def test_terminal_iteration_raises_when_the_connection_is_lost(server: FakeTerminalServer) -> None:
    async def main() -> None:
        async with terminal_client(server) as client:
            term = await client.terminal.connect("vanish")
            await term.exec("vanish")
            with pytest.raises(TerminalConnectionError, match="runtime gone") as info:
                async for _ in term:
                    pass
            assert info.value.close_code == 1011
            with pytest.raises(TerminalConnectionError):
                await term.wait(5)
            with pytest.raises(TerminalSendError, match="runtime gone"):
                await term.send_input("x")

    run(main())


def test_terminal_ending(server: FakeTerminalServer) -> None:
    async def main() -> None:
        async with terminal_client(server) as client:
            with pytest.raises(TerminalSendError, match="connect"):
                await client.terminal.send_input("ls\n")
            await client.terminal.close()  # nothing to close
            term = await client.terminal.connect("s1")
            with pytest.raises(TerminalTimeoutError) as timeout:
                await term.wait(timeout=0.05)
            assert isinstance(timeout.value, TimeoutError) and not term.closed
            await term.close()
            await term.close()  # idempotent
            assert await term.wait(1) == {"exit_code": None, "reason": CLIENT_CLOSED}
            for send in (term.send_input("x"), term.exec("ls"), term.resize(10, 10)):
                with pytest.raises(TerminalSendError, match="closed"):
                    await send
            term = await client.terminal.connect("stop-later")
            await term.exec("stop")
            assert await term.wait(5) == {"exit_code": None, "reason": "session_stopped"}
            assert term.close_code == 4009
            with pytest.raises(TerminalSendError, match="exit code"):
                await term.send_input("ls\n")
            assert other_tasks() == set()

    run(main())


def test_terminal_close_and_errors_from_the_callback(server: FakeTerminalServer) -> None:
    async def main() -> None:
        async with terminal_client(server) as client:
            seen: list[str] = []
            holder: list[AsyncTerminal] = []

            async def closing(message: TerminalMessage) -> None:
                seen.append(message["type"])
                if message["type"] == "term_output":
                    await holder[0].close()  # must not wait for itself

            term = await client.terminal.connect("s1", closing)
            holder.append(term)
            await term.exec("flood")
            assert (await term.wait(5))["reason"] == CLIENT_CLOSED
            assert seen == ["init", "term_output"]

            def failing(message: TerminalMessage) -> None:
                if message["type"] == "term_output":
                    raise RuntimeError("callback bug")

            term = await client.terminal.connect("s1", failing)
            await term.send_input("x")
            with pytest.raises(RuntimeError, match="callback bug"):
                await term.wait(5)
            with pytest.raises(TerminalSendError, match="on_message raised"):
                await term.send_input("y")

            async def waiting(message: TerminalMessage) -> None:
                await holder[1].wait()

            holder.append(await client.terminal.connect("s1", waiting))
            with pytest.raises(RuntimeError, match="cannot be awaited in on_message"):
                await holder[1].wait(5)

    run(main())


def test_terminal_refusals(server: FakeTerminalServer) -> None:
    async def main() -> None:
        async with terminal_client(server) as client:
            with pytest.raises(TerminalSessionNotFoundError) as missing:
                await client.terminal.connect("missing")
            assert isinstance(missing.value, SessionNotFoundError)
            assert missing.value.close_code == 4004 and missing.value.code == "session_not_found"
            with pytest.raises(TerminalSessionStateError) as stopped:
                await client.terminal.connect("stopped")
            assert isinstance(stopped.value, SessionStateError)
            with pytest.raises(TerminalConnectionError) as http404:
                await client.terminal.connect("http404")
            assert http404.value.status_code == 404 and "offer terminals" in str(http404.value)
            with pytest.raises(TerminalConnectionError, match="no init message"):
                await client.terminal.connect("silent", open_timeout=0.2)
            term = await client.terminal.connect("garbage")
            with pytest.raises(TerminalConnectionError, match="not JSON"):
                await term.wait(5)
            assert other_tasks() == set()
        async with terminal_client(server, "wrong") as client:
            with pytest.raises(TerminalAuthenticationError) as auth:
                async with client.terminal.connect("s1"):
                    pass
            assert isinstance(auth.value, AuthenticationError) and auth.value.close_code == 4001
        async with AsyncBastion("http://127.0.0.1:1") as client:
            with pytest.raises(TerminalConnectionError, match="cannot reach"):
                await client.terminal.connect("s1")
        assert other_tasks() == set()

    run(main())
    headers = server.connections[0].headers
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["User-Agent"].startswith("bastion-py-sdk/")


def test_client_close_closes_every_terminal(server: FakeTerminalServer) -> None:
    async def main() -> None:
        client = terminal_client(server)
        first = await client.terminal.connect("s1")
        second = await client.terminal.connect("s1", on_message=lambda m: None)
        readers = [t for t in other_tasks() if t.get_name() == "bastion-terminal-t1"]
        assert len(readers) == 2
        await client.close()
        assert first.closed and second.closed and client.is_closed
        assert other_tasks() == set()
        assert first._ws.transport.is_closing()

    run(main())


def test_a_forgotten_terminal_is_closed_when_the_loop_ends(server: FakeTerminalServer) -> None:
    async def main() -> None:
        client = terminal_client(server)
        await client.terminal.connect("s1")
        await client._http.aclose()  # the terminal itself is left open

    run(main())  # asyncio.run cancels the reader, which closes the connection
    assert server.last().done.wait(5)
