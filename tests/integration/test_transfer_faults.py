"""Transfers under faults: a session stopped or deleted under an upload or a download,
an upload the client abandons or the server refuses, a server killed mid-upload.

Real server, real sandboxes.  The invariants: a transfer whose session stops ends at
once with ``409 session_stopped`` (the SDK raises SessionStateError), the stop does
not wait for the client and the session starts again right after; an upload that does
not finish leaves nothing (no file, no temp file, none of the directories it made),
even when the server is killed in the middle of it.
"""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess
from tests.integration.helpers import shell, stop_or_delete

from bastion import Bastion, FileUploadError, SessionStateError
from bastion.wire import ErrorCode
from bastion_server.runtime.oci import OciRuntime
from bastion_server.runtime.sandbox_fs import TEMP_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHUNK = 256 * 1024


class SlowFile(io.RawIOBase):
    """A binary file of ``total`` bytes that gives ``CHUNK`` at a time, slowly: a
    client uploading over a slow link (5 MB/s by default).  ``sent`` counts what it
    gave."""

    def __init__(self, total: int, pause: float = 0.05) -> None:
        self.total, self.pause, self.sent = total, pause, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.sent >= self.total:
            return 0
        time.sleep(self.pause)
        n = min(len(buffer), CHUNK, self.total - self.sent)
        buffer[:n] = b"x" * n
        self.sent += n
        return n


def _wait_until(condition: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@contextlib.contextmanager
def _in_thread(fn: object) -> Iterator[dict[str, object]]:
    """Run ``fn`` in a thread; the dict gets its ``result`` or ``error`` and ``at``
    (the monotonic time it ended)."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["result"] = fn()  # type: ignore[operator]
        except BaseException as exc:  # handed to the test
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        thread.join(60)
        assert not thread.is_alive(), "the transfer did not end"


# -- a session stopped or deleted under a transfer ------------------------------------


@pytest.mark.parametrize("action", ["stop", "delete"])
def test_upload_ends_at_once_when_its_session_stops(client: Bastion, sid: str, action: str) -> None:
    source = SlowFile(200 * 1024 * 1024)  # 40 s at 5 MB/s
    with _in_thread(lambda: client.files.upload(sid, source, "/tmp/in/a/big.bin")) as upload:
        _wait_until(lambda: source.sent > 4 * 1024 * 1024)
        began = time.monotonic()
        took = stop_or_delete(client, sid, action)
    error = upload.get("error")
    assert isinstance(error, SessionStateError), upload
    assert error.code == ErrorCode.SESSION_STOPPED and error.status_code == 409
    assert ("deleted" if action == "delete" else "stopped") in error.message
    assert float(upload["at"]) - began < 3, "the upload went on after its session stopped"
    assert took < 1.5, f"{action} waited {took:.2f}s for the upload"
    assert source.sent < 100 * 1024 * 1024
    if action == "stop":
        client.sessions.start(sid)  # the disk is free at once
        # Nothing of it is there: not the file, not the directories it made.
        assert shell(client, sid, "ls -a /tmp") == ".\n..\n"


def test_download_is_cut_short_when_its_session_stops(
    client: Bastion, sid: str, server: ServerProcess
) -> None:
    size = 64 * 1024 * 1024
    shell(client, sid, f"head -c {size} /dev/zero > /tmp/big.bin")
    received = 0
    with (
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream(
            "GET", f"/v1/sessions/{sid}/files/content", params={"path": "/tmp/big.bin"}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        chunks = response.iter_bytes(CHUNK)
        received += len(next(chunks))
        began = time.monotonic()
        client.sessions.stop(sid)  # while the client takes its time
        took = time.monotonic() - began
        with pytest.raises(httpx.HTTPError):
            for chunk in chunks:
                received += len(chunk)
                time.sleep(0.01)
    assert took < 1.5, f"stop waited {took:.2f}s for the download"
    assert received < size
    client.sessions.start(sid)
    # A new run of the session transfers again.
    assert client.files.download(sid, "/tmp/big.bin")[:4] == b"\0\0\0\0"


def test_transfer_of_a_stopped_session_is_refused(client: Bastion, sid: str) -> None:
    client.sessions.stop(sid)
    with pytest.raises(SessionStateError) as info:
        client.files.upload(sid, b"late", "/tmp/late.txt")
    assert info.value.code == ErrorCode.SESSION_STATE


# -- all or nothing: an upload that does not finish leaves no directories -------------


def test_upload_failing_on_error_removes_the_directories_it_made(client: Bastion) -> None:
    sid = client.sessions.create(limits={"disk_mb": 16})["session_id"]
    try:
        client.sessions.start(sid)
        shell(client, sid, "mkdir -p /tmp/kept")
        with pytest.raises(FileUploadError) as info:
            client.files.upload(sid, io.BytesIO(b"z" * 40 * 1024 * 1024), "/tmp/kept/a/b/c.bin")
        assert info.value.code == ErrorCode.DISK_FULL, info.value
        assert shell(client, sid, "ls -a /tmp/kept") == ".\n..\n"
        assert not [e for e in client.files.list(sid, "/tmp")["files"] if e["name"] != "kept"]
    finally:
        client.sessions.delete(sid)


def _start_raw_upload(server: ServerProcess, sid: str, path: str, declared: int) -> socket.socket:
    """An upload whose client sends some of the body, then is at our command."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"PUT /v1/sessions/{sid}/files?path={path} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Length: {declared}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + b"y" * CHUNK
    )
    return sock


