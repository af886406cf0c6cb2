"""Freezing a sandbox's processes: the cgroup freezer (v1 ``freezer.state``, v2
``cgroup.freeze``), written directly.

A frozen cgroup's tasks are stopped where they are (in user space or in an
interruptible sleep), keep their memory, get no CPU and see no time pass: a timer
that comes due meanwhile fires only once they are thawed.  Writing the control file
ourselves takes microseconds; ``crun pause`` would fork and exec a process for the
same write.  The OCI runtime reads the same file, so ``crun state`` shows the
container ``paused`` (and ``crun delete --force`` still works on it).
"""

from __future__ import annotations

import os
import time

#: How long a freeze may take to settle (a task in an uninterruptible sleep, such as
#: disk I/O, is frozen once that sleep ends).
FREEZE_TIMEOUT = 10.0


class FreezerError(OSError):
    """The cgroup could not be frozen or thawed."""


def _v1(cgroup: str) -> str:
    return f"/sys/fs/cgroup/freezer{cgroup}/freezer.state"


def _v2(cgroup: str) -> str:
    return f"/sys/fs/cgroup{cgroup}/cgroup.freeze"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def is_frozen(cgroup: str) -> bool | None:
    """Whether the cgroup's tasks are frozen; None if it has no freezer (it is gone)."""
    try:
        return _read(_v1(cgroup)) == "FROZEN"
    except FileNotFoundError:
        pass
    try:
        with open(f"/sys/fs/cgroup{cgroup}/cgroup.events") as f:
            return any(line.strip() == "frozen 1" for line in f)
    except FileNotFoundError:
        return None


def _settle(cgroup: str, frozen: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while is_frozen(cgroup) is not frozen:
        if time.monotonic() >= deadline:
            raise FreezerError(
                f"cgroup {cgroup} did not {'freeze' if frozen else 'thaw'} within {timeout:g}s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def freeze(cgroup: str, timeout: float = FREEZE_TIMEOUT) -> None:
    """Freeze every task of ``cgroup`` and return once all are (blocking).  Freezing a
    frozen cgroup does nothing; if the freeze does not settle in time it is undone."""
    path = _v1(cgroup) if os.path.exists(_v1(cgroup)) else _v2(cgroup)
    if not os.path.exists(path):
        raise FreezerError(f"cgroup {cgroup} has no freezer (is the sandbox running?)")
    _write(path, "FROZEN" if path.endswith("freezer.state") else "1")
    try:
        _settle(cgroup, True, timeout)
    except FreezerError:
        thaw(cgroup)
        raise


def thaw(cgroup: str, timeout: float = FREEZE_TIMEOUT) -> None:
    """Thaw ``cgroup``'s tasks (blocking); a thawed or vanished cgroup is left as it is."""
    path = _v1(cgroup) if os.path.exists(_v1(cgroup)) else _v2(cgroup)
    if not os.path.exists(path):
        return
    _write(path, "THAWED" if path.endswith("freezer.state") else "0")
    _settle(cgroup, False, timeout)
