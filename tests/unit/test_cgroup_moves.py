"""The host's cgroup v2 hierarchy is remounted with ``favordynmods`` (runtime/host.py):
without it each sandbox start waits for an RCU grace period to move its first process."""

from __future__ import annotations

import os

import pytest

from bastion_server.runtime import host

SYSTEMD_V2 = (
    "25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - "
    "cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
)
HYBRID = (
    "31 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    "46 31 0:38 /bastion-net /sys/fs/cgroup/bastion-net rw,relatime - cgroup2 cgroup2 rw\n"
)


def test_a_systemd_hierarchy_keeps_its_own_options():
    # A remount sets every option anew: dropping nsdelegate would break systemd.
    assert host.cgroup_remount_for_moves(SYSTEMD_V2) == (
        "/sys/fs/cgroup",
        "nsdelegate,memory_recursiveprot,favordynmods",
    )


def test_on_a_hybrid_host_the_v2_mount_is_the_one_remounted():
    assert host.cgroup_remount_for_moves(HYBRID) == ("/sys/fs/cgroup/unified", "favordynmods")


def test_nothing_to_do_once_on_or_without_a_v2_hierarchy():
    on = HYBRID.replace("cgroup2 cgroup2 rw\n", "cgroup2 cgroup2 rw,favordynmods\n", 1)
    assert host.cgroup_remount_for_moves(on) is None
    only_v1 = "31 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    assert host.cgroup_remount_for_moves(only_v1) is None
    assert host.cgroup_remount_for_moves("") is None


def test_an_escaped_mount_point_is_decoded():
    line = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n"
    assert host.cgroup_remount_for_moves(line) == ("/mnt/cg two", "favordynmods")


@pytest.mark.skipif(os.geteuid() != 0, reason="remounts the host's cgroup hierarchy")
def test_after_host_preparation_the_hierarchy_favors_moves():
    with open("/proc/self/mountinfo") as f:
        text = f.read()
    if not any(" - cgroup2 " in line for line in text.splitlines()):
        pytest.skip("no cgroup v2 hierarchy on this host")
    host.favor_cgroup_moves()
    with open("/proc/self/mountinfo") as f:
        assert host.cgroup_remount_for_moves(f.read()) is None
