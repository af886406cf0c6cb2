"""Live terminals, streamed job output and the `bastion shell`/`exec` CLI, for real."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.conftest import ServerProcess

from bastion import (
    Bastion,
    JobFailedError,
    TerminalConnectionError,
    TerminalSendError,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Screen:
    """Collects terminal output from the reader thread; waits for text to appear."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.text = ""
        self._cond = threading.Condition()

    def __call__(self, message: dict[str, Any]) -> None:
        with self._cond:
            self.messages.append(message)
            if message["type"] == "term_output":
                self.text += message["payload"]["data"]
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = re.search(pattern, self.text)
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{pattern!r} never appeared in:\n{self.text[-3000:]}")
                self._cond.wait(left)


def test_product_page_terminal_flow(client: Bastion, sid: str) -> None:
    screen = Screen()
    client.terminal.connect(session_id=sid, on_message=screen)
    client.terminal.send_input("ls -la /\n")
    client.terminal.exec("echo hello")
    screen.wait_for(r"[\r\n]hello\r\n")
    client.terminal.close()
    assert screen.messages[0]["type"] == "init"
    init = screen.messages[0]["payload"]
    assert init["shell"] == "/bin/bash" and init["session_id"] == sid
    assert "usr" in screen.text
    with pytest.raises(TerminalSendError):
        client.terminal.send_input("echo after close\n")


def test_tty_job_control_and_resize(client: Bastion, sid: str) -> None:
    screen = Screen()
    with client.terminal.connect(session_id=sid, on_message=screen, rows=30, cols=100) as term:
        term.exec("tty; stty size; id -un")
        screen.wait_for(r"/dev/pts/\d+\r\n30 100\r\nuser\r\n")
        term.resize(40, 120)
        term.exec("stty size")
        screen.wait_for(r"40 120\r\n")
        term.exec("sleep 300")
        time.sleep(0.5)
        term.send_input("\x03")  # Ctrl-C interrupts the foreground job only
        term.exec("echo survived-$((40+2))")
        screen.wait_for(r"survived-42")
        term.exec("exit 7")
        assert term.wait(timeout=15) == {"exit_code": 7, "reason": "exited"}
    ps = client.jobs.run_and_wait(sid, ["ps", "-eo", "args"])["output"]["console_output"]
    assert "sleep 300" not in ps


def test_interactive_program_reads_input(client: Bastion, sid: str) -> None:
    screen = Screen()
    with client.terminal.connect(session_id=sid, on_message=screen) as term:
        term.exec("python3 -q")
        screen.wait_for(r">>> ")
        term.exec("name = input('who? ')")
        screen.wait_for(r"who\? ")
        term.send_input("Ada\n")
        term.exec("print(f'hello {name}', 6 * 7)")
        screen.wait_for(r"hello Ada 42")
        term.send_input("\x04")  # Ctrl-D ends python, back to the shell
        term.exec("echo back-in-bash")
        screen.wait_for(r"back-in-bash\r\n")


def test_burst_of_output_arrives_whole(client: Bastion, sid: str) -> None:
    # 4 MB through cat on a pty, with multi-byte characters split across reads.
    line = "0123456789abcdefghijklmnopqrstuvwxyz-é€😀\n"
    count = 4_000_000 // len(line.encode())
    client.files.upload(sid, (line * count).encode(), "/home/user/burst.txt")
    screen = Screen()
    with client.terminal.connect(session_id=sid, on_message=screen) as term:
        term.exec("stty -onlcr; cat burst.txt; echo DONE-MARKER")
        screen.wait_for(r"DONE-MARKER\n", timeout=120)
    body = screen.text[screen.text.index("0123456789") :]
    assert body.count(line) == count
    assert "\ufffd" not in screen.text


def test_several_terminals_and_session_stop_closes_them(client: Bastion, sid: str) -> None:
    a, b = Screen(), Screen()
    ta = client.terminal.connect(session_id=sid, on_message=a)
    tb = client.terminal.connect(session_id=sid, on_message=b)
    assert ta.terminal_id != tb.terminal_id
    ta.exec("echo from-a")
    tb.exec("echo from-b")
    a.wait_for("from-a\r\n")
    b.wait_for("from-b\r\n")
    client.sessions.stop(sid)
    for term in (ta, tb):
        try:
            outcome = term.wait(timeout=15)
            assert outcome["reason"] == "session_stopped"
        except TerminalConnectionError:
            pass  # also acceptable: the connection reports the session ended
        assert term.closed
    client.sessions.start(sid)


