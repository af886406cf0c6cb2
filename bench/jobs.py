"""Sequential job round trip, and where its time goes.

* ``run_and_wait``: ``bastion.jobs.run_and_wait(sid, ["true"])`` through the SDK, one
  after the other on one running session (after a warm-up).
* ``http_post_wait``: the same job as one raw HTTP request (``POST .../jobs?wait=``)
  with a plain ``httpx.Client``: the server's own cost, without the SDK.
* ``agent_direct``: the job sent straight to the sandbox's agent over its Unix socket
  from this process (no HTTP, no server): the runtime's own cost.
* ``host_true``: ``subprocess.run(["true"])`` on the host, the fork+exec floor the
  other three are measured against (issue 15.6's ratios).

The four are interleaved (one of each per round, in turn), so that on a busy machine
they all see the same background load and their ratios hold.  The rounds run in one
coroutine on one event loop, as the server's jobs do: ``agent_direct`` then pays for
its job and not for starting an event loop each time (about 0.1 ms here).  Interleaved, the floor
also pays for what the server and the sandbox still do after a job has answered, so it
is higher than in a tight loop: ``host_true_loop`` is that loop, just before the rounds,
and the ratios take the lower of the two (the stricter).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.context import Context
from bench.stats import summarize, time_ms


def run(ctx: Context) -> dict[str, Any]:
    runs, warmup = (200, 20) if ctx.quick else (500, 50)
    out: dict[str, Any] = {}
    with (
        ctx.client() as client,
        ctx.sessions(client, 1) as (sid,),
        httpx.Client(timeout=30) as http,
        asyncio.Runner() as runner,
    ):
        ways: dict[str, Callable[[], Awaitable[object]]] = {
            "run_and_wait": _sync(lambda: client.jobs.run_and_wait(sid, ["true"])),
            "http_post_wait": _sync(_http_post_wait(ctx, http, sid)),
            "agent_direct": lambda: _agent_direct(ctx, sid),
            "host_true": _sync(lambda: subprocess.run(["true"], check=True)),
        }
        out.update(runner.run(_rounds(ctx, ways, runs, warmup)))
    return out


def _sync(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """``fn`` as a coroutine function (it blocks the loop: nothing else runs on it)."""

    async def call() -> object:
        return fn()

    return call


async def _rounds(
    ctx: Context, ways: dict[str, Callable[[], Awaitable[object]]], runs: int, warmup: int
) -> dict[str, Any]:
    """Each way warmed up, then ``runs`` rounds of one call of each, in turn."""
    out: dict[str, Any] = {}
    for name, fn in list(ways.items()):
        try:
            for _ in range(warmup):
                await fn()
        except Exception as exc:
            if name == "run_and_wait":
                raise
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            del ways[name]
    out["host_true_loop"] = summarize(
        time_ms(lambda: subprocess.run(["true"], check=True), runs, warmup=10), "ms"
    )
    ctx.say(f"{', '.join(ways)} interleaved, x{runs} each (+{warmup} warm-up)")
    samples: dict[str, list[float]] = {name: [] for name in ways}
    order = list(ways)
    for i in range(runs):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            start = time.perf_counter()
            await ways[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    for name, values in samples.items():
        out[name] = summarize(values, "ms")
    return out


def _http_post_wait(ctx: Context, http: httpx.Client, sid: str) -> Callable[[], None]:
    url = f"{ctx.server.url}/v1/sessions/{sid}/jobs"

    def once() -> None:
        r = http.post(url, params={"wait": "10"}, json={"command": ["true"]})
        if r.status_code != 200 or r.json().get("status") != "completed":
            raise RuntimeError(f"POST ?wait answered {r.status_code}: {r.text[:300]}")

    return once


async def _agent_direct(ctx: Context, sid: str) -> None:
    from bastion_server.runtime.agent_client import AgentProcess
    from bastion_server.runtime.agent_protocol import SOCKET_NAME
    from bastion_server.runtime.base import ExecSpec, ExitEvent

    socket_path = str(Path(ctx.server.data_dir) / "sessions" / sid / "run" / SOCKET_NAME)
    spec = ExecSpec(
        argv=["true"],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/user"},
        cwd="/",
    )
    process = await AgentProcess.start(socket_path, spec)
    code = None
    async for event in process.events():
        if isinstance(event, ExitEvent):
            code = event.exit_code
    if code != 0:
        raise RuntimeError(f"the agent ran `true` with exit code {code}")
