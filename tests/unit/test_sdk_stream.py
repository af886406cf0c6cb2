"""Streaming job output: ``jobs.stream``, ``run_and_wait(on_stdout=...)``, ``watch(on_output=...)``.

The server is an ``httpx.MockTransport`` answering the events endpoint with an NDJSON
body; a generator body shows that events reach the caller while the body is still
being produced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest

from bastion import (
    APIConnectionError,
    Bastion,
    BastionError,
    JobEvent,
    JobEventStream,
    JobFailedError,
    JobInfo,
    JobNotFoundError,
    JobTimeoutError,
    ServerShutdownError,
    SessionNotFoundError,
)
from bastion._resources.job_follow import StatusTracker, parse_job_event

EVENTS_PATH = "/v1/sessions/s1/jobs/j1/events"


def job(
    status: str = "queued", *, stdout: str = "", stderr: str = "", code: int | None = None
) -> JobInfo:
    final = status in ("completed", "failed")
    return {
        "job_id": "j1",
        "session_id": "s1",
        "status": status,  # type: ignore[typeddict-item]
        "command": ["x"],
        "created_at": "t0",
        "started_at": None if status == "queued" else "t1",
        "finished_at": "t2" if final else None,
        "failure_reason": None,
        "output": {"console_output": stdout, "errout": stderr, "status_code": code}
        if final
        else None,
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
        {"type": "end", "job": job(status, stdout="one\ntwo\n", stderr="warn\n", code=code)},
    ]


class TrackedStream(httpx.SyncByteStream):
    """A response body from chunks (or a generator), remembering whether it was closed."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    def close(self) -> None:
        self.closed = True


class Server:
    """A MockTransport handler: runs jobs, answers ``get``/``wait``, streams events."""

    def __init__(
        self,
        events: Iterable[bytes] | list[dict[str, Any]],
        *,
        gets: list[JobInfo] | None = None,
        final: JobInfo | None = None,
    ) -> None:
        body = ndjson(*events) if isinstance(events, list) else events
        self.body = TrackedStream([body] if isinstance(body, bytes) else body)
        self.gets = gets or [job("queued")]
        self.final = final
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.method == "POST":
            return httpx.Response(202, json=job("queued"))
        if path == EVENTS_PATH:
            return httpx.Response(
                200, headers={"Content-Type": "application/x-ndjson"}, stream=self.body
            )
        if path.endswith("/wait"):
            return httpx.Response(200, json=self.final)
        answer = self.gets.pop(0) if len(self.gets) > 1 else self.gets[0]
        return httpx.Response(200, json=answer)

    def client(self) -> Bastion:
        return Bastion("http://bastion.test", transport=httpx.MockTransport(self))

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


# --------------------------------------------------------------------------- jobs.stream


def test_stream_yields_events_in_order_and_stops_after_end() -> None:
    events = [*completed_events(), {"type": "stdout", "data": "after the end"}]
    server = Server(events)
    with server.client() as bastion:
        stream = bastion.jobs.stream("s1", "j1")
        assert isinstance(stream, JobEventStream)
        received = list(stream)
    assert received == completed_events()
    request = server.requests[0]
    assert (request.method, request.url.path) == ("GET", EVENTS_PATH)
    assert request.headers["Accept"] == "application/x-ndjson"
    # A job may be silent for as long as it runs: no read timeout on the stream.
    assert request.extensions["timeout"]["read"] is None
    assert server.body.closed


def test_stream_delivers_each_event_before_the_next_chunk_exists() -> None:
    received: list[JobEvent] = []

    def body() -> Iterator[bytes]:
        yield ndjson({"type": "status", "status": "running"})
        assert [e["type"] for e in received] == ["status"]
        # A line split across chunks is put back together.
        yield b'{"type": "stdout", '
        yield b'"data": "hel'
        yield b'lo\\n"}\n'
        assert received[-1] == {"type": "stdout", "data": "hello\n"}
        yield b"\n"  # a blank keep-alive line
        yield ndjson({"type": "end", "job": job("completed", stdout="hello\n", code=0)})

    server = Server(body())
    with server.client() as bastion:
        for event in bastion.jobs.stream("s1", "j1"):
            received.append(event)
    assert [e["type"] for e in received] == ["status", "stdout", "end"]


def test_stream_closed_early_releases_the_response() -> None:
    server = Server(completed_events())
    with server.client() as bastion:
        with bastion.jobs.stream("s1", "j1") as events:
            assert next(events)["type"] == "status"
        assert server.body.closed

        server.body.closed = False
        stream = bastion.jobs.stream("s1", "j1")
        next(stream)
        stream.close()
        assert server.body.closed
        stream.close()  # idempotent


