"""Directory trees in and out of a real session: ``files.upload_dir`` /
``download_dir`` (sync and async) and ``bastion files upload -r`` / ``download -r``.

The big round trip (2000 files and a 200 MB file) watches the server's memory: the
tree is streamed as one tar on both sides, so the server's RSS must grow by far
less than the big file's size.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess

from bastion import AsyncBastion, Bastion, FileDownloadError, FileUploadError

pytestmark = [pytest.mark.slow, pytest.mark.integration]

HOME = "/home/user"
BIG = 200 * 1024 * 1024


def snapshot(root: Path) -> dict[bytes, tuple[str, int, str]]:
    """Every entry under ``root``: (kind, permission bits, content hash or link)."""
    found: dict[bytes, tuple[str, int, str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = os.fsencode(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                found[rel] = ("file", stat.S_IMODE(st.st_mode), digest.hexdigest())
    return found


def make_tree(root: Path, files: int, big: int = 0) -> None:
    """``files`` small files in 40 directories, odd names, a symlink, an empty
    directory, an executable, and optionally one ``big``-byte file."""
    for i in range(files):
        d = root / f"dir{i % 40:02d}" / "nested"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:04d}.txt").write_bytes(f"content {i}\n".encode() * (i % 7))
    (root / "empty").mkdir()
    odd = root / os.fsdecode(b"caf\xc3\xa9 and \xff bytes")
    odd.write_bytes(b"not utf-8 name\n")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho ran\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("run.sh")
    if big:
        with open(root / "big.bin", "wb") as f:
            block = os.urandom(1 << 20)
            for i in range(big >> 20):
                f.write(block[i % 256 :] + block[: i % 256])


class PeakRSS:
    """The highest resident memory of process ``pid`` seen while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_tree_of_2000_files_and_a_200mb_file_round_trips_in_bounded_memory(
    private_server: ServerProcess, tmp_path: Path
) -> None:
    private_server.start()
    source, back = tmp_path / "source", tmp_path / "back"
    source.mkdir()
    make_tree(source, 2000, big=BIG)
    with Bastion(base_url=private_server.url, timeout=600) as client:
        sid = client.sessions.create()["session_id"]
        client.sessions.start(sid)
        assert private_server.proc is not None
        watch = PeakRSS(private_server.proc.pid)
        baseline = watch.rss()
        with watch:
            start = time.monotonic()
            result = client.files.upload_dir(sid, source, f"{HOME}/tree")
            up = time.monotonic() - start
            start = time.monotonic()
            entries = client.files.download_dir(sid, f"{HOME}/tree", back)
            down = time.monotonic() - start
        growth = watch.peak - baseline
        print(
            f"\nupload {up:.1f}s, download {down:.1f}s, server RSS {baseline >> 20} MiB "
            f"-> peak {watch.peak >> 20} MiB (+{growth >> 20} MiB)"
        )
        assert result["files"] == 2000 + 3
        assert result["symlinks"] == 1
        assert result["bytes"] >= BIG
        assert entries == len(snapshot(source))
        assert snapshot(back) == snapshot(source)
        # Nothing of the tree is held whole: far below the big file's 200 MB.
        assert growth < 64 * 1024 * 1024, f"server RSS grew by {growth >> 20} MiB"
        # What arrived is usable inside: the executable runs, the link resolves.
        job = client.jobs.run_and_wait(sid, ["sh", "-c", f"cd {HOME}/tree && ./link"])
        assert job["output"] is not None and job["output"]["console_output"] == "ran\n"
        client.sessions.delete(sid)


def test_async_round_trip_matches_sync(server: ServerProcess, sid: str, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source, 50)

    async def round_trip() -> tuple[int, int]:
        async with AsyncBastion(base_url=server.url) as client:
            seen: list[int] = []
            result = await client.files.upload_dir(sid, source, f"{HOME}/a", progress=seen.append)
            count = await client.files.download_dir(sid, f"{HOME}/a", tmp_path / "back")
            assert seen and seen[-1] == result["bytes"]
            return result["files"], count

    files, count = asyncio.run(round_trip())
    assert files == 52
    assert count == len(snapshot(source))
    assert snapshot(tmp_path / "back") == snapshot(source)


