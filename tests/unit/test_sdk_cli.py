"""The ``bastion`` command line: the parser, entry-point discovery, errors and exit codes.

The client commands themselves are tested against an in-memory server in
test_sdk_cli_commands.py; formatting, progress and the docs' tables in
test_sdk_cli_output.py; ``exec`` and ``shell`` in their own files.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint
from typing import Any

import httpx
import pytest

import bastion
from bastion.cli import ENTRY_POINT_GROUP, ExitCode, main

Handler = Callable[[httpx.Request], httpx.Response]


def register_hello(subparsers: Any) -> None:
    """A plugin command, as the server package registers ``serve``."""
    parser = subparsers.add_parser("hello", help="say hello")
    parser.add_argument("--name", default="world")
    parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 7)


def register_needs_extra(subparsers: Any) -> None:
    """A plugin that loads fine but imports a missing dependency when run (as
    ``bastion serve`` imports uvicorn)."""

    def run(args: Any) -> int:
        import bastion_no_such_dependency  # type: ignore[import-not-found]  # noqa: F401

        return 0

    subparsers.add_parser("needy").set_defaults(func=run)


def entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def run(argv: list[str], handler: Handler | None = None, **kwargs: Any) -> int:
    transport = httpx.MockTransport(handler) if handler is not None else None
    kwargs.setdefault("commands", [])
    return main(["--url", "http://bastion.test", *argv], transport=transport, **kwargs)


def error(status: int, code: str, message: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": code, "message": message}})

    return handler


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"], commands=[])
    assert info.value.code == 0
    assert bastion.__version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], commands=[]) == 2
    err = capsys.readouterr().err
    for command in ("sessions", "files", "jobs", "exec", "shell"):
        assert command in err


def test_top_help_documents_settings_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"], commands=[])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "BASTION_URL" in out and "BASTION_API_KEY" in out
    for code in ExitCode:
        assert f"  {int(code):<3} " in out


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "session_not_found", ExitCode.NOT_FOUND),
        (404, "job_not_found", ExitCode.NOT_FOUND),
        (404, "not_found", ExitCode.NOT_FOUND),
        (409, "session_state", ExitCode.CONFLICT),
        (401, "unauthorized", ExitCode.AUTH),
        (422, "invalid_request", ExitCode.USAGE),
        (422, "limit_exceeded", ExitCode.USAGE),
        (500, "internal_error", ExitCode.FAILED),
        (500, "session_start_failed", ExitCode.FAILED),
        (503, "some_future_code", ExitCode.FAILED),
        (403, "some_future_code", ExitCode.AUTH),
    ],
)
def test_api_errors_have_distinct_exit_codes(
    status: int, code: str, expected: ExitCode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["sessions", "status", "s9"], error(status, code, "it went wrong")) == expected
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"bastion: it went wrong ({code})\n"


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert run(["sessions", "list"], handler) == 6  # ExitCode.CONNECTION
    err = capsys.readouterr().err
    assert err == (
        "bastion: cannot reach the Bastion server at http://bastion.test (GET /v1/sessions): "
        "connection refused (connection_error)\n"
    )


def test_request_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    assert run(["sessions", "list"], handler) == 7  # ExitCode.TIMEOUT
    assert capsys.readouterr().err.endswith("(timeout)\n")


def test_error_output_has_no_traceback_for_unexpected_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASTION_DEBUG", raising=False)

    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug")

    assert run(["sessions", "list"], handler) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("bastion: RuntimeError: a bug (internal_error)")
    assert "BASTION_DEBUG=1" in err

    monkeypatch.setenv("BASTION_DEBUG", "1")
    assert run(["sessions", "list"], handler) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback")
    assert err.endswith("\nbastion: RuntimeError: a bug (internal_error)\n")


def test_known_errors_have_no_debug_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["sessions", "list"], error(500, "internal_error", "server bug")) == 1
    assert capsys.readouterr().err == "bastion: server bug (internal_error)\n"


def test_interrupted(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    assert run(["sessions", "list"], handler) == ExitCode.INTERRUPTED == 130
    assert capsys.readouterr() == ("", "bastion: interrupted (SIGINT)\n")


class ClosedPipe(io.StringIO):
    """stdout of `bastion ... | head` once head has exited."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("argv", [["sessions", "list"], ["sessions", "list", "--json"]])