def test_refusals_have_documented_close_codes(client: Bastion, sid: str) -> None:
    from bastion.wire import TerminalCloseCode

    with pytest.raises(TerminalConnectionError) as missing:
        client.terminal.connect(session_id="ses_nope")
    assert missing.value.code == "session_not_found" or str(
        TerminalCloseCode.SESSION_NOT_FOUND
    ) in str(missing.value)
    other = client.sessions.create()["session_id"]
    try:
        with pytest.raises(TerminalConnectionError) as not_running:
            client.terminal.connect(session_id=other)
        assert not_running.value.code == "session_state" or str(
            TerminalCloseCode.SESSION_NOT_RUNNING
        ) in str(not_running.value)
    finally:
        client.sessions.delete(other)


def test_idle_terminal_survives_keepalive(client: Bastion, sid: str) -> None:
    screen = Screen()
    with client.terminal.connect(session_id=sid, on_message=screen) as term:
        time.sleep(25)  # past the server's 20 s ping interval
        term.exec("echo still-here")
        screen.wait_for("still-here\r\n")


# ------------------------------------------------------------------- streaming


def _collect(events: Iterator[dict[str, Any]], stamp: Callable[[], float]) -> list[Any]:
    return [(stamp(), e) for e in events]


def test_streamed_output_arrives_before_the_job_ends(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["sh", "-c", "echo first; sleep 2; echo second >&2; echo third"])
    start = time.monotonic()
    with client.jobs.stream(sid, job["job_id"]) as events:
        seen = _collect(events, lambda: time.monotonic() - start)
    kinds = [(e["type"], e.get("data")) for _, e in seen if e["type"] in ("stdout", "stderr")]
    assert kinds == [("stdout", "first\n"), ("stderr", "second\n"), ("stdout", "third\n")]
    first_at = next(t for t, e in seen if e.get("data") == "first\n")
    end_at, end = seen[-1]
    assert end["type"] == "end" and end["job"]["status"] == "completed"
    assert first_at < 1.5 <= end_at  # the first line came while the job still slept
    assert seen[-2][1] == {"type": "status", "status": "completed"}  # status after output


def test_following_a_finished_job_replays_it(client: Bastion, sid: str) -> None:
    r = client.jobs.run_and_wait(sid, ["sh", "-c", "printf 'a\\nb\\n'; printf 'c' >&2"])
    with client.jobs.stream(sid, r["job_id"]) as events:
        got = list(events)
    assert [e for e in got if e["type"] in ("stdout", "stderr")] == [
        {"type": "stdout", "data": "a\nb\n"},
        {"type": "stderr", "data": "c"},
    ]
    assert got[-1]["type"] == "end"


def test_run_and_wait_callbacks_get_everything_in_order(client: Bastion, sid: str) -> None:
    out: list[str] = []
    err: list[str] = []
    script = "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done; exit 3"
    with pytest.raises(JobFailedError) as failed:
        client.jobs.run_and_wait(
            sid, ["sh", "-c", script], on_stdout=out.append, on_stderr=err.append
        )
    assert "".join(out) == "".join(f"out{i}\n" for i in range(1, 201))
    assert "".join(err) == "".join(f"err{i}\n" for i in range(1, 201))
    assert failed.value.status_code == 3
    assert failed.value.console_output == "".join(out)


# ------------------------------------------------------------------- CLI


def _cli_env(server: ServerProcess) -> dict[str, str]:
    return {**os.environ, "BASTION_URL": server.url}


def test_cli_exec_streams_and_exits_with_the_status(server: ServerProcess, sid: str) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bastion",
            "exec",
            sid,
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 5",
        ],
        capture_output=True,
        text=True,
        env=_cli_env(server),
        timeout=60,
    )
    assert r.returncode == 5
    assert r.stdout == "to-out\n" and r.stderr.startswith("to-err\n")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by make setup")
def test_cli_shell_through_a_real_pty(server: ServerProcess, sid: str) -> None:
    name = f"bastion-test-{os.getpid()}"
    command = f"{sys.executable} -m bastion shell {sid}; echo SHELL-EXIT=$?; sleep 30"
    subprocess.run(
        [
            "tmux",
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "90",
            "-y",
            "25",
            "-e",
            f"BASTION_URL={server.url}",
            command,
        ],
        check=True,
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True
        ).stdout

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in screen():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on screen:\n{screen()}")
            time.sleep(0.1)

    def keys(*k: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", name, *k], check=True)

    try:
        wait_for("user@sandbox")
        keys("stty size; tty", "Enter")
        wait_for("25 90")  # the local window size reached the sandbox
        wait_for("/dev/pts/")
        keys("sleep 100", "Enter")
        time.sleep(0.5)
        keys("C-c")
        keys("echo ok-$((1+1))", "Enter")
        wait_for("ok-2")
        subprocess.run(["tmux", "resize-window", "-t", name, "-x", "70", "-y", "20"])
        time.sleep(0.5)
        keys("stty size", "Enter")
        wait_for("20 70")
        keys("exit 3", "Enter")
        wait_for("SHELL-EXIT=3")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
