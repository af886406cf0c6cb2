# ruff: noqa: F811 - the agent fixtures are imported from test_agent_protocol by name
"""Kept connections: one connection to the agent serving job after job ("keep_open").

Spoken to the C agent directly (the fixtures of test_agent_protocol.py), and through
the server's client (AgentProcess with its idle connections).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from tests.unit.test_agent_protocol import (  # noqa: F401 - fixtures
    JOB_PATH,
    Agent,
    Conn,
    agent,
    c_agent_binary,
)

from bastion_server.runtime import agent_connections
from bastion_server.runtime.agent_client import AgentProcess
from bastion_server.runtime.agent_protocol import encode_json
from bastion_server.runtime.base import ExecSpec, ExitEvent, OutputEvent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the agent switches jobs to another user: run these tests as root"
)


def _exec(conn: Conn, agent: Agent, argv: list[str], **fields: object) -> None:
    request = {"op": "exec", "argv": argv, "env": agent.job_env(), "keep_open": True}
    conn.send({**request, **fields})


def _next_exit(conn: Conn, seen: int) -> dict[str, object]:
    """The exit event after the first ``seen`` ones."""
    conn.read_until(lambda: sum(e.get("event") == "exit" for e in conn.events) > seen)
    return [e for e in conn.events if e.get("event") == "exit"][seen]


def test_one_connection_runs_job_after_job(agent: Agent) -> None:
    with agent.connect() as conn:
        for i in range(3):
            before = len(conn.stdout)
            _exec(conn, agent, ["sh", "-c", f"echo job{i}; exit {i}"])
            end = _next_exit(conn, i)
            assert end["exit_code"] == i and end["keep_open"] is True
            assert conn.stdout[before:] == f"job{i}\n".encode()
        assert not conn.eof


def test_without_keep_open_the_connection_closes_after_the_exit(agent: Agent) -> None:
    conn = agent.run(["true"])
    assert "keep_open" not in conn.events[-1]
    assert conn.eof


def test_a_persistent_job_is_forgotten_then_the_next_request_is_taken(agent: Agent) -> None:
    with agent.connect() as conn:
        _exec(conn, agent, ["sh", "-c", "echo one"], persist=True, job_id="kept-1")
        assert _next_exit(conn, 0)["keep_open"] is True
        # forget and the next exec in one write: the agent takes them in order
        conn.sock.sendall(
            encode_json({"op": "forget"})
            + encode_json(
                {"op": "exec", "argv": ["echo", "two"], "env": agent.job_env(), "keep_open": True}
            )
        )
        assert _next_exit(conn, 1)["exit_code"] == 0
        assert conn.stdout == b"one\ntwo\n"
    # forgotten: the first job is gone from the agent
    with agent.connect() as other:
        other.send({"op": "attach", "job_id": "kept-1"})
        assert other.finish()["error"] == "unknown_job"


def test_frames_left_for_a_finished_job_are_dropped(agent: Agent) -> None:
    with agent.connect() as conn:
        _exec(conn, agent, ["true"], stdin=True)
        _next_exit(conn, 0)
        # what a server may still send while the exit event is on its way to it
        conn.send_input(b"late input\n")
        conn.send({"op": "kill", "signal": 15})
        conn.send({"op": "close_stdin"})
        conn.send({"op": "resize", "rows": 10, "cols": 10})
        conn.send({"op": "forget"})
        _exec(conn, agent, ["sh", "-c", "cat; echo read-nothing"])
        end = _next_exit(conn, 1)
        assert end["exit_code"] == 0 and end.get("error") is None
        assert conn.stdout == b"read-nothing\n"
        assert not any(e.get("event") == "error" for e in conn.events)


def test_a_connection_that_broke_the_protocol_is_not_kept(agent: Agent) -> None:
    with agent.connect() as conn:
        _exec(conn, agent, ["sleep", "30"])
        conn.event("started")
        conn.sock.sendall(b"J\x00\x00\x00\x03{x}")  # not JSON: the job is killed
        end = conn.finish()
        assert end["error"] == "killed" and "keep_open" not in end


def test_an_unknown_op_on_a_kept_connection_still_gets_its_error(agent: Agent) -> None:
    with agent.connect() as conn:
        _exec(conn, agent, ["true"])
        _next_exit(conn, 0)
        conn.send({"op": "launch"})
        error = conn.event("error")
        assert error["message"] == "unknown op 'launch'"
        conn.read_until(lambda: conn.eof)


def test_an_idle_kept_connection_closed_by_the_server_leaves_nothing(agent: Agent) -> None:
    for _ in range(20):
        with agent.connect() as conn:
            _exec(conn, agent, ["true"])
            _next_exit(conn, 0)
    assert agent.ping()["event"] == "pong"
    agent_fds = len(os.listdir(f"/proc/{agent.server_pid()}/fd"))
    assert agent_fds < 20, f"the agent holds {agent_fds} descriptors"


# -- the server's client -------------------------------------------------------------


def _spec(argv: list[str], **fields: object) -> ExecSpec:
    return ExecSpec(argv=argv, env={"PATH": JOB_PATH}, cwd="/", **fields)  # type: ignore[arg-type]


async def _run(socket_path: str, spec: ExecSpec) -> tuple[bytes, ExitEvent]:
    process = await AgentProcess.start(socket_path, spec)
    out, end = b"", None
    async for event in process.events():
        if isinstance(event, OutputEvent):
            out += event.data
        else:
            end = event
    await process.forget()
    assert end is not None
    return out, end


def _agent_connections(agent: Agent) -> int:
    """Connections the agent server holds (sockets among its descriptors, less the
    listener)."""
    fd_dir = Path(f"/proc/{agent.server_pid()}/fd")
    sockets = sum(os.readlink(fd_dir / fd).startswith("socket:") for fd in os.listdir(fd_dir))
    return sockets - 1


def test_the_client_keeps_one_connection_for_jobs_one_after_another(agent: Agent) -> None:
    async def main() -> None:
        for i in range(5):
            out, end = await _run(agent.socket_path, _spec(["sh", "-c", f"echo {i}"]))
            assert (out, end.exit_code) == (f"{i}\n".encode(), 0)
            assert len(agent_connections.idle_connections()) == 1
        out, end = await _run(
            agent.socket_path, _spec(["sh", "-c", "echo p"], persist_as="p-1", spool_bytes=1024)
        )
        assert (out, end.exit_code) == (b"p\n", 0)
        assert _agent_connections(agent) == 1
        agent_connections.idle_connections().close_all()

    asyncio.run(main())


def test_a_kept_connection_takes_no_input_once_handed_back(agent: Agent) -> None:
    async def main() -> None:
        process = await AgentProcess.start(agent.socket_path, _spec(["true"], stdin=True))
        async for _ in process.events():
            pass
        with pytest.raises(Exception, match="closed"):
            await process.send_input(b"meant for nobody")
        out, end = await _run(agent.socket_path, _spec(["sh", "-c", "cat; echo ok"]))
        assert (out, end.exit_code) == (b"ok\n", 0)
        agent_connections.idle_connections().close_all()

    asyncio.run(main())


def test_a_kept_connection_whose_agent_went_away_is_not_handed_out(agent: Agent) -> None:
    async def main() -> None:
        await _run(agent.socket_path, _spec(["true"]))
        pool = agent_connections.idle_connections()
        assert len(pool) == 1
        agent.proc.kill()
        agent.proc.wait()
        for _ in range(100):  # the end of the stream reaches the idle connection
            await asyncio.sleep(0.01)
            if pool.take(agent.socket_path) is None:
                break
        else:
            raise AssertionError("a dead agent's connection was still handed out")

    asyncio.run(main())


def test_idle_connections_are_bounded() -> None:
    async def main() -> None:
        pool = agent_connections.IdleConnections(per_agent=2, total=3)
        writers, peers = [], []
        for path in ("a", "a", "a", "b", "c"):
            mine, peer = socket.socketpair()
            peers.append(peer)
            reader, writer = await asyncio.open_unix_connection(sock=mine)
            writers.append(writer)
            pool.put(path, (reader, writer))
        assert len(pool) == 3
        assert pool.take("a") is not None and pool.take("a") is None  # one 'a' went first
        assert sum(w.is_closing() for w in writers) == 2
        pool.close_all()
        for writer in writers:
            writer.close()
        await asyncio.sleep(0)
        for peer in peers:
            peer.close()

    asyncio.run(main())


# -- a count kept with the job -------------------------------------------------------


def test_the_oom_count_a_job_started_with_comes_back_with_its_end(agent: Agent) -> None:
    conn = agent.run(["true"], oom_kills_before=7)
    assert conn.events[-1]["oom_kills_before"] == 7
    with agent.connect() as conn:
        _exec(conn, agent, ["true"], persist=True, job_id="oom-1", oom_kills_before=3)
        _next_exit(conn, 0)
    # a restarted server attaching gets it back from the kept exit event
    with agent.connect() as again:
        again.send({"op": "attach", "job_id": "oom-1"})
        end = again.event("exit")
        assert end["oom_kills_before"] == 3 and "keep_open" not in end
        again.send({"op": "forget"})
        again.read_until(lambda: again.eof)


def test_a_bad_oom_count_is_refused(agent: Agent) -> None:
    conn = agent.run(["true"], oom_kills_before=-1)
    end = conn.events[-1]
    assert end["error"] == "start_failed" and "oom_kills_before" in end["message"]


def _known(agent: Agent, job_id: str) -> bool:
    """Whether the agent still keeps the job (an attach from a connection of its own)."""
    with agent.connect() as conn:
        conn.send({"op": "attach", "job_id": job_id})
        end = conn.event("exit")
        if end.get("error") != "unknown_job":
            conn.send({"op": "forget"})
        return end.get("error") != "unknown_job"


def test_a_persistent_jobs_forget_goes_with_the_next_request(agent: Agent) -> None:
    async def main() -> None:
        persistent = _spec(["echo", "p"], persist_as="owed-1", spool_bytes=1024)
        out, end = await _run(agent.socket_path, persistent)
        assert (out, end.exit_code) == (b"p\n", 0)
        out, end = await _run(agent.socket_path, _spec(["echo", "next"]))
        assert (out, end.exit_code) == (b"next\n", 0)
        await asyncio.sleep(0.05)  # (the agent has read both by now)
        assert not _known(agent, "owed-1")
        agent_connections.idle_connections().close_all()

    asyncio.run(main())


def test_a_forget_owed_is_sent_by_itself_when_no_job_follows(agent: Agent) -> None:
    async def main() -> None:
        await _run(agent.socket_path, _spec(["true"], persist_as="owed-2", spool_bytes=1024))
        await asyncio.sleep(agent_connections.OWED_DELAY + 0.3)
        assert not _known(agent, "owed-2")
        # and a connection closed with a forget owed sends it first
        await _run(agent.socket_path, _spec(["true"], persist_as="owed-3", spool_bytes=1024))
        agent_connections.idle_connections().close_all()
        await asyncio.sleep(0.05)
        assert not _known(agent, "owed-3")

    asyncio.run(main())
