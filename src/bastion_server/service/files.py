"""Files: move bytes in and out of a running session, confined to its root."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

from bastion.wire import ErrorCode, SessionStatus
from bastion_server.config import ServerConfig
from bastion_server.runtime import files as sandbox_files
from bastion_server.runtime.base import Runtime, SandboxNotRunning
from bastion_server.runtime.files import Entry, FileReader, FsError, SandboxFiles
from bastion_server.service.errors import ServiceError
from bastion_server.service.paging import Key, Page, PageRequest, invalid_cursor, take_page
from bastion_server.service.sessions import SessionService
from bastion_server.service.transfers import Transfer, Transfers
from bastion_server.store.sqlite import SessionRecord

P = ParamSpec("P")
T = TypeVar("T")

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


def _service_error(exc: FsError) -> ServiceError:
    return ServiceError(_CODES[exc.kind], exc.message)


def _name_key(entry: Entry) -> Key:
    """A listing's key: the name's bytes (as hex: a name need not be UTF-8)."""
    return (sandbox_files.encode_name(entry.name).hex(),)


class Download:
    """A file being read out of a session: its size, then its bytes from :meth:`chunks`,
    each handed on with :meth:`send` (a stop of the session ends it: ServiceError
    ``session_stopped``).  Whoever takes it must :meth:`close` it in the end."""

    def __init__(self, reader: FileReader, transfer: Transfer) -> None:
        self.size, self._reader, self._transfer = reader.size, reader, transfer
        self._closed = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                self._transfer.raise_if_ended()
                chunk = await self._reader.read()
                if not chunk:
                    return
                yield chunk
        finally:
            await self.close()

    async def send(self, step: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``step``, the client taking bytes: a stop of the session interrupts it."""
        return await self._transfer.wait(step, *args, **kwargs)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._reader.close()
            self._transfer.finish()


class FileService:
    def __init__(self, runtime: Runtime, sessions: SessionService, config: ServerConfig) -> None:
        self.runtime, self.sessions, self.config = runtime, sessions, config
        self.transfers = Transfers()
        # First of all, so that a stop does not wait on a client's slow upload.
        sessions.before_sandbox_stops.insert(0, self._end_transfers)
        sessions.busy_checks.append(self.transfers.active)

    def _fs(self, owner: str, session_id: str) -> SandboxFiles:
        return self._running_fs(self.sessions.require_running(owner, session_id))

    def _running_fs(self, record: SessionRecord) -> SandboxFiles:
        try:
            return self.runtime.files(record.id)
        except SandboxNotRunning as exc:
            raise ServiceError(ErrorCode.SESSION_STATE, str(exc)) from exc

    def begin_transfer(self, owner: str, session_id: str) -> tuple[SandboxFiles, Transfer]:
        """The session's files and a transfer of them (an upload, a download, an
        archive's): :meth:`Transfer.finish` it once its files are closed."""
        record = self.sessions.require_running(owner, session_id)
        # A run of the session is told from the next by when it became running.
        transfer = self.transfers.begin(session_id, record.updated_at)
        try:
            return self._running_fs(record), transfer
        except BaseException:
            transfer.finish()
            raise

    async def _end_transfers(self, session_id: str, reason: str) -> None:
        record = self.sessions.store.get_session(session_id)
        running = record is not None and record.status == SessionStatus.RUNNING
        await self.transfers.end_session(
            session_id, reason, record.updated_at if record is not None and running else None
        )

    @staticmethod
    def check_path(path: str) -> None:
        """Reject a bad path before any byte of a request body is read."""
        try:
            sandbox_files.split_path(path)
        except FsError as exc:
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
        fs, transfer = self.begin_transfer(owner, session_id)
        try:
            return await fs.write(path, transfer.guard(chunks), limit, mode=mode, as_root=as_root)
        except FsError as exc:
            raise _service_error(exc) from exc
        finally:
            transfer.finish()  # its files are closed: a stop waiting for it may go on

    async def list(
        self,
        owner: str,
        session_id: str,
        path: str,
        page: PageRequest | None = None,
        *,
        as_root: bool = False,
    ) -> Page[Entry]:
        """One page of the directory's entries, in the order of their names' bytes
        (without ``page``: every entry, in one)."""
        after = page.after("files", 1) if page is not None else None
        try:
            start = None if after is None else bytes.fromhex(after[0])
        except ValueError:
            raise invalid_cursor("files") from None
        fs = self._fs(owner, session_id)
        count = page.limit + 1 if page is not None else None
        try:
            entries = await fs.list(path, after=start, count=count, as_root=as_root)
        except FsError as exc:
            raise _service_error(exc) from exc
        if page is None:
            return Page(entries, None)
        return take_page("files", entries, page.limit, _name_key)

    async def download(
        self, owner: str, session_id: str, path: str, *, as_root: bool = False
    ) -> Download:
        """The file, opened: its size and its bytes (see :class:`Download`)."""
        fs, transfer = self.begin_transfer(owner, session_id)
        try:
            reader = await fs.open_read(path, as_root=as_root)
        except FsError as exc:
            transfer.finish()
            raise _service_error(exc) from exc
        except BaseException:
            transfer.finish()
            raise
        return Download(reader, transfer)

    async def delete(
        self, owner: str, session_id: str, path: str, *, recursive: bool, as_root: bool = False
    ) -> None:
        fs = self._fs(owner, session_id)
        try:
            await fs.delete(path, recursive=recursive, as_root=as_root)
        except FsError as exc:
            raise _service_error(exc) from exc
