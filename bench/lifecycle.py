"""Session lifecycle: create + start latency, the first job on a fresh session, delete.

Each run is what a user does for a fresh sandbox: ``sessions.create()`` then
``sessions.start()`` (with the server's default limits), then the first
``run_and_wait(["true"])``, then ``sessions.delete()``; one at a time.

The server keeps a warm pool of started sandboxes with the default limits, which a
create takes over; ``create_start_cold`` asks for other limits (1 MiB less memory), so
the sandbox is made and started on the spot: the cost of a start itself, and what a
create pays when the pool has run dry.
"""

from __future__ import annotations

import time
from typing import Any

from bench.context import Context
from bench.stats import summarize

#: Not the server's default (512), so that no pooled sandbox fits.
COLD_MEMORY_MB = 511


def run(ctx: Context) -> dict[str, Any]:
    runs, warmup = (10, 2) if ctx.quick else (30, 3)
    ctx.say(f"session create+start, first job, delete x{runs} (+{warmup} warm-up)")
    parts: dict[str, list[float]] = {
        k: [] for k in ("create", "start", "create_start", "first_job", "to_first_result", "delete")
    }
    with ctx.client() as client:
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            sid = client.sessions.create()["session_id"]
            ctx.remember(sid)
            t1 = time.perf_counter()
            client.sessions.start(sid)
            t2 = time.perf_counter()
            client.jobs.run_and_wait(sid, ["true"])
            t3 = time.perf_counter()
            ctx.delete_session(client, sid)
            t4 = time.perf_counter()
            if i < warmup:
                continue
            for key, value in (
                ("create", t1 - t0),
                ("start", t2 - t1),
                ("create_start", t2 - t0),
                ("first_job", t3 - t2),
                ("to_first_result", t3 - t0),
                ("delete", t4 - t3),
            ):
                parts[key].append(value * 1000.0)
        cold_runs = 5 if ctx.quick else 15
        ctx.say(f"session create+start outside the warm pool x{cold_runs}")
        cold: list[float] = []
        for _ in range(cold_runs):
            t0 = time.perf_counter()
            sid = client.sessions.create(limits={"memory_mb": COLD_MEMORY_MB})["session_id"]
            ctx.remember(sid)
            client.sessions.start(sid)
            cold.append((time.perf_counter() - t0) * 1000.0)
            ctx.delete_session(client, sid)
    out = {key: summarize(values, "ms") for key, values in parts.items()}
    out["create_start_cold"] = summarize(cold, "ms")
    return out
