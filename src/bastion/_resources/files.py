"""``bastion.files``: move files in and out of a session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from .._base import (
    DOWNLOAD_CHUNK_SIZE,
    DownloadDestination,
    SupportsWriteBytes,
    UploadData,
    upload_body,
)
from ..wire import FileDeleteResult, FileList, FileUploadResult

if TYPE_CHECKING:
    from .._client import Bastion


class Files:
    """Upload, list, download and delete files in a running session (``bastion.files``).

    Paths are absolute paths inside the session's filesystem.
    """

    def __init__(self, client: Bastion) -> None:
        self._client = client

    def upload(self, session_id: str, data: UploadData, path: str) -> FileUploadResult:
        """Write ``data`` to ``path`` in the session, creating parent directories.

        A file object is streamed in 1 MiB pieces and never read whole into memory.

        Args:
            session_id: A running session's id.
            data: ``bytes``/``bytearray``/``memoryview``, or a file object opened in
                binary mode (read from its current position to its end).
            path: Absolute destination path; an existing file is replaced.

        Returns:
            ``{"path", "size"}`` of the written file.

        Raises:
            TypeError: ``data`` is a ``str``, a text file or not binary data.
            FileUploadError: Bad path, too large, parent is not a directory, ...
            SessionStateError: The session is not running.
        """
        content, headers = upload_body(data)
        result = self._client._request(
            "PUT",
            self._url(session_id),
            params={"path": path},
            content=content,
            headers=headers,
            file_op="upload",
        )
        return cast(FileUploadResult, result)

    def delete(self, session_id: str, path: str, *, recursive: bool = False) -> FileDeleteResult:
        """Delete a file, or a directory (which must be empty unless ``recursive``).

        Args:
            session_id: A running session's id.
            path: Absolute path to delete.
            recursive: Delete a directory with everything in it.

        Returns:
            ``{"path", "deleted"}``.

        Raises:
            FileDeleteError: No such path, non-empty directory, ...
            SessionStateError: The session is not running.
        """
        params = {"path": path}
        if recursive:
            params["recursive"] = "true"
        result = self._client._request(
            "DELETE", self._url(session_id), params=params, file_op="delete"
        )
        return cast(FileDeleteResult, result)

    def download(self, session_id: str, path: str) -> bytes:
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
        response = self._client._send(
            "GET", self._url(session_id, "content"), params={"path": path}, file_op="download"
        )
        return response.content

    def iter_download(
        self, session_id: str, path: str, chunk_size: int = DOWNLOAD_CHUNK_SIZE
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
        with self._client._stream(
            "GET", self._url(session_id, "content"), params={"path": path}, file_op="download"
        ) as response:
            yield from self._client._iter_body(response, chunk_size)

    def download_to(
        self,
        session_id: str,
        path: str,
        dest: DownloadDestination,
        *,
        chunk_size: int = DOWNLOAD_CHUNK_SIZE,
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
            APIConnectionError: The connection broke during the transfer.
        """
        with self._client._stream(
            "GET", self._url(session_id, "content"), params={"path": path}, file_op="download"
        ) as response:
            chunks = self._client._iter_body(response, chunk_size)
            if not isinstance(dest, str | os.PathLike):
                return _write_chunks(chunks, dest)
            with open(dest, "wb") as fileobj:
                try:
                    return _write_chunks(chunks, fileobj)
                except BaseException:
                    # Only a file this call created and half-wrote is removed.
                    with contextlib.suppress(OSError):
                        os.unlink(dest)
                    raise

    def list(self, session_id: str, path: str = "/") -> FileList:
        """List a directory.

        Args:
            session_id: A running session's id.
            path: Absolute path of the directory.

        Returns:
            ``{"path", "files": [{"name", "path", "size", "type", "modified_at",
            "mode"}, ...]}``.

        Raises:
            FileListError: No such directory, not a directory, ...
            SessionStateError: The session is not running.
        """
        result = self._client._request(
            "GET", self._url(session_id), params={"path": path}, file_op="list"
        )
        return cast(FileList, result)

    def _url(self, session_id: str, *rest: str) -> str:
        return self._client._url("sessions", session_id, "files", *rest)


def _write_chunks(chunks: Iterator[bytes], fileobj: SupportsWriteBytes) -> int:
    written = 0
    for chunk in chunks:
        fileobj.write(chunk)
        written += len(chunk)
    return written
