"""The in-sandbox agent's wire protocol, spoken to the agent itself (no server, no sandbox).

The agent (``agent_c/bastion-agent.c``, built from source for the test run) runs here
as an ordinary child process of the test, as root, with the sandbox user set to nobody
(65534) so that the drop of privileges is real; the frames are those of
``agent_protocol.py``, the codec the server uses.  Outside a container the agent's PID-1
reaper is only a parent process; every job runs with a marker in its environment, and
teardown kills whatever carries it (and every descendant of the agent), so nothing a
test starts outlives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bastion_server.runtime.agent_build import AgentBuildError, build_agent
from bastion_server.runtime.agent_protocol import (
    FRAME_JSON,
    FRAME_STDERR,
    FRAME_STDIN,
    FRAME_STDOUT,
    FrameReader,
    encode_frame,
    encode_json,
)

NOBODY = 65534
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
NOT_FOUND = "No such file or directory"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the agent switches jobs to another user: run these tests as root"
)


# ----------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(name)] = (int(fields[1]), fields[0].decode())
    return table


def descendants(root: int) -> set[int]:
    table = _proc_table()
    found: set[int] = set()
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def marked(marker: str) -> set[int]:
    """Live processes (anywhere) whose environment holds ``marker``: what jobs left."""
    needle = f"BASTION_TEST_MARKER={marker}".encode()
    found = set()
    for pid, (_, state) in _proc_table().items():
        if state in ("Z", "X"):
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            continue
    return found


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# ----------------------------------------------------------------------------- client


class Conn:
    """One connection to the agent, collecting what it sends."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._reader = FrameReader()
        self._pending: list[tuple[bytes, bytes]] = []
        self.events: list[dict[str, Any]] = []
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.stdout_len = 0
        self.keep_output = True
        self.eof = False
        self.usage: dict[str, int] | None = None
        self.kill_signal: int | None = None

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(encode_json(obj))

    def send_input(self, data: bytes) -> None:
        self.sock.sendall(encode_frame(FRAME_STDIN, data))

    def read_frame(self, timeout: float) -> tuple[bytes, bytes] | None:
        while not self._pending:
            self.sock.settimeout(timeout)
            data = self.sock.recv(1 << 20)
            if not data:
                self.eof = True
                return None
            self._pending.extend(self._reader.feed(data))
        kind, payload = self._pending.pop(0)
        if kind == FRAME_JSON:
            event = json.loads(payload)
            if event.get("event") == "exit":  # kept apart: tests/unit/test_agent_jobs.py
                self.usage = event.pop("usage", None)
                self.kill_signal = event.pop("kill_signal", None)
            self.events.append(event)
        elif kind == FRAME_STDOUT:
            self.stdout_len += len(payload)
            if self.keep_output:
                self.stdout += payload
        elif kind == FRAME_STDERR:
            self.stderr += payload
        return kind, payload

    def read_until(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; got events {self.events}")
            if self.read_frame(left) is None and not done():
                raise AssertionError(f"connection closed early; got events {self.events}")

    def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        self.read_until(lambda: any(e.get("event") == name for e in self.events), timeout)
        return next(e for e in self.events if e.get("event") == name)

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Read up to the exit event (the last thing sent) and the close after it."""
        exit_event = self.event("exit", timeout)
        assert self.read_frame(timeout) is None, "the agent sent more after the exit event"
        return exit_event

    @property
    def started(self) -> bool:
        return any(e.get("event") == "started" for e in self.events)


# Ignores SIGINT, SIGQUIT and (through the system call, which libc's sigaction refuses)
# signals 32 and 33, then becomes the program named by its argument.
_IGNORING_LAUNCHER = """
import ctypes, os, platform, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGQUIT, signal.SIG_IGN)
number = {"x86_64": 13, "aarch64": 134}.get(platform.machine())
if number is not None:
    ignore = (ctypes.c_ulong * 4)(1, 0, 0, 0)
    for sig in (32, 33):
        ctypes.CDLL(None, use_errno=True).syscall(number, sig, ignore, None, 8)
