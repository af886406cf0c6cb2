"""Network policy: off by default; when on, out through slirp4netns, never to the host.

All traffic here stays on this machine: the "outside world" is a test host in a
network namespace this test creates (a veth pair, 198.51.100.0/24), and the host's own
services are a listener on the host side of that pair.  The test host also answers on
one public address (``PUBLIC_HOST``, routed to it by a /32 host route for the test's
duration) and on addresses in private, shared and benchmarking ranges, which networked
sessions must not reach unless their allow-list names them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import ServerProcess
from tests.security.helpers import User, run_ok

from bastion import Bastion, InvalidRequestError, JobFailedError
from bastion_server.runtime.oci import OciRuntime

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.security,
    pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="make setup installs it"),
]

HOST_SIDE, TEST_HOST = "198.51.100.1", "198.51.100.2"
#: A public address (the first one past 100.64.0.0/10), routed to the test host.
PUBLIC_HOST = "100.128.0.2"
#: Addresses in ranges blocked by default, all served by the test host.
PRIVATE_HOSTS = {
    "10.213.77.2": "10.213.77.0/24",
    "172.20.77.2": "172.20.0.0/16",
    "192.168.213.2": "192.168.213.0/24",
    "100.64.77.2": "100.64.0.0/10",
    "198.18.0.2": "198.18.0.0/15",
}
#: Alibaba's metadata service address (inside 100.64/10): never reachable.
METADATA = "100.100.100.200"
ROUTED = (PUBLIC_HOST, *PRIVATE_HOSTS, METADATA)


@dataclass
class FakeInternet:
    web_port: int
    host_port: int


def _accept_forever(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def testnet() -> Iterator[FakeInternet]:
    """A test host in its own netns serving HTTP, and a listener on the host's side."""
    ns, veth = f"bth{os.getpid() % 100000}", f"bth{os.getpid() % 100000}h"
    _ip("netns", "add", ns)
    web = None
    host_listener = socket.socket()
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("addr", "add", f"{HOST_SIDE}/24", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{TEST_HOST}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        for address in ROUTED:
            _ip("-n", ns, "addr", "add", f"{address}/32", "dev", "eth0")
            _ip("route", "add", f"{address}/32", "dev", veth)
        web = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "0.0.0.0",
                "8000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # A service of the host's own, listening on every address.
        host_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host_listener.bind(("0.0.0.0", 0))
        host_listener.listen(8)
        threading.Thread(target=_accept_forever, args=(host_listener,), daemon=True).start()
        deadline = time.monotonic() + 10
        for address in (TEST_HOST, *ROUTED):
            while True:
                try:
                    socket.create_connection((address, 8000), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        yield FakeInternet(8000, host_listener.getsockname()[1])
    finally:
        if web is not None:
            web.kill()
            web.wait()
        host_listener.close()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url) as c:
        yield c


def _session(client: Bastion, **network: object) -> str:
    sid = client.sessions.create(network=network)["session_id"]  # type: ignore[typeddict-item]
    client.sessions.start(sid)
    return sid


def _connect(client: Bastion, sid: str, host: str, port: int, user: User | None = None) -> str:
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout=3).close(); print('open')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__, e.errno)\n"
    )
    result = client.jobs.run_and_wait(sid, ["python3", "-c", code], user=user)
    return result["output"]["console_output"]


def test_network_is_off_by_default(client: Bastion, testnet: FakeInternet, as_user: User) -> None:
    sid = _session(client)
    try:
        info = client.sessions.get(sid)
        assert info["network"] == {"enabled": False, "allow": []}
        links = client.jobs.run_and_wait(sid, ["ip", "-o", "link"])["output"]["console_output"]
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        got = _connect(client, sid, TEST_HOST, testnet.web_port, as_user)
        assert got.startswith("OSError 101"), got
    finally:
        client.sessions.delete(sid)


