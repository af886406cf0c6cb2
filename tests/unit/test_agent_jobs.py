# ruff: noqa: F811 - the agent fixtures are imported from test_agent_protocol by name
"""What the C agent gives jobs beyond running them: stdin, signals, usage, limits, root.

Spoken to the agent itself, as in test_agent_protocol.py (whose fixtures these reuse):
the agent runs as an ordinary child of the test, as root, with jobs dropped to nobody.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path

import pytest
from tests.unit.test_agent_protocol import (  # noqa: F401 - fixtures
    NOBODY,
    Agent,
    agent,
    c_agent_binary,
)

from bastion_server.runtime.agent_protocol import encode_json

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the agent switches jobs to another user: run these tests as root"
)


def test_piped_stdin_reaches_the_job_and_closes(agent: Agent) -> None:
    with agent.exec(["sh", "-c", "cat; echo done"], stdin=True) as conn:
        conn.event("started")
        conn.send_input(b"line one\n")
        conn.send_input(b"line two\n")
        conn.send({"op": "close_stdin"})
        exit_event = conn.finish()
    assert exit_event["exit_code"] == 0
    assert bytes(conn.stdout) == b"line one\nline two\ndone\n"


def test_without_stdin_the_job_reads_nothing(agent: Agent) -> None:
    conn = agent.run(["sh", "-c", "cat; echo eof"])
    assert bytes(conn.stdout) == b"eof\n"


def test_a_large_stdin_arrives_whole(agent: Agent) -> None:
    data = os.urandom(3 * 1024 * 1024)
    with agent.exec(["sh", "-c", "cat | wc -c"], stdin=True) as conn:
        conn.event("started")
        for at in range(0, len(data), 1 << 20):
            conn.send_input(data[at : at + (1 << 20)])
        conn.send({"op": "close_stdin"})
        conn.finish(60)
    assert int(conn.stdout) == len(data)


def test_stdin_to_a_job_that_stopped_reading_is_dropped(agent: Agent) -> None:
    with agent.exec(["sh", "-c", "exec 0<&-; sleep 0.2; echo alive"], stdin=True) as conn:
        conn.event("started")
        conn.send_input(b"x" * (1 << 20))
        exit_event = conn.finish()
    assert exit_event["exit_code"] == 0
    assert bytes(conn.stdout) == b"alive\n"


def test_kill_with_sigterm_lets_the_job_handle_it(agent: Agent) -> None:
    script = "trap 'echo caught; exit 7' TERM; echo ready; while :; do sleep 0.05; done"
    with agent.exec(["sh", "-c", script]) as conn:
        conn.read_until(lambda: b"ready" in conn.stdout)
        conn.send({"op": "kill", "signal": int(signal.SIGTERM)})
        exit_event = conn.finish()
    assert b"caught" in conn.stdout
    assert exit_event["exit_code"] == 7
    assert exit_event["error"] == "killed"
    assert conn.kill_signal == signal.SIGTERM


def test_kill_with_sigint_ends_an_unhandling_job_by_that_signal(agent: Agent) -> None:
    with agent.exec(["sleep", "30"]) as conn:
        conn.event("started")
        conn.send({"op": "kill", "signal": int(signal.SIGINT)})
        exit_event = conn.finish()
    assert exit_event["signal"] == signal.SIGINT
    assert exit_event["error"] == "killed"


def test_a_job_ignores_no_signal_the_agent_was_handed_ignored(agent: Agent) -> None:
    conn = agent.run(["grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"])
    assert bytes(conn.stdout).split() == [b"SigBlk:", b"0" * 16, b"SigIgn:", b"0" * 16]


def test_usage_reports_cpu_time_memory_and_wall_time(agent: Agent) -> None:
    # ~64 MiB touched, then a busy loop of about 0.3 s of CPU, in a child of the shell.
    script = (
        'python3 -c "b = bytearray(64 << 20); import time; t = time.process_time(); '
        'exec(\\"while time.process_time() - t < 0.3: pass\\")"'
    )
    conn = agent.run(["sh", "-c", script])
    assert conn.events[-1]["exit_code"] == 0, conn.stderr
    usage = conn.usage
    assert usage is not None
    assert usage["user_cpu_us"] + usage["system_cpu_us"] >= 250_000
    assert usage["peak_rss_kb"] >= 60 * 1024
    assert usage["wall_us"] >= usage["user_cpu_us"] // 2


def test_a_cpu_time_limit_is_enforced_by_the_kernel(agent: Agent) -> None:
    conn = agent.run(["sh", "-c", "while :; do :; done"], rlimits={"cpu_seconds": 1})
    exit_event = conn.events[-1]
    assert exit_event["signal"] in (signal.SIGXCPU, signal.SIGKILL)
    assert conn.usage is not None and conn.usage["user_cpu_us"] >= 900_000


def test_a_file_size_limit_is_enforced(agent: Agent) -> None:
    target = Path(tempfile.mkdtemp()) / "big"
    os.chown(target.parent, NOBODY, NOBODY)
    conn = agent.run(
        ["sh", "-c", f"head -c 100000 /dev/zero > {target}"],
        rlimits={"file_size_bytes": 4096},
    )
    assert conn.events[-1]["exit_code"] != 0 or conn.events[-1]["signal"] == signal.SIGXFSZ
    assert target.stat().st_size <= 4096


def test_bad_rlimits_are_refused(agent: Agent) -> None:
    conn = agent.run(["true"], rlimits={"cpu_seconds": "lots"})
    assert conn.events[-1]["error"] == "start_failed"
    assert "rlimits.cpu_seconds" in conn.events[-1]["message"]


def test_root_is_opt_in(agent: Agent) -> None:
    as_user = agent.run(["id", "-u"])
    as_root = agent.run(["id", "-u"], user="root")
    assert bytes(as_user.stdout) == f"{NOBODY}\n".encode()
    assert bytes(as_root.stdout) == b"0\n"
    bad = agent.run(["id", "-u"], user="admin")
    assert bad.events[-1]["error"] == "start_failed"


def test_cgroup_descriptors_place_the_job(agent: Agent, tmp_path: Path) -> None:
    # A file stands in for cgroup.procs: the supervisor writes "0" (itself) before the
    # job starts, so what the job becomes is born there.
    procs = tmp_path / "cgroup.procs"
    procs.write_bytes(b"")
    fd = os.open(procs, os.O_WRONLY)
    conn = agent.connect()
    try:
        request = {
            "op": "exec",
            "argv": ["true"],
            "env": agent.job_env(),
            "cwd": None,
            "timeout": None,
            "pty": False,
        }
        conn.sock.sendmsg(
            [encode_json(request)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))],
        )
        conn.finish()
    finally:
        os.close(fd)
        conn.close()
    assert procs.read_bytes() == b"0"
    assert conn.events[-1]["exit_code"] == 0


def test_a_cgroup_that_refuses_fails_the_start(agent: Agent, tmp_path: Path) -> None:
    fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    conn = agent.connect()
    try:
        request = {"op": "exec", "argv": ["true"], "env": agent.job_env()}
        conn.sock.sendmsg(
            [encode_json(request)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))],
        )
        exit_event = conn.finish()
    finally:
        os.close(fd)
        conn.close()
    assert exit_event["error"] == "start_failed"
    assert "cgroup" in exit_event["message"]
