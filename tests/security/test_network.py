"""Network policy: off by default; when on, out through slirp4netns, never to the host.

All traffic here stays on this machine: the "outside world" is a test host in a
network namespace this test creates (a veth pair, 198.51.100.0/24), and the host's own
services are a listener on the host side of that pair.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from tests.conftest import ServerProcess

from bastion import Bastion, InvalidRequestError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.security,
    pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="make setup installs it"),
]

HOST_SIDE, TEST_HOST = "198.51.100.1", "198.51.100.2"


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
                TEST_HOST,
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
        while True:
            try:
                socket.create_connection((TEST_HOST, 8000), timeout=1).close()
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


def _connect(client: Bastion, sid: str, host: str, port: int) -> str:
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout=3).close(); print('open')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__, e.errno)\n"
    )
    return client.jobs.run_and_wait(sid, ["python3", "-c", code])["output"]["console_output"]


def test_network_is_off_by_default(client: Bastion, testnet: FakeInternet) -> None:
    sid = _session(client)
    try:
        info = client.sessions.get(sid)
        assert info["network"] == {"enabled": False, "allow": []}
        links = client.jobs.run_and_wait(sid, ["ip", "-o", "link"])["output"]["console_output"]
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        assert _connect(client, sid, TEST_HOST, testnet.web_port).startswith("OSError 101")
    finally:
        client.sessions.delete(sid)


def test_enabled_network_reaches_out_but_never_the_host(
    client: Bastion, testnet: FakeInternet, server: ServerProcess
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
                f"import urllib.request; print(urllib.request.urlopen('http://{TEST_HOST}:8000/')"
                ".status)",
            ],
        )
        assert fetch["output"]["console_output"] == "200\n"
        # The host's own service, on the host's address on that link: rejected.
        assert _connect(client, sid, HOST_SIDE, testnet.host_port) != "open\n"
        # slirp4netns's alias for the host's loopback is off, and so is the API port.
        assert _connect(client, sid, "10.0.2.2", server.port) != "open\n"
        assert _connect(client, sid, "10.0.2.2", testnet.host_port) != "open\n"
        # The sandbox's own loopback is its own.
        assert _connect(client, sid, "127.0.0.1", server.port) != "open\n"
        # Link-local (where cloud metadata services answer) is refused at once.
        start = time.monotonic()
        assert _connect(client, sid, "169.254.169.254", 80) != "open\n"
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
    left = subprocess.run(["pgrep", "-af", "slirp4netns"], capture_output=True, text=True)
    assert sid not in left.stdout
