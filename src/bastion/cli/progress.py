"""A progress bar on stderr for large transfers of ``bastion files``.

Shown only when it helps and cannot get in the way: stderr is a terminal, the
command is not in ``--json`` mode, and the transfer is large (its known size, or
what has moved so far when the size is unknown, reaches :data:`MIN_BYTES`).  The bar
is redrawn at most ten times a second, on one line, fitted to the terminal width.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from .format import format_size

__all__ = ["MIN_BYTES", "CountingReader", "CountingWriter", "Progress"]

#: Transfers smaller than this get no bar (they are over before it would help).
MIN_BYTES = 4 * 1024 * 1024
_REDRAW_INTERVAL = 0.1


class SupportsReadBytes(Protocol):
    def read(self, size: int, /) -> bytes: ...


class SupportsWriteBytes(Protocol):
    def write(self, data: bytes, /) -> int: ...


class Progress:
    """Tracks bytes moved and draws the bar while ``enabled``.

    Args:
        label: What moves (a file name), shown first.
        total: The size in bytes when known.
        stream: Where to draw (stderr).
        enabled: Whether drawing is allowed at all (tty and not ``--json``).
        min_bytes: The size from which a transfer counts as large (default
            :data:`MIN_BYTES`).
        clock: Monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        stream: TextIO,
        *,
        enabled: bool,
        min_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream
        self._enabled = enabled
        self._min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self._clock = clock
        self._started = clock()
        self._last_draw: float | None = None
        self.drawn = False

    @classmethod
    def for_stream(
        cls, label: str, total: int | None, stream: TextIO, *, allowed: bool
    ) -> Progress:
        """A bar that draws only if ``allowed`` and ``stream`` is a terminal."""
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(label, total, stream, enabled=allowed and tty)

    def _large(self) -> bool:
        size = self.total if self.total is not None else self.done
        return max(size, self.done) >= self._min_bytes

    def update(self, count: int) -> None:
        """``count`` more bytes have moved."""
        self.done += count
        if not self._enabled or not self._large():
            return
        now = self._clock()
        if self._last_draw is None or now - self._last_draw >= _REDRAW_INTERVAL:
            self._last_draw = now
            self._draw(now)

    def finish(self) -> None:
        """Draw the final state and end the line (only if a bar was drawn)."""
        if self.drawn:
            self._draw(self._clock())
            self._stream.write("\n")
            self._stream.flush()

    def line(self, now: float, width: int) -> str:
        """The bar's text at ``now``, at most ``width`` characters."""
        elapsed = max(now - self._started, 1e-6)
        rate = self.done / elapsed
        speed = f"{format_size(int(rate))}/s"
        if self.total:
            fraction = min(1.0, self.done / self.total)
            amount = f"{format_size(self.done)}/{format_size(self.total)}"
            left = (self.total - self.done) / rate if rate > 0 and self.done < self.total else 0
            tail = f" {fraction:4.0%} {amount} {speed} {_eta(left)}"
            room = width - len(self.label) - len(tail) - 3
            if room >= 10:
                filled = int(room * fraction)
                bar = "[" + "#" * filled + "-" * (room - filled) + "]"
                return f"{self.label} {bar}{tail}"[:width]
            return f"{self.label}{tail}"[:width]
        return f"{self.label} {format_size(self.done)} {speed}"[:width]

    def _draw(self, now: float) -> None:
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        self._stream.write("\r" + self.line(now, width).ljust(width))
        self._stream.flush()
        self.drawn = True


def _eta(seconds: float) -> str:
    whole = int(seconds + 0.5)
    if whole >= 3600:
        return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
    return f"{whole // 60}:{whole % 60:02d}"


class CountingReader:
    """A binary file object that reports each read to a :class:`Progress`."""

    def __init__(self, raw: SupportsReadBytes, progress: Progress) -> None:
        self._raw = raw
        self._progress = progress

    def read(self, size: int, /) -> bytes:
        data = self._raw.read(size)
        if data:
            self._progress.update(len(data))
        return data


class CountingWriter:
    """A binary file object that reports each write to a :class:`Progress`."""

    def __init__(self, raw: SupportsWriteBytes, progress: Progress) -> None:
        self._raw = raw
        self._progress = progress

    def write(self, data: bytes, /) -> int:
        written = self._raw.write(data)
        self._progress.update(len(data))
        return written
