"""The files contract over the data plane (real TCP on loopback, an in-memory sandbox):
bytes both ways in frames, and each kind of error arriving as itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bastion_server.cluster import data_plane
from bastion_server.cluster.data_plane import DataPlaneServer
from bastion_server.cluster.remote_files import RemoteFiles
from bastion_server.runtime.base import ExecSpec, Process, SandboxNotRunning
from bastion_server.runtime.files import (
    Entry,
    ExtractResult,
    FileReader,
    NotFound,
    SandboxFiles,
    TooLarge,
)

SECRET = b"k" * 32


class MemoryReader(FileReader):
    def __init__(self, data: bytes) -> None:
        self.size, self._data = len(data), data

    async def read(self) -> bytes:
        chunk, self._data = self._data[: 1024 * 1024], self._data[1024 * 1024 :]
        return chunk

    async def close(self) -> None:
        pass


class MemoryFiles(SandboxFiles):
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.chunks_seen = 0

    async def list(
        self, path: str, *, after: bytes | None = None, count: int | None = None,
        as_root: bool = False,
    ) -> list[Entry]:  # fmt: skip
        return [
            Entry(n.rsplit("/", 1)[1], n, len(d), "file", "", "644") for n, d in self.files.items()
        ]

    async def write(
        self, path: str, chunks: AsyncIterator[bytes], max_bytes: int, *,
        mode: int | None = None, as_root: bool = False,
    ) -> int:  # fmt: skip
        data = bytearray()
        async for chunk in chunks:
            self.chunks_seen += 1
            data += chunk
            if len(data) > max_bytes:
                raise TooLarge(f"over {max_bytes} bytes")
        self.files[path] = bytes(data)
        return len(data)

    async def open_read(self, path: str, *, as_root: bool = False) -> FileReader:
        if path not in self.files:
            raise NotFound(f"{path} does not exist")
        return MemoryReader(self.files[path])

    async def delete(self, path: str, *, recursive: bool = False, as_root: bool = False) -> None:
        if self.files.pop(path, None) is None:
            raise NotFound(f"{path} does not exist")

    async def extract_archive(
        self, path: str, chunks: AsyncIterator[bytes], *, as_root: bool = False
    ) -> ExtractResult:
        size = sum([len(c) async for c in chunks])
        return ExtractResult(files=1, bytes=size)

    async def read_archive(self, path: str, *, as_root: bool = False) -> AsyncIterator[bytes]:
        if path != "/dir":
            raise NotFound(f"{path} does not exist")
        for name in sorted(self.files):
            yield self.files[name]


async def _chunks(total: int, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for at in range(0, total, size):
        yield b"a" * min(size, total - at)


async def _setup() -> tuple[DataPlaneServer, MemoryFiles, Any]:
    memory = MemoryFiles()

    async def no_exec(session_id: str, spec: ExecSpec) -> Process:
        raise AssertionError("no process here")

    def files_of(session_id: str) -> SandboxFiles:
        if session_id != "ses_1":
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        return memory

    server = DataPlaneServer(no_exec, SECRET, files_of)
    address = await server.start("127.0.0.1")

    def remote(session_id: str) -> RemoteFiles:
        async def connect(request: dict[str, Any]) -> Any:
            hello = {"session_id": session_id, "files": request}
            return await data_plane.connect(address, SECRET, hello)

        return RemoteFiles(connect)

    return server, memory, remote


def test_files_both_ways() -> None:
    async def run() -> None:
        server, memory, remote = await _setup()
        files = remote("ses_1")
        assert await files.write("/f", _chunks(5 * 1024 * 1024), 10**9) == 5 * 1024 * 1024
        assert memory.chunks_seen > 1  # streamed, not one payload
        reader = await files.open_read("/f")
        got = bytearray()
        while chunk := await reader.read():
            got += chunk
        await reader.close()
        assert reader.size == len(got) == 5 * 1024 * 1024
        assert [e.name for e in await files.list("/")] == ["f"]
        assert b"".join([c async for c in files.read_archive("/dir")]) == bytes(got)
        assert (await files.extract_archive("/x", _chunks(1000))).bytes == 1000
        await files.delete("/f")
        assert memory.files == {}
        await server.close()

    asyncio.run(run())


def test_errors_arrive_as_themselves() -> None:
    async def run() -> None:
        server, memory, remote = await _setup()
        files = remote("ses_1")
        with pytest.raises(TooLarge):
            await files.write("/big", _chunks(4 * 1024 * 1024), 1024 * 1024)
        assert "/big" not in memory.files
        with pytest.raises(NotFound):
            await files.open_read("/missing")
        with pytest.raises(NotFound):
            await anext(files.read_archive("/nodir"))
        with pytest.raises(SandboxNotRunning):
            await remote("ses_stopped").list("/")
        await server.close()

    asyncio.run(run())
