"""Load: many session creates at once, then thousands of jobs from many callers at once.

Three phases against the one server, each caller a thread with a ``Bastion`` client
of its own (one connection each, like independent users) and retries off
(``max_retries=0``), so that every failure is counted instead of hidden by a retry:

1. **creates**: 100 ``sessions.create()`` + ``sessions.start()`` released together
   (20 with ``--quick``); each one's create, start and create+start latency.  The warm
   pool holds two sandboxes, so nearly all of them start a sandbox on the spot.
2. **jobs**: 3000 ``jobs.run_and_wait(sid, ["true"])`` by 64 concurrent callers
   (500 by 16 with ``--quick``), spread round-robin over the sessions of phase 1;
   each job's latency and the aggregate jobs per second.
3. **deletes**: every session deleted at once; each delete's latency.

Failures are counted by type (the SDK's exception class and the server's error code).
The server's RSS is read before, sampled every 50 ms during the phases, and read at
the end; its peak RSS (VmHWM) is reset first where the kernel allows (``clear_refs``),
so the peak is this test's, not the run's so far.

Why threads and not one ``AsyncBastion``: httpx's async connection pool checks every
pooled connection on each request, so with 64 connections in one pool the client
process, not the server, was the limit (41 jobs/s; the client used twice the
server's CPU).  A client per thread has a pool of one.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from bastion import Bastion, BastionError
from bench.context import Context
from bench.machine import host_cpu_seconds, process_cpu_seconds, process_memory
from bench.stats import summarize

MIB = 1024 * 1024
#: (concurrent creates, jobs, concurrent job callers): full run, then --quick.
FULL = (100, 3000, 64)
QUICK = (20, 500, 16)
RSS_SAMPLE_S = 0.05

T = TypeVar("T")


def run(ctx: Context) -> dict[str, Any]:
    creates, jobs, concurrency = QUICK if ctx.quick else FULL
    pid = ctx.server.pid
    out: dict[str, Any] = {"creates": creates, "jobs": jobs, "concurrency": concurrency}
    errors = _Errors()
    rss_before = process_memory(pid)["VmRSS"]
    hwm_reset = _reset_peak_rss(pid)
    sampler = _RssSampler(pid)
    sampler.start()
    clients = [
        Bastion(base_url=ctx.server.url, timeout=300.0, max_retries=0)
        for _ in range(max(creates, concurrency))
    ]
    try:
        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            ctx.say(f"{creates} session creates at once")
            sids, out["create_phase"] = _create_phase(ctx, pool, clients[:creates], errors)
            if sids:
                ctx.say(
                    f"{jobs} jobs by {concurrency} concurrent callers over {len(sids)} sessions"
                )
                out["job_phase"] = _job_phase(pool, clients[:concurrency], sids, jobs, errors, pid)
            ctx.say(f"{len(sids)} session deletes at once")
            out["delete_phase"] = _delete_phase(ctx, pool, clients, sids, errors)
    finally:
        for client in clients:
            client.close()
        sampler.stop()
    end = process_memory(pid)
    out["errors"] = dict(errors.counts.most_common())
    out["error_examples"] = errors.examples
    out["error_count"] = sum(errors.counts.values())
    out["server_rss_mib"] = {
        "before": _mib(rss_before),
        "peak": _mib(max(sampler.peak, end["VmHWM"] if hwm_reset else 0)),
        "peak_source": "VmHWM since reset" if hwm_reset else "sampled every 50 ms",
        "end": _mib(end["VmRSS"]),
    }
    return out


def _together(
    pool: ThreadPoolExecutor, count: int, fn: Callable[[int], T]
) -> tuple[list[T], float]:
    """``fn(0) .. fn(count - 1)`` in ``count`` threads released at the same moment;
    their results and the seconds from the release to the last one's end."""
    barrier = threading.Barrier(count + 1)

    def released(i: int) -> T:
        barrier.wait()
        return fn(i)

    futures = [pool.submit(released, i) for i in range(count)]
    barrier.wait()
    began = time.perf_counter()
    results = [f.result() for f in futures]
    return results, time.perf_counter() - began


