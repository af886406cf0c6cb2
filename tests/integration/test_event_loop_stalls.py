"""Nothing one request does stalls the others: every blocking step of the server
(unmount and its retries, mkfs, removing a session's tree, subprocesses, file I/O)
runs off the event loop.

Each test probes ``/v1/health`` every few milliseconds from a thread of its own while
a heavy operation runs, and asserts that no probe waited long: a blocking call on the
event loop shows up as one probe waiting as long as the call took.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess
from tests.integration.helpers import shell, stop_or_delete

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The longest a health probe may wait while the server is busy elsewhere (the machine
#: running the tests is shared; a blocking unmount retry alone costs 2 s).
MAX_STALL = 0.5


class HealthProbe:
    """Asks for ``/v1/health`` in a loop; ``worst`` is the longest answer, in seconds."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.count = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def _probe(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                began = time.monotonic()
                assert http.get("/v1/health").status_code == 200
                self.worst = max(self.worst, time.monotonic() - began)
                self.count += 1
                time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join(30)
        assert self.count > 5, "the probe hardly ran"


@pytest.mark.parametrize("action", ["stop", "delete"])
def test_unmount_of_a_busy_disk_does_not_stall_the_server(
    client: Bastion, server: ServerProcess, sid: str, action: str
) -> None:
    """A disk something on the host still holds is unmounted with retries for up to
    2 s (then detached): those retries wait in a worker thread, not on the loop."""
    shell(client, sid, "echo held > /tmp/held.txt")
    layer = Path(server.data_dir) / "sessions" / sid / "layer"
    holder = os.open(layer / "upper" / "tmp" / "held.txt", os.O_RDONLY)
    try:
        with HealthProbe(server.url) as probe:
            took = stop_or_delete(client, sid, action)
    finally:
        os.close(holder)
    assert took > 1.0, f"the disk was not busy: {action} took {took:.2f}s"
    assert probe.worst < MAX_STALL, (
        f"/v1/health waited {probe.worst:.2f}s during a {took:.2f}s {action}"
    )
    if action == "stop":
        client.sessions.start(sid)
        assert shell(client, sid, "cat /tmp/held.txt") == "held\n"


class _SlowBody:
    """200 MB at about 5 MB/s."""

    def __init__(self) -> None:
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        chunk = b"x" * (256 * 1024)
        for _ in range(800):
            yield chunk
            self.sent += len(chunk)
            time.sleep(0.05)


@pytest.mark.parametrize("action", ["stop", "delete"])
def test_stop_during_a_slow_upload_does_not_stall_the_server(
    client: Bastion, server: ServerProcess, sid: str, action: str
) -> None:
    """The case of the report: a session stopped or deleted under a 5 MB/s upload."""
    body = _SlowBody()
    answer: dict[str, httpx.Response] = {}

    def upload() -> None:
        with contextlib.suppress(httpx.HTTPError):
            answer["r"] = httpx.put(
                f"{server.url}/v1/sessions/{sid}/files",
                params={"path": "/tmp/big.bin"},
                content=body,
                timeout=120,
            )

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while body.sent < 5 * 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    with HealthProbe(server.url) as probe:
        took = stop_or_delete(client, sid, action)
    thread.join(60)
    assert probe.worst < MAX_STALL, f"/v1/health waited {probe.worst:.2f}s"
    assert took < 1.5, f"{action} took {took:.2f}s"
    assert answer["r"].status_code == 409, answer["r"].text


def test_a_session_lifetime_does_not_stall_the_server(
    client: Bastion, server: ServerProcess
) -> None:
    """Create (mkfs of a large disk), start (mounts, crun), 20,000 files, a 64 MB
    upload and download, stop, start, delete (unmount, removing the tree)."""
    with HealthProbe(server.url) as probe:
        sid = client.sessions.create(limits={"disk_mb": 4096})["session_id"]
        client.sessions.start(sid)
        shell(client, sid, "mkdir -p /tmp/many && cd /tmp/many && seq 20000 | xargs touch")
        data = os.urandom(1024 * 1024) * 64
        client.files.upload(sid, data, "/tmp/blob.bin")
        assert client.files.download(sid, "/tmp/blob.bin") == data
        client.sessions.stop(sid)
        client.sessions.start(sid)
        assert shell(client, sid, "ls /tmp/many | wc -l").strip() == "20000"
        client.sessions.delete(sid)
    assert probe.worst < MAX_STALL, f"/v1/health waited {probe.worst:.2f}s"
