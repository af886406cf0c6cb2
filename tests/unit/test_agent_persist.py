# ruff: noqa: F811 - the agent fixtures are imported from test_agent_protocol by name
"""Persistent jobs: they outlive their connection, spool their output, and are attached
again (what lets a job outlive a restart of the server).

Spoken to the agent itself, as in test_agent_protocol.py (whose fixtures these reuse).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from tests.unit.test_agent_protocol import (  # noqa: F401 - fixtures
    Agent,
    Conn,
    agent,
    c_agent_binary,
    marked,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the agent switches jobs to another user: run these tests as root"
)


def persist(agent: Agent, argv: list[str], job_id: str = "job_1", **fields: Any) -> Conn:
    return agent.exec(argv, persist=True, job_id=job_id, **fields)


def attach(agent: Agent, job_id: str = "job_1", stdout: int = 0, stderr: int = 0) -> Conn:
    conn = agent.connect()
    conn.send({"op": "attach", "job_id": job_id, "stdout_offset": stdout, "stderr_offset": stderr})
    return conn


def forget(conn: Conn) -> None:
    """Acknowledge the end: the agent drops the job and closes the connection."""
    conn.send({"op": "forget"})
    assert conn.read_frame(10) is None, "the agent sent more after the exit event"


def test_a_persistent_job_outlives_its_connection_and_is_attached_again(agent: Agent) -> None:
    script = f"echo before; sleep 0.5; echo after; echo {agent.marker} >/dev/null"
    with persist(agent, ["sh", "-c", script]) as conn:
        conn.read_until(lambda: b"before" in conn.stdout)
    time.sleep(1.0)  # it finishes while nobody is connected
    with attach(agent, stdout=len(b"before\n")) as again:
        exit_event = again.event("exit")
        assert bytes(again.stdout) == b"after\n"
        assert exit_event["exit_code"] == 0
        assert exit_event["output_bytes"] == {"stdout": 13, "stderr": 0}
        forget(again)
    with attach(agent) as gone:  # forgotten: no more
        assert gone.event("exit")["error"] == "unknown_job"


def test_attach_replays_both_streams_in_order_then_goes_on_live(agent: Agent) -> None:
    script = "echo one; echo two >&2; echo three; read x; echo four; echo five >&2"
    with persist(agent, ["sh", "-c", script], stdin=True) as conn:
        conn.read_until(lambda: b"three" in conn.stdout)
    with attach(agent) as again:
        again.read_until(lambda: b"three" in again.stdout)
        again.send_input(b"go\n")  # the job is live again: its stdin too
        exit_event = again.event("exit")
        forget(again)
    assert exit_event["exit_code"] == 0
    assert bytes(again.stdout) == b"one\nthree\nfour\n"
    assert bytes(again.stderr) == b"two\nfive\n"


def test_attach_skips_what_the_server_has_of_each_stream(agent: Agent) -> None:
    script = "printf abc; printf DEF >&2; printf ghi; printf JKL >&2"
    with persist(agent, ["sh", "-c", script]) as conn:
        conn.event("exit")
    with attach(agent, stdout=4, stderr=2) as again:
        again.event("exit")
        forget(again)
    assert bytes(again.stdout) == b"hi"
    assert bytes(again.stderr) == b"FJKL"


def test_an_ended_job_is_kept_until_forgotten(agent: Agent) -> None:
    with persist(agent, ["sh", "-c", "echo hi; exit 3"]) as conn:
        first = conn.event("exit")
        # Without "forget" the connection stays open, and closing it drops nothing.
    for _ in range(2):
        with attach(agent) as again:
            assert again.event("exit") == first
            assert bytes(again.stdout) == b"hi\n"
    with attach(agent) as last:
        last.event("exit")
        forget(last)


def test_a_new_attach_takes_over_from_an_old_connection(agent: Agent) -> None:
    with persist(agent, ["sh", "-c", "echo a; sleep 0.5; echo b"]) as old:
        old.read_until(lambda: b"a" in old.stdout)
        with attach(agent, stdout=2) as new:
            new.event("exit")
            forget(new)
        assert bytes(new.stdout) == b"b\n"
        assert old.read_frame(10) is None  # the old one was closed, the job not killed


def test_the_spool_is_capped_and_what_was_dropped_counted(agent: Agent) -> None:
    with persist(agent, ["sh", "-c", "sleep 0.3; head -c 5000 /dev/zero"], spool_bytes=1000):
        pass  # gone before any output
    time.sleep(1.0)
    with attach(agent) as again:
        exit_event = again.event("exit")
        forget(again)
    assert bytes(again.stdout) == b"\0" * 1000
    assert exit_event["output_bytes"] == {"stdout": 5000, "stderr": 0}


def test_a_timeout_counts_while_nobody_is_attached(agent: Agent) -> None:
    start = time.monotonic()
    with persist(agent, ["sleep", "30"], timeout=1) as conn:
        conn.event("started")
    time.sleep(1.5)
    with attach(agent) as again:
        exit_event = again.event("exit", timeout=10)
        forget(again)
    assert exit_event["timed_out"] is True
    assert time.monotonic() - start < 5


def test_the_spool_has_no_name_and_a_job_cannot_read_it(agent: Agent) -> None:
    spool_dir = Path(agent.socket_path).parent / "spool"
    with persist(agent, ["sh", "-c", "echo secret; sleep 30"], timeout=5) as conn:
        conn.read_until(lambda: b"secret" in conn.stdout)
        assert spool_dir.stat().st_mode & 0o777 == 0o700
        assert list(spool_dir.iterdir()) == []
        conn.send({"op": "kill"})
        conn.event("exit")
        forget(conn)


def test_a_job_without_persist_still_dies_with_its_connection(agent: Agent) -> None:
    with agent.exec(["sh", "-c", f"echo {agent.marker}; sleep 30"]) as conn:
        conn.read_until(lambda: bool(conn.stdout))
        assert marked(agent.marker)
    wait_for(lambda: not marked(agent.marker), 10, "the job to be killed")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pty": True}, "persist is for jobs without a terminal"),
        ({"job_id": "../x"}, "job_id must be"),
        ({"job_id": ""}, "job_id must be"),
        ({"spool_bytes": -1}, "spool_bytes must be"),
    ],
)
def test_bad_persistent_requests(agent: Agent, fields: dict[str, Any], message: str) -> None:
    with agent.exec(["true"], **{"persist": True, "job_id": "job_1", **fields}) as conn:
        exit_event = conn.finish()
    assert exit_event["error"] == "start_failed"
    assert message in exit_event["message"]


def test_two_live_jobs_cannot_share_an_id(agent: Agent) -> None:
    with persist(agent, ["sleep", "30"], timeout=5) as first:
        first.event("started")
        with persist(agent, ["true"]) as second:
            exit_event = second.finish()
        assert "exists already" in exit_event["message"]
        first.send({"op": "kill"})
        first.event("exit")
        forget(first)


def test_attach_to_an_unknown_job(agent: Agent) -> None:
    with attach(agent, "job_nobody_ran") as conn:
        exit_event = conn.finish()
    assert exit_event["error"] == "unknown_job"
    assert agent.ping()["event"] == "pong"
