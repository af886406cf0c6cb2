"""How many idle running sessions the machine holds, and what each one costs.

Sessions are started in batches (a few at a time in parallel).  After each batch the
host's used memory (``MemTotal - MemAvailable``), the sandboxes' own charge (the
memory cgroup that holds every session of this server), the charge of the server's
own memory cgroup (its RSS, page cache and the kernel memory of the mounts and loop
devices it sets up), the server's RSS and the latency of ``run_and_wait(["true"])`` on
a separate *probe* session are recorded.  Memory per session is the growth since
before the first batch divided by the number of idle sessions: host-wide (what the
machine lost, but moved by any other work on it) and attributable (the two cgroups).
The test stops early, saying why, when a session fails to start or the probe's median
job takes longer than 2 s.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from bastion import Bastion
from bench.context import Context
from bench.machine import cgroup_memory, process_memory, used_memory
from bench.stats import summarize, time_ms

MIB = 1024 * 1024
PROBE_LIMIT_MS = 2000.0
START_WORKERS = 4


def run(ctx: Context) -> dict[str, Any]:
    target = ctx.density_target
    batch = max(10, min(50, target // 10))
    out: dict[str, Any] = {"target": target, "batch": batch, "checkpoints": []}
    clients = [ctx.client() for _ in range(START_WORKERS)]
    probe_client = ctx.client()
    idle: list[str] = []
    try:
        probe = ctx.new_session(probe_client)
        _probe(probe_client, probe)  # warm

        time.sleep(1.0)
        base = _memory(ctx)
        out["baseline"] = {
            "host_used_mib": round(base["host_used"] / MIB, 1),
            "server_rss_mib": round(process_memory(ctx.server.pid)["VmRSS"] / MIB, 1),
            "probe_ms": summarize(_probe(probe_client, probe), "ms"),
        }
        started_at = time.monotonic()
        now = base
        with ThreadPoolExecutor(max_workers=START_WORKERS) as pool:
            while len(idle) < target:
                count = min(batch, target - len(idle))
                ctx.say(f"starting idle sessions {len(idle) + 1}..{len(idle) + count} of {target}")
                start_ms, error = _start_batch(ctx, pool, clients, count, idle)
                if error is not None:
                    out["stopped_early"] = (
                        f"a session failed to start after {len(idle)} idle sessions: {error}"
                    )
                    break
                time.sleep(0.5)  # let the new sandboxes settle
                now = _memory(ctx)
                probe_ms = _probe(probe_client, probe)
                server = process_memory(ctx.server.pid)
                n = len(idle)
                probe_median = statistics.median(probe_ms)
                point: dict[str, Any] = {
                    "sessions": n,
                    "host_used_mib": round(now["host_used"] / MIB, 1),
                    "per_session_mib": _per_session(now, base, n, "host_used"),
                    # The sandboxes' cgroup plus the server's own, less page cache:
                    # what Bastion holds, whatever else runs on the machine.
                    "attributable_per_session_mib": _per_session(
                        now, base, n, "sandboxes_charged", "server_charged"
                    ),
                    "sandboxes_per_session_mib": _per_session(now, base, n, "sandboxes_charged"),
                    "probe_ms_median": round(probe_median, 2),
                    "probe_ms_max": round(max(probe_ms), 2),
                    "start_ms_median": round(statistics.median(start_ms), 1),
                    "start_ms_max": round(max(start_ms), 1),
                    "server_rss_mib": round(server["VmRSS"] / MIB, 1),
                    "server_hwm_mib": round(server["VmHWM"] / MIB, 1),
                    "elapsed_s": round(time.monotonic() - started_at, 1),
                }
                out["checkpoints"].append(point)
                ctx.say(
                    f"  {n} idle: {point['per_session_mib']} MiB/session host-wide, "
                    f"{point['attributable_per_session_mib']} attributable; probe job "
                    f"{point['probe_ms_median']} ms; server RSS {point['server_rss_mib']} MiB"
                )
                if probe_median > PROBE_LIMIT_MS:
                    out["stopped_early"] = (
                        f"a job on the probe session took {point['probe_ms_median']} ms "
                        f"(> {PROBE_LIMIT_MS:g} ms) with {n} idle sessions"
                    )
                    break
        n = out["reached"] = len(idle)
        if n:
            split = {
                "sandbox_anon": _per_session(now, base, n, "sandboxes_anon"),
                "sandbox_kernel": _per_session(now, base, n, "sandboxes_kernel"),
                "server_cgroup": _per_session(now, base, n, "server_charged"),
                "page_cache": _per_session(now, base, n, "sandboxes_file", "server_file"),
            }
            if "processes" in now and "processes" in base:
                split["processes"] = round((now["processes"] - base["processes"]) / n, 2)
            out["per_session_breakdown"] = split
        final = out["checkpoints"][-1] if out["checkpoints"] else {}
        for key in ("per_session_mib", "attributable_per_session_mib", "sandboxes_per_session_mib"):
            out[key] = final.get(key)
        out["server_memory_mib"] = {
            "rss": final.get("server_rss_mib"),
            "hwm": final.get("server_hwm_mib"),
        }
    finally:
        ctx.say(f"deleting {len(idle) + 1} sessions")
        with ctx.timed() as t, ThreadPoolExecutor(max_workers=8) as pool:
            everyone = [*idle, *(ctx.live - set(idle))]
            list(pool.map(lambda sid: ctx.delete_session(probe_client, sid), everyone))
        out["delete_all_s"] = round(t[0] / 1000, 1)
        for client in [*clients, probe_client]:
            client.close()
    return out


def _start_batch(
    ctx: Context,
    pool: ThreadPoolExecutor,
    clients: list[Bastion],
    count: int,
    idle: list[str],
) -> tuple[list[float], str | None]:
    """Start ``count`` sessions, ``START_WORKERS`` at a time; their start times in ms."""

    def one(i: int) -> float:
        client = clients[i % len(clients)]
        start = time.perf_counter()
        sid = ctx.new_session(client)
        elapsed = (time.perf_counter() - start) * 1000.0
        idle.append(sid)
        return elapsed

    futures: list[Future[float]] = [pool.submit(one, i) for i in range(count)]
    try:
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:  # Ctrl-C: start no more (those under way finish)
        for f in futures:
            f.cancel()
        raise
    for f in pending:
        f.cancel()
    wait(pending)
    times, error = [], None
    for f in futures:
        if f.cancelled():
            continue
        exc = f.exception()
        if exc is not None:
            error = error or f"{type(exc).__name__}: {exc}"
        else:
            times.append(f.result())
    return times, error


def _probe(client: Bastion, sid: str) -> list[float]:
    return time_ms(lambda: client.jobs.run_and_wait(sid, ["true"]), 5)


def _steady_used_memory() -> int:
    """The median of a few readings, 0.1 s apart (other processes come and go)."""
    readings = []
    for _ in range(5):
        readings.append(used_memory())
        time.sleep(0.1)
    return int(statistics.median(readings))


def _sandboxes_cgroup(ctx: Context) -> Path | None:
    """The memory cgroup that holds every sandbox of this server (``/bastion/<tag>``)."""
    tag = Path(ctx.server.state_root).name
    for path in (
        Path(f"/sys/fs/cgroup/memory/bastion/{tag}"),
        Path(f"/sys/fs/cgroup/bastion/{tag}"),
    ):
        if path.is_dir():
            return path
    return None


def _processes(ctx: Context) -> int | None:
    tag = Path(ctx.server.state_root).name
    for path in (
        f"/sys/fs/cgroup/pids/bastion/{tag}/pids.current",
        f"/sys/fs/cgroup/bastion/{tag}/pids.current",
    ):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def _memory(ctx: Context) -> dict[str, int]:
    """One reading: the host's used memory, both cgroups' charges, the processes."""
    out = {"host_used": _steady_used_memory()}
    sandboxes = _sandboxes_cgroup(ctx)
    for prefix, path in (("sandboxes", sandboxes), ("server", ctx.server.cgroup)):
        charge = cgroup_memory(path) if path is not None else None
        for key, value in (charge or {}).items():
            out[f"{prefix}_{key}"] = value
    processes = _processes(ctx)
    if processes is not None:
        out["processes"] = processes
    return out


def _per_session(now: dict[str, int], base: dict[str, int], n: int, *keys: str) -> float | None:
    """Growth of the sum of ``keys`` since ``base``, per session, in MiB."""
    if not all(k in now and k in base for k in keys):
        return None
    return round(sum(now[k] - base[k] for k in keys) / n / MIB, 2)
