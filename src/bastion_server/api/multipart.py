"""A streaming ``multipart/form-data`` reader: parts one after another, each part's
body as chunks, with nothing spooled to memory or disk.

Used by the original server's upload route (``POST /session/{id}/upload``), whose file
part can be gigabytes: its bytes go straight to the sandbox as they arrive.  A part's
headers are bounded (:data:`MAX_HEADER_BYTES`); a malformed body raises
:class:`MultipartError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message

MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    pass


def boundary_of(content_type: str | None) -> bytes:
    """The boundary named by a ``multipart/form-data`` Content-Type header."""
    message = Message()
    message["content-type"] = content_type or ""
    if message.get_content_type() != "multipart/form-data":
        raise MultipartError("the body must be multipart/form-data")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise MultipartError("the multipart/form-data content type names no boundary")
    return boundary.encode("latin-1")


@dataclass
class Part:
    """One part: its form field ``name``, its ``filename`` (file parts), its body."""

    name: str
    filename: str | None
    _reader: MultipartReader = field(repr=False)

    def chunks(self) -> AsyncIterator[bytes]:
        """The part's body as it arrives; read it before asking for the next part."""
        return self._reader.body()

    async def read(self, limit: int) -> bytes:
        """The whole (small) body; raises :class:`MultipartError` past ``limit`` bytes."""
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise MultipartError(f"form field {self.name!r} is longer than {limit} bytes")
        return bytes(data)


class MultipartReader:
    def __init__(self, source: AsyncIterator[bytes], boundary: bytes) -> None:
        self._source = source
        # The first delimiter has no CRLF before it: one is supplied, so that every
        # delimiter, the first too, reads "\r\n--boundary".
        self._buffer = bytearray(b"\r\n")
        self._delimiter = b"\r\n--" + boundary
        self._eof = False
        self._in_body = False

    async def _fill(self) -> bool:
        """Read more of the source; False at its end."""
        while not self._eof:
            chunk = await anext(self._source, None)
            if chunk is None:
                self._eof = True
            elif chunk:
                self._buffer += chunk
                return True
        return False

    async def _find(self, needle: bytes, what: str) -> int:
        """Where ``needle`` starts, within the first :data:`MAX_HEADER_BYTES` bytes."""
        start = 0
        while (at := self._buffer.find(needle, start)) < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise MultipartError(f"{what} longer than {MAX_HEADER_BYTES} bytes")
            start = max(0, len(self._buffer) - len(needle) + 1)
            if not await self._fill():
                raise MultipartError("the multipart body ends in the middle of a part")
        return at

    async def parts(self) -> AsyncIterator[Part]:
        at = await self._find(self._delimiter, "the preamble is")  # skipped
        del self._buffer[: at + len(self._delimiter)]
        while True:
            while len(self._buffer) < 2 and await self._fill():
                pass
            if self._buffer[:2] == b"--":
                return  # the closing delimiter; an epilogue after it is ignored
            end = await self._find(b"\r\n\r\n", "a part's headers are")
            head = bytes(self._buffer[:end]).decode("latin-1")
            del self._buffer[: end + 4]
            yield self._part(head)
            if self._in_body:  # the caller skipped (some of) the body: drop the rest
                async for _ in self.body():
                    pass
            del self._buffer[: len(self._delimiter)]

    def _part(self, head: str) -> Part:
        message = Message()
        for line in head.split("\r\n")[1:]:  # [0]: the rest of the delimiter line
            name, sep, value = line.partition(":")
            if sep:
                message[name.strip()] = value.strip()
        if message.get_content_disposition() != "form-data":
            raise MultipartError("every part needs a Content-Disposition: form-data header")
        field_name = message.get_param("name", header="content-disposition")
        if not isinstance(field_name, str):
            raise MultipartError("a part has no form field name")
        self._in_body = True
        return Part(field_name, message.get_filename(), self)

    async def body(self) -> AsyncIterator[bytes]:
        """The current part's body up to (not including) the next delimiter."""
        if not self._in_body:
            return
        keep = len(self._delimiter) - 1
        while True:
            at = self._buffer.find(self._delimiter)
            if at >= 0:
                if at:
                    yield bytes(self._buffer[:at])
                del self._buffer[:at]
                self._in_body = False
                return
            if len(self._buffer) > keep:
                chunk = bytes(self._buffer[:-keep])
                del self._buffer[:-keep]
                yield chunk
            if not await self._fill():
                raise MultipartError("the multipart body ends in the middle of a part")
