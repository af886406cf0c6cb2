# ruff: noqa: F811 - the agent fixtures are imported from test_agent_protocol by name
"""The started event, owed until the job's first frame (the same send: one wake-up of
the server for a short job), still comes first, and by itself soon for a quiet job.

(That it is one send is not visible from here: a stream socket's reader gets two quick
sends together too.  bench/jobs.py shows the wake-up saved.)"""

from __future__ import annotations

import os
import time

import pytest
from tests.unit.test_agent_protocol import (  # noqa: F401 - fixtures
    Agent,
    Conn,
    agent,
    c_agent_binary,
)

from bastion_server.runtime.agent_protocol import FRAME_JSON, FRAME_STDOUT, FrameReader

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the agent switches jobs to another user: run these tests as root"
)


def _first_send(conn: Conn) -> list[tuple[bytes, bytes]]:
    """The frames of the first bytes the agent sends (what one wake-up reads)."""
    conn.sock.settimeout(30)
    return FrameReader().feed(conn.sock.recv(1 << 20))


def test_a_short_jobs_started_event_comes_with_its_exit(agent: Agent) -> None:
    with agent.exec(["true"]) as conn:
        frames = _first_send(conn)
    assert [kind for kind, _ in frames] == [FRAME_JSON, FRAME_JSON]
    assert b'"event":"started"' in frames[0][1] and b'"pid":' in frames[0][1]
    assert b'"event":"exit"' in frames[1][1]


def test_the_started_event_comes_with_the_first_output(agent: Agent) -> None:
    with agent.exec(["sh", "-c", "echo hi; sleep 1"]) as conn:
        frames = _first_send(conn)
    assert frames[0][0] == FRAME_JSON and b'"event":"started"' in frames[0][1]
    assert frames[1] == (FRAME_STDOUT, b"hi\n")


def test_a_quiet_jobs_started_event_comes_by_itself_soon(agent: Agent) -> None:
    with agent.exec(["sleep", "5"]) as conn:
        begun = time.monotonic()
        started = conn.event("started", timeout=2)
        assert time.monotonic() - begun < 2
        assert isinstance(started["pid"], int)
        assert not any(e.get("event") == "exit" for e in conn.events)
        conn.send({"op": "kill"})
        assert conn.finish()["signal"] == 9