def test_upload_into_existing_tree_replaces_files_and_keeps_others(
    client: Bastion, sid: str, tmp_path: Path
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a").write_bytes(b"first")
    (tmp_path / "one" / "keep").write_bytes(b"kept")
    client.files.upload_dir(sid, tmp_path / "one", f"{HOME}/t")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a").write_bytes(b"second")
    client.files.upload_dir(sid, tmp_path / "two", f"{HOME}/t")
    assert client.files.download(sid, f"{HOME}/t/a") == b"second"
    assert client.files.download(sid, f"{HOME}/t/keep") == b"kept"


def test_errors_name_the_problem(client: Bastion, sid: str, tmp_path: Path) -> None:
    client.files.upload(sid, b"x", f"{HOME}/plain")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    with pytest.raises(FileUploadError) as up:
        client.files.upload_dir(sid, tmp_path / "d", f"{HOME}/plain")
    assert up.value.code == "not_a_directory"
    with pytest.raises(FileDownloadError) as down:
        client.files.download_dir(sid, f"{HOME}/plain", tmp_path / "out")
    assert down.value.code == "not_a_directory"
    with pytest.raises(FileDownloadError) as missing:
        client.files.download_dir(sid, f"{HOME}/nope", tmp_path / "out")
    assert missing.value.code == "file_not_found"
    assert not (tmp_path / "out").exists()  # nothing made locally for a refused download


def test_cli_recursive_upload_and_download(server: ServerProcess, sid: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    make_tree(source, 30)
    env = {**os.environ, "BASTION_URL": server.url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion", "files", *args],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip

    plain = cli("upload", str(source), f"{sid}:{HOME}/x")
    assert plain.returncode != 0 and "-r" in plain.stderr
    up = cli("upload", "-r", str(source), f"{sid}:{HOME}/cli")
    assert up.returncode == 0, up.stderr
    assert f"{sid}:{HOME}/cli (32 files" in up.stdout
    down = cli("download", "-r", f"{sid}:{HOME}/cli", str(tmp_path / "got"))
    assert down.returncode == 0, down.stderr
    assert snapshot(tmp_path / "got") == snapshot(source)
    as_json = cli("download", "-r", f"{sid}:{HOME}/cli", str(tmp_path / "again"), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert '"entries"' in as_json.stdout


def test_a_stop_ends_a_directory_upload_at_once(server: ServerProcess, client: Bastion) -> None:
    """An upload waiting on a slow client holds the session's disk open: a stop ends
    it (409 session_stopped) instead of waiting for the client."""
    sid = client.sessions.create()["session_id"]
    client.sessions.start(sid)
    release = threading.Event()

    def slow_tar() -> Iterator[bytes]:
        info = tarfile.TarInfo("big")
        info.size = 8 << 20
        yield info.tobuf(tarfile.GNU_FORMAT)
        yield bytes(2 << 20)  # part of the file, then the client stalls
        release.wait(60)
        yield bytes(6 << 20) + bytes(-info.size % 512) + bytes(1024)

    answer: list[httpx.Response] = []
    upload = threading.Thread(
        target=lambda: answer.append(
            httpx.post(
                f"{server.url}/v1/sessions/{sid}/files/archive",
                params={"path": f"{HOME}/slow"},
                content=slow_tar(),
                timeout=60,
            )
        )
    )
    upload.start()
    try:
        time.sleep(1.5)  # the extraction is under way, waiting for more bytes
        start = time.monotonic()
        client.sessions.stop(sid)
        took = time.monotonic() - start
    finally:
        release.set()
        upload.join(60)
        client.sessions.delete(sid)
    assert took < 5, f"the stop waited {took:.1f}s for the upload"
    assert answer and answer[0].status_code == 409, answer and answer[0].text
    assert answer[0].json()["error"]["code"] == "session_stopped"
