"""Job cgroups on the host's real cgroup filesystem: limits, placement, OOM, removal.

Root only.  Each test makes a parent cgroup of its own (standing in for a sandbox's),
puts a child process (never the test itself) in a job cgroup inside it, and removes
both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from bastion_server.runtime.cgroups import ROOT, Cgroup, JobCgroup, remove_job_cgroups

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are made by root"),
    pytest.mark.skipif(
        not (ROOT / "memory").is_dir() and not (ROOT / "cgroup.controllers").exists(),
        reason="no memory cgroup controller on this host",
    ),
]


@pytest.fixture
def sandbox() -> Iterator[Cgroup]:
    cgroup = Cgroup(f"bastion-test/{uuid.uuid4().hex[:12]}")
    made = []
    for controller in ("memory", "pids") if not cgroup.v2 else ("unified",):
        path = cgroup.dir(controller)
        path.mkdir(parents=True)
        made.append(path)
    yield cgroup
    for _ in range(100):  # killed processes leave their cgroup once reaped
        remove_job_cgroups(cgroup)
        if not any(p.is_dir() for d in made for p in d.iterdir()):
            break
        time.sleep(0.02)
    for path in made:
        path.rmdir()


def _place(fds: list[int], argv: list[str]) -> subprocess.Popen[bytes]:
    """Start argv with its first act being to join the job cgroup (as the agent does)."""

    def join() -> None:
        for fd in fds:
            os.write(fd, b"0")

    return subprocess.Popen(argv, preexec_fn=join, pass_fds=fds)


def test_limits_are_written_and_the_job_is_placed(sandbox: Cgroup) -> None:
    job = JobCgroup(sandbox, "job_limits")
    fds = job.create(memory_bytes=64 << 20, pids=16)
    try:
        proc = _place(fds, ["sleep", "5"])
    finally:
        for fd in fds:
            os.close(fd)
    try:
        procs = (job.dir("pids") / "cgroup.procs").read_text().split()
        assert str(proc.pid) in procs
        assert (job.dir("pids") / "pids.max").read_text().strip() == "16"
        limit = "memory.max" if job.v2 else "memory.limit_in_bytes"
        assert int((job.dir("memory") / limit).read_text()) == 64 << 20
    finally:
        proc.kill()
        proc.wait()
    job.remove()
    assert not job.dir("memory").exists()


def test_the_oom_killer_is_seen(sandbox: Cgroup) -> None:
    job = JobCgroup(sandbox, "job_oom")
    fds = job.create(memory_bytes=32 << 20, pids=None)
    try:
        proc = _place(fds, [sys.executable, "-c", "b = bytearray(256 << 20)"])
    finally:
        for fd in fds:
            os.close(fd)
    assert proc.wait(timeout=60) == -9
    assert job.oom_kills() == 1
    peak = job.peak_memory()
    assert peak is not None and peak <= 33 << 20
    job.remove()


def test_the_pids_limit_holds_for_the_whole_tree(sandbox: Cgroup) -> None:
    job = JobCgroup(sandbox, "job_pids")
    fds = job.create(memory_bytes=None, pids=4)
    script = "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait"
    try:
        proc = _place(fds, ["sh", "-c", script])
    finally:
        for fd in fds:
            os.close(fd)
    proc.wait(timeout=30)
    left = [int(p) for p in (job.dir("pids") / "cgroup.procs").read_text().split()]
    for pid in left:  # the sleeps that did start
        os.kill(pid, 9)
    refused = job.pids_refused()
    assert refused is not None and refused >= 1
    assert len(left) <= 4


def test_a_job_cgroup_still_in_use_stays_until_the_sandbox_goes(sandbox: Cgroup) -> None:
    job = JobCgroup(sandbox, "job_busy")
    fds = job.create(memory_bytes=None, pids=8)
    try:
        proc = _place(fds, ["sleep", "30"])
    finally:
        for fd in fds:
            os.close(fd)
    job.remove()  # a process is still there: nothing removed, nothing raised
    assert job.dir("pids").exists()
    proc.kill()
    proc.wait()
    remove_job_cgroups(sandbox)
    assert not job.dir("pids").exists()
