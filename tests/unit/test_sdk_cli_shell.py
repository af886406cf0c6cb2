"""``bastion shell`` against the local fake terminal server.

With stdin a pipe (the non-tty path) the CLI runs in-process; with a pty it runs as a
subprocess whose stdin/stdout is the pty's slave end, so the test can type into the
master end, resize the window, and check that the tty is left as it was found.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from tests.unit.test_sdk_terminal import API_KEY, Connection, FakeTerminalServer
from websockets.sync.server import ServerConnection

from bastion import Terminal
from bastion.cli import EXEC_FAILED, main
from bastion.cli import shell as cli

#: A hang (a bug) fails one test quickly instead of stalling the run.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[FakeTerminalServer]:
    srv = FakeTerminalServer()
    try:
        yield srv
    finally:
        srv.close()


class StdinPipe:
    """The write end of a pipe that replaced ``sys.stdin``; closed at most once (a
    second ``os.close`` could hit an unrelated fd that reused the number)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.open = True

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        if self.open:
            self.open = False
            os.close(self.fd)


@pytest.fixture
def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[StdinPipe]:
    """Replace stdin by a pipe."""
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "r")
    monkeypatch.setattr(sys, "stdin", reader)
    pipe = StdinPipe(write_fd)
    try:
        yield pipe
    finally:
        pipe.close()
        reader.close()


def shell(server: FakeTerminalServer, session_id: str = "s1") -> int:
    return main(["--url", server.url, "--api-key", API_KEY, "shell", session_id], commands=[])


# --------------------------------------------------------------------------- stdin a pipe