def test_stream_is_lazy() -> None:
    server = Server(completed_events())
    with server.client() as bastion:
        stream = bastion.jobs.stream("s1", "j1")
        assert server.requests == []
        stream.close()
        assert server.requests == []


def test_stream_error_response() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "job_not_found", "message": "no j9"}})

    with Bastion("http://bastion.test", transport=httpx.MockTransport(handler)) as bastion:
        stream = bastion.jobs.stream("s1", "j9")
        with pytest.raises(JobNotFoundError, match="no j9"):
            next(stream)


def test_stream_ending_without_end_is_a_connection_error() -> None:
    server = Server(completed_events()[:3])
    with server.client() as bastion:
        events = bastion.jobs.stream("s1", "j1")
        assert [e["type"] for e in [next(events), next(events), next(events)]] == [
            "status",
            "status",
            "stdout",
        ]
        with pytest.raises(APIConnectionError, match="ended before the job did"):
            next(events)


def shutdown_events() -> list[dict[str, Any]]:
    """What a server that begins to shut down while the job runs sends."""
    return [
        {"type": "status", "status": "running"},
        {"type": "stdout", "data": "one\n"},
        {"type": "end", "job": job("running"), "reason": "server_shutdown"},
    ]


def test_stream_ended_by_a_server_shutdown_raises_server_shutdown_error() -> None:
    server = Server(shutdown_events())
    with server.client() as bastion:
        events = bastion.jobs.stream("s1", "j1")
        assert [next(events)["type"], next(events)["type"]] == ["status", "stdout"]
        with pytest.raises(ServerShutdownError, match="shutting down") as raised:
            next(events)
    assert raised.value.code == "server_shutdown"
    assert server.body.closed


def test_run_and_wait_never_takes_a_shutdown_end_for_the_result() -> None:
    server = Server(shutdown_events(), gets=[job("running")])
    seen: list[str] = []
    with server.client() as bastion, pytest.raises(ServerShutdownError):
        bastion.jobs.run_and_wait("s1", "make", on_stdout=seen.append)
    assert seen == ["one\n"]


def test_stream_broken_connection_is_translated() -> None:
    def body() -> Iterator[bytes]:
        yield ndjson({"type": "status", "status": "running"})
        raise httpx.ReadError("connection reset")

    server = Server(body())
    with server.client() as bastion:
        events = bastion.jobs.stream("s1", "j1")
        next(events)
        with pytest.raises(APIConnectionError, match="connection reset"):
            next(events)
    assert server.body.closed


def test_stream_malformed_line() -> None:
    server = Server(iter([b'{"type": "status", "status": "running"}\nnot json\n']))
    with server.client() as bastion:
        events = bastion.jobs.stream("s1", "j1")
        next(events)
        with pytest.raises(BastionError, match="not JSON"):
            next(events)


def test_parse_job_event() -> None:
    assert parse_job_event("  \n") is None
    assert parse_job_event('{"type": "future", "x": 1}') == {"type": "future", "x": 1}
    for bad in ("[1]", '{"status": "x"}', '{"type": "end"}', '{"type": "stdout"}'):
        with pytest.raises(BastionError):
            parse_job_event(bad)


# --------------------------------------------------------------------------- run_and_wait


def test_run_and_wait_streams_output_to_callbacks_in_order() -> None:
    server = Server(completed_events())
    calls: list[tuple[str, str]] = []
    with server.client() as bastion:
        result = bastion.jobs.run_and_wait(
            "s1",
            ["make"],
            on_stdout=lambda text: calls.append(("out", text)),
            on_stderr=lambda text: calls.append(("err", text)),
        )
    assert calls == [("out", "one\n"), ("err", "warn\n"), ("out", "two\n")]
    assert result["status"] == "completed"
    assert result["output"] is not None and result["output"]["console_output"] == "one\ntwo\n"
    assert server.paths() == ["POST /v1/sessions/s1/jobs", f"GET {EVENTS_PATH}"]
    assert server.body.closed


def test_run_and_wait_only_stdout_callback() -> None:
    server = Server(completed_events())
    out: list[str] = []
    with server.client() as bastion:
        bastion.jobs.run_and_wait("s1", "make", on_stdout=out.append)
    assert out == ["one\n", "two\n"]


def test_run_and_wait_failed_job_raises_after_all_output() -> None:
    server = Server(completed_events(code=2))
    err: list[str] = []
    with server.client() as bastion, pytest.raises(JobFailedError) as info:
        bastion.jobs.run_and_wait("s1", "make", on_stderr=err.append)
    assert err == ["warn\n"]
    assert info.value.status_code == 2 and info.value["status"] == "failed"
    assert info.value.console_output == "one\ntwo\n"