def test_enabled_network_reaches_out_but_never_the_host(
    client: Bastion, testnet: FakeInternet, server: ServerProcess, as_user: User
) -> None:
    sid = _session(client, enabled=True)
    try:
        routes = client.jobs.run_and_wait(sid, ["ip", "route"])["output"]["console_output"]
        assert "default via 10.0.2.2 dev tap0" in routes
        fetch = client.jobs.run_and_wait(
            sid,
            [
                "python3",
                "-c",
                f"import urllib.request; print(urllib.request.urlopen('http://{PUBLIC_HOST}:8000/')"
                ".status)",
            ],
        )
        assert fetch["output"]["console_output"] == "200\n"
        # The host's own service, on the host's address on that link: rejected.
        assert _connect(client, sid, HOST_SIDE, testnet.host_port, as_user) != "open\n"
        # slirp4netns's alias for the host's loopback is off, and so is the API port.
        assert _connect(client, sid, "10.0.2.2", server.port, as_user) != "open\n"
        assert _connect(client, sid, "10.0.2.2", testnet.host_port, as_user) != "open\n"
        # The sandbox's own loopback is its own.
        assert _connect(client, sid, "127.0.0.1", server.port, as_user) != "open\n"
        # Link-local (where cloud metadata services answer) is refused at once.
        start = time.monotonic()
        assert _connect(client, sid, "169.254.169.254", 80, as_user) != "open\n"
        assert time.monotonic() - start < 5
    finally:
        client.sessions.delete(sid)


def test_allow_list_limits_destinations(client: Bastion, testnet: FakeInternet) -> None:
    allowed = _session(client, enabled=True, allow=[f"{TEST_HOST}/32"])
    other = _session(client, enabled=True, allow=["203.0.113.0/24"])
    try:
        assert _connect(client, allowed, TEST_HOST, testnet.web_port) == "open\n"
        assert _connect(client, other, TEST_HOST, testnet.web_port) != "open\n"
        # Deleting one session's rules leaves the other's in force.
        client.sessions.delete(other)
        assert _connect(client, allowed, TEST_HOST, testnet.web_port) == "open\n"
        # Stop/start keeps the policy.
        client.sessions.stop(allowed)
        client.sessions.start(allowed)
        assert client.sessions.get(allowed)["network"]["allow"] == [f"{TEST_HOST}/32"]
        assert _connect(client, allowed, TEST_HOST, testnet.web_port) == "open\n"
    finally:
        for sid in (allowed, other):
            try:
                client.sessions.delete(sid)
            except Exception:
                pass


def test_root_of_a_session_cannot_rewire_its_network(
    client: Bastion, testnet: FakeInternet
) -> None:
    # Root of the session holds no CAP_NET_ADMIN: its network namespace's addresses,
    # routes and links stay as the server made them, and the policy (judged on the
    # host, on slirp4netns's sockets) holds for root's traffic as for the user's.
    sid = _session(client, enabled=True, allow=[f"{TEST_HOST}/32"])
    try:
        script = "ip -o addr; ip route; ip -o link"
        before = run_ok(client, sid, ["sh", "-c", script])
        for change in (
            "ip addr add 10.0.2.200/24 dev tap0",
            "ip route replace default via 10.0.2.3 dev tap0",
            "ip link set tap0 address 02:00:00:00:00:99",
            "ip link set tap0 mtu 9000",
            "ip link add dummy0 type dummy",
            "ip link set lo down",
        ):
            result = client.jobs.run(sid, ["sh", "-c", change], user="root")
            try:
                client.jobs.wait(sid, result["job_id"], timeout=30)
                pytest.fail(f"root of the session ran {change!r}")
            except JobFailedError as exc:
                assert "Operation not permitted" in exc.errout, (change, exc.errout)
        assert run_ok(client, sid, ["sh", "-c", script]) == before
        assert _connect(client, sid, TEST_HOST, testnet.web_port, "root") == "open\n"  # control
        assert _connect(client, sid, PUBLIC_HOST, 8000, "root") != "open\n"
    finally:
        client.sessions.delete(sid)


def test_bad_network_requests(client: Bastion) -> None:
    for bad in (
        {"enabled": "yes"},
        {"allow": ["10.0.0.0/8"]},
        {"enabled": True, "allow": ["not a host!"]},
    ):
        with pytest.raises(InvalidRequestError):
            client.sessions.create(network=bad)  # type: ignore[typeddict-item]


def test_a_server_can_forbid_network(private_server: ServerProcess) -> None:
    private_server.extra_args = ("--no-network",)
    private_server.start()
    with Bastion(base_url=private_server.url) as c:
        with pytest.raises(InvalidRequestError) as err:
            c.sessions.create(network={"enabled": True})
        assert err.value.code == "limit_exceeded"


