"""One session cannot use up kernel limits that other sessions or the host share.

The kernel counts some limits per host user (pipe buffer pages, file descriptors in
flight on unix sockets) and others per user namespace owner (inotify instances, POSIX
message queue bytes).  Each session has a host id range of its own and a user namespace
owned by its own root, so a session holding all of its share leaves every other
session's share, and host root's, untouched.  Each test fills one resource from a
session of one key and then uses the same resource from a session of another key, and
(for the per-owner counters) from host root.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator

import pytest
from tests.conftest import KEY_A, KEY_B, ServerProcess
from tests.security.helpers import User, py

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Python run inside a sandbox: ``grab(kind)`` takes as much of a resource as the
#: kernel gives, ``use(kind)`` checks one more can be had normally.
PROBES = r"""
import array, ctypes, errno, fcntl, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
held = []

def inotify():
    fd = libc.inotify_init1(0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    return fd

def mqueue(i):
    name = f"/bastion-probe-{os.getpid()}-{i}".encode()
    fd = libc.mq_open(name, os.O_CREAT | os.O_RDWR, ctypes.c_int(0o600), None)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "mq_open")
    libc.mq_unlink(name)
    return fd

def big_pipe():
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    return r, w

def pass_fds(pair, count):
    fds = array.array("i", [pair[1].fileno()] * count).tobytes()
    pair[0].sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    return count

def grab(kind):
    n = 0
    try:
        if kind == "pipes":
            while True:
                held.append(big_pipe()); n += 1
        elif kind == "unix_fds":
            while True:
                pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                pair[0].setblocking(False)
                held.append(pair)
                try:
                    while True:
                        n += pass_fds(pair, 250)
                except BlockingIOError:
                    continue
        else:
            while True:
                held.append(inotify() if kind == "inotify" else mqueue(n)); n += 1
    except OSError as exc:
        print(f"held {n} until {errno.errorcode.get(exc.errno, exc.errno)}", flush=True)
    time.sleep(600)

def use(kind):
    if kind == "inotify":
        inotify()
    elif kind == "mqueue":
        mqueue(0)
    elif kind == "pipes":
        r, w = os.pipe()
        assert fcntl.fcntl(w, F_GETPIPE_SZ) == 65536, fcntl.fcntl(w, F_GETPIPE_SZ)
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    else:
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        pass_fds(pair, 1)
    print("ok")
"""


@pytest.fixture(scope="module")
def clients(auth_server: ServerProcess) -> Iterator[tuple[Bastion, Bastion]]:
    with (
        Bastion(base_url=auth_server.url, api_key=KEY_A, timeout=60) as a,
        Bastion(base_url=auth_server.url, api_key=KEY_B, timeout=60) as b,
    ):
        yield a, b


def _session(client: Bastion) -> str:
    sid = client.sessions.create(limits={"pids": 512})["session_id"]
    client.sessions.start(sid)
    return sid


def _hold(client: Bastion, sid: str, kind: str, user: User) -> str:
    """Start a job (as ``user``) that takes all of ``kind`` it can and keeps it; what it
    reported."""
    job = client.jobs.run(sid, ["python3", "-c", PROBES + f"\ngrab({kind!r})\n"], user=user)
    seen = ""
    with client.jobs.stream(sid, job["job_id"]) as events:
        for event in events:
            if event["type"] in ("stdout", "stderr"):
                seen += str(event.get("data", ""))
                if "held" in seen:
                    return seen
    pytest.fail(f"the holder of {kind} ended without reporting: {seen}")


@pytest.mark.parametrize("kind", ["inotify", "mqueue", "pipes", "unix_fds"])
def test_a_session_holding_a_shared_limit_starves_nobody(
    clients: tuple[Bastion, Bastion], kind: str, as_user: User
) -> None:
    # The holder runs as the sandbox user, then as root of its session (another id,
    # whose counters the session's user namespace charges all the same).
    a, b = clients
    holder, victim = _session(a), _session(b)
    try:
        held = _hold(a, holder, kind, as_user)
        assert "held" in held and not held.startswith("held 0 "), held
        # Another tenant's session gets its own share in full.
        assert py(b, victim, PROBES + f"\nuse({kind!r})\n").strip() == "ok"
        # Another session of the same tenant too: the share is the session's, not the key's.
        other = _session(a)
        try:
            assert py(a, other, PROBES + f"\nuse({kind!r})\n").strip() == "ok"
        finally:
            a.sessions.delete(other)
        if kind in ("inotify", "mqueue"):
            _use_on_host(kind)
    finally:
        a.sessions.delete(holder)
        b.sessions.delete(victim)


def _use_on_host(kind: str) -> None:
    """Host root's own share of a per-owner counter is whole."""
    libc = ctypes.CDLL(None, use_errno=True)
    if kind == "inotify":
        fd = libc.inotify_init1(0)
        assert fd >= 0, (
            f"host root cannot make an inotify instance: {errno.errorcode[ctypes.get_errno()]}"
        )
        os.close(fd)
    else:
        name = f"/bastion-host-probe-{os.getpid()}".encode()
        fd = libc.mq_open(name, os.O_CREAT | os.O_RDWR, ctypes.c_int(0o600), None)
        assert fd >= 0, (
            f"host root cannot open a message queue: {errno.errorcode[ctypes.get_errno()]}"
        )
        libc.mq_unlink(name)
        os.close(fd)


def test_sessions_have_host_id_ranges_of_their_own(clients: tuple[Bastion, Bastion]) -> None:
    a, b = clients
    first, second = _session(a), _session(b)
    try:
        maps = {py(c, s, "print(open('/proc/self/uid_map').read().split()[1])").strip()
                for c, s in ((a, first), (b, second))}  # fmt: skip
        assert len(maps) == 2, maps
        assert "100000" not in maps
    finally:
        a.sessions.delete(first)
        b.sessions.delete(second)
