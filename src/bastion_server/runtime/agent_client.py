"""The server's side of the agent protocol (see :mod:`bastion_server.runtime.agent_protocol`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from bastion_server.runtime import agent_protocol as protocol
from bastion_server.runtime.base import ExecSpec, ExitEvent, OutputEvent, Process, SandboxError

_STREAMS = {protocol.FRAME_STDOUT: "stdout", protocol.FRAME_STDERR: "stderr"}


class AgentProcess(Process):
    """A process started by a sandbox's agent, over its own Unix connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._exited = False

    @classmethod
    async def start(cls, socket_path: str, spec: ExecSpec) -> AgentProcess:
        try:
            reader, writer = await asyncio.open_unix_connection(
                socket_path, limit=protocol.MAX_FRAME + protocol.FRAME_HEADER.size
            )
        except OSError as exc:
            raise SandboxError(f"sandbox agent unreachable: {exc}") from exc
        writer.write(
            protocol.encode_json(
                {
                    "op": "exec",
                    "argv": spec.argv,
                    "env": spec.env,
                    "cwd": spec.cwd,
                    "timeout": spec.timeout,
                    "pty": spec.pty,
                    "rows": spec.rows,
                    "cols": spec.cols,
                }
            )
        )
        await writer.drain()
        return cls(reader, writer)

    async def _read_frame(self) -> tuple[bytes, bytes] | None:
        try:
            header = await self._reader.readexactly(protocol.FRAME_HEADER.size)
            kind, length = protocol.decode_header(header)
            return kind, await self._reader.readexactly(length)
        except protocol.FrameTooLarge as exc:
            raise SandboxError(f"agent sent an oversized frame: {exc}") from exc
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def events(self) -> AsyncIterator[OutputEvent | ExitEvent]:
        try:
            while not self._exited:
                frame = await self._read_frame()
                if frame is None:
                    self._exited = True
                    yield ExitEvent(
                        exit_code=None,
                        error="lost",
                        message="the sandbox went away while the process ran",
                    )
                    return
                kind, payload = frame
                if kind in _STREAMS:
                    yield OutputEvent(_STREAMS[kind], payload)
                    continue
                if kind != protocol.FRAME_JSON:
                    continue
                msg = json.loads(payload)
                if msg.get("event") == "exit":
                    self._exited = True
                    yield ExitEvent(
                        exit_code=msg.get("exit_code"),
                        signal=msg.get("signal"),
                        timed_out=bool(msg.get("timed_out")),
                        error=msg.get("error"),
                        message=msg.get("message"),
                    )
                    return
        finally:
            await self.close()

    async def _send(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise SandboxError("process connection is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def kill(self) -> None:
        if not self._exited and not self._writer.is_closing():
            try:
                await self._send(protocol.encode_json({"op": "kill"}))
            except (ConnectionError, SandboxError):
                pass

    async def send_input(self, data: bytes) -> None:
        await self._send(protocol.encode_frame(protocol.FRAME_STDIN, data))

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(protocol.encode_json({"op": "resize", "rows": rows, "cols": cols}))

    async def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def ping(socket_path: str, timeout: float = 1.0) -> bool:
    """True if an agent answers on ``socket_path``."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket_path), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(protocol.encode_json({"op": "ping"}))
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(protocol.FRAME_HEADER.size), timeout)
        _, length = protocol.decode_header(header)
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
        return bool(json.loads(payload).get("event") == "pong")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False
    finally:
        writer.close()