def test_shell_forwards_stdin_and_exits_with_the_shell_status(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_pipe.write(b"echo hi\nexit 3\n")
    assert shell(server) == 3
    assert capsys.readouterr().out == "echo hi\nexit 3\n"  # the fake shell echoes input
    typed = "".join(str(m["payload"]["data"]) for m in server.last().received)
    assert typed == "echo hi\nexit 3\n"


def test_shell_sends_ctrl_d_at_end_of_input(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_pipe.write("héllo\n".encode())
    stdin_pipe.close()
    assert shell(server) == 0
    received = [m["payload"]["data"] for m in server.last().received]
    assert "".join(received) == "héllo\n\x04"
    assert received[-1] == "\x04"


def test_shell_input_arriving_later(server: FakeTerminalServer, stdin_pipe: StdinPipe) -> None:
    def type_slowly() -> None:
        for chunk in (b"ec", b"ho 1\n", b"exit 4\n"):
            time.sleep(0.05)
            stdin_pipe.write(chunk)

    typist = threading.Thread(target=type_slowly)
    typist.start()
    try:
        assert shell(server) == 4
    finally:
        typist.join()


def test_shell_window_size_without_a_tty(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINES", "33")
    monkeypatch.setenv("COLUMNS", "111")
    stdin_pipe.write(b"exit 0\n")
    assert shell(server) == 0
    assert server.last().query == {"rows": "33", "cols": "111"}


def test_shell_uses_env_url_and_key(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_URL", server.url)
    monkeypatch.setenv("BASTION_API_KEY", API_KEY)
    stdin_pipe.write(b"exit 6\n")
    assert main(["shell", "s1"], commands=[]) == 6


def test_shell_url_and_key_after_the_command(
    server: FakeTerminalServer, stdin_pipe: StdinPipe
) -> None:
    stdin_pipe.write(b"exit 9\n")
    argv = ["shell", "s1", "--url", server.url, "--api-key", API_KEY]
    assert main(argv, commands=[]) == 9


# bastion itself failing exits 125 (as `docker run`), with the usual error line.


def test_shell_session_not_found(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shell(server, "missing") == EXEC_FAILED == 125
    assert capsys.readouterr().err == (
        "bastion: cannot open terminal of session missing: session missing: "
        "session_not_found (close code 4004) (session_not_found)\n"
    )


def test_shell_bad_key(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--url", server.url, "--api-key", "nope", "shell", "s1"], commands=[])
    assert code == 125
    assert capsys.readouterr().err == (
        "bastion: cannot open terminal of session s1: invalid API key (close code 4001) "
        "(unauthorized)\n"
    )


def test_shell_unreachable_server(
    stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert main(["--url", url, "--api-key", API_KEY, "shell", "s1"], commands=[]) == 125
    err = capsys.readouterr().err
    assert err.startswith("bastion: ") and err.endswith("(connection_error)\n")
    assert "Traceback" not in err


def test_shell_connection_lost(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_pipe.write(b"vanish\n")
    assert shell(server, "vanish") == 125
    assert capsys.readouterr().err == (
        "bastion: terminal of session vanish closed: runtime gone (close code 1011) "
        "(connection_error)\n"
    )


def test_shell_session_stopped_while_attached(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    """The remote shell ended without a status: not bastion failing, so 1."""
    stdin_pipe.write(b"stop\n")
    assert shell(server, "stop-later") == 1
    assert capsys.readouterr().err == (
        "bastion: the shell ended without an exit status (session_stopped)\n"
    )


# --------------------------------------------------------------------------- end of input


class LosesFirstCtrlD:
    """A server connection whose first Ctrl-D never reaches the shell, as happens to
    one sent before a real shell's line editor is up."""

    def __init__(self, ws: ServerConnection, lost: list[str]) -> None:
        self._ws = ws
        self._lost = lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    def __iter__(self) -> Iterator[str | bytes]:
        for raw in self._ws:
            message = json.loads(raw)
            if not self._lost and message["payload"].get("data") == "\x04":
                self._lost.append(message["payload"]["data"])
                continue
            yield raw


class SlowShellServer(FakeTerminalServer):
    def __init__(self) -> None:
        super().__init__()
        self.lost: list[str] = []

    def _serve(self, ws: ServerConnection, conn: Connection) -> None:
        super()._serve(cast(ServerConnection, LosesFirstCtrlD(ws, self.lost)), conn)


@pytest.fixture
def slow_server() -> Iterator[SlowShellServer]:
    srv = SlowShellServer()
    try:
        yield srv
    finally:
        srv.close()


def test_shell_with_stdin_at_dev_null_repeats_ctrl_d(
    slow_server: SlowShellServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bastion shell SID </dev/null` ends: Ctrl-D is sent again until the shell goes."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        started = time.monotonic()
        assert shell(slow_server) == 0
        elapsed = time.monotonic() - started
    assert slow_server.lost == ["\x04"]
    assert [m["payload"]["data"] for m in slow_server.last().received] == ["\x04"]
    assert elapsed < cli.EOF_INTERVAL + 3


def test_shell_repeats_ctrl_d_after_piped_input(
    slow_server: SlowShellServer, stdin_pipe: StdinPipe, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_pipe.write(b"echo hi\n")
    stdin_pipe.close()
    assert shell(slow_server) == 0
    received = [m["payload"]["data"] for m in slow_server.last().received]
    assert received == ["echo hi\n", "\x04"] and slow_server.lost == ["\x04"]
    assert capsys.readouterr().out == "echo hi\n\x04"


def test_shell_stops_repeating_ctrl_d_after_a_while(
    server: FakeTerminalServer, stdin_pipe: StdinPipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command of the input that still runs gets a few Ctrl-Ds, then the client only
    waits for the shell to end."""
    monkeypatch.setattr(cli, "EOF_INTERVAL", 0.05)
    monkeypatch.setattr(cli, "EOF_PATIENCE", 0.3)
    sent: list[str] = []

    class Busy:
        """A terminal whose shell ignores input until the client has given up."""

        closed = False

        def send_input(self, text: str) -> None:
            sent.append(text)

    started = time.monotonic()
    cli._end_input(cast(Terminal, Busy()))
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2
    assert set(sent) == {"\x04"} and 3 <= len(sent) <= 8


def test_shell_leaves_no_thread(server: FakeTerminalServer, stdin_pipe: StdinPipe) -> None:
    baseline = threading.active_count()
    stdin_pipe.write(b"exit 0\n")
    assert shell(server) == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("bastion-terminal")]
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == baseline


# --------------------------------------------------------------------------- a real pty


class PtyShell:
    """``bastion shell`` in a subprocess whose terminal is a fresh pty."""

    def __init__(self, server: FakeTerminalServer, session_id: str, rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        self.set_size(rows, cols)
        self.original = termios.tcgetattr(self.slave)
        self.output = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "--url", server.url, "shell", session_id],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env={**os.environ, "BASTION_API_KEY": API_KEY},
        )

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def attrs(self) -> list[object]:
        return termios.tcgetattr(self.slave)

    def is_raw(self) -> bool:
        lflag = self.attrs()[3]
        assert isinstance(lflag, int)
        return not lflag & (termios.ECHO | termios.ICANON)

    def _pump(self, wait: float) -> None:
        ready, _, _ = select.select([self.master], [], [], wait)
        if ready:
            try:
                self.output += os.read(self.master, 4096)
            except OSError:  # EIO once nothing holds the slave end open
                pass

    def read_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; output so far: {self.output!r}")
            self._pump(0.05)

    def finish(self, timeout: float = 10.0) -> int:
        """Wait for the client to exit (reading its output meanwhile); its status."""
        self.read_until(lambda: self.proc.poll() is not None, timeout)
        self._pump(0.05)
        return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_shell(server: FakeTerminalServer) -> Iterator[Callable[..., PtyShell]]:
    shells: list[PtyShell] = []

    def start(session_id: str = "s1", rows: int = 30, cols: int = 100) -> PtyShell:
        shells.append(PtyShell(server, session_id, rows, cols))
        return shells[-1]

    try:
        yield start
    finally:
        for sh in shells:
            sh.close()


def test_pty_raw_mode_resize_and_restore(
    server: FakeTerminalServer, pty_shell: Callable[..., PtyShell]
) -> None:
    sh = pty_shell("s1", 30, 100)
    assert not sh.is_raw()
    sh.read_until(sh.is_raw)
    # The window size went with the connection...
    assert server.last().query == {"rows": "30", "cols": "100"}
    # ...and a resize follows SIGWINCH.
    sh.set_size(40, 120)
    sh.proc.send_signal(signal.SIGWINCH)
    sh.read_until(lambda: b"[resize 40x120]" in sh.output)
    # Raw mode: Enter is a bare \r, typed characters are not echoed locally.
    os.write(sh.master, b"exit 5\r")
    assert sh.finish() == 5
    assert sh.output.count(b"exit 5") == 1  # the remote echo only
    assert sh.attrs() == sh.original


def test_pty_restored_when_the_connection_breaks(
    server: FakeTerminalServer, pty_shell: Callable[..., PtyShell]
) -> None:
    sh = pty_shell("vanish")
    sh.read_until(sh.is_raw)
    os.write(sh.master, b"vanish\r")
    assert sh.finish() == 125
    assert b"runtime gone" in sh.output
    assert sh.attrs() == sh.original


def test_pty_restored_on_keyboard_interrupt(
    server: FakeTerminalServer, pty_shell: Callable[..., PtyShell]
) -> None:
    sh = pty_shell("s1")
    sh.read_until(sh.is_raw)
    # In raw mode Ctrl-C is a byte for the remote shell; a SIGINT from elsewhere
    # still ends the local client.
    os.write(sh.master, b"\x03")
    sh.read_until(lambda: b"\x03" in sh.output)
    assert sh.proc.poll() is None
    sh.proc.send_signal(signal.SIGINT)
    assert sh.finish() == 130
    assert sh.attrs() == sh.original


def test_pty_session_not_found_leaves_tty_alone(
    server: FakeTerminalServer, pty_shell: Callable[..., PtyShell]
) -> None:
    sh = pty_shell("missing")
    assert sh.finish() == 125
    assert b"session_not_found" in sh.output
    assert sh.attrs() == sh.original
