"""The data plane between gateway and node agent, over real TCP on loopback: a
process's bytes both ways, and nothing for a peer without the cluster's secret."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bastion_server.cluster.data_plane import DataPlaneServer, attach_process, open_process
from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    JobLimits,
    OutputEvent,
    Process,
    SandboxError,
    SandboxNotRunning,
)

SECRET = b"s" * 32
#: The node's end of each process the test server ran.
PROCESSES: list[EchoProcess] = []


class EchoProcess(Process):
    """Echoes its input as stdout until its input closes, then exits 0."""

    def __init__(self, spec: ExecSpec) -> None:
        self.spec = spec
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False
        self.forgotten = asyncio.Event()

    async def events(self) -> AsyncIterator[OutputEvent | ExitEvent]:
        yield OutputEvent("stderr", " ".join(self.spec.argv).encode())
        while (data := await self.queue.get()) is not None:
            yield OutputEvent("stdout", data)
        yield ExitEvent(exit_code=0)

    async def kill(self, signal: int | None = None) -> None:
        await self.queue.put(None)

    async def send_input(self, data: bytes) -> None:
        await self.queue.put(data)

    async def close_input(self) -> None:
        await self.queue.put(None)

    async def resize(self, rows: int, cols: int) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    async def forget(self) -> None:
        self.forgotten.set()


async def _serve() -> tuple[DataPlaneServer, tuple[str, int], list[tuple[str, ExecSpec]]]:
    started: list[tuple[str, ExecSpec]] = []

    async def exec_(session_id: str, spec: ExecSpec) -> Process:
        if session_id == "stopped":
            raise SandboxNotRunning("sandbox stopped is not running")
        started.append((session_id, spec))
        PROCESSES.append(EchoProcess(spec))
        return PROCESSES[-1]

    async def attach(session_id: str, job_id: str, stdout: int, stderr: int) -> Process:
        if job_id == "job_gone":
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        spec = ExecSpec(["attached", session_id, job_id, str(stdout), str(stderr)])
        started.append((session_id, spec))
        PROCESSES.append(EchoProcess(spec))
        return PROCESSES[-1]

    PROCESSES.clear()
    server = DataPlaneServer(exec_, SECRET, attach=attach)
    return server, await server.start("127.0.0.1"), started


def test_a_process_streams_both_ways_with_its_whole_spec() -> None:
    asyncio.run(_test_a_process_streams_both_ways_with_its_whole_spec())


async def _test_a_process_streams_both_ways_with_its_whole_spec() -> None:
    server, address, started = await _serve()
    spec = ExecSpec(["cat", "-"], env={"A": "1"}, stdin=True, limits=JobLimits(memory_mb=64))
    process = await open_process(address, SECRET, "ses_1", spec)
    payload = b"x" * (3 * 1024 * 1024)
    await process.send_input(payload)
    await process.close_input()
    out = bytearray()
    events = []
    async for event in process.events():
        if isinstance(event, OutputEvent) and event.stream == "stdout":
            out += event.data
        else:
            events.append(event)
    assert bytes(out) == payload
    assert events[0] == OutputEvent("stderr", b"cat -")
    assert isinstance(events[-1], ExitEvent) and events[-1].exit_code == 0
    assert started == [("ses_1", spec)]
    await server.close()


def test_a_wrong_secret_runs_nothing() -> None:
    asyncio.run(_test_a_wrong_secret_runs_nothing())


async def _test_a_wrong_secret_runs_nothing() -> None:
    server, address, started = await _serve()
    with pytest.raises(SandboxError, match="did not take"):
        await open_process(address, b"not the secret", "ses_1", ExecSpec(["true"]))
    assert started == []
    await server.close()


def test_a_stopped_sandbox_is_told_apart() -> None:
    asyncio.run(_test_a_stopped_sandbox_is_told_apart())


async def _test_a_stopped_sandbox_is_told_apart() -> None:
    server, address, _ = await _serve()
    with pytest.raises(SandboxNotRunning, match="not running"):
        await open_process(address, SECRET, "stopped", ExecSpec(["true"]))
    await server.close()


def test_a_persistent_process_end_is_kept_until_the_gateway_forgets_it() -> None:
    asyncio.run(_test_a_persistent_process_end_is_kept_until_the_gateway_forgets_it())


async def _test_a_persistent_process_end_is_kept_until_the_gateway_forgets_it() -> None:
    server, address, _ = await _serve()
    process = await open_process(address, SECRET, "ses_1", ExecSpec(["job"], persist_as="job_1"))
    await process.close_input()
    events = [event async for event in process.events()]
    assert isinstance(events[-1], ExitEvent) and events[-1].exit_code == 0
    node_end = PROCESSES[-1]
    await asyncio.sleep(0.1)
    assert not node_end.forgotten.is_set()  # the exit is recorded only after this
    await process.forget()
    await asyncio.wait_for(node_end.forgotten.wait(), 5)
    await server.close()


def test_a_job_is_taken_up_again_from_the_given_bytes() -> None:
    asyncio.run(_test_a_job_is_taken_up_again_from_the_given_bytes())


async def _test_a_job_is_taken_up_again_from_the_given_bytes() -> None:
    server, address, started = await _serve()
    process = await attach_process(address, SECRET, "ses_1", "job_7", 12, 3)
    assert started == [("ses_1", ExecSpec(["attached", "ses_1", "job_7", "12", "3"]))]
    await process.close_input()
    events = [event async for event in process.events()]
    assert events[0] == OutputEvent("stderr", b"attached ses_1 job_7 12 3")
    await process.close()  # a gateway gone before forgetting: the node's end is closed
    await asyncio.sleep(0.1)
    assert PROCESSES[-1].closed and not PROCESSES[-1].forgotten.is_set()
    with pytest.raises(SandboxNotRunning, match="not running"):
        await attach_process(address, SECRET, "ses_1", "job_gone", 0, 0)
    await server.close()
