"""Aggregate jobs per second with 1, 4 and 16 sessions in parallel.

One thread per session, each with a ``Bastion`` client of its own, runs
``run_and_wait(["true"])`` back to back for a fixed time.  Besides jobs/s and each
job's latency under that load, the CPU time the host spent per job is split into this
client process, the server process, the sandboxes (agents and the jobs themselves) and
everything else (the kernel's work outside those, other processes on the machine): on
a 2-core machine the client's share is part of the picture.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from bastion import Bastion, BastionError
from bench.context import Context
from bench.machine import host_cpu_seconds, process_cpu_seconds
from bench.stats import summarize

LEVELS = (1, 4, 16)


def run(ctx: Context) -> dict[str, Any]:
    duration = 3.0 if ctx.quick else 10.0
    out: dict[str, Any] = {"duration_s": duration}
    clients = [ctx.client() for _ in range(max(LEVELS))]
    try:
        with ctx.sessions(clients[0], max(LEVELS)) as sids:
            for client, sid in zip(clients, sids, strict=True):
                client.jobs.run_and_wait(sid, ["true"])  # warm each connection
            for level in LEVELS:
                ctx.say(f"{level} session(s) in parallel for {duration:g} s")
                out[str(level)] = _level(ctx, clients[:level], sids[:level], duration)
    finally:
        for client in clients:
            client.close()
    return out


def _level(
    ctx: Context, clients: list[Bastion], sids: list[str], duration: float
) -> dict[str, Any]:
    barrier = threading.Barrier(len(clients) + 1)
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[str] = []
    stop_at = [0.0]

    def worker(i: int) -> None:
        client, sid, mine = clients[i], sids[i], latencies[i]
        barrier.wait()
        while True:
            start = time.perf_counter()
            if start >= stop_at[0]:
                return
            try:
                client.jobs.run_and_wait(sid, ["true"])
            except BastionError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            mine.append((time.perf_counter() - start) * 1000.0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    before = _cpu(ctx)
    begin = time.perf_counter()
    stop_at[0] = begin + duration
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    client_s, server_s, sandbox_s, host_s = (b - a for a, b in zip(before, _cpu(ctx), strict=True))
    samples = [x for per in latencies for x in per]
    jobs = len(samples)
    per_job = 1000.0 / jobs if jobs else 0.0
    return {
        "sessions": len(clients),
        "jobs": jobs,
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
        "latency": summarize(samples, "ms"),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "cpu_ms_per_job": {
            "client": round(client_s * per_job, 3),
            "server": round(server_s * per_job, 3),
            "sandboxes": round(sandbox_s * per_job, 3),
            "other": round(max(0.0, host_s - client_s - server_s - sandbox_s) * per_job, 3),
            "host_busy": round(host_s * per_job, 3),
        },
        "host_cpu_utilisation": round(host_s / (elapsed * (os.cpu_count() or 1)), 3),
    }


def _cpu(ctx: Context) -> tuple[float, float, float, float]:
    """CPU seconds so far of this process, the server, the sandboxes, the whole host."""
    return (
        time.process_time(),
        process_cpu_seconds(ctx.server.pid),
        _sandboxes_cpu_seconds(ctx),
        host_cpu_seconds(),
    )


def _sandboxes_cpu_seconds(ctx: Context) -> float:
    """CPU time charged to this server's sandboxes (agents and jobs): the cpuacct cgroup
    that holds them all (cgroup v1), or the v2 equivalent; 0 if unreadable."""
    tag = Path(ctx.server.state_root).name
    try:
        with open(f"/sys/fs/cgroup/cpuacct/bastion/{tag}/cpuacct.usage") as f:
            return int(f.read()) / 1e9
    except (OSError, ValueError):
        pass
    try:
        with open(f"/sys/fs/cgroup/bastion/{tag}/cpu.stat") as f:
            for line in f:
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        pass
    return 0.0