def test_upload_abandoned_by_its_client_removes_the_directories_it_made(
    client: Bastion, sid: str, server: ServerProcess
) -> None:
    sock = _start_raw_upload(server, sid, "/tmp/gone/x/y/file.bin", 100 * 1024 * 1024)
    try:
        _wait_until(lambda: "y" in shell(client, sid, "ls /tmp/gone/x 2>/dev/null"))
        # What the sandbox puts in a directory the upload made is kept (and so is the
        # directory); the rest of what the upload made goes.
        shell(client, sid, "touch /tmp/gone/kept.txt")
    finally:
        sock.close()  # the client goes away mid-body
    _wait_until(lambda: shell(client, sid, "ls -a /tmp/gone") == ".\n..\nkept.txt\n")


# -- the server killed in the middle of an upload ---------------------------------------


def _used_bytes(client: Bastion, sid: str) -> int:
    return int(shell(client, sid, "sync; df -B1 --output=used / | tail -1").strip())


def test_server_killed_mid_upload_leaves_nothing_visible_or_counted(
    private_server: ServerProcess,
) -> None:
    srv = private_server
    srv.start()
    with Bastion(base_url=srv.url) as client:
        sid = client.sessions.create()["session_id"]
        client.sessions.start(sid)
        before = _used_bytes(client, sid)
        source = SlowFile(200 * 1024 * 1024, pause=0.005)
        with _in_thread(lambda: client.files.upload(sid, source, "/home/user/part.bin")):
            _wait_until(lambda: source.sent > 64 * 1024 * 1024, timeout=60)
            # Mid-upload the file is seen nowhere: not by the listing, not inside.
            assert "part.bin" not in shell(client, sid, "ls -a /home/user")
            assert not [
                e
                for e in client.files.list(sid, "/home/user")["files"]
                if e["name"].startswith((TEMP_PREFIX, "part"))
            ]
            assert srv.proc is not None
            srv.proc.kill()  # kill -9
            srv.proc.wait()
        srv.proc = None
    srv.start()
    with Bastion(base_url=srv.url) as client:
        assert client.sessions.get(sid)["status"] == "running"  # adopted
        names = [e["name"] for e in client.files.list(sid, "/home/user")["files"]]
        assert not [n for n in names if n.startswith((TEMP_PREFIX, "part"))], names
        inside = shell(client, sid, "ls -a /home/user")
        assert TEMP_PREFIX not in inside and "part.bin" not in inside, inside
        # The 64+ MB written before the kill are not counted against the disk.
        assert _used_bytes(client, sid) - before < 8 * 1024 * 1024
        client.sessions.delete(sid)


def test_upload_to_a_path_nobody_else_uses_round_trips(client: Bastion, sid: str) -> None:
    """The happy path still is: the directories made stay once the upload finished."""
    path = f"/tmp/{uuid.uuid4().hex}/deep/er/file.txt"
    client.files.upload(sid, b"hello", path)
    assert client.files.download(sid, path) == b"hello"
    assert Path(path).name in shell(client, sid, f"ls {Path(path).parent}")


def test_temp_name_left_by_a_crash_is_swept_when_the_session_starts(
    private_server: ServerProcess,
) -> None:
    """The server dies between linking a replacing upload in under its temp name and
    renaming it, and the sandbox is gone too (a host crash): the next start of the
    session removes the temp name before anything in the sandbox can see it."""
    srv = private_server
    srv.extra_env = {"BASTION_FAULT": "upload.after_link"}
    srv.start()
    with Bastion(base_url=srv.url, max_retries=0) as client:
        sid = client.sessions.create()["session_id"]
        client.sessions.start(sid)
        client.files.upload(sid, b"old", "/home/user/f.txt")  # a new file: no temp name
        with contextlib.suppress(Exception):
            client.files.upload(sid, b"new", "/home/user/f.txt")  # dies after the link
    assert srv.proc is not None
    srv.proc.wait(30)
    srv.proc = None
    base = srv.data_dir / "sessions" / sid
    upper = base / "layer" / "upper" / "home" / "user"
    assert [p.name for p in upper.iterdir() if p.name.startswith(TEMP_PREFIX)], "no temp name"
    # The sandbox goes down with the host: no container, nothing mounted.
    state = OciRuntime.state_root_for(srv.data_dir)
    name_file = base / "container"  # a session born in the warm pool keeps its name
    container = name_file.read_text().strip() if name_file.exists() else sid
    subprocess.run(["crun", "--root", state, "delete", "--force", container], check=False)
    for mountpoint in ("rootfs", "run", "layer"):
        subprocess.run(["umount", str(base / mountpoint)], check=False)
    srv.extra_env = {}
    srv.start()
    with Bastion(base_url=srv.url) as client:
        assert client.sessions.get(sid)["status"] == "stopped"
        client.sessions.start(sid)
        names = [e["name"] for e in client.files.list(sid, "/home/user")["files"]]
        assert not [n for n in names if n.startswith(TEMP_PREFIX)], names
        assert TEMP_PREFIX not in shell(client, sid, "ls -a /home/user")
        assert client.files.download(sid, "/home/user/f.txt") == b"old"
        client.sessions.delete(sid)
