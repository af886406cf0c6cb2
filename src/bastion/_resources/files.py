"""``bastion.files``: move files in and out of a session (sync and async).

The requests of the file endpoints come first, shared by :class:`Files` and
:class:`AsyncFiles`; the two classes only send them and move the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, cast

from .._base import DOWNLOAD_CHUNK_SIZE, APIRequest, Attempts, FileOperation, docs_from
from .._exceptions import BastionError
from .._local_files import (
    AsyncDestination,
    AsyncDownloadDestination,
    AsyncUploadData,
    DownloadDestination,
    UploadBody,
    UploadData,
    async_upload_body,
    destination_file,
    upload_body,
    write_chunks,
)
from .._local_tree import LocalTreeArchive, ProgressCallback, extract_tree
from .._pages import PageRequestFor, merge_pages, page_params, wants_every_page
from .._tar_stream import ChunkReader, QueueReader
from ..wire import (
    MAX_PAGE_SIZE,
    ArchiveUploadResult,
    ErrorCode,
    FileDeleteResult,
    FileEntry,
    FileList,
    FileUploadResult,
    FileUser,
)
from .sessions import session_url

if TYPE_CHECKING:
    from .._client import AsyncBastion, Bastion


def _file_request(
    method: str,
    session_id: str,
    endpoint: tuple[str, ...],
    file_op: FileOperation,
    path: str,
    user: str,
    *,
    params: Mapping[str, str] | None = None,
    body: UploadBody | None = None,
    idempotent: bool = True,
) -> APIRequest:
    """A request of a file endpoint (``.../files`` and below) on ``path``, as ``user``
    (the sandbox user's is the default, left out of the query)."""
    query = {"path": path, **(params or {})}
    if user != "user":
        query["user"] = user
    return APIRequest(
        method,
        session_url(session_id, *endpoint),
        params=query,
        body=body,
        file_op=file_op,
        idempotent=idempotent,
    )


def upload_request(
    session_id: str, path: str, body: UploadBody, *, mode: int | None = None, user: str = "user"
) -> APIRequest:
    """``PUT .../files``: replaces the file, so idempotent when the body can be resent."""
    if mode is not None and not (isinstance(mode, int) and 0 <= mode <= 0o777):
        raise ValueError(f"mode must be permission bits between 0o000 and 0o777, not {mode!r}")
    extra = {"mode": format(mode, "o")} if mode is not None else {}
    return _file_request(
        "PUT",
        session_id,
        ("files",),
        "upload",
        path,
        user,
        params=extra,
        body=body,
        idempotent=body.buffered,
    )


def delete_file_request(
    session_id: str, path: str, recursive: bool, *, user: str = "user"
) -> APIRequest:
    extra = {"recursive": "true"} if recursive else {}
    return _file_request("DELETE", session_id, ("files",), "delete", path, user, params=extra)


def file_delete_recovered(
    path: str, error: BastionError, attempts: Attempts
) -> FileDeleteResult | None:
    """The result of a retried delete whose earlier attempt may have deleted ``path``.

    A ``file_not_found`` answer after such an attempt is the mark of its success.
    """
    if attempts.may_have_taken_effect and error.code == ErrorCode.FILE_NOT_FOUND:
        return {"path": path, "deleted": True}
    return None


def download_request(session_id: str, path: str, *, user: str = "user") -> APIRequest:
    return _file_request("GET", session_id, ("files", "content"), "download", path, user)


def upload_archive_request(
    session_id: str, path: str, body: UploadBody, *, user: str
) -> APIRequest:
    """``POST .../files/archive``: a tar stream extracted into directory ``path``
    (a stream: retried only if the connection could not be opened)."""
    return _file_request(
        "POST",
        session_id,
        ("files", "archive"),
        "upload",
        path,
        user,
        body=body,
        idempotent=False,
    )


def download_archive_request(session_id: str, path: str, *, user: str) -> APIRequest:
    """``GET .../files/archive``: directory ``path`` as a tar stream."""
    return _file_request("GET", session_id, ("files", "archive"), "download", path, user)


def list_files_request(
    session_id: str,
    path: str,
    *,
    user: str = "user",
    limit: int | None = None,
    cursor: str | None = None,
) -> APIRequest:
    params = page_params(limit, cursor)
    return _file_request("GET", session_id, ("files",), "list", path, user, params=params)


def _page_of(session_id: str, path: str, user: FileUser, page_size: int) -> PageRequestFor:
    """The request of a page of the listing of ``path``, given its cursor."""

    def request_for(cursor: str | None) -> APIRequest:
        return list_files_request(session_id, path, user=user, limit=page_size, cursor=cursor)

    return request_for


class Files:
    """Upload, list, download and delete files in a running session (``bastion.files``).

    Paths are absolute paths inside the session's filesystem.
    """

    def __init__(self, client: Bastion) -> None:
        self._client = client

    def upload(
        self,
        session_id: str,
        data: UploadData,
        path: str,
        *,
        mode: int | None = None,
        user: FileUser = "user",
    ) -> FileUploadResult:
        """Write ``data`` to ``path`` in the session, creating parent directories.

        A file object is streamed in 1 MiB pieces and never read whole into memory.
        An upload of ``bytes`` (or another buffer) is retried after a transient
        failure like any idempotent request; one from a file object only if the
        connection could not be opened, since a failed attempt may have consumed part
        of the file.

        Args:
            session_id: A running session's id.
            data: ``bytes``/``bytearray``/``memoryview``, or a file object opened in
                binary mode (read from its current position to its end).
            path: Absolute destination path; an existing file is replaced.
            mode: The file's permission bits (e.g. ``0o755``); default ``0o644``.
            user: Act as the session's ``"user"`` (the default: what a job could do)
                or as its ``"root"``.

        Returns:
            ``{"path", "size"}`` of the written file.

        Raises:
            TypeError: ``data`` is a ``str``, a text file or not binary data.
            FileUploadError: Bad path, too large, parent is not a directory, ...
            LocalFileError: Reading the file object failed.
            SessionStateError: The session is not running, or it was stopped or deleted
                during the upload (code ``session_stopped``; nothing was written).
        """
        request = upload_request(session_id, path, upload_body(data), mode=mode, user=user)
        return cast(FileUploadResult, self._client._request(request))

    def delete(
        self, session_id: str, path: str, *, recursive: bool = False, user: FileUser = "user"
    ) -> FileDeleteResult:
        """Delete a file, or a directory (which must be empty unless ``recursive``).

        Args:
            session_id: A running session's id.
            path: Absolute path to delete.
            recursive: Delete a directory with everything in it.

        Returns:
            ``{"path", "deleted"}``.  If a retry finds the path gone after an attempt
            whose answer was lost, that attempt deleted it: the result is success.

        Raises:
            FileDeleteError: No such path, non-empty directory, ...
            SessionStateError: The session is not running.
        """
        request = delete_file_request(session_id, path, recursive, user=user)
        attempts = self._client._attempts(request)
        try:
            return cast(FileDeleteResult, self._client._request(request, attempts=attempts))
        except BastionError as exc:
            recovered = file_delete_recovered(path, exc, attempts)
            if recovered is None:
                raise
            return recovered

    def download(self, session_id: str, path: str, *, user: FileUser = "user") -> bytes:
        """Read a whole file into memory (see :meth:`download_to` for large files).

        Args:
            session_id: A running session's id.
            path: Absolute path of the file.

        Returns:
            The file's content.

        Raises:
            FileDownloadError: No such file, is a directory, ...
            SessionStateError: The session is not running.
        """
        return self._client._send(download_request(session_id, path, user=user)).content

    def iter_download(
        self,
        session_id: str,
        path: str,
        chunk_size: int = DOWNLOAD_CHUNK_SIZE,
        *,
        user: FileUser = "user",
    ) -> Iterator[bytes]:
        """Stream a file's content in pieces of at most ``chunk_size`` bytes.

        The request is sent when iteration starts, so errors are raised by the first
        ``next()``.  Iterate to the end, or close the iterator (``contextlib.closing``)
        if you stop early, to release the connection at once.

        Args:
            session_id: A running session's id.
            path: Absolute path of the file.
            chunk_size: Largest piece yielded.

        Yields:
            The file's content, in order.

        Raises:
            FileDownloadError: No such file, is a directory, ...
            APIConnectionError: The connection broke during the transfer.
        """
        with self._client._stream(download_request(session_id, path, user=user)) as response:
            yield from self._client._iter_body(response, chunk_size)

    def download_to(
        self,
        session_id: str,
        path: str,
        dest: DownloadDestination,
        *,
        chunk_size: int = DOWNLOAD_CHUNK_SIZE,
        user: FileUser = "user",
    ) -> int:
        """Stream a file to a local path or a binary file object, never whole in memory.

        A local file is opened only once the server has accepted the request, so an
        error leaves an existing file untouched; if the transfer breaks midway the
        partial file is removed.

        Args:
            session_id: A running session's id.
            path: Absolute path of the file in the session.
            dest: A local path, or a file object opened for binary writing.
            chunk_size: Size of the pieces read and written.

        Returns:
            The number of bytes written.

        Raises:
            FileDownloadError: No such file, is a directory, ...
            LocalFileError: ``dest`` could not be opened or written.
            APIConnectionError: The connection broke during the transfer.
        """
        with self._client._stream(download_request(session_id, path, user=user)) as response:
            chunks = self._client._iter_body(response, chunk_size)
            if not isinstance(dest, str | os.PathLike):
                return write_chunks(chunks, dest)
            with destination_file(dest) as fileobj:
                return write_chunks(chunks, fileobj)

    def upload_dir(
        self,
        session_id: str,
        local_dir: str | os.PathLike[str],
        remote_dir: str,
        *,
        user: FileUser = "user",
        progress: ProgressCallback | None = None,
    ) -> ArchiveUploadResult:
        """Upload a local directory tree into ``remote_dir`` (made if missing).

        The tree goes as one tar stream made while it is walked: nothing is staged
        on either side.  Directories, regular files and symlinks (as links) are sent;
        other special files are left out.  Existing files are replaced; setuid,
        setgid and sticky bits are dropped by the server.

        Args:
            session_id: A running session's id.
            local_dir: The local directory whose content is uploaded.
            remote_dir: Absolute path of the directory in the session.
            user: Act as the session's ``"user"`` (default) or its ``"root"``.
            progress: Called with the bytes of file content sent so far.

        Returns:
            ``{"path", "files", "directories", "symlinks", "bytes"}``: what was
            written (``directories`` counts those created).

        Raises:
            FileUploadError: Bad path, too large, a refused member, ...
            LocalFileError: ``local_dir`` is not a directory or could not be read.
            SessionStateError: The session is not running.
        """
        body = upload_body(LocalTreeArchive(local_dir, progress))
        request = upload_archive_request(session_id, remote_dir, body, user=user)
        return cast(ArchiveUploadResult, self._client._request(request))

    def download_dir(
        self,
        session_id: str,
        remote_dir: str,
        local_dir: str | os.PathLike[str],
        *,
        user: FileUser = "user",
        progress: ProgressCallback | None = None,
    ) -> int:
        """Download directory ``remote_dir`` of the session into ``local_dir`` (made
        if missing), streamed: the tar the server makes while walking the tree is
        extracted as it arrives.

        Extraction uses :mod:`tarfile`'s ``"data"`` filter: absolute names, ``..``,
        links leading out of ``local_dir`` and special files are refused.

        Args:
            session_id: A running session's id.
            remote_dir: Absolute path of the directory in the session.
            local_dir: The local directory to write into.
            user: Act as the session's ``"user"`` (default) or its ``"root"``.
            progress: Called with the bytes of the archive received so far.

        Returns:
            The number of entries written.

        Raises:
            FileDownloadError: No such directory, not a directory, a refused member.
            LocalFileError: Writing into ``local_dir`` failed.
            APIConnectionError: The connection broke during the transfer.
        """
        request = download_archive_request(session_id, remote_dir, user=user)
        with self._client._stream(request) as response:
            chunks = _counted(self._client._iter_body(response, DOWNLOAD_CHUNK_SIZE), progress)
            return extract_tree(ChunkReader(chunks), local_dir)

    def list(
        self,
        session_id: str,
        path: str = "/",
        *,
        user: FileUser = "user",
        limit: int | None = None,
        cursor: str | None = None,
    ) -> FileList:
        """List a directory, in the order of the names' bytes.

        Without ``limit`` and ``cursor``: every entry, fetched page after page.  With
        either: one page, as the server answers it.

        Args:
            session_id: A running session's id.
            path: Absolute path of the directory.
            limit: At most this many entries (1 to 1000, ``bastion.wire.MAX_PAGE_SIZE``;
                the server's default 100).
            cursor: The ``next_cursor`` of the page before; none for the first page.

        Returns:
            ``{"path", "files": [{"name", "path", "size", "type", "modified_at",
            "mode"}, ...], "next_cursor": str | None}``: the cursor of the next page,
            None after the last (and always for the whole list).

        Raises:
            FileListError: No such directory, not a directory, ...
            SessionStateError: The session is not running.
            InvalidRequestError: ``limit`` is out of range, or ``cursor`` is not one of
                this list's (code ``invalid_cursor``).
        """
        if wants_every_page(limit, cursor):
            pages = self._client._pages(_page_of(session_id, path, user, MAX_PAGE_SIZE))
            return cast(FileList, merge_pages(pages, "files"))
        request = list_files_request(session_id, path, user=user, limit=limit, cursor=cursor)
        return cast(FileList, self._client._request(request))

    def iter_all(
        self,
        session_id: str,
        path: str = "/",
        *,
        user: FileUser = "user",
        page_size: int = MAX_PAGE_SIZE,
    ) -> Iterator[FileEntry]:
        """Every entry of a directory, in the order of the names' bytes, each page
        fetched as the loop reaches it (of entries made meanwhile, those whose names
        come after the page in progress are listed).

        Args:
            session_id: A running session's id.
            path: Absolute path of the directory.
            page_size: Entries per request (1 to 1000, the default).

        Yields:
            ``FileEntry`` after ``FileEntry``.

        Raises:
            FileListError: No such directory, not a directory, ...
            SessionStateError: The session is not running.
        """
        for page in self._client._pages(_page_of(session_id, path, user, page_size)):
            yield from page["files"]


@docs_from(Files)
class AsyncFiles:
    """Upload, list, download and delete files in a running session (``bastion.files``).

    The async twin of :class:`Files`: the same methods, as coroutines;
    ``iter_download`` is an async iterator.  Local files are read and written in a
    worker thread, so the event loop never waits on the disk.
    """

    def __init__(self, client: AsyncBastion) -> None:
        self._client = client

    async def upload(
        self,
        session_id: str,
        data: AsyncUploadData,
        path: str,
        *,
        mode: int | None = None,
        user: FileUser = "user",
    ) -> FileUploadResult:
        """Write ``data`` to ``path`` in the session, creating parent directories.

        Streamed in 1 MiB pieces, never read whole into memory.  Retried as
        :meth:`Files.upload` is: ``bytes`` like any idempotent request, a stream only
        if the connection could not be opened.

        Args:
            session_id: A running session's id.
            data: ``bytes``/``bytearray``/``memoryview``; a binary file object, sync
                (``open(..., "rb")``; read in a worker thread) or async (its ``read``
                awaited); or an async iterable of ``bytes``.
            path: Absolute destination path; an existing file is replaced.
            mode: The file's permission bits (e.g. ``0o755``); default ``0o644``.
            user: Act as the session's ``"user"`` (the default: what a job could do)
                or as its ``"root"``.

        Returns:
            ``{"path", "size"}`` of the written file.

        Raises:
            TypeError: ``data`` is a ``str``, a text file or not binary data.
            FileUploadError: Bad path, too large, parent is not a directory, ...
            LocalFileError: Reading the file object failed.
            SessionStateError: The session is not running, or it was stopped or deleted
                during the upload (code ``session_stopped``; nothing was written).
        """
        request = upload_request(session_id, path, async_upload_body(data), mode=mode, user=user)
        return cast(FileUploadResult, await self._client._request(request))

    async def delete(
        self, session_id: str, path: str, *, recursive: bool = False, user: FileUser = "user"
    ) -> FileDeleteResult:
        request = delete_file_request(session_id, path, recursive, user=user)
        attempts = self._client._attempts(request)
        try:
            data = await self._client._request(request, attempts=attempts)
        except BastionError as exc:
            recovered = file_delete_recovered(path, exc, attempts)
            if recovered is None:
                raise
            return recovered
        return cast(FileDeleteResult, data)

    async def download(self, session_id: str, path: str, *, user: FileUser = "user") -> bytes:
        return (await self._client._send(download_request(session_id, path, user=user))).content

    async def iter_download(
        self,
        session_id: str,
        path: str,
        chunk_size: int = DOWNLOAD_CHUNK_SIZE,
        *,
        user: FileUser = "user",
    ) -> AsyncIterator[bytes]:
        """Stream a file's content in pieces of at most ``chunk_size`` bytes.

        An async generator: the request is sent when iteration starts.  Iterate to
        the end, or close it (``contextlib.aclosing``) if you stop early, to release
        the connection at once::

            async with contextlib.aclosing(bastion.files.iter_download(sid, p)) as it:
                async for chunk in it:
                    ...

        Args:
            session_id: A running session's id.
            path: Absolute path of the file.
            chunk_size: Largest piece yielded.

        Yields:
            The file's content, in order.

        Raises:
            FileDownloadError: No such file, is a directory, ...
            APIConnectionError: The connection broke during the transfer.
        """
        async with self._client._stream(download_request(session_id, path, user=user)) as response:
            chunks = self._client._iter_body(response, chunk_size)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

    async def download_to(
        self,
        session_id: str,
        path: str,
        dest: AsyncDownloadDestination,
        *,
        chunk_size: int = DOWNLOAD_CHUNK_SIZE,
        user: FileUser = "user",
    ) -> int:
        """Stream a file to a local path or a binary file object, never whole in memory.

        As :meth:`Files.download_to`.  A path is opened and written in a worker
        thread; a sync file object's ``write`` runs in a worker thread too, an async
        file object's is awaited.

        Args:
            session_id: A running session's id.
            path: Absolute path of the file in the session.
            dest: A local path, or a file object (sync or async) for binary writing.
            chunk_size: Size of the pieces read and written.

        Returns:
            The number of bytes written.

        Raises:
            FileDownloadError: No such file, is a directory, ...
            LocalFileError: ``dest`` could not be opened or written.
            APIConnectionError: The connection broke during the transfer.
        """
        async with self._client._stream(download_request(session_id, path, user=user)) as response:
            chunks = self._client._iter_body(response, chunk_size)
            try:
                async with AsyncDestination(dest) as destination:
                    async for chunk in chunks:
                        await destination.write(chunk)
            finally:
                await chunks.aclose()
            return destination.written

    async def upload_dir(
        self,
        session_id: str,
        local_dir: str | os.PathLike[str],
        remote_dir: str,
        *,
        user: FileUser = "user",
        progress: ProgressCallback | None = None,
    ) -> ArchiveUploadResult:
        """Upload a local directory tree into ``remote_dir``, as :meth:`Files.upload_dir`
        (the tree is read in worker threads).

        Returns:
            ``{"path", "files", "directories", "symlinks", "bytes"}``.

        Raises:
            FileUploadError: Bad path, too large, a refused member, ...
            LocalFileError: ``local_dir`` is not a directory or could not be read.
            SessionStateError: The session is not running.
        """
        archive = await asyncio.to_thread(LocalTreeArchive, local_dir, progress)
        request = upload_archive_request(
            session_id, remote_dir, async_upload_body(archive), user=user
        )
        return cast(ArchiveUploadResult, await self._client._request(request))

    async def download_dir(
        self,
        session_id: str,
        remote_dir: str,
        local_dir: str | os.PathLike[str],
        *,
        user: FileUser = "user",
        progress: ProgressCallback | None = None,
    ) -> int:
        """Download directory ``remote_dir`` into ``local_dir``, as
        :meth:`Files.download_dir` (extracted in a worker thread as it arrives).

        Returns:
            The number of entries written.

        Raises:
            FileDownloadError: No such directory, not a directory, a refused member.
            LocalFileError: Writing into ``local_dir`` failed.
            APIConnectionError: The connection broke during the transfer.
        """
        request = download_archive_request(session_id, remote_dir, user=user)
        async with self._client._stream(request) as response:
            reader = QueueReader()
            extraction = asyncio.ensure_future(asyncio.to_thread(extract_tree, reader, local_dir))
            extraction.add_done_callback(lambda _: reader.abandon())
            chunks = self._client._iter_body(response, DOWNLOAD_CHUNK_SIZE)
            received = 0
            try:
                async for chunk in chunks:
                    if extraction.done():
                        break
                    received += len(chunk)
                    if progress is not None:
                        progress(received)
                    await asyncio.to_thread(reader.put, chunk)
                await asyncio.to_thread(reader.close)
            except BaseException as exc:
                await asyncio.to_thread(reader.fail, exc)
                with contextlib.suppress(BaseException):
                    await extraction
                raise
            finally:
                await chunks.aclose()
            return await extraction

    async def list(
        self,
        session_id: str,
        path: str = "/",
        *,
        user: FileUser = "user",
        limit: int | None = None,
        cursor: str | None = None,
    ) -> FileList:
        if wants_every_page(limit, cursor):
            request_for = _page_of(session_id, path, user, MAX_PAGE_SIZE)
            pages = [page async for page in self._client._pages(request_for)]
            return cast(FileList, merge_pages(pages, "files"))
        request = list_files_request(session_id, path, user=user, limit=limit, cursor=cursor)
        return cast(FileList, await self._client._request(request))

    async def iter_all(
        self,
        session_id: str,
        path: str = "/",
        *,
        user: FileUser = "user",
        page_size: int = MAX_PAGE_SIZE,
    ) -> AsyncIterator[FileEntry]:
        async for page in self._client._pages(_page_of(session_id, path, user, page_size)):
            for entry in page["files"]:
                yield entry


def _counted(chunks: Iterator[bytes], progress: ProgressCallback | None) -> Iterator[bytes]:
    """``chunks``, telling ``progress`` the bytes passed so far."""
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if progress is not None:
            progress(received)
        yield chunk
