"""Ending every process of a running sandbox at once, from the host (blocking).

The sandbox's first process (its agent) is pid 1 of the sandbox's pid namespace:
when it dies the kernel kills every other process of the namespace and its exit
completes only once they are all gone.  So one SIGKILL through a pidfd, then a poll
on that pidfd, ends the whole sandbox, with no process list to walk and no sleep
between looks (``crun delete --force`` does the same with a kill and a polling wait:
about 15 ms here, against under 1 ms).
"""

from __future__ import annotations

import os
import select
import signal

from bastion_server.runtime.cgroups import Cgroup


def _is_namespace_init(pid: int) -> bool:
    """Whether host pid ``pid`` is pid 1 of a pid namespace of its own."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        pass
    return False


def _members(cgroup: Cgroup) -> list[int]:
    try:
        text = (cgroup.dir("pids") / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(pid) for pid in text.split()]


def sandbox_init(cgroup: Cgroup) -> int | None:
    """The host pid of the sandbox's first process, from its cgroup (its jobs are in
    cgroups below); None if it no longer runs."""
    return next((pid for pid in _members(cgroup) if _is_namespace_init(pid)), None)


def kill_sandbox(cgroup: Cgroup, timeout: float = 10.0) -> bool:
    """Kill every process of the sandbox whose cgroup is ``cgroup`` and return once
    they are gone; False if it had no first process left (nothing was killed).
    Raises TimeoutError if they are not all gone within ``timeout`` seconds."""
    pid = sandbox_init(cgroup)
    if pid is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # The pidfd holds the pid: looked at again now, it cannot be another process's.
        if pid not in _members(cgroup) or not _is_namespace_init(pid):
            return False
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it was ending: its exit is waited for below
        if not select.select([pidfd], [], [], timeout)[0]:
            raise TimeoutError(f"the sandbox's processes did not end within {timeout:g}s")
        return True
    finally:
        os.close(pidfd)
