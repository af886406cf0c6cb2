"""The `bastion` command line against a real server, and every CLI example in the docs.

Each ```sh block of README.md and docs/*.md that runs `bastion` is executed as it is
written, by bash with `set -euo pipefail`, in a fresh directory, with `BASTION_URL`
pointing at the test server, `$SID` a running session and `$JOB` a finished job in it
(it printed "hello").  A block fails the test if any command in it fails.  Its stdin
is "exit\n": an interactive example (`bastion shell $SID`) ends as if a user typed exit.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import KEY_A, ServerProcess, free_port

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

_SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)
#: `bastion` run as a command: at a line's start, in $(...), or after a pipe.
_RUNS_BASTION = re.compile(r"(^|\$\(|\|)\s*bastion\s", re.M)
#: One line on stderr for every error: `bastion: <message> (<code>)`.
ERROR_LINE = re.compile(r"^bastion: .+ \([A-Za-z_]+\)$")


def cli_examples() -> list[tuple[str, str]]:
    examples = []
    for path in DOCS:
        for index, block in enumerate(_SH_BLOCK.findall(path.read_text())):
            if _RUNS_BASTION.search(block) and "bastion serve" not in block:
                examples.append((f"{path.name}-{index}", block))
    return examples


EXAMPLES = cli_examples()


def client_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_URL"] = url
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def session(server: ServerProcess) -> Iterator[tuple[str, str]]:
    """A running session and a finished job in it: ``(session_id, job_id)``."""
    with Bastion(server.url) as client:
        sid = client.sessions.create()["session_id"]
        try:
            client.sessions.start(sid)
            job = client.jobs.run_and_wait(sid, ["echo", "hello"])
            yield sid, job["job_id"]
        finally:
            try:
                client.sessions.delete(sid)
            except Exception:
                pass


def bastion(
    server: ServerProcess, *args: str, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "bastion"), *args],
        env=client_env(server.url),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The last line on stderr, which must be the one error line."""
    lines = result.stderr.decode().splitlines()
    assert lines, "nothing on stderr"
    assert "Traceback" not in result.stderr.decode()
    assert ERROR_LINE.match(lines[-1]), lines[-1]
    return lines[-1]


# --------------------------------------------------------------------------- examples


def test_docs_have_cli_examples() -> None:
    by_file: dict[str, int] = {}
    for name, _ in EXAMPLES:
        file = name.rsplit("-", 1)[0]
        by_file[file] = by_file.get(file, 0) + 1
    assert by_file.get("README.md", 0) >= 2
    assert by_file.get("CLI.md", 0) >= 7


@pytest.mark.parametrize("block", [b for _, b in EXAMPLES], ids=[n for n, _ in EXAMPLES])
def test_cli_example_runs(
    block: str, server: ServerProcess, session: tuple[str, str], tmp_path: Path
) -> None:
    sid, job = session
    script = tmp_path / "example.sh"
    script.write_text(block)
    work = tmp_path / "work"
    work.mkdir()
    env = client_env(server.url) | {"SID": sid, "JOB": job}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", str(script)],
        cwd=work,
        env=env,
        input="exit\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, (
        f"example failed ({result.returncode}):\n{block}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- end to end


def test_session_lifecycle_and_tables(server: ServerProcess) -> None:
    created = bastion(
        server, "sessions", "create", "--memory-mb", "128", "--metadata", "t=cli", "-q"
    )
    assert created.returncode == 0, created.stderr
    sid = created.stdout.decode().strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", sid)
    try:
        listed = bastion(server, "sessions", "list")
        assert listed.returncode == 0
        header, *rows = listed.stdout.decode().splitlines()
        assert header.split()[:3] == ["SESSION", "STATUS", "CREATED"]
        row = next(r for r in rows if r.startswith(sid))
        assert row.split()[1] == "created" and "t=cli" in row
        started = bastion(server, "sessions", "start", sid)
        assert started.stdout.decode() == f"{sid}  running\n"
        status = bastion(server, "sessions", "status", sid).stdout.decode()
        assert "limits    memory 128 MiB" in status and "usage     " in status
    finally:
        deleted = bastion(server, "sessions", "delete", sid, "--json")
    assert deleted.returncode == 0
    assert b'"status": "deleted"' in deleted.stdout


