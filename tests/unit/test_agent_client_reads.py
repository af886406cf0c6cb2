# ruff: noqa: F811 - the agent fixtures are imported from test_agent_protocol by name
"""The server's agent client receives into one reused buffer (asyncio's plain receive
allocates 256 KiB each time): frames larger than that buffer, and many frames in one
receive, still arrive whole and in order, on new and on kept connections."""

from __future__ import annotations

import asyncio
import os

import pytest
from tests.unit.test_agent_protocol import (  # noqa: F401 - fixtures
    JOB_PATH,
    Agent,
    agent,
    c_agent_binary,
)

from bastion_server.runtime import agent_client, agent_connections
from bastion_server.runtime.agent_client import AgentProcess
from bastion_server.runtime.base import ExecSpec, ExitEvent, OutputEvent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the agent switches jobs to another user: run these tests as root"
)


async def _output(socket_path: str, script: str) -> tuple[bytes, bytes, ExitEvent]:
    spec = ExecSpec(argv=["sh", "-c", script], env={"PATH": JOB_PATH}, cwd="/")
    process = await AgentProcess.start(socket_path, spec)
    out = {"stdout": b"", "stderr": b""}
    end = None
    async for event in process.events():
        if isinstance(event, OutputEvent):
            out[event.stream] += event.data
        else:
            end = event
    assert end is not None
    return out["stdout"], out["stderr"], end


def test_output_larger_than_the_receive_buffer_arrives_whole(agent: Agent) -> None:
    size = 3 * 1024 * 1024 + 7  # many times the buffer, not a multiple of it
    assert size > agent_client.RECEIVE_SIZE

    async def main() -> None:
        for _ in range(2):  # a new connection, then the kept one
            out, err, end = await _output(
                agent.socket_path, f"head -c {size} /dev/zero | tr '\\0' x; echo done >&2"
            )
            assert (len(out), set(out), err, end.exit_code) == (size, {ord("x")}, b"done\n", 0)
        assert len(agent_connections.idle_connections()) == 1
        agent_connections.idle_connections().close_all()

    asyncio.run(main())


def test_many_small_frames_arrive_in_order(agent: Agent) -> None:
    async def main() -> None:
        out, _, end = await _output(agent.socket_path, "for i in $(seq 1 2000); do echo $i; done")
        assert out.decode().split() == [str(i) for i in range(1, 2001)]
        assert end.exit_code == 0
        agent_connections.idle_connections().close_all()

    asyncio.run(main())
