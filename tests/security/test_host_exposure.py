"""What other host users, and sessions themselves, can learn of the server's data.

* Records (the database and its WAL, job logs) and session files are private: a host
  user such as ``nobody``, or another session's host ids, can read none of them.
* A session sees no host path and no other session's id: not in its mountinfo, not in
  loop devices' backing files.
* A session's disk can always be mounted again: stop then start never depends on timing
  or on a host process that copied the mount namespace.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest
from tests.conftest import ServerProcess
from tests.security.helpers import User, run_ok, sh

from bastion import Bastion
from bastion_server.runtime.idmap import DEFAULT_REGISTRY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NOBODY = 65534


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url, timeout=60) as c:
        yield c


def _as_host_user(uid: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, user=uid, group=uid, extra_groups=[], capture_output=True, text=True, timeout=60
    )


def test_other_host_users_read_no_records_and_no_session_files(
    client: Bastion, server: ServerProcess
) -> None:
    secret = "env-secret-" + secrets.token_hex(12)
    sid = client.sessions.create()["session_id"]
    other = client.sessions.create()["session_id"]
    try:
        client.sessions.start(sid)
        client.sessions.start(other)
        run_ok(client, sid, ["sh", "-c", 'echo "$S" > /home/user/secret.txt'], env={"S": secret})
        client.files.upload(sid, secret.encode(), "/home/user/uploaded.txt")
        data = server.data_dir
        for path in ("bastion.db", "bastion.db-wal"):
            assert (data / path).stat().st_mode & 0o077 == 0, path
        # nobody finds the secret nowhere: not in the records, not in the session's files.
        grep = _as_host_user(NOBODY, ["grep", "-rl", secret, str(data)])
        assert secret not in grep.stdout and grep.stdout.strip() == "", grep.stdout
        for name in ("secret.txt", "uploaded.txt"):
            cat = _as_host_user(
                NOBODY, ["cat", str(data / "sessions" / sid / "rootfs" / "home" / "user" / name)]
            )
            assert cat.returncode != 0 and secret not in cat.stdout
        # Nor does the other session's root (its host id range's first id).
        other_root = int((data / "sessions" / other / "id-range").read_text())
        cat = _as_host_user(
            other_root, ["cat", str(data / "sessions" / sid / "rootfs/home/user/secret.txt")]
        )
        assert cat.returncode != 0 and secret not in cat.stdout
    finally:
        client.sessions.delete(sid)
        client.sessions.delete(other)


def test_a_session_sees_no_host_path_and_no_other_session(
    client: Bastion, server: ServerProcess, as_user: User
) -> None:
    first = client.sessions.create()["session_id"]
    second = client.sessions.create()["session_id"]
    try:
        client.sessions.start(first)
        client.sessions.start(second)
        seen = sh(
            client,
            second,
            "cat /proc/self/mountinfo /proc/mounts;"
            " cat /sys/block/*/loop/backing_file /sys/devices/virtual/block/*/loop/backing_file"
            " /sys/class/block/*/loop/backing_file 2>/dev/null; ls -R /sys/block /sys/dev 2>&1;"
            # every process's descriptors (the agent's stdout is a host file)
            " ls -l /proc/[0-9]*/fd/ 2>&1; true",
            user=as_user,
        )
        for secret in (str(server.data_dir), "/var/lib/bastion", "images", first, "disk.img"):
            assert secret not in seen, f"{secret!r} is visible inside a session"
    finally:
        client.sessions.delete(first)
        client.sessions.delete(second)


def test_stop_then_start_never_fails(client: Bastion) -> None:
    sid = client.sessions.create()["session_id"]
    try:
        client.sessions.start(sid)
        for i in range(8):
            sh(client, sid, f"echo {i} >> /home/user/count")
            client.sessions.stop(sid)
            client.sessions.start(sid)
        assert sh(client, sid, "cat /home/user/count").split() == [str(i) for i in range(8)]
    finally:
        client.sessions.delete(sid)


def test_a_host_process_holding_a_copy_of_the_mounts_does_not_stop_a_start(
    client: Bastion,
) -> None:
    """``ip netns exec``, ``unshare -m`` and friends copy every mount, a session's disk
    included; the session must start again all the same, with its files whole."""
    sid = client.sessions.create()["session_id"]
    holder = None
    try:
        client.sessions.start(sid)
        sh(client, sid, "echo before > /home/user/f")
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "120"]
        )
        time.sleep(0.3)
        client.sessions.stop(sid)
        client.sessions.start(sid)
        sh(client, sid, "echo after >> /home/user/f")
        client.sessions.stop(sid)
        client.sessions.start(sid)
        assert sh(client, sid, "cat /home/user/f").split() == ["before", "after"]
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        client.sessions.delete(sid)


def test_deleted_sessions_give_their_id_range_back(client: Bastion, server: ServerProcess) -> None:
    sid = client.sessions.create()["session_id"]
    base = int((server.data_dir / "sessions" / sid / "id-range").read_text())
    registry = DEFAULT_REGISTRY
    entries = {o for p in registry.iterdir() if p.name.isdigit() for o in p.read_text().split()}
    assert str(server.data_dir / "sessions" / sid) in entries
    client.sessions.delete(sid)
    entries = {o for p in registry.iterdir() if p.name.isdigit() for o in p.read_text().split()}
    assert str(server.data_dir / "sessions" / sid) not in entries
    assert base >= 1 << 24
