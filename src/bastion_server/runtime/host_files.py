"""The files contract for a sandbox whose root the host can see (the OCI backend).

:class:`HostFiles` offers a :class:`~bastion_server.runtime.sandbox_fs.SandboxFS` (and
the tar code of :mod:`~bastion_server.runtime.sandbox_archive`) as the async
:class:`~bastion_server.runtime.files.SandboxFiles`: every system call runs in a
worker thread, and those that hold file descriptors run to their end even when their
caller is cancelled (:mod:`bastion_server.blocking`), so no descriptor is closed
under a thread still using it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from bastion._tar_stream import QueueReader, SourceFailed
from bastion_server.blocking import run_to_end, run_to_end_or_undo
from bastion_server.runtime import sandbox_archive
from bastion_server.runtime.files import (
    READ_CHUNK,
    Entry,
    ExtractResult,
    FileReader,
    SandboxFiles,
)
from bastion_server.runtime.sandbox_fs import SandboxFS

#: Archive bytes gathered before one hand-over to the extracting thread.
_ARCHIVE_BATCH = 1024 * 1024


class HostFileReader(FileReader):
    def __init__(self, fd: int, size: int) -> None:
        self.size, self._fd = size, fd

    async def read(self) -> bytes:
        if self._fd < 0:
            return b""
        return await run_to_end(os.read, self._fd, READ_CHUNK)

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class HostFiles(SandboxFiles):
    def __init__(self, fs: SandboxFS) -> None:
        self.fs = fs

    async def list(
        self,
        path: str,
        *,
        after: bytes | None = None,
        count: int | None = None,
        as_root: bool = False,
    ) -> list[Entry]:
        return await asyncio.to_thread(
            self.fs.list, path, after=after, count=count, as_root=as_root
        )

    async def write(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
        *,
        mode: int | None = None,
        as_root: bool = False,
    ) -> int:
        return await self.fs.write(path, chunks, max_bytes, mode=mode, as_root=as_root)

    async def open_read(self, path: str, *, as_root: bool = False) -> FileReader:
        fd, size = await run_to_end_or_undo(
            lambda opened: os.close(opened[0]), self.fs.open_read, path, as_root=as_root
        )
        return HostFileReader(fd, size)

    async def delete(self, path: str, *, recursive: bool = False, as_root: bool = False) -> None:
        await asyncio.to_thread(self.fs.delete, path, recursive=recursive, as_root=as_root)

    async def extract_archive(
        self, path: str, chunks: AsyncIterator[bytes], *, as_root: bool = False
    ) -> ExtractResult:
        """The body is handed, as it arrives, to an extraction in a worker thread
        through a bounded queue: a few MiB of it are held at most, whatever its size."""
        reader = QueueReader()
        extraction = asyncio.ensure_future(
            asyncio.to_thread(
                sandbox_archive.extract_archive, self.fs, path, reader, as_root=as_root
            )
        )
        extraction.add_done_callback(lambda _: reader.abandon())
        failure: BaseException | None = None
        try:
            await _feed(reader, chunks, extraction)
        except BaseException as exc:  # the client left, sent too much, or the session stops
            failure = exc
            await asyncio.to_thread(reader.fail, exc)
        try:
            result = await extraction
        except SourceFailed:
            assert failure is not None
            raise failure from None
        if failure is not None:
            raise failure
        return result

    async def read_archive(
        self, path: str, *, as_root: bool = False
    ) -> AsyncGenerator[bytes, None]:
        fd = await run_to_end_or_undo(
            os.close, sandbox_archive.open_tree, self.fs, path, as_root=as_root
        )
        tree = sandbox_archive.iter_tree(self.fs, fd, as_root=as_root)
        try:
            while True:
                # To its end: the tree (and the fd it holds) is closed only after.
                piece = await run_to_end(next, tree, None)
                if piece is None:
                    return
                yield piece
        finally:
            await asyncio.to_thread(_close, tree)


async def _feed(
    reader: QueueReader, chunks: AsyncIterator[bytes], extraction: asyncio.Future[ExtractResult]
) -> None:
    batch = bytearray()
    async for chunk in chunks:
        if extraction.done():
            return  # it ended (the archive's end, or an error): the rest is unread
        batch += chunk
        if len(batch) >= _ARCHIVE_BATCH:
            await asyncio.to_thread(reader.put, bytes(batch))
            batch.clear()
    if batch:
        await asyncio.to_thread(reader.put, bytes(batch))
    await asyncio.to_thread(reader.close)


def _close(tree: Iterator[bytes]) -> None:
    close = getattr(tree, "close", None)
    if close is not None:
        close()