def _create_phase(
    ctx: Context, pool: ThreadPoolExecutor, clients: list[Bastion], errors: _Errors
) -> tuple[list[str], dict[str, Any]]:
    create_ms: list[float] = []
    start_ms: list[float] = []
    both_ms: list[float] = []

    def one(i: int) -> str | None:
        client = clients[i]
        began = time.perf_counter()
        created = _attempt(client.sessions.create, errors, "create")
        if created is None:
            return None
        sid = created["session_id"]
        ctx.remember(sid)
        made = time.perf_counter()
        create_ms.append((made - began) * 1000.0)
        if _attempt(lambda: client.sessions.start(sid), errors, "start") is None:
            return sid  # created, not started: deleted with the rest, runs no jobs
        done = time.perf_counter()
        start_ms.append((done - made) * 1000.0)
        both_ms.append((done - began) * 1000.0)
        return sid

    results, wall = _together(pool, len(clients), one)
    sids = [sid for sid in results if sid is not None]
    return sids, {
        "wall_s": round(wall, 3),
        "created": len(create_ms),
        "started": len(both_ms),
        "create": summarize(create_ms, "ms"),
        "start": summarize(start_ms, "ms"),
        "create_start": summarize(both_ms, "ms"),
    }


def _job_phase(
    pool: ThreadPoolExecutor,
    clients: list[Bastion],
    sids: list[str],
    jobs: int,
    errors: _Errors,
    server_pid: int,
) -> dict[str, Any]:
    latencies: list[float] = []
    numbers = itertools.count()  # next() on it is atomic: each job number is taken once

    def caller(i: int) -> None:
        client = clients[i]
        while (n := next(numbers)) < jobs:
            sid = sids[n % len(sids)]
            began = time.perf_counter()
            # A job that does not succeed raises (JobFailedError): counted as an error.
            if _attempt(partial(client.jobs.run_and_wait, sid, ["true"]), errors, "job"):
                latencies.append((time.perf_counter() - began) * 1000.0)

    before = _cpu_seconds(server_pid)
    _, wall = _together(pool, len(clients), caller)
    used = [after - b for b, after in zip(before, _cpu_seconds(server_pid), strict=True)]
    return {
        "wall_s": round(wall, 3),
        "succeeded": len(latencies),
        "jobs_per_s": round(len(latencies) / wall, 1) if wall else None,
        "latency": summarize(latencies, "ms"),
        # Where the phase's CPU went: this (client) process, the server, the whole host
        # (other work on the machine included), in seconds.
        "cpu_s": dict(zip(("client", "server", "host"), (round(u, 2) for u in used), strict=True)),
    }


def _cpu_seconds(server_pid: int) -> tuple[float, float, float]:
    return time.process_time(), process_cpu_seconds(server_pid), host_cpu_seconds()


def _delete_phase(
    ctx: Context, pool: ThreadPoolExecutor, clients: list[Bastion], sids: list[str], errors: _Errors
) -> dict[str, Any]:
    delete_ms: list[float] = []

    def one(i: int) -> None:
        sid = sids[i]
        began = time.perf_counter()
        if _attempt(lambda: clients[i].sessions.delete(sid), errors, "delete") is not None:
            delete_ms.append((time.perf_counter() - began) * 1000.0)
            ctx.forget(sid)

    _, wall = _together(pool, len(sids), one)
    return {
        "wall_s": round(wall, 3),
        "deleted": len(delete_ms),
        "delete": summarize(delete_ms, "ms"),
    }


class _Errors:
    """Failures by kind (``"<phase>: <exception class> (<error code>)"``): how many, and
    the first message of each; safe to add to from many threads."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, what: str, exc: Exception) -> None:
        code = exc.code if isinstance(exc, BastionError) else None
        kind = f"{what}: {type(exc).__name__}" + (f" ({code})" if code else "")
        with self._lock:
            self.counts[kind] += 1
            self.examples.setdefault(kind, str(exc)[:300])


def _attempt(call: Callable[[], T], errors: _Errors, what: str) -> T | None:
    """``call()``; on a failure, count it under ``what`` and return None."""
    try:
        return call()
    except Exception as exc:  # every failure is a finding, whatever raised it
        errors.add(what, exc)
    return None


def _reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0, as root)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class _RssSampler:
    """The highest VmRSS of a process seen by a thread that reads it every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, process_memory(self.pid)["VmRSS"])
            self._stop.wait(RSS_SAMPLE_S)


def _mib(n: int) -> float:
    return round(n / MIB, 1)
