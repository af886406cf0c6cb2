# ruff: noqa: F811 - the sandbox fixture is imported from test_cgroups by name
"""A job taken up again by a restarted server still gets its OOM verdict.

On the host's real cgroup filesystem (root only), as tests/unit/test_cgroups.py: the
server that started the job is gone; what the next one has is the job's id (its
cgroup is named after it) and the count the agent kept with the job.
"""

from __future__ import annotations

import asyncio
import os
import sys

from tests.unit.test_cgroups import _place, pytestmark, sandbox  # noqa: F401

from bastion_server.runtime import job_limits
from bastion_server.runtime.base import ExitEvent, JobLimits
from bastion_server.runtime.cgroups import Cgroup, JobCgroup

KILLED = ExitEvent(exit_code=137, signal=9)
HOG = [sys.executable, "-c", "b = bytearray(256 << 20)"]


def test_a_job_cgroup_is_found_by_the_job_id_and_judged(sandbox: Cgroup) -> None:
    name = job_limits.cgroup_name("job_0123abcd")
    assert name == "job_job_0123abcd"
    fds, _ = asyncio.run(job_limits.prepare(sandbox, name, JobLimits(memory_mb=32)))
    try:
        proc = _place(fds, HOG)
    finally:
        for fd in fds:
            os.close(fd)
    assert proc.wait(timeout=60) == -9
    # the server that made it restarted: the next one knows the job's id only
    hook = job_limits.reattached(sandbox, name)
    event = asyncio.run(hook(KILLED, None))
    assert event.oom_killed
    assert JobCgroup.existing(sandbox, name) is None  # read, then removed


def test_without_a_cgroup_the_kept_count_judges(sandbox: Cgroup) -> None:
    limit = "memory.max" if sandbox.v2 else "memory.limit_in_bytes"
    (sandbox.dir("memory") / limit).write_text(str(32 << 20))
    before = sandbox.oom_kills()
    assert before is not None
    fd = os.open(sandbox.dir("memory") / "cgroup.procs", os.O_WRONLY)
    try:
        proc = _place([fd], HOG)
    finally:
        os.close(fd)
    assert proc.wait(timeout=60) == -9
    hook = job_limits.reattached(sandbox, job_limits.cgroup_name("job_nocgroup"))
    assert asyncio.run(hook(KILLED, before)).oom_killed
    # a job that started after that kill was not its victim
    assert not asyncio.run(hook(KILLED, sandbox.oom_kills())).oom_killed
    # and one the agent kept no count for is not judged an OOM kill
    assert not asyncio.run(hook(KILLED, None)).oom_killed


def test_a_started_job_hands_its_count_to_the_agent(sandbox: Cgroup) -> None:
    _, hook = asyncio.run(job_limits.prepare(sandbox, "job_x", JobLimits()))
    assert hook.oom_kills_before == sandbox.oom_kills()
    fds, own = asyncio.run(job_limits.prepare(sandbox, "job_y", JobLimits(pids=8)))
    for fd in fds:
        os.close(fd)
    assert own.oom_kills_before is None  # its own cgroup counts
    asyncio.run(own(ExitEvent(exit_code=0)))
