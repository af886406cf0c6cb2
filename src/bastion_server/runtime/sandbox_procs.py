"""A running sandbox's processes, read from the host (blocking: call in a thread).

Every process of a sandbox is in its cgroup or in a job cgroup below it, so the pids
are those of ``cgroup.procs`` of the sandbox's pids cgroup and every cgroup under it.
``/proc/<pid>/status`` gives each one's pid inside the sandbox (the last ``NSpid``),
its parent (a host pid, mapped through the same table) and its uid (a host uid of the
session's id range, mapped back to the sandbox's); ``/proc/<pid>/stat`` its CPU time.
A process that exits while it is read is left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from bastion_server.runtime.base import SandboxProcess
from bastion_server.runtime.cgroups import Cgroup
from bastion_server.runtime.idmap import RANGE_SIZE, IdRange

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _host_pids(cgroup: Cgroup) -> list[int]:
    pids: set[int] = set()
    for directory, _, _ in os.walk(cgroup.dir("pids")):
        try:
            text = (Path(directory) / "cgroup.procs").read_text()
        except OSError:
            continue
        pids.update(int(line) for line in text.split())
    return sorted(pids)


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def _cpu_and_memory(pid: int) -> tuple[float, int]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 (utime, stime) of proc(5); after the name they start at 11.
    ticks = int(after_name[11]) + int(after_name[12])
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return ticks / _CLOCK_TICKS, rss_pages * _PAGE


def _command(pid: int, fallback: str) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    if not raw:
        return [f"[{fallback}]"]  # a kernel-style name: a zombie or an exec under way
    return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")]


def list_processes(cgroup: Cgroup, ids: IdRange, users: dict[int, str]) -> list[SandboxProcess]:
    """Every process of the sandbox whose cgroup is ``cgroup``, by its sandbox pid;
    ``users`` names uids inside the sandbox ("root", "user")."""
    found: list[tuple[int, int, SandboxProcess]] = []
    for host_pid in _host_pids(cgroup):
        try:
            status = _status(host_pid)
            cpu, memory = _cpu_and_memory(host_pid)
            command = _command(host_pid, status.get("Name", "?"))
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
        uid = int(status["Uid"].split()[0]) - ids.base
        found.append(
            (
                host_pid,
                int(status["PPid"]),
                SandboxProcess(
                    pid=int(status["NSpid"].split()[-1]),
                    ppid=0,
                    user=users.get(uid, str(uid)) if 0 <= uid < RANGE_SIZE else "?",
                    command=command,
                    cpu_seconds=cpu,
                    memory_bytes=memory,
                ),
            )
        )
    in_sandbox = {host: proc.pid for host, _, proc in found}
    return [
        SandboxProcess(
            pid=proc.pid,
            ppid=in_sandbox.get(host_ppid, 0),
            user=proc.user,
            command=proc.command,
            cpu_seconds=proc.cpu_seconds,
            memory_bytes=proc.memory_bytes,
        )
        for _, host_ppid, proc in sorted(found, key=lambda f: f[2].pid)
    ]
