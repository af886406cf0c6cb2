"""A job's output as an append-only log file: stdout and stderr interleaved in order.

Each record is ``stream (1 byte: 'O' or 'E') | length (4 bytes) | bytes``.  Keeping the
two streams in one file keeps their relative order, so the output can be replayed to
a late follower exactly as it was produced, and the final result is rebuilt from it
after a server restart.  What a job writes past the configured cap is counted, not
kept: an output flood costs disk up to the cap and nothing more.

The service layer reaches job logs through :class:`JobLogStore` (and each job's
writer through :class:`JobLogAppender`); :class:`LocalJobLogs` keeps them as files on
the server's disk.  Another home (a shared volume, an object store, a node's agent)
implements the same two protocols.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

_HEADER = struct.Struct(">cI")
STDOUT, STDERR = b"O", b"E"
_STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
_STREAM_CODES = {v: k for k, v in _STREAM_NAMES.items()}


class JobLogAppender(Protocol):
    """What records one job's output, in order, up to a cap per stream."""

    max_bytes_per_stream: int
    #: Bytes of each stream kept, and dropped past the cap.
    kept: dict[str, int]
    dropped: dict[str, int]

    def resume(self) -> None:
        """Go on after what the log holds already, counting it as kept (blocking)."""

    def append(self, stream: str, data: bytes) -> bytes:
        """Record ``data`` of ``stream``; returns the part that was kept."""

    def close(self) -> None:
        """No more output comes."""


class JobLogStore(Protocol):
    """Where jobs' output is kept, by job id: written once by the job's runner, read by
    any number of followers (from a byte offset: a late one misses nothing), removed
    with the job's session.  Reads and removes may block (call them off the event loop
    where a log may be big)."""

    def writer(self, job_id: str, max_bytes_per_stream: int) -> JobLogAppender:
        """A writer of the job's log (appending after what it holds, once resumed)."""

    def records(self, job_id: str, offset: int = 0) -> Iterator[tuple[str, bytes, int]]:
        """``(stream, data, next_offset)`` for every complete record from ``offset``."""

    def text(self, job_id: str, stream: str) -> Iterator[str]:
        """One stream of the job as text, chunk by chunk (UTF-8, bad bytes replaced)."""

    def size(self, job_id: str) -> int:
        """Bytes the job's log holds (both streams, framing included); 0 for none."""

    def remove(self, job_ids: Iterable[str]) -> None:
        """Forget the logs of these jobs (blocking)."""


class JobLogWriter:
    """Appends a job's output; the file is created with the first byte (a job that
    prints nothing, the common case for short commands, costs no file at all)."""

    def __init__(self, path: Path, max_bytes_per_stream: int) -> None:
        self.path = path
        self._fd = -1
        self._max = self.max_bytes_per_stream = max_bytes_per_stream
        self.kept = {"stdout": 0, "stderr": 0}
        self.dropped = {"stdout": 0, "stderr": 0}

    def resume(self) -> None:
        """Go on after what the log holds already (a job taken up again after a
        restart), counting it as kept (blocking: reads the records' headers)."""
        self.kept = stream_sizes(self.path)

    def append(self, stream: str, data: bytes) -> bytes:
        """Record ``data``; returns the part that was kept (empty past the cap)."""
        room = self._max - self.kept[stream]
        kept = data[: max(room, 0)]
        self.dropped[stream] += len(data) - len(kept)
        if kept:
            self.kept[stream] += len(kept)
            if self._fd < 0:
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                self._fd = os.open(self.path, flags, 0o600)
            os.write(self._fd, _HEADER.pack(_STREAM_CODES[stream], len(kept)) + kept)
        return kept

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_records(path: Path, offset: int = 0) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(stream, data, next_offset)`` for every complete record from ``offset``."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    try:
        f.seek(offset)
        while True:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            code, length = _HEADER.unpack(header)
            data = f.read(length)
            if len(data) < length:
                return  # a record still being written
            offset += _HEADER.size + length
            yield _STREAM_NAMES[code], data, offset
    finally:
        f.close()


def stream_sizes(path: Path) -> dict[str, int]:
    """Bytes of each stream in the log's complete records (headers read, data skipped).
    A record cut short by a crash is cut off: appends go on after the last whole one."""
    sizes = {"stdout": 0, "stderr": 0}
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return sizes
    with f:
        end = f.seek(0, os.SEEK_END)
        offset = 0
        while offset + _HEADER.size <= end:
            f.seek(offset)
            code, length = _HEADER.unpack(f.read(_HEADER.size))
            if offset + _HEADER.size + length > end:
                break
            sizes[_STREAM_NAMES[code]] += length
            offset += _HEADER.size + length
        if offset < end:
            f.truncate(offset)
    return sizes


def stream_decoders() -> dict[str, codecs.IncrementalDecoder]:
    """One incremental UTF-8 decoder per stream: a character split across two records
    is decoded whole; bytes that are not UTF-8 become U+FFFD."""
    return {name: codecs.getincrementaldecoder("utf-8")("replace") for name in _STREAM_CODES}


def iter_text(path: Path, stream: str) -> Iterator[str]:
    """One stream of a job as text, chunk by chunk (UTF-8, bad bytes replaced)."""
    decoder = stream_decoders()[stream]
    for name, data, _ in read_records(path):
        if name == stream and (text := decoder.decode(data)):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail


def read_output(path: Path) -> tuple[str, str]:
    """The whole stdout and stderr of a job as text (UTF-8, bad bytes replaced)."""
    return "".join(iter_text(path, "stdout")), "".join(iter_text(path, "stderr"))


class LocalJobLogs:
    """:class:`JobLogStore` as one file per job, ``<directory>/<job id>.log``, on this
    server's disk: readable by the server alone (mode 0700 directory, 0600 files)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # jobs' output is the tenants' alone

    def path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.log"

    def writer(self, job_id: str, max_bytes_per_stream: int) -> JobLogWriter:
        return JobLogWriter(self.path(job_id), max_bytes_per_stream)

    def records(self, job_id: str, offset: int = 0) -> Iterator[tuple[str, bytes, int]]:
        return read_records(self.path(job_id), offset)

    def text(self, job_id: str, stream: str) -> Iterator[str]:
        return iter_text(self.path(job_id), stream)

    def size(self, job_id: str) -> int:
        try:
            return self.path(job_id).stat().st_size
        except FileNotFoundError:
            return 0

    def remove(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            with contextlib.suppress(FileNotFoundError):
                self.path(job_id).unlink()
