"""A sandbox's files on another node: the files contract over the data plane.

The gateway's :class:`RemoteFiles` implements :class:`~bastion_server.runtime.files.SandboxFiles`
with one data-plane connection per operation (:func:`.data_plane.connect`, the same
challenge); the node agent's :func:`serve_files` runs the operation on its own
runtime's files.  A request is ``{"files": {"call": name, "args": {...}}}`` in the
hello; the agent takes it (``J {"accepted": true}``, or an error if the sandbox does
not run) and answers ``J {"result": ...}`` or ``J {"error": {...}}``.  Bytes go
as frames, never whole: an upload's (``write``, ``extract_archive``) as ``I`` frames
the agent consumes as it writes, then ``J {"end": true}``; a download's
(``open_read``, ``read_archive``) as ``O`` frames after the result, each written once
the one before drained, then ``J {"end": true}`` (or an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from bastion_server.runtime import agent_protocol as protocol
from bastion_server.runtime.base import SandboxError, SandboxNotRunning
from bastion_server.runtime.files import (
    Entry,
    ExtractResult,
    FileReader,
    FsError,
    SandboxFiles,
)


def _error_classes() -> dict[str, type[FsError]]:
    classes: list[type[FsError]] = [FsError, *FsError.__subclasses__()]
    return {cls.kind: cls for cls in classes}


def _encode_error(exc: SandboxError) -> dict[str, Any]:
    return {
        "error": {
            "kind": exc.kind if isinstance(exc, FsError) else None,
            "not_running": isinstance(exc, SandboxNotRunning),
            "message": str(exc),
        }
    }


def _raise(reply: dict[str, Any]) -> None:
    error = reply.get("error")
    if not isinstance(error, dict):
        return
    message = str(error.get("message") or "the node failed")
    if error.get("not_running"):
        raise SandboxNotRunning(message)
    kind = error.get("kind")
    if isinstance(kind, str):
        raise _error_classes().get(kind, FsError)(message)
    raise SandboxError(message)


async def _send(writer: asyncio.StreamWriter, frame: bytes) -> None:
    writer.write(frame)
    await writer.drain()


async def _incoming(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The chunks the gateway sends, until its end frame."""
    from bastion_server.cluster.data_plane import read_frame

    while True:
        frame = await read_frame(reader, protocol.MAX_FRAME)
        if frame is None:
            raise SandboxError("the gateway went away mid-transfer")
        kind, payload = frame
        if kind == protocol.FRAME_STDIN:
            yield payload
        elif kind == protocol.FRAME_JSON:
            return


async def _stream_out(
    writer: asyncio.StreamWriter, chunks: AsyncIterator[bytes], first: bytes | None
) -> None:
    chunk = first
    while chunk:
        await _send(writer, protocol.encode_frame(protocol.FRAME_STDOUT, chunk))
        chunk = await anext(chunks, b"")


async def serve_files(
    files_of: Callable[[], SandboxFiles],
    request: Any,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """The node agent's end: take one files operation (``J {"accepted": true}``, or
    an error if the sandbox does not run), then run it and answer it."""
    call = request.get("call") if isinstance(request, dict) else None
    args = (request.get("args") or {}) if isinstance(request, dict) else {}
    path, as_root = str(args.get("path")), bool(args.get("as_root"))
    try:
        files = files_of()
    except SandboxError as exc:
        await _send(writer, protocol.encode_json(_encode_error(exc)))
        return
    await _send(writer, protocol.encode_json({"accepted": True}))
    try:
        if call == "list":
            after = args.get("after")
            entries = await files.list(
                path,
                after=bytes.fromhex(after) if isinstance(after, str) else None,
                count=args.get("count"),
                as_root=as_root,
            )
            await _send(
                writer,
                protocol.encode_json({"result": [dataclasses.asdict(e) for e in entries]}),
            )
        elif call == "delete":
            await files.delete(path, recursive=bool(args.get("recursive")), as_root=as_root)
            await _send(writer, protocol.encode_json({"result": None}))
        elif call == "write":
            written = await files.write(
                path,
                _incoming(reader),
                int(args["max_bytes"]),
                mode=args.get("mode"),
                as_root=as_root,
            )
            await _send(writer, protocol.encode_json({"result": written}))
        elif call == "extract_archive":
            result = await files.extract_archive(path, _incoming(reader), as_root=as_root)
            await _send(writer, protocol.encode_json({"result": dataclasses.asdict(result)}))
        elif call == "open_read":
            opened = await files.open_read(path, as_root=as_root)
            try:
                await _send(writer, protocol.encode_json({"result": opened.size}))

                async def chunks() -> AsyncIterator[bytes]:
                    while chunk := await opened.read():
                        yield chunk

                await _stream_out(writer, chunks(), await opened.read())
            finally:
                await opened.close()
            await _send(writer, protocol.encode_json({"end": True}))
        elif call == "read_archive":
            archive = files.read_archive(path, as_root=as_root)
            try:
                first = await anext(archive, b"")  # errors about the path come here
                await _send(writer, protocol.encode_json({"result": None}))
                await _stream_out(writer, archive, first)
            finally:
                with contextlib.suppress(Exception):
                    await archive.aclose()  # type: ignore[attr-defined]
            await _send(writer, protocol.encode_json({"end": True}))
        else:
            raise SandboxError(f"no such files operation: {call!r}")
    except SandboxError as exc:
        await _send(writer, protocol.encode_json(_encode_error(exc)))


#: Opens a connection for a files request: hello's ``files`` part -> (reader, writer, reply).
Connect = Callable[
    [dict[str, Any]],
    Coroutine[Any, Any, tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]],
]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


