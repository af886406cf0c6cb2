"""The ``bastion`` command line (client commands and entry-point discovery)."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import EntryPoint
from typing import Any

import httpx
import pytest

import bastion
from bastion.cli import ENTRY_POINT_GROUP, main

Handler = Callable[[httpx.Request], httpx.Response]


def register_hello(subparsers: Any) -> None:
    """A plugin command, as the server package registers ``serve``."""
    parser = subparsers.add_parser("hello", help="say hello")
    parser.add_argument("--name", default="world")
    parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 7)


def entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def run(argv: list[str], handler: Handler | None = None, **kwargs: Any) -> int:
    transport = httpx.MockTransport(handler) if handler is not None else None
    kwargs.setdefault("commands", [])
    return main(["--url", "http://bastion.test", *argv], transport=transport, **kwargs)


def job(status: str, exit_status: int | None) -> dict[str, Any]:
    return {
        "job_id": "j1",
        "session_id": "s1",
        "status": status,
        "command": ["x"],
        "created_at": "t",
        "started_at": "t",
        "finished_at": "t",
        "failure_reason": None,
        "output": {"console_output": "hi\n", "errout": "", "status_code": exit_status},
    }


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"], commands=[])
    assert info.value.code == 0
    assert bastion.__version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], commands=[]) == 2
    assert "sessions" in capsys.readouterr().err


def test_sessions_create_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        status = "running" if request.url.path.endswith("/start") else "created"
        return httpx.Response(200, json={"session_id": "s1", "status": status})

    code = run(
        ["sessions", "create", "--memory-mb", "128", "--metadata", "team=a", "--start"], handler
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"session_id": "s1", "status": "running"}
    assert json.loads(requests[0].content) == {
        "limits": {"memory_mb": 128},
        "metadata": {"team": "a"},
    }
    assert requests[1].url.path == "/v1/sessions/s1/start"


@pytest.mark.parametrize(
    ("action", "method", "path"),
    [
        ("status", "GET", "/v1/sessions/s1"),
        ("start", "POST", "/v1/sessions/s1/start"),
        ("stop", "POST", "/v1/sessions/s1/stop"),
        ("delete", "DELETE", "/v1/sessions/s1"),
    ],
)
def test_session_actions(action: str, method: str, path: str) -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(200, json={"session_id": "s1"})

    assert run(["sessions", action, "s1"], handler) == 0
    assert seen == [(method, path)]


def test_jobs_run_waits_and_prints_result(capsys: pytest.CaptureFixture[str]) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.method == "POST":
            return httpx.Response(202, json=job("queued", None) | {"output": None})
        return httpx.Response(200, json=job("completed", 0))

    code = run(["jobs", "run", "s1", "--env", "A=1", "--", "python3", "-c", "print('hi')"], handler)
    assert code == 0
    assert json.loads(requests[0].content) == {
        "command": ["python3", "-c", "print('hi')"],
        "env": {"A": "1"},
    }
    assert requests[1].url.path == "/v1/sessions/s1/jobs/j1/wait"
    assert json.loads(capsys.readouterr().out)["output"]["console_output"] == "hi\n"


def test_jobs_run_failed_job_exits_with_its_status(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=job("failed", 3))

    assert run(["jobs", "run", "s1", "--shell", "--", "exit", "3"], handler) == 3
    assert json.loads(capsys.readouterr().out)["status"] == "failed"


def test_api_error_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            404, json={"error": {"code": "session_not_found", "message": "no session s9"}}
        )

    assert run(["sessions", "status", "s9"], handler) == 1
    assert "no session s9 [session_not_found]" in capsys.readouterr().err


def test_unreachable_server_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert run(["sessions", "list"], handler) == 1
    err = capsys.readouterr().err
    assert "connection refused" in err and "http://bastion.test" in err


def test_plugin_command_from_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [entry_point("hello", f"{__name__}:register_hello")]
    assert run(["hello", "--name", "bastion"], commands=commands) == 7
    assert capsys.readouterr().out == "hello bastion\n"


def test_missing_server_extra_is_silent_until_asked(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [entry_point("serve", "bastion_no_such_package.cli:register_serve")]
    # Other commands work and say nothing about it.
    with pytest.raises(SystemExit):
        run(["--help"], commands=commands)
    captured = capsys.readouterr()
    assert captured.err == ""
    # Asking for it (with its own options) explains what to install.
    assert run(["serve", "--port", "8080"], commands=commands) == 2
    assert "install bastion-py-sdk[server]" in capsys.readouterr().err


def test_broken_plugin_does_not_break_other_commands(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [entry_point("image", f"{__name__}:no_such_function")]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"sessions": []})

    assert run(["sessions", "list"], handler, commands=commands) == 0
    assert run(["image"], commands=commands) == 2
    assert "cannot load" in capsys.readouterr().err


def test_unknown_arguments_are_rejected() -> None:
    with pytest.raises(SystemExit) as info:
        run(["sessions", "list", "--bogus"])
    assert info.value.code == 2


def test_key_value_validation(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(["jobs", "run", "s1", "--env", "novalue", "--", "true"])
    assert info.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
