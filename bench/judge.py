"""An online judge's workload: one C program, 100 inputs, each run with its own limits.

The image has no C compiler, so the submission is compiled once on the host (``gcc
-O2 -static``, the judge's own build step) and the binary uploaded.  Then 100
submissions, each its own input on stdin (given inline in the run request) and its
own limits (``memory_mb``, ``cpu_seconds``, ``pids``, ``output_bytes``, varied from
one to the next), are judged with ``AsyncBastion``:

* ``warm``: all in one running session, 4 at a time (one sandbox, one job cgroup per
  submission: a submission's limits never reach the next one's);
* ``fresh``: each in a session of its own (create, start, upload, run, delete), 8
  at a time.

Every answer is checked (the program's output for its input), and its verdict must be
``completed`` with usage reported.  Submissions per second = 100 / wall time.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bastion import AsyncBastion
from bench.context import Context

SUBMISSIONS = 100
#: Reads n, prints the number of primes below n (a sieve: real CPU and memory use).
PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    long n;
    if (scanf("%ld", &n) != 1 || n < 2) { puts("0"); return 0; }
    char *composite = calloc((size_t)n, 1);
    if (!composite) return 3;
    long count = 0;
    for (long i = 2; i < n; i++) {
        if (composite[i]) continue;
        count++;
        for (long j = i * i; j < n; j += i) composite[j] = 1;
    }
    printf("%ld\n", count);
    return 0;
}
"""
BINARY = "/home/user/solution"


def _primes_below(n: int) -> int:
    if n < 2:
        return 0
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, n, i)))
    return sum(sieve)


def _cases() -> list[tuple[int, dict[str, int]]]:
    """100 inputs, each with limits of its own (all generous enough to pass)."""
    cases = []
    for i in range(SUBMISSIONS):
        n = 1000 + (i * 7919) % 200_000
        limits = {
            "memory_mb": 16 + (i % 4) * 16,
            "cpu_seconds": 1 + i % 3,
            "pids": 4 + i % 8,
            "output_bytes": 4096,
        }
        cases.append((n, limits))
    return cases


def compile_program(scratch: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("the judge benchmark compiles its program with the host's gcc")
    source = scratch / "solution.c"
    binary = scratch / "solution"
    source.write_text(PROGRAM)
    subprocess.run([gcc, "-O2", "-static", "-o", str(binary), str(source)], check=True)
    return binary


async def _judge(client: AsyncBastion, sid: str, n: int, limits: dict[str, int]) -> None:
    job = await client.jobs.run_and_wait(
        sid, [BINARY], stdin=f"{n}\n", limits=limits, timeout=30, wait_timeout=60
    )
    output = job["output"]
    if output is None or output["console_output"] != f"{_primes_below(n)}\n":
        raise RuntimeError(f"wrong answer for {n}: {job}")
    if job.get("usage") is None:
        raise RuntimeError(f"no usage reported: {job}")


async def _upload(client: AsyncBastion, sid: str, binary: bytes) -> None:
    await client.files.upload(sid, binary, BINARY, mode=0o755)


async def _warm(ctx: Context, binary: bytes, concurrency: int) -> float:
    async with AsyncBastion(base_url=ctx.server.url, timeout=120) as client:
        sid = (await client.sessions.create())["session_id"]
        ctx.remember(sid)
        try:
            await client.sessions.start(sid)
            await _upload(client, sid, binary)
            await _judge(client, sid, 10, {"memory_mb": 16})  # warm-up
            gate = asyncio.Semaphore(concurrency)

            async def one(n: int, limits: dict[str, int]) -> None:
                async with gate:
                    await _judge(client, sid, n, limits)

            start = time.perf_counter()
            await asyncio.gather(*(one(n, limits) for n, limits in _cases()))
            return time.perf_counter() - start
        finally:
            await client.sessions.delete(sid)
            ctx.forget(sid)


async def _fresh(ctx: Context, binary: bytes, concurrency: int) -> float:
    async with AsyncBastion(base_url=ctx.server.url, timeout=120) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(n: int, limits: dict[str, int]) -> None:
            async with gate:
                sid = (await client.sessions.create())["session_id"]
                ctx.remember(sid)
                try:
                    await client.sessions.start(sid)
                    await _upload(client, sid, binary)
                    await _judge(client, sid, n, limits)
                finally:
                    await client.sessions.delete(sid)
                    ctx.forget(sid)

        start = time.perf_counter()
        await asyncio.gather(*(one(n, limits) for n, limits in _cases()))
        return time.perf_counter() - start


def run(ctx: Context) -> dict[str, Any]:
    binary = compile_program(ctx.scratch).read_bytes()
    ctx.say(f"solution compiled on the host ({len(binary) // 1024} KiB static binary)")
    out: dict[str, Any] = {"submissions": SUBMISSIONS, "compiled_on": "host (gcc -static)"}
    warm = asyncio.run(_warm(ctx, binary, concurrency=4))
    out["warm"] = {
        "seconds": round(warm, 3),
        "submissions_per_s": round(SUBMISSIONS / warm, 1),
        "concurrency": 4,
    }
    ctx.say(f"warm session: {SUBMISSIONS / warm:.1f} submissions/s")
    fresh = asyncio.run(_fresh(ctx, binary, concurrency=8))
    out["fresh"] = {
        "seconds": round(fresh, 3),
        "submissions_per_s": round(SUBMISSIONS / fresh, 1),
        "concurrency": 8,
    }
    ctx.say(f"fresh sessions: {SUBMISSIONS / fresh:.1f} submissions/s")
    return out
