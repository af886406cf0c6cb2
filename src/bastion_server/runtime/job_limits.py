"""A job's kernel limits and verdict facts on the host side: its cgroup and OOM count.

A job with a memory or pids limit gets a cgroup of its own inside its sandbox's
(:class:`~bastion_server.runtime.cgroups.JobCgroup`): the agent puts the job's whole
tree there before it runs.  When the job ends, its cgroup says whether the kernel's OOM
killer struck, whether a fork was refused, and its peak memory; then it is removed.

A job without a cgroup of its own can still be killed by the OOM killer at the
sandbox's memory limit.  The sandbox's OOM counter is then read before and after the
job: if it moved, the job is taken to be the victim.  That is a heuristic (another job
of the same session running at the same time may have been the one killed), the best
the host can tell without a cgroup per job; a job that must be judged exactly sets a
``memory_mb`` limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence

from bastion_server.runtime.agent_client import ExitHook
from bastion_server.runtime.base import ExitEvent, JobLimits, JobUsage
from bastion_server.runtime.cgroups import JOB_CONTROLLERS, Cgroup, JobCgroup, remove_job_cgroups

_MIB = 1024 * 1024
#: Removing a job's cgroup: tries, and the pause between two (about 0.1 s in all).
REMOVE_TRIES = 20
REMOVE_PAUSE = 0.005


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _with_peak(usage: JobUsage | None, peak: int | None) -> JobUsage | None:
    if usage is None or peak is None:
        return usage
    return dataclasses.replace(usage, peak_memory_bytes=peak)


async def prepare(sandbox: Cgroup, job_name: str, limits: JobLimits) -> tuple[list[int], ExitHook]:
    """The descriptors to send with the job's exec request, and the hook that completes
    its exit event (and releases its cgroup).  The caller owns the descriptors once the
    request is sent: close them then (the agent has its own copies)."""
    if not limits.needs_cgroup:
        # A read of one small cgroup file never waits on a disk: done inline, as a
        # thread hand-off would cost a job more than the read itself.
        before = sandbox.oom_kills()

        async def sandbox_verdict(event: ExitEvent) -> ExitEvent:
            after = sandbox.oom_kills()
            moved = before is not None and after is not None and after > before
            return dataclasses.replace(event, oom_killed=moved) if moved else event

        return [], sandbox_verdict

    cgroup = JobCgroup(sandbox, job_name)
    memory = limits.memory_mb * _MIB if limits.memory_mb is not None else None
    fds = await asyncio.to_thread(cgroup.create, memory_bytes=memory, pids=limits.pids)

    def read_and_remove() -> tuple[int | None, int | None, int | None]:
        facts = cgroup.oom_kills(), cgroup.pids_refused(), cgroup.peak_memory()
        # The job's supervisor is in the cgroup too, and leaves it only as it exits,
        # just after the exit event: give it a moment.  What the job left running in
        # the background keeps the cgroup, which then goes with the sandbox's.
        for _ in range(REMOVE_TRIES):
            cgroup.remove()
            if not cgroup.exists():
                break
            time.sleep(REMOVE_PAUSE)
        return facts

    async def job_verdict(event: ExitEvent) -> ExitEvent:
        oom, refused, peak = await asyncio.to_thread(read_and_remove)
        return dataclasses.replace(
            event,
            oom_killed=bool(oom),
            pids_refused=bool(refused),
            usage=_with_peak(event.usage, peak),
        )

    return fds, job_verdict


async def release_fds(fds: Sequence[int]) -> None:
    """Close the descriptors sent with an exec request.  Inline: closing a cgroup file
    never waits on a disk, and a thread hand-off per job would cost more (most jobs
    send none)."""
    _close(fds)


def remove_leftovers(sandbox: Cgroup) -> None:
    """After the sandbox's processes are gone (blocking): remove the job cgroups a job's
    background processes kept, and the sandbox's own cgroup if they kept it too (its
    runtime cannot remove a cgroup that still has children)."""
    controllers = ("unified",) if sandbox.v2 else JOB_CONTROLLERS
    if not any(sandbox.dir(c).is_dir() for c in controllers):
        return
    remove_job_cgroups(sandbox)
    for controller in controllers:
        with contextlib.suppress(OSError):
            sandbox.dir(controller).rmdir()
