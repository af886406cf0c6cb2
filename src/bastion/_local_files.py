"""The SDK's local file I/O: reading upload sources, writing download destinations.

Both clients stream: an upload is read in pieces as it is sent, a download written
in pieces as it arrives, never whole in memory.  The async client runs the blocking
``read``/``write``/``open`` calls of plain files in a worker thread (one call at a
time, in order), and awaits those of async file objects.  An ``OSError`` from a local
file becomes :class:`LocalFileError` (still an ``OSError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterator
from typing import IO, Protocol, TypeAlias

from ._base import UPLOAD_CHUNK_SIZE
from ._exceptions import LocalFileError


class SupportsReadBytes(Protocol):
    """A binary file object: ``read(n)`` returns at most ``n`` bytes, ``b""`` at EOF."""

    def read(self, size: int, /) -> bytes: ...


class SupportsAsyncReadBytes(Protocol):
    """An async binary file object (``aiofiles``, ``anyio.AsyncFile``...)."""

    def read(self, size: int, /) -> Awaitable[bytes]: ...


class SupportsWriteBytes(Protocol):
    def write(self, data: bytes, /) -> int: ...


class SupportsAsyncWriteBytes(Protocol):
    def write(self, data: bytes, /) -> Awaitable[int]: ...


UploadData: TypeAlias = bytes | bytearray | memoryview | SupportsReadBytes
#: What the async client uploads: also async file objects and async iterables.
AsyncUploadData: TypeAlias = (
    bytes
    | bytearray
    | memoryview
    | SupportsReadBytes
    | SupportsAsyncReadBytes
    | AsyncIterable[bytes]
)
DownloadDestination: TypeAlias = str | os.PathLike[str] | SupportsWriteBytes
AsyncDownloadDestination: TypeAlias = (
    str | os.PathLike[str] | SupportsWriteBytes | SupportsAsyncWriteBytes
)

RequestContent: TypeAlias = bytes | Iterator[bytes] | AsyncIterator[bytes]

_READ_UPLOAD = "reading the upload source"


# --------------------------------------------------------------------------- uploads


class UploadBody:
    """The content of one upload, which a retry may send again only if that is safe.

    ``bytes`` go as they are; other buffers are sent in slices (no copy of the whole
    buffer) with their length; file objects and iterables are read ``chunk_size``
    bytes at a time and sent with chunked transfer encoding.  A buffer can be sent
    any number of times (:attr:`buffered`); a stream only until its first read.

    Build it with :func:`upload_body` (sync) or :func:`async_upload_body`.
    """

    def __init__(
        self,
        data: bytes
        | memoryview
        | SupportsReadBytes
        | SupportsAsyncReadBytes
        | AsyncIterable[bytes],
        chunk_size: int,
        *,
        is_async: bool,
    ) -> None:
        self.headers = {"Content-Type": "application/octet-stream"}
        self._data = data
        self._chunk_size = chunk_size
        self._async = is_async
        self.buffered = isinstance(data, bytes | memoryview)
        #: The stream source has been read from: it cannot be sent again.
        self.started = False
        if isinstance(data, memoryview):
            # httpx sends the iterator with this Content-Length instead of chunked.
            self.headers["Content-Length"] = str(data.nbytes)

    def can_resend(self) -> bool:
        return self.buffered or not self.started

    def content(self) -> RequestContent:
        """The request content for one attempt."""
        data = self._data
        if isinstance(data, bytes):
            return data
        if isinstance(data, memoryview):
            return self._aiter_buffer(data) if self._async else self._iter_buffer(data)
        if not self._async:
            return self._iter_file(data)  # type: ignore[arg-type]
        if callable(getattr(data, "read", None)):
            return self._aiter_file(data)  # type: ignore[arg-type]
        return self._aiter_iterable(data)  # type: ignore[arg-type]

    def _iter_buffer(self, view: memoryview) -> Iterator[bytes]:
        for start in range(0, view.nbytes, self._chunk_size):
            yield bytes(view[start : start + self._chunk_size])

    async def _aiter_buffer(self, view: memoryview) -> AsyncIterator[bytes]:
        for chunk in self._iter_buffer(view):
            yield chunk

    def _iter_file(self, fileobj: SupportsReadBytes) -> Iterator[bytes]:
        while True:
            self.started = True
            try:
                chunk: object = fileobj.read(self._chunk_size)
            except OSError as exc:
                raise LocalFileError.wrap(exc, _READ_UPLOAD) from exc
            data = _checked_chunk(chunk)
            if not data:
                return
            yield data

    async def _aiter_file(
        self, fileobj: SupportsReadBytes | SupportsAsyncReadBytes
    ) -> AsyncIterator[bytes]:
        read = fileobj.read
        # A plain file's read blocks: run it in a worker thread, off the event loop.
        in_thread = not inspect.iscoroutinefunction(read)
        while True:
            self.started = True
            try:
                if in_thread:
                    chunk: object = await asyncio.to_thread(read, self._chunk_size)
                else:
                    chunk = read(self._chunk_size)
                if inspect.isawaitable(chunk):
                    chunk = await chunk
            except OSError as exc:
                raise LocalFileError.wrap(exc, _READ_UPLOAD) from exc
            data = _checked_chunk(chunk)
            if not data:
                return
            yield data

    async def _aiter_iterable(self, iterable: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        self.started = True
        try:
            async for chunk in iterable:
                data = _checked_chunk(chunk, iterable=True)
                if data:
                    yield data
        except OSError as exc:
            raise LocalFileError.wrap(exc, _READ_UPLOAD) from exc


def _checked_chunk(chunk: object, *, iterable: bool = False) -> bytes:
    what = "upload iterable yielded" if iterable else "upload file object returned"
    if chunk is None and not iterable:
        # A non-blocking file with no data ready; treating it as EOF would silently
        # truncate the upload.
        raise ValueError("upload file object returned None: non-blocking files are not supported")
    if not isinstance(chunk, bytes | bytearray | memoryview):
        raise TypeError(f"{what} {type(chunk).__name__}, not bytes")
    return bytes(chunk)


def _check_not_text(data: object) -> None:
    if isinstance(data, str):
        raise TypeError("upload data must be bytes or a binary file object, not str")
    if isinstance(data, io.TextIOBase):
        raise TypeError("upload needs a file opened in binary mode ('rb'), not a text file")


def _as_buffer(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    # A flat byte view of any buffer, without copying it.
    return data if isinstance(data, bytes) else memoryview(data).cast("B")


def upload_body(data: UploadData, chunk_size: int = UPLOAD_CHUNK_SIZE) -> UploadBody:
    """The body of a sync upload: a buffer, or a binary file object read in chunks.

    Raises:
        TypeError: ``data`` is a ``str``, a text file or no binary data at all.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return UploadBody(_as_buffer(data), chunk_size, is_async=False)
    _check_not_text(data)
    if not callable(getattr(data, "read", None)):
        raise TypeError(
            f"upload data must be bytes or a binary file object, not {type(data).__name__}"
        )
    return UploadBody(data, chunk_size, is_async=False)


