"""The sync client against httpx.MockTransport: requests sent and results returned."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion import (
    Bastion,
    JobFailedError,
    JobInfo,
    JobStatus,
    JobTimeoutError,
    SessionInfo,
)
from bastion._base import UPLOAD_CHUNK_SIZE
from bastion._resources.job_follow import WATCH_QUEUED_HOLD
from bastion.wire import IDEMPOTENCY_HEADER, JOB_WAIT_MAX_HOLD

Handler = Callable[[httpx.Request], httpx.Response]
MiB = 1024 * 1024


class Recorder:
    """A MockTransport handler that records requests and answers from a script."""

    def __init__(self, *responses: httpx.Response | Handler) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        return answer(request) if callable(answer) else answer

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def client(self, **kwargs: Any) -> Bastion:
        kwargs.setdefault("base_url", "http://bastion.test")
        return Bastion(transport=httpx.MockTransport(self), **kwargs)


def session(status: str = "created", sid: str = "s1") -> SessionInfo:
    return {
        "session_id": sid,
        "status": status,  # type: ignore[typeddict-item]
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "limits": {},
        "metadata": {},
    }


def job(status: str, exit_status: int | None = 0, stdout: str = "") -> JobInfo:
    final = status in ("completed", "failed")
    return {
        "job_id": "j1",
        "session_id": "s1",
        "status": status,  # type: ignore[typeddict-item]
        "command": ["python3", "/main.py"],
        "created_at": "2024-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "failure_reason": None,
        "output": (
            {
                "console_output": stdout,
                "errout": "oops\n" if status == "failed" else "",
                "status_code": exit_status,
            }
            if final
            else None
        ),
    }


def ok(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


# --------------------------------------------------------------------------- configuration


def test_env_var_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_URL", "http://from-env:9000/")
    monkeypatch.setenv("BASTION_API_KEY", "env-key")
    rec = Recorder(ok({"sessions": []}))
    with Bastion(transport=httpx.MockTransport(rec)) as client:
        assert client.base_url == "http://from-env:9000"
        client.sessions.list()
    assert str(rec.last.url) == "http://from-env:9000/v1/sessions?limit=1000"  # every page
    assert rec.last.headers["Authorization"] == "Bearer env-key"
    assert "env-key" not in repr(client)


def test_defaults_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_URL", raising=False)
    monkeypatch.setenv("BASTION_API_KEY", "")  # empty means no key
    rec = Recorder(ok({"sessions": []}))
    with Bastion(transport=httpx.MockTransport(rec)) as client:
        client.sessions.list()
    assert str(rec.last.url) == "http://localhost:8080/v1/sessions?limit=1000"
    assert "Authorization" not in rec.last.headers
    assert rec.last.headers["User-Agent"].startswith("bastion-py-sdk/")


def test_arguments_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_URL", "http://from-env:9000")
    monkeypatch.setenv("BASTION_API_KEY", "env-key")
    rec = Recorder(ok({"status": "ok", "version": "0.1.0", "runtime": "crun"}))
    with rec.client(base_url="http://explicit:1/prefix", api_key="arg-key") as client:
        assert client.health()["runtime"] == "crun"
    assert str(rec.last.url) == "http://explicit:1/prefix/v1/health"
    assert rec.last.headers["Authorization"] == "Bearer arg-key"


def test_timeout_setting_reaches_requests() -> None:
    rec = Recorder(ok({"sessions": []}))
    with rec.client(timeout=7.5) as client:
        client.sessions.list()
    assert rec.last.extensions["timeout"]["read"] == 7.5


def test_context_manager_closes_and_resources_are_built_once() -> None:
    with Recorder(ok({})).client() as client:
        assert client.sessions is client.sessions
        assert client.jobs is client.jobs and client.files is client.files
        assert not client.is_closed
    assert client.is_closed


# --------------------------------------------------------------------------- URLs


def test_path_parameters_are_quoted() -> None:
    rec = Recorder(ok(session()))
    with rec.client() as client:
        client.sessions.get("a/b c")
        assert rec.last.url.raw_path == b"/v1/sessions/a%2Fb%20c"
        client.sessions.get("..")
        assert rec.last.url.raw_path == b"/v1/sessions/%2E%2E"
        client.jobs.get("s1", "../../x")
        assert rec.last.url.raw_path == b"/v1/sessions/s1/jobs/..%2F..%2Fx"
        with pytest.raises(ValueError, match="non-empty"):
            client.sessions.delete("")
    assert len(rec.requests) == 3


# --------------------------------------------------------------------------- sessions


def test_session_lifecycle_requests() -> None:
    rec = Recorder(ok(session("created"), 201))
    with rec.client(api_key="k") as client:
        assert client.sessions.create()["status"] == "created"
        create = rec.last
        assert (create.method, create.url.path) == ("POST", "/v1/sessions")
        assert body(create) == {}
        first_key = create.headers[IDEMPOTENCY_HEADER]
        uuid.UUID(first_key)

        client.sessions.create(limits={"memory_mb": 256, "pids": 64}, metadata={"team": "a"})
        assert body(rec.last) == {
            "limits": {"memory_mb": 256, "pids": 64},
            "metadata": {"team": "a"},
        }
        assert rec.last.headers[IDEMPOTENCY_HEADER] != first_key  # fresh per call

        client.sessions.create(idempotency_key="retry-me")
        assert rec.last.headers[IDEMPOTENCY_HEADER] == "retry-me"

        for call, method, path in [
            (lambda: client.sessions.get("s1"), "GET", "/v1/sessions/s1"),
            (lambda: client.sessions.status("s1"), "GET", "/v1/sessions/s1"),
            (lambda: client.sessions.start("s1"), "POST", "/v1/sessions/s1/start"),
            (lambda: client.sessions.stop("s1"), "POST", "/v1/sessions/s1/stop"),
            (lambda: client.sessions.delete("s1"), "DELETE", "/v1/sessions/s1"),
            (lambda: client.sessions.list(), "GET", "/v1/sessions"),
        ]:
            call()
            assert (rec.last.method, rec.last.url.path) == (method, path)
            assert rec.last.headers["Authorization"] == "Bearer k"


# --------------------------------------------------------------------------- jobs


def test_run_sends_command_and_options() -> None:
    rec = Recorder(ok(job("queued"), 202))
    with rec.client() as client:
        assert client.jobs.run("s1", ["python3", "/main.py"])["status"] == "queued"
        assert (rec.last.method, rec.last.url.path) == ("POST", "/v1/sessions/s1/jobs")
        assert body(rec.last) == {"command": ["python3", "/main.py"]}

        client.jobs.run("s1", ("ls", "-la"), env={"A": "1"}, cwd="/tmp", timeout=2.5)
        assert body(rec.last) == {
            "command": ["ls", "-la"],
            "env": {"A": "1"},
            "cwd": "/tmp",
            "timeout": 2.5,
        }

        client.jobs.run("s1", "echo hi | wc -c")
        assert body(rec.last)["command"] == ["/bin/sh", "-c", "echo hi | wc -c"]

        with pytest.raises(TypeError):
            client.jobs.run("s1", ["echo", 1])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            client.jobs.run("s1", b"echo")  # type: ignore[arg-type]
    assert len(rec.requests) == 3


def test_get_and_list_jobs() -> None:
    rec = Recorder(ok(job("running")))
    with rec.client() as client:
        assert client.jobs.get("s1", "j1")["status"] == "running"
        assert rec.last.url.path == "/v1/sessions/s1/jobs/j1"
        rec.responses = [ok({"jobs": [job("running")]})]
        assert len(client.jobs.list("s1")["jobs"]) == 1
        assert rec.last.url.path == "/v1/sessions/s1/jobs"


def test_wait_long_polls_until_final() -> None:
    rec = Recorder(ok(job("running")), ok(job("running")), ok(job("completed", stdout="hi\n")))
    with rec.client(timeout=30) as client:
        result = client.jobs.wait("s1", "j1")
    assert result["output"] is not None
    assert result["output"]["console_output"] == "hi\n"
    assert len(rec.requests) == 3
    for request in rec.requests:
        assert (request.method, request.url.path) == ("GET", "/v1/sessions/s1/jobs/j1/wait")
        assert float(request.url.params["timeout"]) == JOB_WAIT_MAX_HOLD
        # The read timeout covers the server's hold plus the usual read timeout.
        assert request.extensions["timeout"]["read"] == JOB_WAIT_MAX_HOLD + 30


def test_wait_holds_no_longer_than_the_deadline() -> None:
    rec = Recorder(ok(job("completed")))
    with rec.client() as client:
        client.jobs.wait("s1", "j1", timeout=2)
    assert 0 < float(rec.last.url.params["timeout"]) <= 2


def test_wait_timeout_raises_timeout_error() -> None:
    rec = Recorder(ok(job("running")))
    with rec.client() as client, pytest.raises(TimeoutError) as info:
        client.jobs.wait("s1", "j1", timeout=0.3)
    err = info.value
    assert isinstance(err, JobTimeoutError)
    assert err.job_id == "j1" and err.timeout == 0.3
    assert err.job is not None and err.job["status"] == "running"
    assert all(float(r.url.params["timeout"]) <= 0.3 for r in rec.requests)


def test_wait_with_zero_timeout_polls_once() -> None:
    rec = Recorder(ok(job("queued")))
    with rec.client() as client, pytest.raises(JobTimeoutError):
        client.jobs.wait("s1", "j1", timeout=0)
    assert len(rec.requests) == 1
    assert rec.last.url.params["timeout"] == "0"


def test_wait_raises_failed_job_with_result() -> None:
    failed = job("failed", exit_status=3)
    rec = Recorder(ok(failed))
    with rec.client() as client, pytest.raises(JobFailedError) as info:
        client.jobs.wait("s1", "j1")
    assert info.value.result == failed
    assert info.value.status_code == 3
    assert info.value.errout == "oops\n"
    assert info.value["status"] == "failed"


def test_run_and_wait() -> None:
    rec = Recorder(ok(job("queued"), 202), ok(job("completed", stdout="hi\n")))
    with rec.client() as client:
        result = client.jobs.run_and_wait("s1", ["python3", "/main.py"], timeout=5)
    assert result["output"] is not None and result["output"]["console_output"] == "hi\n"
    assert [r.method for r in rec.requests] == ["POST", "GET"]
    assert body(rec.requests[0])["timeout"] == 5


def test_run_and_wait_raises_on_failure() -> None:
    rec = Recorder(ok(job("queued"), 202), ok(job("failed", exit_status=1)))
    with rec.client() as client, pytest.raises(JobFailedError) as info:
        client.jobs.run_and_wait("s1", "exit 1")
    assert info.value.job_id == "j1"
    assert info.value.status_code == 1


def test_watch_reports_each_status_change_in_order() -> None:
    rec = Recorder(
        ok(job("queued")),  # GET job
        ok(job("queued")),  # wait: still queued after a short hold, not reported again
        ok(job("running")),
        ok(job("running")),  # a hold that ended without news
        ok(job("completed", stdout="done\n")),
    )
    seen: list[str] = []
    with rec.client() as client:
        final = client.jobs.watch("s1", "j1", lambda info: seen.append(info["status"]))
    assert seen == ["queued", "running", "completed"]
    assert final["status"] == JobStatus.COMPLETED
    assert rec.requests[0].url.path == "/v1/sessions/s1/jobs/j1"
    holds = [float(r.url.params["timeout"]) for r in rec.requests[1:]]
    # Short holds while queued (to see it start), long ones once it runs.
    assert holds == [WATCH_QUEUED_HOLD, WATCH_QUEUED_HOLD, JOB_WAIT_MAX_HOLD, JOB_WAIT_MAX_HOLD]


def test_watch_returns_failed_job_without_raising() -> None:
    rec = Recorder(ok(job("running")), ok(job("failed", exit_status=2)))
    seen: list[JobInfo] = []
    with rec.client() as client:
        final = client.jobs.watch("s1", "j1", seen.append)
    assert final["status"] == "failed"
    assert [info["status"] for info in seen] == ["running", "failed"]
    assert seen[-1] is final


def test_watch_of_finished_job_reports_once() -> None:
    rec = Recorder(ok(job("completed")))
    seen: list[JobInfo] = []
    with rec.client() as client:
        client.jobs.watch("s1", "j1", seen.append)
    assert len(seen) == 1 and len(rec.requests) == 1


def test_watch_timeout() -> None:
    rec = Recorder(ok(job("running")))
    seen: list[JobInfo] = []
    with rec.client() as client, pytest.raises(JobTimeoutError):
        client.jobs.watch("s1", "j1", seen.append, timeout=0.2)
    assert [info["status"] for info in seen] == ["running"]


# --------------------------------------------------------------------------- files


class RecordingFile(io.RawIOBase):
    """A binary file that records each read and refuses whole-file reads."""

    def __init__(self, size: int) -> None:
        self.data = bytes(range(256)) * (size // 256)
        self.position = 0
        self.read_sizes: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        assert size is not None and size > 0, "upload must never read a file whole"
        self.read_sizes.append(size)
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk


class StreamingTransport(httpx.BaseTransport):
    """Reads a request body chunk by chunk, as a server does.

    (``MockTransport`` reads the whole body before calling its handler, which would
    hide whether the client streams.)
    """

    def __init__(self, source: RecordingFile) -> None:
        self.source = source
        self.received: list[int] = []
        self.position_at_first_chunk: int | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        for chunk in request.stream:
            if self.position_at_first_chunk is None:
                self.position_at_first_chunk = self.source.position
            self.received.append(len(chunk))
        return ok({"path": request.url.params["path"], "size": sum(self.received)}, 201)


def test_upload_streams_file_object_in_chunks() -> None:
    source = RecordingFile(2 * MiB + 512 * 1024)
    transport = StreamingTransport(source)
    with Bastion("http://bastion.test", transport=transport) as client:
        result = client.files.upload("s1", source, "/data/big.bin")
    assert result == {"path": "/data/big.bin", "size": len(source.data)}
    assert transport.received == [MiB, MiB, 512 * 1024]
    assert set(source.read_sizes) == {UPLOAD_CHUNK_SIZE}
    # Streaming, not buffering: the server saw the first chunk before the rest was read.
    assert transport.position_at_first_chunk == MiB


def test_upload_request_shape() -> None:
    rec = Recorder(ok({"path": "/main.py", "size": 11}, 201))
    with rec.client() as client:
        client.files.upload("s1", b'print("hi")', "/main.py")
    request = rec.last
    assert (request.method, request.url.path) == ("PUT", "/v1/sessions/s1/files")
    assert request.url.params["path"] == "/main.py"
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert request.headers["Content-Length"] == "11"
    assert request.content == b'print("hi")'


@pytest.mark.parametrize("make", [bytearray, memoryview], ids=["bytearray", "memoryview"])
def test_upload_buffers_with_length(make: Callable[[bytes], Any]) -> None:
    data = b"z" * (MiB + 10)
    rec = Recorder(ok({"path": "/b", "size": len(data)}, 201))
    with rec.client() as client:
        client.files.upload("s1", make(data), "/b")
    assert rec.last.headers["Content-Length"] == str(len(data))
    assert "Transfer-Encoding" not in rec.last.headers
    assert rec.last.content == data


def test_upload_from_real_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"abc" * 1000)
    rec = Recorder(ok({"path": "/in.bin", "size": 3000}, 201))
    with rec.client() as client, path.open("rb") as fileobj:
        client.files.upload("s1", fileobj, "/in.bin")
    assert rec.last.content == b"abc" * 1000
    assert rec.last.headers["Transfer-Encoding"] == "chunked"


def test_upload_rejects_text(tmp_path: Path) -> None:
    rec = Recorder(ok({}))
    path = tmp_path / "t.txt"
    path.write_text("hello")
    with rec.client() as client:
        with pytest.raises(TypeError, match="not str"):
            client.files.upload("s1", "print(1)", "/x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="binary mode"), path.open() as text:
            client.files.upload("s1", text, "/x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            client.files.upload("s1", 42, "/x")  # type: ignore[arg-type]
    assert rec.requests == []


def test_upload_refuses_non_blocking_file_without_data() -> None:
    class NotReady:
        def read(self, size: int) -> bytes | None:
            return None

    with Recorder(ok({})).client() as client, pytest.raises(ValueError, match="non-blocking"):
        client.files.upload("s1", NotReady(), "/x")  # type: ignore[arg-type]


def test_list_and_delete_files() -> None:
    listing = {
        "path": "/",
        "files": [
            {
                "name": "main.py",
                "path": "/main.py",
                "size": 11,
                "type": "file",
                "modified_at": "t",
                "mode": "0644",
            }
        ],
    }
    rec = Recorder(ok(listing))
    with rec.client() as client:
        assert client.files.list("s1")["files"][0]["name"] == "main.py"
        assert (rec.last.method, rec.last.url.path) == ("GET", "/v1/sessions/s1/files")
        assert dict(rec.last.url.params) == {"path": "/", "limit": "1000"}  # every page

        rec.responses = [ok({"path": "/d", "deleted": True})]
        assert client.files.delete("s1", "/d")["deleted"] is True
        assert rec.last.method == "DELETE"
        assert dict(rec.last.url.params) == {"path": "/d"}
        client.files.delete("s1", "/d", recursive=True)
        assert dict(rec.last.url.params) == {"path": "/d", "recursive": "true"}


def test_downloads(tmp_path: Path) -> None:
    content = b"0123456789" * 1000
    rec = Recorder(lambda request: httpx.Response(200, content=content))
    with rec.client() as client:
        assert client.files.download("s1", "/f") == content
        assert rec.last.url.path == "/v1/sessions/s1/files/content"
        assert rec.last.url.params["path"] == "/f"

        chunks = list(client.files.iter_download("s1", "/f", chunk_size=4096))
        assert b"".join(chunks) == content
        assert max(len(c) for c in chunks) <= 4096

        dest = tmp_path / "out.bin"
        assert client.files.download_to("s1", "/f", dest) == len(content)
        assert dest.read_bytes() == content

        buffer = io.BytesIO()
        assert client.files.download_to("s1", "/f", buffer) == len(content)
        assert buffer.getvalue() == content


def test_long_poll_bookkeeping_with_a_fake_clock() -> None:
    from bastion._resources.job_follow import LongPoll

    now = [100.0]
    poll = LongPoll(10.0, clock=lambda: now[0])
    assert poll.next_hold() == 10.0 and poll.next_hold(cap=1.0) == 1.0
    assert poll.pause_after(hold=10.0, elapsed=6.0) == 0.0  # an honest hold: poll again
    assert poll.pause_after(hold=10.0, elapsed=0.01) == 0.5  # answered early: back off
    now[0] = 109.8
    assert poll.next_hold() == pytest.approx(0.2)
    assert poll.pause_after(hold=10.0, elapsed=0.0) == pytest.approx(0.2)  # never past deadline
    now[0] = 110.0
    assert poll.expired() and poll.next_hold() == 0.0
    forever = LongPoll(None, clock=lambda: now[0])
    assert not forever.expired() and forever.next_hold() == JOB_WAIT_MAX_HOLD
