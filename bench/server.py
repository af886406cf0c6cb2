"""A real ``bastion serve`` for the benchmarks, started and torn down like the tests do.

The server gets a free loopback port and a data directory of its own under a mode-0711
parent in /var/tmp (sandboxes' unprivileged root must be able to walk down to it).
:meth:`BenchServer.teardown` deletes every session through the API, stops the server,
then removes whatever a crash could have left (containers, mounts, cgroups) and the
directory itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bastion_server.runtime import host
from bastion_server.runtime.oci import OciRuntime
from bastion_server.testing import ServerProcess


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = str(root.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


class BenchServer(ServerProcess):
    """One ``bastion serve`` subprocess with a data directory of its own, in a memory
    cgroup of its own, torn down without leaving anything behind."""

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        self.parent = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/var/tmp"))
        self.parent.chmod(0o711)
        super().__init__(self.parent / "data", extra_args=extra_args, own_process_group=True)
        self.scratch = self.parent / "scratch"  # the benchmark's own files (uploads ...)
        self.scratch.mkdir(mode=0o700)
        #: A memory cgroup of the server's own: what it and the kernel work it causes
        #: (mounts, loop devices, page cache) cost, apart from every other process.
        self.cgroup: Path | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server is not running")
        return self.proc.pid

    @property
    def state_root(self) -> str:
        return OciRuntime.state_root_for(self.data_dir)

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        assert self.proc is not None
        self.cgroup = _enter_memory_cgroup(self.proc.pid, f"bastion-bench-{self.parent.name}")

    def leftovers(self) -> dict[str, list[str]]:
        """Containers and mounts of this server that still exist."""
        containers: list[str] = []
        if os.path.isdir(self.state_root) and shutil.which("crun"):
            out = subprocess.run(
                ["crun", "--root", self.state_root, "list", "--quiet"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            containers = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        mounts = _mounts_under(self.parent) if self.parent.exists() else []
        return {"containers": containers, "mounts": mounts}

    def teardown(self) -> dict[str, object]:
        """Delete the sessions, stop the server, remove everything it left; report what
        had to be removed by force (nothing, normally)."""
        deleted = self.delete_all_sessions()
        code = self.stop()
        left = self.leftovers()
        for cid in left["containers"]:
            subprocess.run(
                ["crun", "--root", self.state_root, "delete", "--force", cid],
                capture_output=True,
                timeout=60,
            )
        for point in left["mounts"]:
            host.umount(point)
        self._remove_cgroups()
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
        shutil.rmtree(self.parent, ignore_errors=True)
        if os.path.isdir(self.state_root):
            shutil.rmtree(self.state_root, ignore_errors=True)
        return {
            "sessions_deleted": deleted,
            "server_exit_code": code,
            "forced_containers": left["containers"],
            "forced_mounts": left["mounts"],
            "still_mounted": _mounts_under(self.parent) if self.parent.exists() else [],
        }

    def _remove_cgroups(self) -> None:
        """The empty parent cgroups crun made for this data dir (``/bastion/<tag>``)."""
        tag = Path(self.state_root).name
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            parent = hierarchy / "bastion" / tag
            if not parent.is_dir():
                continue
            for child in sorted(parent.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                try:
                    child.rmdir()  # cgroups go with rmdir, and only when empty
                except OSError:
                    pass


def _enter_memory_cgroup(pid: int, name: str) -> Path | None:
    """Move ``pid`` into a new memory cgroup (v1, else v2); None where that is not
    possible.  Only what is charged after the move counts, which is all the benchmark
    compares (growth from a baseline taken later)."""
    for root, enable in (
        (Path("/sys/fs/cgroup/memory"), False),
        (Path("/sys/fs/cgroup"), True),
    ):
        if not (root / "cgroup.procs").exists():
            continue
        if enable and "memory" not in _read(root / "cgroup.subtree_control").split():
            continue
        path = root / name
        try:
            path.mkdir(exist_ok=True)
            (path / "cgroup.procs").write_text(str(pid))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            continue
        return path
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