def test_network_helper_goes_with_the_session(client: Bastion) -> None:
    sid = _session(client, enabled=True)
    before = subprocess.run(["pgrep", "-c", "slirp4netns"], capture_output=True, text=True)
    assert int(before.stdout.strip() or 0) >= 1
    client.sessions.delete(sid)
    time.sleep(0.2)
    # Its cgroup (where its slirp4netns ran) is gone, so nothing of it still runs.
    assert not list(Path("/sys/fs/cgroup/bastion-net").rglob(sid))


def _reach(client: Bastion, sid: str, hosts: list[str], port: int = 8000) -> dict[str, bool]:
    """Which of ``hosts`` the session can open a TCP connection to (one job for all)."""
    code = (
        "import socket,sys\n"
        "for host in sys.argv[1:]:\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=3).close(); print(host, 1)\n"
        "    except OSError:\n"
        "        print(host, 0)\n"
    )
    out = client.jobs.run_and_wait(sid, ["python3", "-c", code, *hosts])["output"]
    assert out is not None
    pairs = [line.split() for line in out["console_output"].splitlines()]
    return {host: flag == "1" for host, flag in pairs}


def test_a_restored_session_has_its_network_policy_again(
    client: Bastion, testnet: FakeInternet
) -> None:
    """A restore runs the sandbox anew (a new network namespace): the session's policy
    is applied to it again, the allowed address reachable, the others not."""
    sid = _session(client, enabled=True, allow=["10.213.77.0/24"])
    try:
        snap = client.sessions.snapshot(sid)["snapshot_id"]
        hosts = [PUBLIC_HOST, "10.213.77.2", METADATA]
        expected = {PUBLIC_HOST: False, "10.213.77.2": True, METADATA: False}
        assert _reach(client, sid, hosts) == expected
        for _ in range(2):  # the runtime's own restore, then (maybe) a standby's
            client.sessions.restore(sid, snap)
            assert _reach(client, sid, hosts) == expected
    finally:
        client.sessions.delete(sid)
        client.snapshots.delete(snap)


def test_private_ranges_are_blocked_unless_allowed_by_name(
    client: Bastion, testnet: FakeInternet
) -> None:
    everything = [PUBLIC_HOST, TEST_HOST, *PRIVATE_HOSTS, METADATA]
    open_ = _session(client, enabled=True)
    named = _session(client, enabled=True, allow=["10.213.77.0/24", "100.64.0.0/10"])
    broad = _session(client, enabled=True, allow=["0.0.0.0/0"])
    try:
        # Anywhere public, nothing private, shared, benchmarking or documentation.
        assert _reach(client, open_, everything) == {
            host: host == PUBLIC_HOST for host in everything
        }
        # A private network named in the allow-list is reachable, exactly that one; a
        # metadata service address never is.
        assert _reach(client, named, everything) == {
            host: host in ("10.213.77.2", "100.64.77.2") for host in everything
        }
        # An allow-list entry covering everything names no private range.
        assert _reach(client, broad, everything) == {
            host: host == PUBLIC_HOST for host in everything
        }
        # DNS still answers: slirp4netns asks the host's resolvers (wherever they are,
        # a private range included) and any answer, NXDOMAIN too, shows the way is open.
        query = (
            "import socket,struct\n"
            "q = struct.pack('>6H', 0x4242, 0x0100, 1, 0, 0, 0) + b'\\7example\\3com\\0'\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)\n"
            "s.sendto(q + struct.pack('>2H', 1, 1), ('10.0.2.3', 53))\n"
            "print(s.recv(512)[:2].hex())\n"
        )
        for sid in (open_, named):
            dns = client.jobs.run_and_wait(sid, ["python3", "-c", query])["output"]
            assert dns is not None and dns["console_output"] == "4242\n", dns
    finally:
        for sid in (open_, named, broad):
            client.sessions.delete(sid)


