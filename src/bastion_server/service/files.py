"""Files: move bytes in and out of a running session, confined to its root."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from bastion.wire import ErrorCode
from bastion_server.config import ServerConfig
from bastion_server.runtime import sandbox_fs
from bastion_server.runtime.base import Runtime, SandboxNotRunning
from bastion_server.runtime.sandbox_fs import Entry, SandboxFS
from bastion_server.service.errors import ServiceError
from bastion_server.service.sessions import SessionService

_CODES = {
    "invalid_path": ErrorCode.INVALID_PATH,
    "not_found": ErrorCode.FILE_NOT_FOUND,
    "not_a_directory": ErrorCode.NOT_A_DIRECTORY,
    "is_a_directory": ErrorCode.IS_A_DIRECTORY,
    "not_empty": ErrorCode.DIRECTORY_NOT_EMPTY,
    "too_large": ErrorCode.FILE_TOO_LARGE,
    "disk_full": ErrorCode.DISK_FULL,
    "permission_denied": ErrorCode.PERMISSION_DENIED,
    "failed": ErrorCode.FILE_OPERATION_FAILED,
}


def _service_error(exc: sandbox_fs.FsError) -> ServiceError:
    return ServiceError(_CODES[exc.kind], exc.message)


class FileService:
    def __init__(self, runtime: Runtime, sessions: SessionService, config: ServerConfig) -> None:
        self.runtime, self.sessions, self.config = runtime, sessions, config

    def _fs(self, owner: str, session_id: str) -> SandboxFS:
        self.sessions.require_running(owner, session_id)
        try:
            return self.runtime.files(session_id)
        except SandboxNotRunning as exc:
            raise ServiceError(ErrorCode.SESSION_STATE, str(exc)) from exc

    @staticmethod
    def check_path(path: str) -> None:
        """Reject a bad path before any byte of a request body is read."""
        try:
            sandbox_fs.split_path(path)
        except sandbox_fs.FsError as exc:
            raise _service_error(exc) from exc

    async def upload(
        self,
        owner: str,
        session_id: str,
        path: str,
        chunks: AsyncIterator[bytes],
        declared_size: int | None,
        *,
        mode: int | None = None,
        as_root: bool = False,
    ) -> int:
        self.check_path(path)
        limit = self.config.max_upload_bytes
        if declared_size is not None and declared_size > limit:
            raise ServiceError(
                ErrorCode.FILE_TOO_LARGE,
                f"upload of {declared_size} bytes exceeds the limit of {limit}",
            )
        fs = self._fs(owner, session_id)
        try:
            return await fs.write(path, chunks, limit, mode=mode, as_root=as_root)
        except sandbox_fs.FsError as exc:
            raise _service_error(exc) from exc

    async def list(
        self, owner: str, session_id: str, path: str, *, as_root: bool = False
    ) -> list[Entry]:
        fs = self._fs(owner, session_id)
        try:
            return await asyncio.to_thread(fs.list, path, as_root=as_root)
        except sandbox_fs.FsError as exc:
            raise _service_error(exc) from exc

    async def download(
        self, owner: str, session_id: str, path: str, *, as_root: bool = False
    ) -> tuple[Iterator[bytes], int]:
        """An iterator over the file's bytes (it owns the open file) and the size."""
        fs = self._fs(owner, session_id)
        try:
            fd, size = await asyncio.to_thread(fs.open_read, path, as_root=as_root)
        except sandbox_fs.FsError as exc:
            raise _service_error(exc) from exc
        return SandboxFS.iter_fd(fd), size

    async def delete(
        self, owner: str, session_id: str, path: str, *, recursive: bool, as_root: bool = False
    ) -> None:
        fs = self._fs(owner, session_id)
        try:
            await asyncio.to_thread(fs.delete, path, recursive=recursive, as_root=as_root)
        except sandbox_fs.FsError as exc:
            raise _service_error(exc) from exc
