"""Bytes from a node agent to the gateway: Ray's object store against the data plane.

    .venv/bin/python bench/cluster_data_plane.py [MiB]

Starts a two-node Ray cluster on this machine (bastion_server/cluster/testing_cluster.py),
an actor on the worker node, and pulls ``MiB`` mebibytes (default 256) from it to this
process (the gateway's place) two ways, 1 MiB at a time:

* ``ray``: each chunk an actor call's result, which Ray puts in the worker node's object
  store and copies into this node's (payloads over 100 KiB go through the store);
* ``data plane``: the chunks as output frames over the node agent's direct stream
  (:mod:`bastion_server.cluster.data_plane`), read as a job's output is.

Prints MiB/s and the driver's CPU seconds per GiB for each.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

CHUNK = 1024 * 1024
SECRET = b"bench-secret-0123456789abcdef012"


class Source:
    """The actor: chunks by Ray call, or by a data plane stream."""

    def __init__(self) -> None:
        self.chunk = b"x" * CHUNK
        self.address: tuple[str, int] | None = None

    async def get_chunk(self) -> bytes:
        return self.chunk

    async def serve(self) -> tuple[str, int]:
        import ray

        from bastion_server.cluster.data_plane import DataPlaneServer
        from bastion_server.runtime.base import ExecSpec, ExitEvent, OutputEvent, Process

        chunk = self.chunk

        class Emit(Process):
            def __init__(self, count: int) -> None:
                self.count = count

            async def events(self) -> AsyncIterator[OutputEvent | ExitEvent]:
                for _ in range(self.count):
                    yield OutputEvent("stdout", chunk)
                yield ExitEvent(exit_code=0)

            async def kill(self, signal: int | None = None) -> None: ...
            async def send_input(self, data: bytes) -> None: ...
            async def close_input(self) -> None: ...
            async def resize(self, rows: int, cols: int) -> None: ...
            async def close(self) -> None: ...

        async def exec_(session_id: str, spec: ExecSpec) -> Process:
            return Emit(int(spec.argv[0]))

        server = DataPlaneServer(exec_, SECRET)
        self.server = server
        return await server.start(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _measure(actor: Any, address: tuple[str, int], count: int) -> None:
    from bastion_server.cluster.data_plane import open_process
    from bastion_server.runtime.base import ExecSpec, OutputEvent

    results = {}
    t, c = time.perf_counter(), _cpu()
    got = 0
    for _ in range(count):
        got += len(await actor.get_chunk.remote())
    results["ray (object store)"] = (time.perf_counter() - t, _cpu() - c, got)
    t, c = time.perf_counter(), _cpu()
    got = 0
    process = await open_process(address, SECRET, "bench", ExecSpec([str(count)]))
    async for event in process.events():
        if isinstance(event, OutputEvent):
            got += len(event.data)
    results["data plane (direct TCP)"] = (time.perf_counter() - t, _cpu() - c, got)
    for name, (wall, cpu, size) in results.items():
        mib = size / CHUNK
        print(
            f"{name:26s} {mib:6.0f} MiB in {wall:6.2f} s: {mib / wall:7.1f} MiB/s, "
            f"driver CPU {cpu / (mib / 1024):5.2f} s/GiB"
        )


def main() -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from bastion_server.cluster.testing_cluster import LocalRayCluster

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    cluster = LocalRayCluster(["head", "w1"])
    try:
        ray.init(address=cluster.address, logging_level=logging.ERROR)
        worker = next(
            n["NodeID"]
            for n in ray.nodes()  # type: ignore[no-untyped-call]
            if n["Alive"] and "bastion_node_w1" in n["Resources"]
        )
        source: Any = ray.remote(Source)
        actor = source.options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=False),
        ).remote()
        host, port = ray.get(actor.serve.remote())
        address = (str(host), int(port))
        asyncio.run(_measure(actor, address, count))
        ray.shutdown()
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
