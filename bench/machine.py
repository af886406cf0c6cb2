"""What the benchmark ran on: the machine, the code, and the host's memory and CPU."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def _first(path: str, prefix: str, sep: str = ":") -> str | None:
    """The value of the first line of ``path`` that starts with ``prefix``."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix) and sep in line:
                    return line.split(sep, 1)[1].strip()
    except OSError:
        pass
    return None


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def used_memory() -> int:
    """The host's used memory in bytes: MemTotal - MemAvailable."""
    info = meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0]) * 1024
    return out


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its waited-for children), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields after the command: state is [0]; utime, stime, cutime, cstime are [11:15].
    return sum(int(x) for x in fields[11:15]) / _TICKS


def host_cpu_seconds() -> float:
    """CPU time the whole host spent busy (everything but idle and iowait), in seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICKS


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(*argv: str) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def machine_info() -> dict[str, Any]:
    os_release = _first("/etc/os-release", "PRETTY_NAME=", sep="=")
    return {
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "memory_bytes": meminfo()["MemTotal"],
        "kernel": platform.release(),
        "os": os_release.strip('"') if os_release else None,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "crun": _version("crun", "--version"),
        "podman": _version("podman", "--version"),
        "loadavg_at_start": loadavg(),
        "hostname": platform.node(),
    }


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        # Uncommitted changes to tracked files: the numbers are of the working tree.
        "dirty": bool(status) if status is not None else None,
    }


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def cgroup_memory(path: Path) -> dict[str, int] | None:
    """A memory cgroup's charge (cgroup v1 or v2), in bytes: ``usage``; ``file`` (page
    cache, reclaimable); ``anon``; ``kernel`` where the kernel tells; and ``charged`` =
    usage - file, what the cgroup holds that cannot simply be dropped."""
    v1 = (path / "memory.usage_in_bytes").exists()
    try:
        usage = int((path / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
        stat: dict[str, int] = {}
        for line in (path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                stat[key] = int(value)
    except (OSError, ValueError):
        return None
    if v1:
        file = stat.get("total_active_file", 0) + stat.get("total_inactive_file", 0)
        out = {"usage": usage, "file": file, "anon": stat.get("total_rss", 0)}
        try:
            out["kernel"] = int((path / "memory.kmem.usage_in_bytes").read_text())
        except (OSError, ValueError):
            pass
    else:
        file = stat.get("file", 0)
        out = {"usage": usage, "file": file, "anon": stat.get("anon", 0)}
        if "kernel" in stat:
            out["kernel"] = stat["kernel"]
    out["charged"] = usage - file
    return out
