"""A user namespace held open by a small process: closing it leaves nothing open."""

from __future__ import annotations

import os
import signal
import time

import pytest

from bastion_server.runtime.idmap import UserNamespace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="maps ids: needs root")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _holder_pid(ns: UserNamespace) -> int:
    return int(ns.path.split("/")[2])  # /proc/PID/ns/user


def _wait_until_dead(pid: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        assert time.monotonic() < deadline, f"process {pid} did not die"
        time.sleep(0.01)


def test_a_namespace_closes_its_holder_and_pipe() -> None:
    before = _open_fds()
    ns = UserNamespace(0, "0 0 1\n")
    assert os.readlink(ns.path) != os.readlink("/proc/self/ns/user")
    holder = _holder_pid(ns)
    ns.close()
    assert not os.path.exists(f"/proc/{holder}")
    assert _open_fds() <= before


def test_a_namespace_whose_holder_died_first_still_closes_its_pipe() -> None:
    # Left to the garbage collector, the pipe would be an "unclosed file" warning in
    # whatever test happens to run then.
    before = _open_fds()
    ns = UserNamespace(0, "0 0 1\n")
    holder = _holder_pid(ns)
    os.kill(holder, signal.SIGKILL)
    _wait_until_dead(holder)
    ns.close()
    assert not os.path.exists(f"/proc/{holder}")
    assert _open_fds() <= before
