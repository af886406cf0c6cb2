"""``bastion exec``: a job's output streamed live, the job's exit status as the CLI's,
and 125 (as ``docker run``) when bastion itself failed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from bastion.cli import EXEC_FAILED, main

EVENTS_PATH = "/v1/sessions/s1/jobs/j1/events"


def job(status: str, code: int | None, reason: str | None = None) -> dict[str, Any]:
    final = status in ("completed", "failed")
    return {
        "job_id": "j1",
        "session_id": "s1",
        "status": status,
        "command": ["x"],
        "created_at": "t",
        "started_at": "t",
        "finished_at": "t" if final else None,
        "failure_reason": reason,
        "output": {"console_output": "", "errout": "", "status_code": code} if final else None,
    }


def line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


class Server:
    """Answers ``POST .../jobs`` and streams the given event body."""

    def __init__(self, body: Callable[[], Iterator[bytes]]) -> None:
        self.body = body
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if request.method == "POST":
            return httpx.Response(202, json=job("queued", None))
        assert request.url.path == EVENTS_PATH
        return httpx.Response(200, content=self.body())


def run(argv: list[str], handler: Callable[[httpx.Request], httpx.Response]) -> int:
    return main(
        ["--url", "http://bastion.test", *argv],
        transport=httpx.MockTransport(handler),
        commands=[],
    )


def test_exec_streams_output_live(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[tuple[str, str]] = []

    def body() -> Iterator[bytes]:
        yield line({"type": "status", "status": "running"})
        yield line({"type": "stdout", "data": "compiling\n"})
        # The chunk is on stdout before the job has produced anything more.
        captured = capsys.readouterr()
        seen.append((captured.out, captured.err))
        yield line({"type": "stderr", "data": "warning: x\n"})
        captured = capsys.readouterr()
        seen.append((captured.out, captured.err))
        yield line({"type": "stdout", "data": "done\n"})
        yield line({"type": "end", "job": job("completed", 0)})

    server = Server(body)
    assert run(["exec", "s1", "--env", "A=1", "--cwd", "/w", "--", "make", "-j4"], server) == 0
    assert seen == [("compiling\n", ""), ("", "warning: x\n")]
    assert capsys.readouterr() == ("done\n", "")  # no JSON result printed
    assert json.loads(server.requests[0].content) == {
        "command": ["make", "-j4"],
        "env": {"A": "1"},
        "cwd": "/w",
    }


def test_exec_exits_with_the_job_status(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> Iterator[bytes]:
        yield line({"type": "stderr", "data": "boom\n"})
        yield line({"type": "end", "job": job("failed", 3, "nonzero_exit")})

    assert run(["exec", "s1", "--shell", "--", "exit", "3"], Server(body)) == 3
    out, err = capsys.readouterr()
    assert (out, err) == ("", "boom\n")  # only the job's own output


def test_exec_failure_without_status_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> Iterator[bytes]:
        yield line({"type": "end", "job": job("failed", None, "not_found")})

    assert run(["exec", "s1", "--", "nosuchcmd"], Server(body)) == 1
    assert capsys.readouterr().err == "bastion: job j1 failed (not_found)\n"


def test_exec_timeout_reason_with_status(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> Iterator[bytes]:
        yield line({"type": "end", "job": job("failed", 137, "timeout")})

    assert run(["exec", "s1", "--timeout", "1", "--", "sleep", "9"], Server(body)) == 137
    assert "failed with exit status 137 (timeout)" in capsys.readouterr().err


def test_exec_status_out_of_range_is_1() -> None:
    def body() -> Iterator[bytes]:
        yield line({"type": "end", "job": job("failed", -9)})

    assert run(["exec", "s1", "--", "x"], Server(body)) == 1


def test_exec_interrupted(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> Iterator[bytes]:
        yield line({"type": "stdout", "data": "working\n"})
        raise KeyboardInterrupt

    assert run(["exec", "s1", "--", "sleep", "100"], Server(body)) == 130
    out, err = capsys.readouterr()
    assert out == "working\n"
    assert err == "bastion: interrupted; the job keeps running in the session (SIGINT)\n"


@pytest.mark.parametrize(
    ("status", "code"),
    [(409, "session_state"), (404, "session_not_found"), (401, "unauthorized")],
)
def test_exec_api_error_exits_125(
    status: int, code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not the remote command's status: bastion itself failed, as `docker run` says."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": code, "message": "it failed"}})

    assert run(["exec", "s1", "--", "ls"], handler) == EXEC_FAILED == 125
    assert capsys.readouterr() == ("", f"bastion: it failed ({code})\n")


def test_exec_unreachable_server_exits_125(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert run(["exec", "s1", "--", "ls"], handler) == 125
    assert capsys.readouterr().err == (
        "bastion: cannot reach the Bastion server at http://bastion.test "
        "(POST /v1/sessions/s1/jobs): connection refused (connection_error)\n"
    )


def test_exec_wait_timeout_exits_125(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        if request.method == "POST":
            return httpx.Response(202, json=job("queued", None))
        raise httpx.ReadTimeout("timed out")

    assert run(["exec", "s1", "--wait-timeout", "0.2", "--", "sleep", "9"], handler) == 125
    assert capsys.readouterr().err.endswith("(timeout)\n")


def test_exec_url_and_key_after_the_command() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(202, json=job("queued", None))
        return httpx.Response(200, content=line({"type": "end", "job": job("completed", 0)}))

    argv = ["exec", "s1", "--url", "http://after.test", "--api-key", "k2", "--", "true"]
    assert main(argv, transport=httpx.MockTransport(handler), commands=[]) == 0
    assert seen[0].url.host == "after.test"
    assert all(r.headers["Authorization"] == "Bearer k2" for r in seen)


def test_exec_uses_env_url_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(202, json=job("queued", None))
        return httpx.Response(200, content=line({"type": "end", "job": job("completed", 0)}))

    monkeypatch.setenv("BASTION_URL", "http://env.test:9")
    monkeypatch.setenv("BASTION_API_KEY", "k1")
    assert (
        main(["exec", "s1", "--", "true"], transport=httpx.MockTransport(handler), commands=[]) == 0
    )
    assert seen[0].url.host == "env.test"
    assert all(r.headers["Authorization"] == "Bearer k1" for r in seen)


def test_exec_needs_a_command() -> None:
    with pytest.raises(SystemExit) as info:
        main(["exec", "s1"], commands=[])
    assert info.value.code == 2