def async_upload_body(data: AsyncUploadData, chunk_size: int = UPLOAD_CHUNK_SIZE) -> UploadBody:
    """The body of an async upload: a buffer, a binary file object (sync or async,
    read in chunks), or an async iterable of ``bytes``.

    Raises:
        TypeError: ``data`` is a ``str``, a text file or no binary data at all.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return UploadBody(_as_buffer(data), chunk_size, is_async=True)
    _check_not_text(data)
    if not callable(getattr(data, "read", None)) and not hasattr(data, "__aiter__"):
        raise TypeError(
            "upload data must be bytes, a binary file object or an async iterable of bytes, "
            f"not {type(data).__name__}"
        )
    return UploadBody(data, chunk_size, is_async=True)


# --------------------------------------------------------------------------- downloads

_OPEN_DEST = "opening the download destination"
_WRITE_DEST = "writing the download destination"


def write_chunks(chunks: Iterator[bytes], fileobj: SupportsWriteBytes) -> int:
    """Write every chunk to ``fileobj``; the number of bytes written."""
    written = 0
    for chunk in chunks:
        try:
            fileobj.write(chunk)
        except OSError as exc:
            raise LocalFileError.wrap(exc, _WRITE_DEST) from exc
        written += len(chunk)
    return written


@contextlib.contextmanager
def destination_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """``path`` opened for writing; removed again if the block fails.

    Only a file this call created and half-wrote is removed: open the file only once
    the server has accepted the download, so an error answer leaves an existing file
    untouched.
    """
    try:
        fileobj = open(path, "wb")
    except OSError as exc:
        raise LocalFileError.wrap(exc, _OPEN_DEST) from exc
    try:
        yield fileobj
        fileobj.close()  # a full disk may only show at the last flush
    except BaseException as exc:
        with contextlib.suppress(OSError):
            fileobj.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError):
            raise LocalFileError.wrap(exc, _WRITE_DEST) from exc
        raise


class AsyncDestination:
    """Where the async ``download_to`` writes: a path or a (sync or async) file object.

    Plain files are opened, written and closed in a worker thread; an async file
    object's ``write`` is awaited.  Use as ``async with``: a file this object opened
    is closed, and removed if the block fails.
    """

    def __init__(self, dest: AsyncDownloadDestination) -> None:
        self._dest = dest
        self._path = dest if isinstance(dest, str | os.PathLike) else None
        self._file: SupportsWriteBytes | SupportsAsyncWriteBytes | None = None
        self.written = 0

    async def __aenter__(self) -> AsyncDestination:
        if self._path is None:
            self._file = self._dest  # type: ignore[assignment]
            return self
        try:
            self._file = await asyncio.to_thread(open, self._path, "wb")
        except OSError as exc:
            raise LocalFileError.wrap(exc, _OPEN_DEST) from exc
        return self

    async def write(self, chunk: bytes) -> None:
        assert self._file is not None
        write = self._file.write
        try:
            if inspect.iscoroutinefunction(write):
                await write(chunk)
            else:
                result = await asyncio.to_thread(write, chunk)
                if inspect.isawaitable(result):
                    await result
        except OSError as exc:
            raise LocalFileError.wrap(exc, _WRITE_DEST) from exc
        self.written += len(chunk)

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self._path is None:
            return
        fileobj = self._file
        assert isinstance(fileobj, io.IOBase)
        path = self._path
        if exc is None:
            try:
                await asyncio.to_thread(fileobj.close)
                return
            except OSError as close_exc:
                await asyncio.to_thread(_discard, fileobj, path)
                raise LocalFileError.wrap(close_exc, _WRITE_DEST) from close_exc
        # Failed or cancelled: remove the partial file.  Shielded, so a cancellation
        # arriving now cannot leave it behind; done inline if the loop is closing.
        try:
            await asyncio.shield(asyncio.to_thread(_discard, fileobj, path))
        except (asyncio.CancelledError, RuntimeError):
            _discard(fileobj, path)


def _discard(fileobj: io.IOBase, path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):
        fileobj.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
