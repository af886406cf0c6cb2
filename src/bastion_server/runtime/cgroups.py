"""Cgroups of a sandbox and of its jobs, on cgroup v1 (per controller) or v2 (unified).

The OCI runtime makes each sandbox's cgroup at ``cgroupsPath``; this module reads what
it used (:func:`read_usage`) and its OOM-kill counter, and makes a cgroup of a job's own
inside it (:class:`JobCgroup`): a memory and a pids limit that apply to the job's whole
tree and to nothing else of the session.  The job's tree is put there by the agent (the
server opens each ``cgroup.procs`` and hands the descriptor over with the job, see the
agent's protocol), so a job cgroup never needs a host pid.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
#: The controllers a job cgroup limits (v1 names; v2 has them all in one tree).
JOB_CONTROLLERS = ("memory", "pids")


@functools.cache
def is_v2(root: Path = ROOT) -> bool:
    """Whether ``root`` is a cgroup v2 (unified) mount.  Asked once per root: a host's
    cgroup layout does not change under a running server, and every job asks."""
    return (root / "cgroup.controllers").exists()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_key(path: Path, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed file (``memory.stat``, ``memory.events``)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass(frozen=True)
class CgroupUsage:
    cpu_seconds: float | None
    memory_bytes: int | None
    processes: int | None


class Cgroup:
    """One cgroup path (as in ``cgroupsPath``), in every hierarchy it lives in."""

    def __init__(self, path: str, root: Path = ROOT) -> None:
        self.path = path.strip("/")
        self.root = root
        self.v2 = is_v2(root)

    def dir(self, controller: str) -> Path:
        return self.root / self.path if self.v2 else self.root / controller / self.path

    def usage(self) -> CgroupUsage:
        if self.v2:
            usec = _read_key(self.dir("cpu") / "cpu.stat", "usage_usec")
            return CgroupUsage(
                cpu_seconds=usec / 1e6 if usec is not None else None,
                memory_bytes=_read_int(self.dir("memory") / "memory.current"),
                processes=_read_int(self.dir("pids") / "pids.current"),
            )
        ns = _read_int(self.dir("cpuacct") / "cpuacct.usage")
        return CgroupUsage(
            cpu_seconds=ns / 1e9 if ns is not None else None,
            memory_bytes=_read_int(self.dir("memory") / "memory.usage_in_bytes"),
            processes=_read_int(self.dir("pids") / "pids.current"),
        )

    def oom_kills(self) -> int | None:
        """How many processes the kernel's OOM killer has killed here (None: unknown)."""
        if self.v2:
            return _read_key(self.dir("memory") / "memory.events", "oom_kill")
        return _read_key(self.dir("memory") / "memory.oom_control", "oom_kill")

    def peak_memory(self) -> int | None:
        if self.v2:
            return _read_int(self.dir("memory") / "memory.peak")
        return _read_int(self.dir("memory") / "memory.max_usage_in_bytes")

    def pids_refused(self) -> int | None:
        """How many forks the pids limit refused."""
        return _read_key(self.dir("pids") / "pids.events", "max")


class JobCgroup(Cgroup):
    """A job's own cgroup inside its sandbox's: made, limited, then removed."""

    def __init__(self, sandbox: Cgroup, name: str) -> None:
        super().__init__(f"{sandbox.path}/{name}", sandbox.root)
        self._made: list[Path] = []

    def create(self, *, memory_bytes: int | None, pids: int | None) -> list[int]:
        """Make the cgroup with its limits (blocking); returns the open ``cgroup.procs``
        descriptors (write-only) the agent puts the job's tree in."""
        fds: list[int] = []
        try:
            controllers = ("unified",) if self.v2 else JOB_CONTROLLERS
            for controller in controllers:
                path = self.dir(controller)
                path.mkdir()
                self._made.append(path)
            if memory_bytes is not None:
                self._limit_memory(memory_bytes)
            if pids is not None:
                _write(self.dir("pids") / "pids.max", str(pids))
            for path in self._made:
                fds.append(os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
            return fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.remove()
            raise

    def _limit_memory(self, limit: int) -> None:
        memory = self.dir("memory")
        if self.v2:
            _write(memory / "memory.max", str(limit))
            with contextlib.suppress(OSError):
                _write(memory / "memory.swap.max", "0")
            return
        _write(memory / "memory.limit_in_bytes", str(limit))
        # With swap accounting, memory+swap is capped too (else a job would swap).
        with contextlib.suppress(OSError):
            _write(memory / "memory.memsw.limit_in_bytes", str(limit))

    def remove(self) -> None:
        """Remove the cgroup (blocking); one still holding processes (what the job left
        running in the background) stays, and goes with the sandbox's."""
        for path in reversed(self._made):
            with contextlib.suppress(OSError):
                path.rmdir()
        self._made = [p for p in self._made if p.exists()]

    def exists(self) -> bool:
        """Whether any directory of the cgroup is still there (after :meth:`remove`)."""
        return any(path.exists() for path in self._made)

    @classmethod
    def existing(cls, sandbox: Cgroup, name: str) -> JobCgroup | None:
        """The job cgroup ``name`` made earlier (by a server since restarted), to read
        and remove; None if there is none."""
        cgroup = cls(sandbox, name)
        controllers = ("unified",) if cgroup.v2 else JOB_CONTROLLERS
        cgroup._made = [p for p in map(cgroup.dir, controllers) if p.is_dir()]
        return cgroup if cgroup._made else None


def remove_job_cgroups(sandbox: Cgroup) -> None:
    """Remove every job cgroup left inside a sandbox's (blocking; once its processes
    are gone), so the sandbox's own can be removed."""
    controllers = ("unified",) if sandbox.v2 else JOB_CONTROLLERS
    for controller in controllers:
        parent = sandbox.dir(controller)
        with contextlib.suppress(OSError):
            for child in parent.iterdir():
                if child.is_dir() and child.name.startswith("job_"):
                    with contextlib.suppress(OSError):
                        child.rmdir()