def test_run_and_wait_without_callbacks_keeps_the_long_poll() -> None:
    server = Server(completed_events(), final=job("completed", stdout="x", code=0))
    with server.client() as bastion:
        assert bastion.jobs.run_and_wait("s1", "make")["status"] == "completed"
    assert server.paths() == ["POST /v1/sessions/s1/jobs", "GET /v1/sessions/s1/jobs/j1/wait"]


def test_run_and_wait_timeout_while_streaming() -> None:
    def body() -> Iterator[bytes]:
        yield ndjson({"type": "status", "status": "running"})
        # What httpx raises when the read timeout (the time left) passes in silence.
        raise httpx.ReadTimeout("timed out")

    server = Server(body())
    with server.client() as bastion, pytest.raises(JobTimeoutError) as info:
        bastion.jobs.run_and_wait("s1", "sleep 100", wait_timeout=0.0, on_stdout=print)
    assert isinstance(info.value, TimeoutError)
    assert info.value.job is not None and info.value.job["status"] == "running"
    read = server.requests[-1].extensions["timeout"]["read"]
    assert read is not None and read <= 0.0
    assert server.body.closed


def test_run_and_wait_stream_cut_short() -> None:
    server = Server(completed_events()[:3], gets=[job("running")])
    with server.client() as bastion, pytest.raises(APIConnectionError, match="ended before"):
        bastion.jobs.run_and_wait("s1", "make", on_stdout=print)
    assert server.paths()[-1] == "GET /v1/sessions/s1/jobs/j1"


def test_run_and_wait_session_deleted_while_streaming() -> None:
    events = ndjson({"type": "status", "status": "running"})

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=job("queued"))
        if request.url.path == EVENTS_PATH:
            return httpx.Response(200, content=events)  # ends without "end"
        body = {"error": {"code": "session_not_found", "message": "no session s1"}}
        return httpx.Response(404, json=body)

    with Bastion("http://bastion.test", transport=httpx.MockTransport(handler)) as bastion:
        with pytest.raises(SessionNotFoundError, match="no session s1") as info:
            bastion.jobs.run_and_wait("s1", "make", on_stdout=print)
    assert isinstance(info.value.__cause__, APIConnectionError)


def test_run_and_wait_callback_error_propagates_and_closes() -> None:
    server = Server(completed_events())

    def boom(text: str) -> None:
        raise ValueError("callback bug")

    with server.client() as bastion, pytest.raises(ValueError, match="callback bug"):
        bastion.jobs.run_and_wait("s1", "make", on_stdout=boom)
    assert server.body.closed


# --------------------------------------------------------------------------- watch


def test_watch_with_output() -> None:
    server = Server(completed_events(), gets=[job("queued"), job("running")])
    calls: list[tuple[str, Any]] = []
    with server.client() as bastion:
        final = bastion.jobs.watch(
            "s1",
            "j1",
            lambda info: calls.append(("update", info["status"])),
            on_output=lambda event: calls.append((event["type"], event.get("data"))),
        )
    assert calls == [
        ("update", "queued"),
        ("update", "running"),
        ("stdout", "one\n"),
        ("stderr", "warn\n"),
        ("stdout", "two\n"),
        ("update", "completed"),
    ]
    assert final["status"] == "completed"
    # The initial get, the stream, and one get for the running snapshot.
    assert server.paths() == [
        "GET /v1/sessions/s1/jobs/j1",
        f"GET {EVENTS_PATH}",
        "GET /v1/sessions/s1/jobs/j1",
    ]


def test_watch_started_late_does_not_go_backwards() -> None:
    # The job runs already; the stream replays "queued" and "running" from the start.
    server = Server(completed_events(code=1), gets=[job("running")])
    updates: list[str] = []
    output: list[JobEvent] = []
    with server.client() as bastion:
        final = bastion.jobs.watch(
            "s1", "j1", lambda info: updates.append(info["status"]), on_output=output.append
        )
    assert updates == ["running", "failed"]  # a failed job is returned, not raised
    assert final["status"] == "failed"
    assert len(output) == 3


def test_watch_of_a_finished_job_replays_its_output() -> None:
    final_job = completed_events()[-1]["job"]
    server = Server(completed_events(), gets=[final_job])
    updates: list[str] = []
    output: list[JobEvent] = []
    with server.client() as bastion:
        bastion.jobs.watch(
            "s1", "j1", lambda info: updates.append(info["status"]), on_output=output.append
        )
    assert updates == ["completed"]
    assert [e.get("data") for e in output] == ["one\n", "warn\n", "two\n"]


def test_status_tracker_is_monotonic() -> None:
    tracker = StatusTracker()
    assert tracker.changed(job("running"))
    assert not tracker.is_new("queued")
    assert not tracker.changed(job("queued"))
    assert tracker.changed(job("completed"))
    assert not tracker.is_new("running")