def test_broken_pipe_exits_quietly(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"sessions": [{"session_id": "s1", "status": "running"}]})

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert run(argv, handler) == 141  # 128 + SIGPIPE, as a shell reports it
    assert capsys.readouterr().err == ""


def test_plugin_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASTION_DEBUG", raising=False)
    commands = [entry_point("broken", f"{__name__}:register_broken")]
    assert run(["broken"], commands=commands) == 1
    err = capsys.readouterr().err
    assert err.startswith("bastion: ValueError: no good (internal_error)\n")
    assert "Traceback" not in err


def register_broken(subparsers: Any) -> None:
    def run(args: Any) -> int:
        raise ValueError("no good")

    subparsers.add_parser("broken").set_defaults(func=run)


def test_url_and_key_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_URL", "http://wrong.test")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"sessions": []})

    code = main(
        ["sessions", "list", "--url", "http://right.test", "--api-key", "k1", "--json"],
        transport=httpx.MockTransport(handler),
        commands=[],
    )
    assert code == 0
    assert seen[0].url.host == "right.test"
    assert seen[0].headers["authorization"] == "Bearer k1"


def test_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_URL", "http://env.test:9000")
    monkeypatch.setenv("BASTION_API_KEY", "env-key")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"sessions": []})

    assert main(["sessions", "list"], transport=httpx.MockTransport(handler), commands=[]) == 0
    assert str(seen[0].url) == "http://env.test:9000/v1/sessions?limit=1000"
    assert seen[0].headers["authorization"] == "Bearer env-key"


def test_json_flag_before_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"sessions": []})

    assert run(["--json", "sessions", "list"], handler) == 0
    assert json.loads(capsys.readouterr().out) == {"sessions": []}


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


def test_plugin_missing_a_dependency_when_run(capsys: pytest.CaptureFixture[str]) -> None:
    """`bastion serve` loads without the extra and imports uvicorn only when it runs."""
    commands = [entry_point("needy", f"{__name__}:register_needs_extra")]
    assert run(["needy"], commands=commands) == 2
    err = capsys.readouterr().err
    assert err.startswith("bastion: needy: this command needs the server extra")
    assert "bastion_no_such_dependency" in err and "pip install 'bastion-py-sdk[server]'" in err
    assert "Traceback" not in err


def test_broken_plugin_does_not_break_other_commands(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [entry_point("image", f"{__name__}:no_such_function")]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"sessions": []})

    assert run(["sessions", "list"], handler, commands=commands) == 0
    assert run(["image"], commands=commands) == 2
    assert "cannot load" in capsys.readouterr().err


def test_plugins_cannot_replace_builtin_commands() -> None:
    commands = [entry_point("files", f"{__name__}:register_hello")]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"path": "/", "files": []})

    assert run(["files", "list", "s1", "--json"], handler, commands=commands) == 0


def test_unknown_arguments_are_rejected() -> None:
    with pytest.raises(SystemExit) as info:
        run(["sessions", "list", "--bogus"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "run", "s1", "--env", "novalue", "--", "true"],
        ["sessions", "create", "--metadata", "=x"],
        ["sessions", "create", "--idle-timeout", "soon"],
        ["sessions", "create", "--on-timeout", "explode"],
        ["files", "upload", "local.txt", "no-colon"],
        ["files", "download", "s1:", "x"],
        ["sessions"],
        ["jobs", "run", "s1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_key_value_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["jobs", "run", "s1", "--env", "novalue", "--", "true"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
