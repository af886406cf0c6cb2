"""Directory trees in and out of a running session as streamed tar archives.

An upload's body is handed, as it arrives, to an extraction running in a worker
thread (:func:`bastion_server.runtime.sandbox_archive.extract_archive`) through a
bounded queue: the server holds a few MiB of it at most, whatever the tree's size, and
keeps no copy anywhere.  A download is a tar made while the tree is walked.  The body
of an upload counts against ``max_upload_bytes`` like a single file's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from bastion._tar_stream import QueueReader, SourceFailed
from bastion.wire import ErrorCode
from bastion_server.config import ServerConfig
from bastion_server.runtime import sandbox_archive, sandbox_fs
from bastion_server.runtime.sandbox_archive import BadArchive, ExtractResult
from bastion_server.service.errors import ServiceError
from bastion_server.service.files import FileService, _service_error
from bastion_server.service.transfers import Transfer

#: Body bytes gathered before one hand-over to the extracting thread.
_BATCH = 1024 * 1024


def _error(exc: sandbox_fs.FsError) -> ServiceError:
    if isinstance(exc, BadArchive):
        return ServiceError(ErrorCode.INVALID_REQUEST, exc.message)
    return _service_error(exc)


class ArchiveService:
    def __init__(self, files: FileService, config: ServerConfig) -> None:
        self.files, self.config = files, config

    async def upload(
        self,
        owner: str,
        session_id: str,
        path: str,
        chunks: AsyncIterator[bytes],
        declared_size: int | None,
        *,
        as_root: bool = False,
    ) -> ExtractResult:
        """Extract the tar stream ``chunks`` into directory ``path`` (made if missing)."""
        self.files.check_path(path)
        limit = self.config.max_upload_bytes
        if declared_size is not None and declared_size > limit:
            raise ServiceError(
                ErrorCode.FILE_TOO_LARGE,
                f"archive of {declared_size} bytes exceeds the upload limit of {limit}",
            )
        fs, transfer = self.files.begin_transfer(owner, session_id)
        try:
            return await self._extract(fs, path, transfer.guard(chunks), limit, as_root)
        finally:
            transfer.finish()  # the extraction has ended: its files are closed

    async def _extract(
        self,
        fs: sandbox_fs.SandboxFS,
        path: str,
        chunks: AsyncIterator[bytes],
        limit: int,
        as_root: bool,
    ) -> ExtractResult:
        reader = QueueReader()
        extraction = asyncio.ensure_future(
            asyncio.to_thread(sandbox_archive.extract_archive, fs, path, reader, as_root=as_root)
        )
        extraction.add_done_callback(lambda _: reader.abandon())
        failure: BaseException | None = None
        try:
            await self._feed(reader, chunks, extraction, limit)
        except BaseException as exc:  # the client left, sent too much, or the session stops
            failure = exc
            await asyncio.to_thread(reader.fail, exc)
        try:
            result = await extraction
        except SourceFailed:
            assert failure is not None
            raise failure from None
        except sandbox_fs.FsError as exc:
            raise _error(exc) from exc
        if failure is not None:
            raise failure
        return result

    @staticmethod
    async def _feed(
        reader: QueueReader,
        chunks: AsyncIterator[bytes],
        extraction: asyncio.Future[ExtractResult],
        limit: int,
    ) -> None:
        size = 0
        batch = bytearray()
        async for chunk in chunks:
            if extraction.done():
                return  # it ended (the archive's end, or an error): the rest is unread
            size += len(chunk)
            if size > limit:
                raise ServiceError(
                    ErrorCode.FILE_TOO_LARGE, f"archive exceeds the upload limit of {limit} bytes"
                )
            batch += chunk
            if len(batch) >= _BATCH:
                await asyncio.to_thread(reader.put, bytes(batch))
                batch.clear()
        if batch:
            await asyncio.to_thread(reader.put, bytes(batch))
        await asyncio.to_thread(reader.close)

    async def download(
        self, owner: str, session_id: str, path: str, *, as_root: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """The tar stream of directory ``path``, made in worker threads; a stop of the
        session ends it (the answer is cut short).  Close it when done."""
        fs, transfer = self.files.begin_transfer(owner, session_id)
        try:
            fd = await asyncio.to_thread(sandbox_archive.open_tree, fs, path, as_root=as_root)
        except BaseException as exc:
            transfer.finish()
            if isinstance(exc, sandbox_fs.FsError):
                raise _error(exc) from exc
            raise
        return self._pieces(sandbox_archive.iter_tree(fs, fd, as_root=as_root), transfer)

    @staticmethod
    async def _pieces(tree: Iterator[bytes], transfer: Transfer) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                transfer.raise_if_ended()
                piece = await asyncio.to_thread(next, tree, None)
                if piece is None:
                    return
                yield piece
        finally:
            await asyncio.to_thread(_close, tree)
            transfer.finish()


def _close(tree: Iterator[bytes]) -> None:
    close = getattr(tree, "close", None)
    if close is not None:
        close()