os.execv(sys.argv[1], sys.argv[1:])
"""


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    socket_path: str
    marker: str
    log_path: Path

    def job_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"PATH": JOB_PATH, "BASTION_TEST_MARKER": self.marker, **(extra or {})}

    def connect(self) -> Conn:
        return Conn(self.socket_path)

    def exec(self, argv: list[str], env: dict[str, str] | None = None, **fields: Any) -> Conn:
        conn = self.connect()
        request: dict[str, Any] = {
            "op": "exec",
            "argv": argv,
            "env": self.job_env(env),
            "cwd": None,
            "timeout": None,
            "pty": False,
            "rows": 24,
            "cols": 80,
        }
        conn.send({**request, **fields})
        return conn

    def run(self, argv: list[str], env: dict[str, str] | None = None, **fields: Any) -> Conn:
        with self.exec(argv, env, **fields) as conn:
            conn.finish()
        return conn

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        with self.connect() as conn:
            conn.send({"op": "ping"})
            return conn.event("pong", timeout)

    def server_pid(self) -> int:
        """The agent server: the reaper's child running the agent itself."""
        cmdline = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes()
        for pid in sorted(descendants(self.proc.pid)):
            try:
                same = Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline
            except OSError:
                continue
            if same and _proc_table().get(pid, (0, ""))[0] == self.proc.pid:
                return pid
        raise AssertionError("no agent server process")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode}):\n{self.log()}")
            if os.path.exists(self.socket_path):
                try:
                    self.ping(timeout=1.0)
                    return
                except (OSError, AssertionError):
                    pass
            time.sleep(0.01)
        raise AssertionError(f"the agent did not answer:\n{self.log()}")

    def shutdown(self) -> None:
        for _ in range(3):
            for pid in descendants(self.proc.pid) | marked(self.marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        for pid in marked(self.marker):  # jobs whose orphans went to the host's init
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def c_agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C agent, built from source (or $BASTION_TEST_AGENT_BINARY: another build of it,
    say one with sanitizers)."""
    prebuilt = os.environ.get("BASTION_TEST_AGENT_BINARY")
    if prebuilt:
        return Path(prebuilt)
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed, so the C agent cannot be built (apt-get install gcc)")
    try:
        return build_agent(tmp_path_factory.mktemp("agent-bin"))
    except AgentBuildError as exc:
        pytest.skip(f"the C agent cannot be built: {exc}")


@pytest.fixture
def agent(c_agent_binary: Path) -> Iterator[Agent]:
    # Started with signals ignored, as a shell hands SIGINT and SIGQUIT to a server it
    # starts in the background (and libc's own real-time ones may come so too): the
    # agent must give its jobs every signal back.
    command = [sys.executable, "-c", _IGNORING_LAUNCHER, str(c_agent_binary)]
    # Short: a socket path has at most 107 bytes.
    sock_dir = Path(tempfile.mkdtemp(prefix="bastion-agent-"))
    log_path = sock_dir / "agent.log"
    env = {
        "PATH": os.environ.get("PATH", JOB_PATH),
        "BASTION_UID": str(NOBODY),
        "BASTION_GID": str(NOBODY),
        "BASTION_HOME": "/tmp",
        "BASTION_SOCKET_DIR": str(sock_dir),
        "BASTION_SPOOL_DIR": str(sock_dir / "spool"),
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    agent = Agent(proc, str(sock_dir / "agent.sock"), uuid.uuid4().hex, log_path)
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.shutdown()
        shutil.rmtree(sock_dir, ignore_errors=True)


def exit_event(code: int | None, **fields: Any) -> dict[str, Any]:
    return {
        "event": "exit",
        "exit_code": code,
        "signal": None,
        "timed_out": False,
        "error": None,
        **fields,
    }


# ----------------------------------------------------------------------------- basics


def test_ping(agent: Agent) -> None:
    with agent.connect() as conn:
        conn.send({"op": "ping"})
        pong = conn.event("pong")
        assert conn.read_frame(5) is None
    assert pong == {"event": "pong", "pid": agent.server_pid()}


def test_exec_echo(agent: Agent) -> None:
    conn = agent.run(["echo", "hello"])
    assert conn.events[0]["event"] == "started"
    assert isinstance(conn.events[0]["pid"], int)
    assert bytes(conn.stdout) == b"hello\n"
    assert conn.events[1:] == [exit_event(0)]


def test_stdout_stderr_and_exit_code(agent: Agent) -> None:
    conn = agent.run(["sh", "-c", "echo out; echo err >&2; echo more; exit 3"])
    assert bytes(conn.stdout) == b"out\nmore\n"
    assert bytes(conn.stderr) == b"err\n"
    assert conn.events[-1] == exit_event(3)


def test_job_runs_as_the_sandbox_user_in_home(agent: Agent) -> None:
    conn = agent.run(["sh", "-c", "id -u; id -g; id -G; pwd"])
    assert bytes(conn.stdout) == b"65534\n65534\n65534\n/tmp\n"


def test_env_is_exactly_the_requests(agent: Agent) -> None:
    conn = agent.run(["env"], env={"FOO": "bar é", "EMPTY": ""})
    lines = bytes(conn.stdout).decode().splitlines()
    assert dict(line.split("=", 1) for line in lines) == agent.job_env(
        {"FOO": "bar é", "EMPTY": ""}
    )


def test_cwd(agent: Agent) -> None:
    assert bytes(agent.run(["pwd"], cwd="/usr").stdout) == b"/usr\n"
    assert bytes(agent.run(["pwd"], cwd="").stdout) == b"/tmp\n"


def test_signal_death(agent: Agent) -> None:
    conn = agent.run(["sh", "-c", "echo x; kill -TERM $$"])
    assert conn.events[-1] == exit_event(143, signal=15)


def test_stdin_is_dev_null_without_a_pty(agent: Agent) -> None:
    with agent.exec(["cat"]) as conn:
        conn.send_input(b"ignored\n")
        assert conn.finish() == exit_event(0)
    assert bytes(conn.stdout) == b""


def test_unknown_op(agent: Agent) -> None:
    with agent.connect() as conn:
        conn.send({"op": "nope"})
        conn.read_until(lambda: conn.eof or bool(conn.events), 10)
        assert conn.read_frame(10) is None
    assert conn.events == [{"event": "error", "message": "unknown op 'nope'"}]


# ----------------------------------------------------------------------------- exec errors


@pytest.mark.parametrize("argv0", ["no-such-command-4711", "/no/such/file", 'odd "name"\n\x01é'])
def test_not_found(agent: Agent, argv0: str) -> None:
    conn = agent.run([argv0, "arg"])
    assert conn.events == [exit_event(127, error="not_found", message=f"{argv0}: {NOT_FOUND}")]
    assert not conn.stdout and not conn.stderr


def test_exec_failed(agent: Agent) -> None:
    conn = agent.run(["/etc/passwd"])
    assert conn.events == [
        exit_event(126, error="exec_failed", message="/etc/passwd: Permission denied")
    ]


def test_missing_cwd_is_invalid_cwd(agent: Agent) -> None:
    conn = agent.run(["true"], cwd="/no/such/dir")
    assert conn.events == [
        exit_event(126, error="invalid_cwd", message=f"working directory: {NOT_FOUND}")
    ]


def test_path_search_like_execvp(agent: Agent) -> None:
    """A directory whose file cannot be run wins over later "not found"s (EACCES is
    remembered, as execvp does); a runnable file in a later directory is found."""
    tool_dir = Path(tempfile.mkdtemp(prefix="bastion-path-"))
    try:
        tool_dir.chmod(0o755)
        tool = tool_dir / "bastion-tool"
        tool.write_text("#!/bin/sh\necho tool ran\n")
        tool.chmod(0o644)
        path = f"/no/such/dir:{tool_dir}:/also/missing"
        conn = agent.run(["bastion-tool"], env={"PATH": path})
        assert conn.events == [
            exit_event(126, error="exec_failed", message="bastion-tool: Permission denied")
        ]
        tool.chmod(0o755)
        assert bytes(agent.run(["bastion-tool"], env={"PATH": path}).stdout) == b"tool ran\n"
    finally:
        shutil.rmtree(tool_dir)


# ----------------------------------------------------------------------------- JSON


def test_json_strings_round_trip(agent: Agent) -> None:
    text = 'q"b\\s/é€😀\t\n\x01\x7f'
    conn = agent.run(["printf", "%s", text])
    assert bytes(conn.stdout) == text.encode()


def test_json_escapes_by_hand(agent: Agent) -> None:
    marker = agent.marker.encode()
    payload = (
        b'{"op": "exec", "argv": ["printf", "%s", '
        b'"\\/\\b\\f\\n\\r\\t\\"\\\\\\u00e9\\u20AC\\ud83d\\ude00 raw:\xc3\xa9"], '
        b'"env": {"PATH": "/usr/bin:/bin", "BASTION_TEST_MARKER": "' + marker + b'"}, '
        b'"cwd": null, "timeout": null, "pty": false, "rows": 24, "cols": 80, "x": [1, -2.5e3]}'
    )
    with agent.connect() as conn:
        conn.sock.sendall(encode_frame(FRAME_JSON, payload))
        assert conn.finish() == exit_event(0)
    assert bytes(conn.stdout) == '/\b\f\n\r\t"\\é€😀 raw:é'.encode()


@pytest.mark.parametrize(
    "payload",
    [b'{"op": "exec", "argv": [', b"not json", b'{"op": "exec", "argv": ["a\\x"]}', b"[1, 2]"],
)
def test_malformed_request_leaves_the_agent_up(agent: Agent, payload: bytes) -> None:
    with agent.connect() as conn:
        conn.sock.sendall(encode_frame(FRAME_JSON, payload))
        conn.read_until(lambda: conn.eof, 10)
    assert len(conn.events) == 1
    assert conn.events[0]["error"] == "start_failed"
    assert conn.events[0]["message"].startswith("bad request: ")
    agent.ping()
    assert bytes(agent.run(["echo", "still here"]).stdout) == b"still here\n"


def test_first_frame_not_json(agent: Agent) -> None:
    with agent.connect() as conn:
        conn.sock.sendall(encode_frame(FRAME_STDIN, b"hello"))
        conn.read_until(lambda: conn.eof, 10)
    assert conn.events == [{"event": "error", "message": "unknown op None"}]


# ----------------------------------------------------------------------------- output


def test_large_output_intact(agent: Agent) -> None:
    expected_out = subprocess.run(["seq", "1", "700000"], capture_output=True, check=True).stdout
    expected_err = subprocess.run(["seq", "1", "200000"], capture_output=True, check=True).stdout
    assert len(expected_out) > 4_500_000
    conn = agent.run(["sh", "-c", "seq 1 700000 & seq 1 200000 >&2; wait"])
    assert conn.events[-1] == exit_event(0)
    assert bytes(conn.stdout) == expected_out
    assert bytes(conn.stderr) == expected_err


def test_background_process_does_not_hold_the_job(agent: Agent) -> None:
    """It keeps the output pipe open, but the job ends with its main process."""
    start = time.monotonic()
    conn = agent.run(["sh", "-c", "sleep 30 & echo hi"])
    assert time.monotonic() - start < 5
    assert bytes(conn.stdout) == b"hi\n"
    assert conn.events[-1] == exit_event(0)


def test_backpressure_bounds_buffering(agent: Agent) -> None:
    """A client that does not read stalls the job, not the agent's memory."""
    server = agent.server_pid()
    before = vm_rss_kib(server)
    total = 64_000_000
    with agent.exec(["head", "-c", str(total), "/dev/zero"]) as conn:
        conn.keep_output = False
        conn.event("started")
        time.sleep(1.0)
        grown = vm_rss_kib(server) - before
        # Meanwhile the agent serves others.
        agent.ping()
        assert bytes(agent.run(["echo", "other"]).stdout) == b"other\n"
        assert conn.finish(60) == exit_event(0)
    assert conn.stdout_len == total
    assert grown < 16 * 1024, f"the agent grew by {grown} KiB while its client did not read"


def test_concurrent_jobs(agent: Agent) -> None:
    start = time.monotonic()
    conns = [agent.exec(["sh", "-c", f"sleep 0.5; echo job {i}"]) for i in range(16)]
    try:
        for i, conn in enumerate(conns):
            assert conn.finish() == exit_event(0)
            assert bytes(conn.stdout) == f"job {i}\n".encode()
    finally:
        for conn in conns:
            conn.close()
    assert time.monotonic() - start < 5  # one after the other would take 8 s


def test_job_sees_only_its_stdio(agent: Agent) -> None:
    with agent.exec(["sleep", "30"]) as other:  # its pipes must not leak into the next job
        other.event("started")
        conn = agent.run(["sh", "-c", "ls /proc/$$/fd; true"])
    assert bytes(conn.stdout).split() == [b"0", b"1", b"2"]


# ----------------------------------------------------------------------------- killing


TREE = ["sh", "-c", "sleep 100 & sleep 100; echo never"]


def test_timeout_kills_the_tree(agent: Agent) -> None:
    start = time.monotonic()
    with agent.exec(TREE, timeout=0.5) as conn:
        conn.event("started")
        wait_for(lambda: len(marked(agent.marker)) >= 2, 5, "the job's tree")
        assert conn.finish() == exit_event(137, signal=9, timed_out=True, error="timeout")
    assert 0.5 <= time.monotonic() - start < 10
    assert marked(agent.marker) == set()
    assert b"never" not in conn.stdout


def test_kill_op_kills_the_tree(agent: Agent) -> None:
    with agent.exec(TREE) as conn:
        conn.event("started")
        wait_for(lambda: len(marked(agent.marker)) >= 2, 5, "the job's tree")
        conn.send({"op": "kill"})
        assert conn.finish() == exit_event(137, signal=9, error="killed")
    assert marked(agent.marker) == set()


def test_disconnect_kills_the_tree(agent: Agent) -> None:
    with agent.exec(TREE) as conn:
        conn.event("started")
        wait_for(lambda: len(marked(agent.marker)) >= 2, 5, "the job's tree")
    wait_for(lambda: not marked(agent.marker), 5, "the tree to die")
    agent.ping()


def test_kill_reaches_a_new_session_and_a_fork_loop(agent: Agent) -> None:
    script = "setsid sleep 100 & (while :; do sleep 100 & sleep 0.01; done) & sleep 100"
    with agent.exec(["sh", "-c", script]) as conn:
        conn.event("started")
        wait_for(lambda: len(marked(agent.marker)) >= 6, 5, "the job's tree")
        conn.send({"op": "kill"})
        assert conn.finish()["error"] == "killed"
    assert marked(agent.marker) == set()


# ----------------------------------------------------------------------------- pty


def test_pty_tty(agent: Agent) -> None:
    conn = agent.run(["sh", "-c", 'tty; stat -c %u "$(tty)"; id -u'], pty=True)
    assert re.fullmatch(rb"/dev/pts/\d+\r\n65534\r\n65534\r\n", bytes(conn.stdout))
    assert conn.events[-1] == exit_event(0)


def test_pty_input_echo(agent: Agent) -> None:
    # Repeated: the job closes its terminal just before it exits, and the agent must not
    # hang the terminal up (SIGHUP) in between.
    for _ in range(5):
        with agent.exec(["cat"], pty=True) as conn:
            conn.event("started")
            conn.send_input(b"hello\n")
            conn.read_until(lambda: conn.stdout.count(b"hello\r\n") >= 2)
            conn.send_input(b"\x04")
            assert conn.finish() == exit_event(0)
        assert bytes(conn.stdout) == b"hello\r\nhello\r\n"


def test_pty_resize(agent: Agent) -> None:
    with agent.exec(["sh", "-c", "stty size; read x; stty size"], pty=True, rows=30, cols=100) as c:
        c.read_until(lambda: b"30 100" in c.stdout)
        c.send({"op": "resize", "rows": 40, "cols": 120})
        c.send_input(b"\n")
        assert c.finish() == exit_event(0)
    assert b"40 120" in c.stdout


def test_pty_kill(agent: Agent) -> None:
    with agent.exec(["sh", "-c", "sleep 100 & sleep 100"], pty=True) as conn:
        conn.event("started")
        wait_for(lambda: len(marked(agent.marker)) >= 2, 5, "the job's tree")
        conn.send({"op": "kill"})
        assert conn.finish() == exit_event(137, signal=9, error="killed")
    assert marked(agent.marker) == set()
