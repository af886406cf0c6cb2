"""Files: upload, list, download, delete against a real server and sandbox."""

from __future__ import annotations

import io
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import ServerProcess

from bastion import (
    Bastion,
    FileDeleteError,
    FileDownloadError,
    FileListError,
    FileUploadError,
    SessionStateError,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def sid(client: Bastion) -> Iterator[str]:
    session_id = client.sessions.create()["session_id"]
    client.sessions.start(session_id)
    yield session_id
    client.sessions.delete(session_id)


def test_upload_creates_parents_and_the_sandbox_user_owns_it(client: Bastion, sid: str) -> None:
    result = client.files.upload(sid, b"#!/bin/sh\necho ran\n", "/home/user/a/b/run.sh")
    assert result == {"path": "/home/user/a/b/run.sh", "size": 19}
    r = client.jobs.run_and_wait(
        sid, ["sh", "-c", "stat -c '%U %a' /home/user/a /home/user/a/b/run.sh && sh a/b/run.sh"]
    )
    assert r["output"]["console_output"] == "user 755\nuser 644\nran\n"
    # The sandbox user can change and remove what was uploaded.
    client.jobs.run_and_wait(sid, ["sh", "-c", "echo more >> a/b/run.sh && rm -r a"])


def test_list_gives_name_size_type_and_mtime(client: Bastion, sid: str) -> None:
    client.files.upload(sid, b"12345", "/home/user/list/file.txt")
    client.jobs.run_and_wait(
        sid, ["sh", "-c", "cd /home/user/list && mkdir sub && ln -s file.txt link"]
    )
    listing = client.files.list(sid, "/home/user/list")
    assert listing["path"] == "/home/user/list"
    by_name = {f["name"]: f for f in listing["files"]}
    assert set(by_name) == {"file.txt", "sub", "link"}
    assert by_name["file.txt"]["size"] == 5 and by_name["file.txt"]["type"] == "file"
    assert by_name["sub"]["type"] == "directory"
    assert by_name["link"]["type"] == "symlink"
    assert by_name["file.txt"]["path"] == "/home/user/list/file.txt"
    assert by_name["file.txt"]["modified_at"].endswith("Z")
    root = {f["name"] for f in client.files.list(sid, "/")["files"]}
    assert {"bin", "etc", "home", "usr"} <= root


def test_download_and_delete(client: Bastion, sid: str, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    client.files.upload(sid, io.BytesIO(data), "/home/user/blob.bin")
    assert client.files.download(sid, "/home/user/blob.bin") == data
    target = tmp_path / "blob.bin"
    client.files.download_to(sid, "/home/user/blob.bin", target)
    assert target.read_bytes() == data
    assert b"".join(client.files.iter_download(sid, "/home/user/blob.bin")) == data
    client.files.delete(sid, "/home/user/blob.bin")
    with pytest.raises(FileDownloadError) as err:
        client.files.download(sid, "/home/user/blob.bin")
    assert err.value.code == "file_not_found" and err.value.status_code == 404


def test_overwrite_is_atomic_and_replaces(client: Bastion, sid: str) -> None:
    client.files.upload(sid, b"old", "/home/user/over.txt")
    client.files.upload(sid, b"new contents", "/home/user/over.txt")
    assert client.files.download(sid, "/home/user/over.txt") == b"new contents"
    names = [f["name"] for f in client.files.list(sid, "/home/user")["files"]]
    assert not [n for n in names if n.startswith(".bastion-upload")]


def test_errors_name_the_operation(client: Bastion, sid: str) -> None:
    with pytest.raises(FileListError) as e1:
        client.files.list(sid, "/no/such/dir")
    assert e1.value.code == "file_not_found"
    with pytest.raises(FileListError) as e2:
        client.files.list(sid, "/etc/hostname")
    assert e2.value.code == "not_a_directory"
    with pytest.raises(FileDeleteError) as e3:
        client.files.delete(sid, "/home/user/nothing-here")
    assert e3.value.code == "file_not_found"
    with pytest.raises(FileUploadError) as e4:
        client.files.upload(sid, b"x", "relative/path")
    assert e4.value.code == "invalid_path"
    with pytest.raises(FileUploadError) as e5:
        client.files.upload(sid, b"x", "/home/user")  # an existing directory
    assert e5.value.code == "is_a_directory"
    with pytest.raises(FileDownloadError) as e6:
        client.files.download(sid, "/home")
    assert e6.value.code == "is_a_directory"
    with pytest.raises(FileUploadError) as e7:
        client.files.upload(sid, b"x", "/" + "a" * 5000)
    assert e7.value.code == "invalid_path"


def test_recursive_delete(client: Bastion, sid: str) -> None:
    client.files.upload(sid, b"1", "/home/user/tree/x/y/z.txt")
    with pytest.raises(FileDeleteError) as err:
        client.files.delete(sid, "/home/user/tree")
    assert err.value.code == "directory_not_empty"
    client.files.delete(sid, "/home/user/tree", recursive=True)
    assert "tree" not in [f["name"] for f in client.files.list(sid, "/home/user")["files"]]


def test_files_need_a_running_session(client: Bastion) -> None:
    other = client.sessions.create()["session_id"]
    try:
        with pytest.raises(SessionStateError):
            client.files.upload(other, b"x", "/x")
        with pytest.raises(SessionStateError):
            client.files.list(other, "/")
    finally:
        client.sessions.delete(other)


def test_upload_limit_leaves_nothing_behind(private_server: ServerProcess) -> None:
    private_server.extra_args = ("--max-upload-bytes", "100000")
    private_server.start()
    with Bastion(base_url=private_server.url) as c:
        sid = c.sessions.create()["session_id"]
        c.sessions.start(sid)
        with pytest.raises(FileUploadError) as declared:
            c.files.upload(sid, b"x" * 100001, "/home/user/big.bin")  # Content-Length known
        assert declared.value.code == "file_too_large" and declared.value.status_code == 413
        with pytest.raises(FileUploadError) as streamed:
            c.files.upload(sid, io.BytesIO(b"y" * 300000), "/home/user/big.bin")  # chunked
        assert streamed.value.code == "file_too_large"
        names = [f["name"] for f in c.files.list(sid, "/home/user")["files"]]
        assert "big.bin" not in names and not [n for n in names if "upload" in n]
        c.files.upload(sid, b"z" * 100000, "/home/user/ok.bin")  # at the limit is fine


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_one_gigabyte_streams_through_without_filling_memory(
    private_server: ServerProcess, tmp_path: Path
) -> None:
    private_server.start()
    assert private_server.proc is not None
    size = 1024**3
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:  # sparse except a marker at each end
        f.write(b"start")
        f.seek(size - 3)
        f.write(b"end")
    client_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Bastion(base_url=private_server.url, timeout=300) as c:
        sid = c.sessions.create(limits={"disk_mb": 1200})["session_id"]
        c.sessions.start(sid)
        with open(source, "rb") as f:
            assert c.files.upload(sid, f, "/home/user/big.bin")["size"] == size
        r = c.jobs.run_and_wait(sid, ["sh", "-c", "stat -c %s big.bin; head -c 5 big.bin"])
        assert r["output"]["console_output"] == f"{size}\nstart"
        received = 0
        tail = b""
        for chunk in c.files.iter_download(sid, "/home/user/big.bin"):
            received += len(chunk)
            tail = (tail + chunk)[-3:]
        assert received == size and tail == b"end"
        c.sessions.delete(sid)
    server_peak = _peak_rss_kib(private_server.proc.pid)
    client_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - client_peak_before
    assert server_peak < 300 * 1024, f"server peak RSS {server_peak} KiB"
    assert client_growth < 200 * 1024, f"client peak RSS grew by {client_growth} KiB"