class _RemoteReader(FileReader):
    def __init__(
        self, size: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.size = size
        self._reader, self._writer = reader, writer
        self._done = False

    async def read(self) -> bytes:
        return await _next_chunk(self)

    async def close(self) -> None:
        self._done = True
        await _close(self._writer)


async def _next_chunk(stream: _RemoteReader) -> bytes:
    """The next downloaded chunk; ``b""`` after the end frame; an error frame raised."""
    from bastion_server.cluster.data_plane import read_frame

    if stream._done:
        return b""
    frame = await read_frame(stream._reader, protocol.MAX_FRAME)
    if frame is None:
        stream._done = True
        raise SandboxError("the node went away mid-download")
    kind, payload = frame
    if kind == protocol.FRAME_STDOUT:
        return payload
    stream._done = True
    _raise(json.loads(payload))
    return b""


class RemoteFiles(SandboxFiles):
    """The gateway's end: a session's files on its node, one connection per call."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def _open(
        self, call: str, args: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer, accepted = await self._connect({"call": call, "args": args})
        try:
            _raise(accepted)
        except BaseException:
            await _close(writer)
            raise
        return reader, writer

    async def _call(
        self, call: str, **args: Any
    ) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._open(call, args)
        try:
            reply = await read_json_unbounded(reader)
            _raise(reply)
        except BaseException:
            await _close(writer)
            raise
        return reply.get("result"), reader, writer

    async def _simple(self, call: str, **args: Any) -> Any:
        result, _, writer = await self._call(call, **args)
        await _close(writer)
        return result

    async def list(
        self,
        path: str,
        *,
        after: bytes | None = None,
        count: int | None = None,
        as_root: bool = False,
    ) -> list[Entry]:
        raw = await self._simple(
            "list",
            path=path,
            after=after.hex() if after is not None else None,
            count=count,
            as_root=as_root,
        )
        return [Entry(**e) for e in raw]

    async def delete(self, path: str, *, recursive: bool = False, as_root: bool = False) -> None:
        await self._simple("delete", path=path, recursive=recursive, as_root=as_root)

    async def _upload(self, call: str, chunks: AsyncIterator[bytes], **args: Any) -> Any:
        reader, writer = await self._open(call, args)
        try:
            sender = asyncio.create_task(self._send_chunks(writer, chunks))
            answer = asyncio.create_task(read_json_unbounded(reader))
            done, _ = await asyncio.wait({sender, answer}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                sender.result()  # the client's own error (a cut upload) goes up
                reply = await answer
            else:  # the node answered before the end: an error (too large, disk full)
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
                reply = answer.result()
            _raise(reply)
            return reply.get("result")
        finally:
            await _close(writer)

    @staticmethod
    async def _send_chunks(writer: asyncio.StreamWriter, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            for at in range(0, len(chunk), protocol.MAX_FRAME):
                await _send(
                    writer,
                    protocol.encode_frame(
                        protocol.FRAME_STDIN, chunk[at : at + protocol.MAX_FRAME]
                    ),
                )
        await _send(writer, protocol.encode_json({"end": True}))

    async def write(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
        *,
        mode: int | None = None,
        as_root: bool = False,
    ) -> int:
        return int(
            await self._upload(
                "write", chunks, path=path, max_bytes=max_bytes, mode=mode, as_root=as_root
            )
        )

    async def extract_archive(
        self, path: str, chunks: AsyncIterator[bytes], *, as_root: bool = False
    ) -> ExtractResult:
        raw = await self._upload("extract_archive", chunks, path=path, as_root=as_root)
        return ExtractResult(**raw)

    async def open_read(self, path: str, *, as_root: bool = False) -> FileReader:
        size, reader, writer = await self._call("open_read", path=path, as_root=as_root)
        return _RemoteReader(int(size), reader, writer)

    async def read_archive(self, path: str, *, as_root: bool = False) -> AsyncIterator[bytes]:
        _, reader, writer = await self._call("read_archive", path=path, as_root=as_root)
        stream = _RemoteReader(0, reader, writer)
        try:
            while chunk := await stream.read():
                yield chunk
        finally:
            await stream.close()


async def read_json_unbounded(reader: asyncio.StreamReader) -> dict[str, Any]:
    """An upload's answer: it comes when the upload ends, however long that takes."""
    from bastion_server.cluster.data_plane import read_frame

    frame = await read_frame(reader, protocol.MAX_FRAME)
    if frame is None or frame[0] != protocol.FRAME_JSON:
        raise SandboxError("the node went away during the upload")
    reply = json.loads(frame[1])
    return reply if isinstance(reply, dict) else {}
