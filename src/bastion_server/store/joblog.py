"""A job's output as an append-only log file: stdout and stderr interleaved in order.

Each record is ``stream (1 byte: 'O' or 'E') | length (4 bytes) | bytes``.  Keeping the
two streams in one file keeps their relative order, so the output can be replayed to
a late follower exactly as it was produced, and the final result is rebuilt from it
after a server restart.  What a job writes past the configured cap is counted, not
kept: an output flood costs disk up to the cap and nothing more.
"""

from __future__ import annotations

import codecs
import os
import struct
from collections.abc import Iterator
from pathlib import Path

_HEADER = struct.Struct(">cI")
STDOUT, STDERR = b"O", b"E"
_STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
_STREAM_CODES = {v: k for k, v in _STREAM_NAMES.items()}


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
