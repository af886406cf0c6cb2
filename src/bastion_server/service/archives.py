"""Directory trees in and out of a running session as streamed tar archives.

An upload's body is handed, as it arrives, to the runtime's files
(:meth:`SandboxFiles.extract_archive`), which hold a few MiB of it at most, whatever
the tree's size, and keep no copy anywhere.  A download is a tar made while the tree is
walked (:meth:`SandboxFiles.read_archive`).  The body
of an upload counts against ``max_upload_bytes`` like a single file's.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from bastion.wire import ErrorCode
from bastion_server.config import ServerConfig
from bastion_server.runtime.files import BadArchive, ExtractResult, FsError
from bastion_server.service.errors import ServiceError
from bastion_server.service.files import FileService, _service_error
from bastion_server.service.transfers import Transfer


def _error(exc: FsError) -> ServiceError:
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
            body = _capped(transfer.guard(chunks), limit)
            return await fs.extract_archive(path, body, as_root=as_root)
        except FsError as exc:
            raise _error(exc) from exc
        finally:
            transfer.finish()  # the extraction has ended: its files are closed

    async def download(
        self, owner: str, session_id: str, path: str, *, as_root: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """The tar stream of directory ``path``, made as it is sent; a stop of the
        session ends it (the answer is cut short).  Errors about ``path`` come here,
        before any byte.  Close it when done."""
        fs, transfer = self.files.begin_transfer(owner, session_id)
        tree = fs.read_archive(path, as_root=as_root)
        try:
            first = await anext(aiter(tree), b"")
        except BaseException as exc:
            await _aclose(tree)
            transfer.finish()
            if isinstance(exc, FsError):
                raise _error(exc) from exc
            raise
        return self._pieces(first, tree, transfer)

    @staticmethod
    async def _pieces(
        first: bytes, tree: AsyncIterator[bytes], transfer: Transfer
    ) -> AsyncGenerator[bytes, None]:
        try:
            if first:
                yield first
            async for piece in tree:
                transfer.raise_if_ended()
                yield piece
        finally:
            await _aclose(tree)
            transfer.finish()


async def _capped(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``chunks``, refused once they exceed ``limit`` bytes in all."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ServiceError(
                ErrorCode.FILE_TOO_LARGE, f"archive exceeds the upload limit of {limit} bytes"
            )
        yield chunk


async def _aclose(tree: AsyncIterator[bytes]) -> None:
    close = getattr(tree, "aclose", None)
    if close is not None:
        await close()
