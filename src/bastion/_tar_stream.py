"""Tar archives made and read as streams, never whole in memory or on disk.

Directory transfers (``files.upload_dir`` / ``download_dir`` and the server's
``/files/archive`` routes) move a tree as one tar stream.  Both sides build it member
by member as they walk their tree (:func:`member_header`, the file's bytes,
:func:`padding`, and :data:`END_OF_ARCHIVE` last), and read one with
:mod:`tarfile`'s stream mode over a file-like view of chunks
(:class:`ChunkReader`, or :class:`QueueReader` fed from an event loop).

Archives use the GNU format; names are bytes, carried as Python carries a name that
is not UTF-8 (lone surrogates, PEP 383), so they round-trip exactly.
"""

from __future__ import annotations

import queue
import tarfile
from collections.abc import Iterator
from typing import IO, cast

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
NAME_ENCODING = ("utf-8", "surrogateescape")

_TYPES = {"file": tarfile.REGTYPE, "directory": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}


def member_header(
    name: str, kind: str, *, size: int = 0, mode: int = 0o644, mtime: float = 0, linkname: str = ""
) -> bytes:
    """The header block(s) of one member: ``kind`` is file, directory or symlink."""
    info = tarfile.TarInfo(name + "/" if kind == "directory" else name)
    info.type = _TYPES[kind]
    info.size = size if kind == "file" else 0
    info.mode = mode & 0o7777
    info.mtime = int(mtime)
    info.linkname = linkname
    return info.tobuf(tarfile.GNU_FORMAT, *NAME_ENCODING)


def padding(size: int) -> bytes:
    """The zeros that complete a member's data of ``size`` bytes to whole blocks."""
    return bytes(-size % BLOCK)


def open_stream(reader: ChunkReader | QueueReader) -> tarfile.TarFile:
    """A tar (plain or compressed) read member after member from ``reader``."""
    return tarfile.open(
        fileobj=cast(IO[bytes], reader),
        mode="r|*",
        encoding=NAME_ENCODING[0],
        errors=NAME_ENCODING[1],
    )


class ChunkReader:
    """A binary file object reading an iterator of byte chunks, in order."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    def _next_chunk(self) -> bytes | None:
        return next(self._chunks, None)

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = self._next_chunk()
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


class SourceFailed(Exception):
    """What fed a :class:`QueueReader` broke off; the reader raises this."""


class QueueReader(ChunkReader):
    """A :class:`ChunkReader` read in a worker thread, fed by an event loop.

    The loop side calls :meth:`put` (through ``asyncio.to_thread``: the queue is
    bounded, so a slow reader holds the writer back) and :meth:`close` at the end,
    or :meth:`fail` when its source broke.  :meth:`abandon` tells a writer still
    putting that the reader has stopped (it then drops what it is given).
    """

    def __init__(self, depth: int = 8) -> None:
        super().__init__(iter(()))
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._ended = False
        self.abandoned = False

    def _next_chunk(self) -> bytes | None:
        if self._ended:
            return None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise SourceFailed(str(item)) from item
        if item is None:
            self._ended = True
        return item

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self.abandoned:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def put(self, chunk: bytes) -> None:
        self._put(chunk)

    def close(self) -> None:
        self._put(None)

    def fail(self, exc: BaseException) -> None:
        self._put(exc)

    def abandon(self) -> None:
        self.abandoned = True
