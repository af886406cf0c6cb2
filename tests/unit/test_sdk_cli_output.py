"""What the command line prints: sizes, times, tables, the progress bar, error lines."""

from __future__ import annotations

import errno
import io
from datetime import UTC, datetime, timedelta

import pytest

from bastion import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    FileDownloadError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    ServerError,
    SessionNotFoundError,
    SessionStateError,
    TerminalAuthenticationError,
)
from bastion.cli.errors import ExitCode, UsageError, describe
from bastion.cli.format import (
    command_text,
    format_duration,
    format_size,
    format_time_ago,
    parse_duration,
    table,
    write_json,
)
from bastion.cli.progress import CountingReader, CountingWriter, Progress


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (10 * 1024 * 1024, "10.0 MiB"),
        (150 * 1024 * 1024, "150 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**5, "5.0 PiB"),
        (None, "-"),
        (-1, "-"),
        ("12", "-"),
        (True, "-"),
    ],
)
def test_format_size(size: object, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "0.25s"),
        (1.5, "1.5s"),
        (12.34, "12.3s"),
        (60, "1m"),
        (75, "1m15s"),
        (600, "10m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (7260, "2h01m"),
        (86400 * 2 + 3600 * 3, "2d03h"),
        (None, "-"),
        (-1, "-"),
    ],
)
def test_format_duration(seconds: object, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1H", 3600.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "m10", "-5", "nan", "inf", "1h-5m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_time_ago() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

    def ago(delta: timedelta) -> str:
        return format_time_ago((now - delta).isoformat().replace("+00:00", "Z"), now)

    assert ago(timedelta(seconds=2)) == "just now"
    assert ago(timedelta(seconds=-30)) == "just now"  # a server clock a little ahead
    assert ago(timedelta(seconds=42)) == "42s ago"
    assert ago(timedelta(minutes=5, seconds=59)) == "5m ago"
    assert ago(timedelta(hours=3)) == "3h ago"
    assert ago(timedelta(days=6)) == "6d ago"
    assert ago(timedelta(days=90)) == (now - timedelta(days=90)).astimezone().strftime("%Y-%m-%d")
    assert format_time_ago(None) == "-"
    assert format_time_ago("not a time") == "not a time"


def test_command_text() -> None:
    assert command_text(["sh", "-c", "echo a b"]) == "sh -c 'echo a b'"
    assert command_text(["ls"]) == "ls"
    assert command_text(None) == "-"


def test_table_aligns_and_cuts() -> None:
    lines = table(
        ["NAME", "SIZE", "NOTE"],
        [["a", "1 B", "short"], ["longer-name", "10.0 KiB", "x" * 50]],
        right=["SIZE"],
    )
    assert lines == [
        "NAME             SIZE  NOTE",
        "a                 1 B  short",
        "longer-name  10.0 KiB  " + "x" * 50,
    ]
    cut = table(["NAME", "NOTE"], [["a", "x" * 100]], max_width=40)
    assert [len(line) for line in cut] == [len("NAME  NOTE"), 40]
    assert cut[1].endswith("…")


def test_write_json_keeps_unicode() -> None:
    out = io.StringIO()
    write_json(out, {"text": "héllo ✓"}, indent=None)
    assert out.getvalue() == '{"text": "héllo ✓"}\n'


# --------------------------------------------------------------------------- progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_draws_only_large_transfers_on_a_tty() -> None:
    tty, clock = Tty(), Clock()
    bar = Progress("data.bin", 10_000, tty, enabled=True, min_bytes=1000, clock=clock)
    clock.now = 1.0
    bar.update(2500)
    assert tty.getvalue().startswith("\rdata.bin [")
    assert " 25% 2.4 KiB/9.8 KiB 2.4 KiB/s 0:03" in tty.getvalue()
    clock.now = 1.05
    bar.update(10)  # redrawn at most ten times a second
    assert tty.getvalue().count("\r") == 1
    clock.now = 4.0
    bar.update(7490)
    bar.finish()
    assert "100% 9.8 KiB/9.8 KiB" in tty.getvalue().split("\r")[-1]
    assert tty.getvalue().endswith("\n")

    small = Tty()
    bar = Progress("s", 999, small, enabled=True, min_bytes=1000, clock=clock)
    bar.update(999)
    bar.finish()
    assert small.getvalue() == ""

    unknown = Tty()
    bar = Progress("stdin", None, unknown, enabled=True, min_bytes=1000, clock=clock)
    bar.update(500)
    assert unknown.getvalue() == ""  # not large yet
    bar.update(600)
    assert unknown.getvalue().startswith("\rstdin 1.1 KiB ")


def test_progress_for_stream_needs_a_tty() -> None:
    not_tty = io.StringIO()
    bar = Progress.for_stream("x", 10**9, not_tty, allowed=True)
    bar.update(10**9)
    bar.finish()
    assert not_tty.getvalue() == ""
    tty = Tty()
    bar = Progress.for_stream("x", 10**9, tty, allowed=False)  # --json, --no-progress
    bar.update(10**9)
    bar.finish()
    assert tty.getvalue() == ""


def test_progress_line_fits_the_width() -> None:
    bar = Progress("a-rather-long-file-name.tar.gz", 100, io.StringIO(), enabled=False)
    bar.done = 50
    for width in (20, 40, 60, 120):
        assert len(bar.line(10.0, width)) <= width


def test_counting_wrappers() -> None:
    bar = Progress("x", None, io.StringIO(), enabled=False)
    reader = CountingReader(io.BytesIO(b"abcdef"), bar)
    assert reader.read(4) == b"abcd" and reader.read(4) == b"ef" and reader.read(4) == b""
    out = io.BytesIO()
    CountingWriter(out, bar).write(b"xyz")
    assert bar.done == 9 and out.getvalue() == b"xyz"


# --------------------------------------------------------------------------- errors


def job(status_code: int | None, reason: str | None) -> dict[str, object]:
    return {
        "job_id": "j1",
        "status": "failed",
        "output": {"console_output": "", "errout": "", "status_code": status_code},
        "failure_reason": reason,
    }


@pytest.mark.parametrize(
    ("exc", "status", "line"),
    [
        (
            SessionNotFoundError("no session s1", code="session_not_found", status_code=404),
            ExitCode.NOT_FOUND,
            "bastion: no session s1 (session_not_found)",
        ),
        (
            SessionStateError("s1 is stopped", code="session_state", status_code=409),
            ExitCode.CONFLICT,
            "bastion: s1 is stopped (session_state)",
        ),
        (
            FileDownloadError("no such file: /x", code="file_not_found", status_code=404),
            ExitCode.NOT_FOUND,
            "bastion: no such file: /x (file_not_found)",
        ),
        (
            FileDownloadError("too big", code="file_too_large", status_code=413),
            ExitCode.USAGE,
            "bastion: too big (file_too_large)",
        ),
        (
            AuthenticationError("bad key", code="unauthorized", status_code=401),
            ExitCode.AUTH,
            "bastion: bad key (unauthorized)",
        ),
        (
            TerminalAuthenticationError("bad key (close code 4001)", close_code=4001),
            ExitCode.AUTH,
            "bastion: bad key (close code 4001) (unauthorized)",
        ),
        (
            InvalidRequestError("memory_mb too large", code="limit_exceeded", status_code=422),
            ExitCode.USAGE,
            "bastion: memory_mb too large (limit_exceeded)",
        ),
        (
            ServerError("boom", code="internal_error", status_code=500),
            ExitCode.FAILED,
            "bastion: boom (internal_error)",
        ),
        (
            APIConnectionError("connection to the Bastion server failed: refused"),
            ExitCode.CONNECTION,
            "bastion: cannot reach the Bastion server at http://h: refused (connection_error)",
        ),
        (
            APIConnectionError("the event stream of job j1 ended before the job did"),
            ExitCode.CONNECTION,
            "bastion: the event stream of job j1 ended before the job did (connection_error)",
        ),
        (
            APITimeoutError("request timed out: read"),
            ExitCode.TIMEOUT,
            "bastion: request timed out: read (timeout)",
        ),
        (
            JobTimeoutError("job j1 still running after 5 s"),
            ExitCode.TIMEOUT,
            "bastion: job j1 still running after 5 s (timeout)",
        ),
        (
            JobFailedError(job(3, "nonzero_exit")),  # type: ignore[arg-type]
            ExitCode.FAILED,
            "bastion: job j1 failed with exit status 3 (nonzero_exit) (job_failed)",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "in.csv"),
            ExitCode.NOT_FOUND,
            "bastion: in.csv: No such file or directory (ENOENT)",
        ),
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "src"),
            ExitCode.CONFLICT,
            "bastion: src: Is a directory (EISDIR)",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/root/x"),
            ExitCode.FAILED,
            "bastion: /root/x: Permission denied (EACCES)",
        ),
        (UsageError("give LOCAL"), ExitCode.USAGE, "bastion: give LOCAL (usage)"),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, "bastion: interrupted (SIGINT)"),
    ],
)
def test_describe(exc: BaseException, status: ExitCode, line: str) -> None:
    assert describe(exc, "http://h") == (status, line)


class LocalError(FileDownloadError, OSError):
    """Like the SDK's LocalFileError: a BastionError that is also an OSError."""

    def __init__(self, message: str, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


def test_describe_local_file_errors_raised_by_the_sdk() -> None:
    assert describe(LocalError("cannot write copy.bin: No space left", errno.ENOSPC)) == (
        ExitCode.FAILED,
        "bastion: cannot write copy.bin: No space left (ENOSPC)",
    )
    assert describe(LocalError("cannot read x: missing", errno.ENOENT))[0] == ExitCode.NOT_FOUND


def test_exit_codes_are_distinct_and_stable() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "FAILED": 1,
        "USAGE": 2,
        "NOT_FOUND": 3,
        "CONFLICT": 4,
        "AUTH": 5,
        "CONNECTION": 6,
        "TIMEOUT": 7,
        "INTERRUPTED": 130,
    }
