"""The server's side of the agent protocol (see :mod:`bastion_server.runtime.agent_protocol`)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import os
import signal as signals
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Protocol

from bastion_server.runtime import agent_protocol as protocol
from bastion_server.runtime.agent_connections import idle_connections
from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    JobUsage,
    OutputEvent,
    Process,
    SandboxError,
)


class ExitHook(Protocol):
    """Given the agent's exit event, the event to report: the runtime adds what only
    the host knows, such as the job cgroup's OOM kills, and releases the job's cgroup.

    ``oom_kills_before`` is a count the hook wants the agent to keep with the job (the
    sandbox's OOM kills at its start): sent with the exec request, and given back to
    the hook at the end (``kept``), also to the hook of a server restarted meanwhile
    that took the job up again."""

    oom_kills_before: int | None

    def __call__(self, event: ExitEvent, kept: int | None = None) -> Awaitable[ExitEvent]: ...


def _usage(raw: Any) -> JobUsage | None:
    if not isinstance(raw, dict):
        return None
    try:
        return JobUsage(
            wall_seconds=int(raw["wall_us"]) / 1e6,
            user_cpu_seconds=int(raw["user_cpu_us"]) / 1e6,
            system_cpu_seconds=int(raw["system_cpu_us"]) / 1e6,
            peak_memory_bytes=int(raw["peak_rss_kb"]) * 1024,
        )
    except (KeyError, TypeError, ValueError):
        return None


def _open_socket_file(socket_path: str) -> int:
    """An ``O_PATH`` descriptor of the agent's socket itself, never through a link.

    The socket's directory is the sandbox's own (its root, and so a root job, may
    write there): a symbolic link put in the socket's place would have the server,
    root of the host, connect to whatever host socket it names and hand it the job's
    request and cgroup descriptors.  Connecting to ``/proc/self/fd/N`` of this
    descriptor reaches exactly the socket that was checked.
    """
    fd = os.open(socket_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "not a socket", socket_path)
    return fd


def _connect_blocking(sock: socket.socket, socket_path: str) -> None:
    fd = _open_socket_file(socket_path)
    try:
        sock.connect(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


#: What one receive from an agent takes at most (the agent's own socket reads are as big).
RECEIVE_SIZE = 64 * 1024


class _ReusedBufferProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """A stream reader's protocol that receives into one buffer of its own, reused:
    asyncio's plain receive allocates 256 KiB for each one, most of a short job's
    frames' cost to read."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = bytearray(RECEIVE_SIZE)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._buffer[:nbytes]))


async def _streams(
    sock: socket.socket, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The reader and writer of a connected socket (as ``asyncio.open_unix_connection``
    makes them, but with :class:`_ReusedBufferProtocol`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = _ReusedBufferProtocol(reader)
    transport, _ = await loop.create_unix_connection(lambda: protocol, sock=sock)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _open_connection(
    socket_path: str, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream connection to the agent listening at ``socket_path`` (never a link)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        fd = _open_socket_file(socket_path)
        try:
            await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    except BaseException:
        sock.close()
        raise
    return await _streams(sock, limit)


def _count(raw: Any) -> int | None:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else None


def _connect_and_send(socket_path: str, frame: bytes, fds: Sequence[int]) -> socket.socket:
    """Connect and send the exec frame, with ``fds`` as SCM_RIGHTS (blocking, brief)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _connect_blocking(sock, socket_path)
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        sent = sock.sendmsg([frame], ancillary)
        if sent < len(frame):
            sock.sendall(frame[sent:])
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


_STREAMS = {protocol.FRAME_STDOUT: "stdout", protocol.FRAME_STDERR: "stderr"}


def exec_request(
    spec: ExecSpec, *, keep_open: bool = False, oom_kills_before: int | None = None
) -> bytes:
    """The frame that asks an agent to run ``spec`` (the sandbox's, or a node agent's);
    ``keep_open``: the connection takes another request after this job;
    ``oom_kills_before``: kept by the agent and sent back with the job's end."""
    request: dict[str, Any] = {
        "op": "exec",
        "argv": spec.argv,
        "env": spec.env,
        "cwd": spec.cwd,
        "timeout": spec.timeout,
        "pty": spec.pty,
        "rows": spec.rows,
        "cols": spec.cols,
    }
    if spec.stdin:
        request["stdin"] = True
    if spec.user is not None:
        request["user"] = spec.user
    if spec.limits.cpu_seconds is not None:
        request["rlimits"] = {"cpu_seconds": spec.limits.cpu_seconds}
    if spec.persist_as is not None:
        request.update(persist=True, job_id=spec.persist_as, spool_bytes=spec.spool_bytes)
    if keep_open:
        request["keep_open"] = True
    if oom_kills_before is not None:
        request["oom_kills_before"] = oom_kills_before
    return protocol.encode_json(request)


def attach_request(job_id: str, stdout_offset: int, stderr_offset: int) -> bytes:
    """The frame that takes up a persistent job again past what the server has of it."""
    return protocol.encode_json(
        {
            "op": "attach",
            "job_id": job_id,
            "stdout_offset": stdout_offset,
            "stderr_offset": stderr_offset,
        }
    )


def _output_bytes(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    try:
        return {"stdout": int(raw["stdout"]), "stderr": int(raw["stderr"])}
    except (KeyError, TypeError, ValueError):
        return None


def exit_event_frame(event: ExitEvent) -> bytes:
    """An ExitEvent as the agent's ``exit`` frame (what :meth:`AgentProcess.events` reads)."""
    return protocol.encode_json(
        {
            "event": "exit",
            "exit_code": event.exit_code,
            "signal": event.signal,
            "timed_out": event.timed_out,
            "error": event.error,
            "message": event.message,
            "kill_signal": event.kill_signal,
            "usage": None
            if event.usage is None
            else {
                "wall_us": round(event.usage.wall_seconds * 1e6),
                "user_cpu_us": round(event.usage.user_cpu_seconds * 1e6),
                "system_cpu_us": round(event.usage.system_cpu_seconds * 1e6),
                "peak_rss_kb": (event.usage.peak_memory_bytes or 0) // 1024,
            },
        }
    )


class AgentProcess(Process):
    """A process started by a sandbox's agent, over a Unix connection of its own while
    it runs.  Started with ``socket_path``, the connection is kept open for the next
    job once this one's conversation is over (see :mod:`.agent_connections`)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_exit: ExitHook | None = None,
        socket_path: str | None = None,
    ) -> None:
        self._reader, self._writer = reader, writer
        self._on_exit = on_exit
        self._exited = False
        self.pid: int | None = None
        #: A persistent process: once it ended, the agent keeps it until ``forget``.
        self.persistent = False
        self._socket_path = socket_path
        #: The exit event said the agent keeps the connection for another request.
        self._keep_open = False
        #: A persistent process whose end the agent was told to forget.
        self._forgotten = False
        #: The connection went back to the idle ones: nothing is sent on it from here.
        self._handed_back = False

    @classmethod
    async def start(
        cls,
        socket_path: str,
        spec: ExecSpec,
        fds: Sequence[int] = (),
        on_exit: ExitHook | None = None,
    ) -> AgentProcess:
        """Start ``spec``; ``fds`` (cgroup.procs descriptors) go with the request, and
        ``on_exit`` is given the exit event (also a lost one) before it is reported."""
        oom_kills = on_exit.oom_kills_before if on_exit is not None else None
        frame = exec_request(spec, keep_open=True, oom_kills_before=oom_kills)
        limit = protocol.MAX_FRAME + protocol.FRAME_HEADER.size
        persistent = spec.persist_as is not None
        try:
            if fds:  # (descriptors go with the first byte: a connection of its own)
                sock = await asyncio.to_thread(_connect_and_send, socket_path, frame, fds)
                reader, writer = await _streams(sock, limit)
                return cls(reader, writer, on_exit, socket_path)._persisting(persistent)
            kept = idle_connections().take(socket_path)
            if kept is not None:
                (reader, writer), owed = kept
                frame = owed + frame  # one send: what the last job owed, then this one
            else:
                reader, writer = await _open_connection(socket_path, limit=limit)
        except OSError as exc:
            raise SandboxError(f"sandbox agent unreachable: {exc}") from exc
        writer.write(frame)
        await writer.drain()
        return cls(reader, writer, on_exit, socket_path)._persisting(persistent)

    @classmethod
    async def attach(
        cls,
        socket_path: str,
        job_id: str,
        stdout_offset: int,
        stderr_offset: int,
        on_exit: ExitHook | None = None,
    ) -> AgentProcess:
        """Take up the persistent job ``job_id`` again (see Runtime.attach); ``on_exit``
        as for :meth:`start`."""
        try:
            reader, writer = await _open_connection(
                socket_path, limit=protocol.MAX_FRAME + protocol.FRAME_HEADER.size
            )
        except OSError as exc:
            raise SandboxError(f"sandbox agent unreachable: {exc}") from exc
        writer.write(attach_request(job_id, stdout_offset, stderr_offset))
        await writer.drain()
        return cls(reader, writer, on_exit)._persisting(True)

    def _persisting(self, persistent: bool) -> AgentProcess:
        self.persistent = persistent
        return self

    async def _exit(self, event: ExitEvent, oom_kills_before: int | None = None) -> ExitEvent:
        self._exited = True
        hook, self._on_exit = self._on_exit, None
        return await hook(event, oom_kills_before) if hook is not None else event

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
                    yield await self._exit(
                        ExitEvent(
                            exit_code=None,
                            error="lost",
                            message="the sandbox went away while the process ran",
                        )
                    )
                    return
                kind, payload = frame
                if kind in _STREAMS:
                    yield OutputEvent(_STREAMS[kind], payload)
                    continue
                if kind != protocol.FRAME_JSON:
                    continue
                msg = json.loads(payload)
                if msg.get("event") == "started":
                    self.pid = msg.get("pid")
                elif msg.get("event") == "exit":
                    self._keep_open = msg.get("keep_open") is True
                    yield await self._exit(
                        ExitEvent(
                            exit_code=msg.get("exit_code"),
                            signal=msg.get("signal"),
                            timed_out=bool(msg.get("timed_out")),
                            error=msg.get("error"),
                            message=msg.get("message"),
                            kill_signal=msg.get("kill_signal"),
                            usage=_usage(msg.get("usage")),
                            output_bytes=_output_bytes(msg.get("output_bytes")),
                        ),
                        _count(msg.get("oom_kills_before")),
                    )
                    return
        finally:
            if not (self.persistent and self._exited):  # that one waits for forget()
                await self.close()

    async def _send(self, data: bytes) -> None:
        if self._handed_back or self._writer.is_closing():
            raise SandboxError("process connection is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def kill(self, signal: int | None = None) -> None:
        request: dict[str, Any] = {"op": "kill"}
        if signal is not None and signal != signals.SIGKILL:
            request["signal"] = int(signal)
        if not self._exited and not self._writer.is_closing():
            try:
                await self._send(protocol.encode_json(request))
            except (ConnectionError, SandboxError):
                pass

    async def send_input(self, data: bytes) -> None:
        for at in range(0, len(data), protocol.MAX_FRAME):
            await self._send(
                protocol.encode_frame(protocol.FRAME_STDIN, data[at : at + protocol.MAX_FRAME])
            )

    async def close_input(self) -> None:
        await self._send(protocol.encode_json({"op": "close_stdin"}))

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(protocol.encode_json({"op": "resize", "rows": rows, "cols": cols}))

    async def forget(self) -> None:
        if self.persistent and self._exited and not self._writer.is_closing():
            forget = protocol.encode_json({"op": "forget"})
            if self._hand_back(owed=forget):  # sent with the next request on it
                return
            with contextlib.suppress(ConnectionError, SandboxError):
                await self._send(forget)
                self._forgotten = True
        await self.close()

    def _hand_back(self, owed: bytes = b"") -> bool:
        """Give the connection back for the next job, if its agent keeps it open and
        this job's conversation is over but for ``owed`` (a persistent job's forget:
        the agent reads it before the next request, which it goes with)."""
        if self._handed_back:
            return True
        over = self._forgotten or not self.persistent or bool(owed)
        done = self._exited and self._keep_open and over
        if not done or self._socket_path is None or self._on_exit is not None:
            return False
        self._handed_back = True
        idle_connections().put(self._socket_path, (self._reader, self._writer), owed)
        return True

    async def close(self) -> None:
        if self._hand_back():
            return
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        if self._on_exit is not None:  # never started reading: release what it holds
            await self._exit(ExitEvent(exit_code=None, error="lost"))


async def ping(socket_path: str, timeout: float = 1.0) -> bool:
    """True if an agent answers on ``socket_path``."""
    try:
        reader, writer = await asyncio.wait_for(_open_connection(socket_path), timeout)
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
