"""Host preparation: what must be true of the machine before a sandbox can start."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2

_V2_CONTROLLER_FILES = (
    "/sys/fs/cgroup/unified/cgroup.controllers",
    "/sys/fs/cgroup/cgroup.controllers",
)


class HostNotReady(Exception):
    """The host lacks something a sandbox needs; the message says what to do."""


def mount(source: str, target: str, fstype: str, options: str, flags: int = 0) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def fix_hybrid_cgroups() -> bool:
    """Bind stray cgroup-v2 controllers to a v1 hierarchy so crun accepts the host.

    On a hybrid host (v1 hierarchies plus a v2 mount) crun refuses to start when the v2
    hierarchy carries any controller ("cgroups in hybrid mode not supported, drop all
    controllers from cgroupv2").  Mounting a v1 hierarchy for a controller moves it
    off v2.  Returns True when something was changed.
    """
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        return False  # a pure cgroup-v2 host: crun works as it is
    changed = False
    for path in _V2_CONTROLLER_FILES:
        try:
            with open(path) as f:
                controllers = f.read().split()
        except OSError:
            continue
        for controller in controllers:
            target = f"/sys/fs/cgroup/{controller}"
            os.makedirs(target, exist_ok=True)
            if not os.path.ismount(target):
                mount("cgroup", target, "cgroup", controller)
                changed = True
    return changed


def find_runtime_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostNotReady(
            f"OCI runtime {name!r} not found on PATH; install it (apt-get install {name}) "
            "or run `make setup`"
        )
    return path


def hard_limit(kind: int) -> int:
    """The host's hard rlimit; OCI rlimits above it make the sandbox start fail."""
    hard = resource.getrlimit(kind)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


if __name__ == "__main__":  # `python -m bastion_server.runtime.host`: used by `make setup`
    if fix_hybrid_cgroups():
        print("prepare-host: moved stray cgroup-v2 controllers to v1 hierarchies")