def test_exit_codes(server: ServerProcess, session: tuple[str, str]) -> None:
    sid, _ = session
    cases: list[tuple[list[str], int, str]] = [
        (["sessions", "status", "no-such-session"], 3, "(session_not_found)"),
        (["jobs", "get", sid, "no-such-job"], 3, "(job_not_found)"),
        (["files", "download", f"{sid}:/no/such/file", "-"], 3, "(file_not_found)"),
        (["files", "download", f"{sid}:/etc", "-"], 4, "(is_a_directory)"),
        (["files", "list", f"{sid}:relative/path"], 2, "(invalid_path)"),
        (["jobs", "run", sid, "--", "sh", "-c", "exit 5"], 1, "(nonzero_exit)"),
        (["jobs", "run", sid, "--", "no-such-program"], 1, "(not_found)"),
        (["jobs", "run", sid, "--wait-timeout", "0.5", "--", "sleep", "5"], 7, "(timeout)"),
        (["sessions", "create", "--memory-mb", "-1"], 2, ""),
    ]
    for argv, code, suffix in cases:
        result = bastion(server, *argv)
        assert result.returncode == code, (argv, result.stderr)
        assert error_line(result).endswith(suffix), (argv, result.stderr)

    stopped = bastion(server, "sessions", "stop", sid)
    assert stopped.returncode == 0
    result = bastion(server, "jobs", "run", sid, "--", "true")
    assert result.returncode == 4 and error_line(result).endswith("(session_state)")


def test_connection_error_exit_code() -> None:
    dead = ServerProcess(Path("/nonexistent"), port=free_port())  # never started
    result = bastion(dead, "sessions", "list")
    assert result.returncode == 6
    line = error_line(result)
    assert line.startswith(f"bastion: cannot reach the Bastion server at {dead.url}")
    assert line.endswith("(connection_error)")


def test_auth_exit_code(auth_server: ServerProcess) -> None:
    no_key = bastion(auth_server, "sessions", "list")
    assert no_key.returncode == 5 and error_line(no_key).endswith("(unauthorized)")
    wrong = bastion(auth_server, "--api-key", "wrong-key", "sessions", "list")
    assert wrong.returncode == 5
    right = bastion(auth_server, "sessions", "list", "--api-key", KEY_A, "--json")
    assert right.returncode == 0, right.stderr


def test_large_file_through_stdin_and_stdout(
    server: ServerProcess, session: tuple[str, str], tmp_path: Path
) -> None:
    sid, _ = session
    data = os.urandom(24 * 1024 * 1024 + 123)
    up = bastion(server, "files", "upload", "-", f"{sid}:/tmp/big.bin", "--json", input=data)
    assert up.returncode == 0, up.stderr
    assert up.stdout.decode().count(str(len(data))) == 1
    assert up.stderr == b""  # no progress bar: stderr is not a terminal
    down = bastion(server, "files", "download", f"{sid}:/tmp/big.bin", "-")
    assert down.returncode == 0 and down.stdout == data
    local = tmp_path / "copy.bin"
    saved = bastion(server, "files", "download", f"{sid}:/tmp/big.bin", str(local))
    assert saved.returncode == 0 and local.read_bytes() == data
    assert saved.stdout.decode() == f"downloaded {sid}:/tmp/big.bin -> {local} (24.0 MiB)\n"


def test_progress_bar_on_a_terminal(
    server: ServerProcess, session: tuple[str, str], tmp_path: Path
) -> None:
    sid, _ = session
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(BIN / "bastion"), "files", "upload", str(big), f"{sid}:/tmp/"],
            env=client_env(server.url),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        drawn = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert stdout.decode() == f"uploaded {big} -> {sid}:/tmp/big.bin (8.0 MiB)\n"
    assert b"big.bin [" in drawn and b"100%" in drawn and b"8.0 MiB/8.0 MiB" in drawn


def test_logs_follow_is_live(server: ServerProcess, session: tuple[str, str]) -> None:
    sid, _ = session
    job = bastion(
        server, "jobs", "run", "--no-wait", "-q", sid, "--",
        "sh", "-c", "echo first; sleep 2; echo second >&2; echo third",
    )  # fmt: skip
    jid = job.stdout.decode().strip()
    proc = subprocess.Popen(
        [str(BIN / "bastion"), "jobs", "logs", "-f", sid, jid],
        env=client_env(server.url),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    # The first line arrives while the job still runs.
    with Bastion(server.url) as client:
        assert client.jobs.get(sid, jid)["status"] == "running"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert first + out == b"first\nthird\n" and err == b"second\n"


def test_logs_of_a_running_job_without_follow(
    server: ServerProcess, session: tuple[str, str]
) -> None:
    sid, _ = session
    with Bastion(server.url) as client:
        jid = client.jobs.run(sid, ["sh", "-c", "echo started; sleep 60"])["job_id"]
        deadline = time.monotonic() + 30
        while True:  # until the job has written its line
            result = bastion(server, "jobs", "logs", sid, jid)
            if result.stdout or time.monotonic() > deadline:
                break
        assert result.returncode == 0 and result.stdout == b"started\n"
        assert client.jobs.get(sid, jid)["status"] == "running"  # returned without the end


def test_help_of_every_command() -> None:
    for argv in (
        [],
        ["sessions"],
        ["sessions", "create"],
        ["files", "upload"],
        ["files", "download"],
        ["jobs", "run"],
        ["jobs", "logs"],
        ["exec"],
        ["shell"],
    ):
        result = subprocess.run(
            [str(BIN / "bastion"), *argv, "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "examples:" in result.stdout
