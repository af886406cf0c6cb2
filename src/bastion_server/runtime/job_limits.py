"""A job's kernel limits and verdict facts on the host side: its cgroup and OOM count.

A job with a memory or pids limit gets a cgroup of its own inside its sandbox's
(:class:`~bastion_server.runtime.cgroups.JobCgroup`): the agent puts the job's whole
tree there before it runs.  When the job ends, its cgroup says whether the kernel's OOM
killer struck, whether a fork was refused, and its peak memory; then it is removed.

A job without a cgroup of its own can still be killed by the OOM killer at the
sandbox's memory limit.  The sandbox's OOM counter is then read before and after the
job (the count before is also kept by the agent with the job, so that a server
restarted meanwhile judges as well): if it moved, the job is taken to be the victim.
That is a heuristic (another job of the same session running at the same time may
have been the one killed), the best the host can tell without a cgroup per job; a job
that must be judged exactly sets a ``memory_mb`` limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
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


def cgroup_name(job_id: str | None) -> str:
    """The name of a job's own cgroup: after its id, so that a restarted server taking
    the job up again finds it (else a fresh random name)."""
    return f"job_{job_id}" if job_id is not None else f"job_{secrets.token_hex(6)}"


class SandboxVerdict:
    """The exit hook of a job without a cgroup of its own: an OOM kill if the sandbox's
    counter moved while it ran (from ``before``, or the count the agent kept)."""

    def __init__(self, sandbox: Cgroup, before: int | None) -> None:
        self.sandbox = sandbox
        self.oom_kills_before = before

    async def __call__(self, event: ExitEvent, kept: int | None = None) -> ExitEvent:
        start = self.oom_kills_before if self.oom_kills_before is not None else kept
        after = self.sandbox.oom_kills()
        moved = start is not None and after is not None and after > start
        return dataclasses.replace(event, oom_killed=moved) if moved else event


class JobCgroupVerdict:
    """The exit hook of a job with a cgroup of its own: its OOM kills, refused forks
    and peak memory, read from the cgroup, which is then removed."""

    def __init__(self, cgroup: JobCgroup) -> None:
        self.cgroup = cgroup
        self.oom_kills_before: int | None = None  # its own cgroup counts

    def _read_and_remove(self) -> tuple[int | None, int | None, int | None]:
        cgroup = self.cgroup
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

    async def __call__(self, event: ExitEvent, kept: int | None = None) -> ExitEvent:
        oom, refused, peak = await asyncio.to_thread(self._read_and_remove)
        return dataclasses.replace(
            event,
            oom_killed=bool(oom),
            pids_refused=bool(refused),
            usage=_with_peak(event.usage, peak),
        )


async def prepare(sandbox: Cgroup, job_name: str, limits: JobLimits) -> tuple[list[int], ExitHook]:
    """The descriptors to send with the job's exec request, and the hook that completes
    its exit event (and releases its cgroup ``job_name``, see :func:`cgroup_name`, if
    its limits need one).  The caller owns the descriptors once the request is sent:
    close them then (the agent has its own copies)."""
    if not limits.needs_cgroup:
        # A read of one small cgroup file never waits on a disk: done inline, as a
        # thread hand-off would cost a job more than the read itself.
        return [], SandboxVerdict(sandbox, sandbox.oom_kills())
    cgroup = JobCgroup(sandbox, job_name)
    memory = limits.memory_mb * _MIB if limits.memory_mb is not None else None
    fds = await asyncio.to_thread(cgroup.create, memory_bytes=memory, pids=limits.pids)
    return fds, JobCgroupVerdict(cgroup)


def reattached(sandbox: Cgroup, job_name: str) -> ExitHook:
    """The exit hook of a job a restarted server takes up again: the verdict
    :func:`prepare`'s would give, from the job's own cgroup if it has one (found by
    its name), else from the sandbox's OOM count against the one the agent kept from
    the job's start."""
    cgroup = JobCgroup.existing(sandbox, job_name)
    if cgroup is not None:
        return JobCgroupVerdict(cgroup)
    return SandboxVerdict(sandbox, None)


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
