"""Root of a session (``jobs.run(..., user="root")``) attacks what only root could.

Root inside a session is root of the session's user namespace: it owns the session's
files and may change them, but holds only the agent's few capabilities (no
CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_MKNOD, CAP_SYS_PTRACE...), runs under the same
seccomp filter, with no new privileges, in the session's cgroup.  Each test tries an
attack that the sandbox user could not even begin, and proves it has no effect
outside the sandbox.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from tests.conftest import ServerProcess
from tests.security.helpers import Sessions, run_ok

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.security]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url, timeout=120) as c:
        yield c


def root_sh(client: Bastion, sid: str, script: str) -> str:
    return run_ok(client, sid, ["sh", "-c", script], user="root")


@pytest.fixture
def host_listener() -> Iterator[tuple[str, list[bytes]]]:
    """A Unix socket on the host that anyone may connect to, recording what it gets."""
    tmp = tempfile.mkdtemp(prefix="bastion-h7-", dir="/tmp")
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "host.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(8)
    server.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(2)
            try:
                got.append(conn.recv(65536))
            except OSError:
                got.append(b"")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield path, got
    finally:
        stop.set()
        thread.join(5)
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


def swap_agent_socket_for_link(client: Bastion, sid: str, target: str) -> None:
    """As root of the session: put a link to ``target`` in the agent socket's place."""
    listing = root_sh(
        client,
        sid,
        f"ln -sfn {target} /run/bastion/agent.sock.new && "
        "mv -fT /run/bastion/agent.sock.new /run/bastion/agent.sock && "
        "ls -l /run/bastion/agent.sock",
    )
    assert f"-> {target}" in listing, listing  # control: the link is in place


def fresh_agent_connections(client: Bastion, sid: str, argv: list[str]) -> list[str]:
    """Run ``argv`` so that the server connects to the agent anew: jobs with limits of
    their own (their cgroup goes with the request, on a connection of its own), and
    more at once than the idle connections kept.  Each job's outcome."""
    jobs = [client.jobs.run(sid, argv, limits={"memory_mb": 64}) for _ in range(3)]
    jobs += [client.jobs.run(sid, argv) for _ in range(6)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(client.jobs.wait(sid, job["job_id"], timeout=30)["status"])
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


def test_agent_socket_swapped_for_a_link_to_a_host_socket_is_not_followed(
    client: Bastion, sessions: Sessions, host_listener: tuple[str, list[bytes]]
) -> None:
    path, got = host_listener
    # Control: the host socket takes connections and records them.
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
        probe.sendall(b"control")
    deadline = time.monotonic() + 5
    while got != [b"control"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == [b"control"], got
    got.clear()
    sid = sessions.new()
    swap_agent_socket_for_link(client, sid, path)
    outcomes = fresh_agent_connections(client, sid, ["echo", "hello"])
    time.sleep(0.5)
    assert got == [], f"the server connected to a host socket the sandbox named: {got[:1]}"
    # The jobs that needed a new connection failed (the session broke its own agent).
    assert "completed" not in outcomes[:3], outcomes


def test_agent_socket_swapped_for_a_link_to_another_session_runs_nothing_there(
    client: Bastion, sessions: Sessions, server: ServerProcess
) -> None:
    attacker, victim = sessions.new(), sessions.new()
    victim_socket = server.data_dir / "sessions" / victim / "run" / "agent.sock"
    assert victim_socket.is_socket(), victim_socket
    swap_agent_socket_for_link(client, attacker, str(victim_socket))
    marker = f"/tmp/planted-{secrets.token_hex(4)}"
    fresh_agent_connections(client, attacker, ["sh", "-c", f"echo x > {marker}"])
    victim_tmp = run_ok(client, victim, ["ls", "-A", "/tmp"])
    assert marker.rsplit("/", 1)[1] not in victim_tmp, "a job of one session ran in another"