def _sandbox_pid(srv: ServerProcess, sid: str) -> int:
    name_file = srv.data_dir / "sessions" / sid / "container"
    container = name_file.read_text().strip() if name_file.exists() else sid
    state = subprocess.run(
        ["crun", "--root", OciRuntime.state_root_for(srv.data_dir), "state", container],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(json.loads(state.stdout)["pid"])


def _slirp_pid(srv: ServerProcess, sid: str) -> int:
    pid_file = Path(OciRuntime.state_root_for(srv.data_dir)) / f"{sid}.slirp.pid"
    return int(pid_file.read_text())


def test_allow_lists_survive_a_restart(
    private_server: ServerProcess, testnet: FakeInternet
) -> None:
    srv = private_server
    srv.start()
    with Bastion(base_url=srv.url) as c:
        limited = _session(c, enabled=True, allow=[f"{TEST_HOST}/32"])
        open_ = _session(c, enabled=True)
        # Its slirp4netns will be gone when the server comes back (as if it crashed).
        crashed = _session(c, enabled=True, allow=[f"{TEST_HOST}/32"])
        expect_limited = {TEST_HOST: True, PUBLIC_HOST: False}
        expect_open = {PUBLIC_HOST: True}
        assert _reach(c, limited, list(expect_limited)) == expect_limited
        assert _reach(c, open_, list(expect_open)) == expect_open
        assert _reach(c, crashed, list(expect_limited)) == expect_limited
        survivor = _slirp_pid(srv, limited)
    assert srv.stop() == 0, srv.log_tail()
    os.kill(_slirp_pid(srv, crashed), signal.SIGKILL)
    srv.start()
    with Bastion(base_url=srv.url) as c:
        for sid in (limited, open_, crashed):
            assert c.sessions.get(sid)["status"] == "running"
        assert _reach(c, limited, list(expect_limited)) == expect_limited
        assert _reach(c, open_, list(expect_open)) == expect_open
        assert _reach(c, crashed, list(expect_limited)) == expect_limited
        # slirp4netns runs in a session of its own: a restart leaves it running.
        assert _slirp_pid(srv, limited) == survivor
        for sid in (limited, open_, crashed):
            c.sessions.delete(sid)


def test_another_server_leaves_our_rules_alone(
    client: Bastion, testnet: FakeInternet, private_server: ServerProcess
) -> None:
    limited = _session(client, enabled=True, allow=[f"{TEST_HOST}/32"])
    expect = {TEST_HOST: True, PUBLIC_HOST: False}
    try:
        assert _reach(client, limited, list(expect)) == expect
        private_server.start()  # another data dir: another server instance
        with Bastion(base_url=private_server.url) as other:
            theirs = _session(other, enabled=True, allow=[PUBLIC_HOST])
            assert _reach(other, theirs, list(expect)) == {TEST_HOST: False, PUBLIC_HOST: True}
            assert _reach(client, limited, list(expect)) == expect
            other.sessions.delete(theirs)
        assert private_server.stop() == 0
        assert _reach(client, limited, list(expect)) == expect
        # A server stopping with no networked session left takes its table with it.
        tag = Path(OciRuntime.state_root_for(private_server.data_dir)).name
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        assert f"bastion_{tag}" not in tables.stdout
    finally:
        client.sessions.delete(limited)


def test_a_session_whose_network_cannot_be_restored_is_stopped(
    private_server: ServerProcess, testnet: FakeInternet
) -> None:
    srv = private_server
    srv.start()
    with Bastion(base_url=srv.url) as c:
        sid = _session(c, enabled=True, allow=[f"{TEST_HOST}/32"])
        assert _reach(c, sid, [TEST_HOST]) == {TEST_HOST: True}
        plain = c.sessions.create()["session_id"]
        c.sessions.start(plain)
    assert srv.stop() == 0, srv.log_tail()
    # While the server is down its slirp4netns dies, and something takes the name of
    # its tap device inside the sandbox: a new slirp4netns cannot attach.
    os.kill(_slirp_pid(srv, sid), signal.SIGKILL)
    time.sleep(0.2)
    subprocess.run(
        ["nsenter", "-t", str(_sandbox_pid(srv, sid)), "-n", "ip", "link", "add", "tap0",
         "type", "bridge"],
        check=True,
    )  # fmt: skip
    srv.start()
    with Bastion(base_url=srv.url) as c:
        info = c.sessions.get(sid)
        assert info["status"] == "stopped", info
        assert info["status_reason"]
        assert c.sessions.get(plain)["status"] == "running"  # the others are adopted
        assert not list(Path("/sys/fs/cgroup/bastion-net").rglob(sid))  # no slirp4netns
        # And it starts again with its allow-list in force.
        c.sessions.start(sid)
        assert _reach(c, sid, [TEST_HOST, PUBLIC_HOST]) == {TEST_HOST: True, PUBLIC_HOST: False}
        c.sessions.delete(sid)
        c.sessions.delete(plain)
