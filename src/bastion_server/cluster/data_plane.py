"""The data plane: a job's or a terminal's bytes, between the gateway and a node agent.

Ray carries the control plane (create, start, stop, placement, failure notices); the
bytes of a process go over a TCP connection of their own, gateway -> node agent, one
per process, in the sandbox agent's own frames (:mod:`bastion_server.runtime.agent_protocol`):
``O``/``E`` output and a last ``exit`` frame towards the gateway, ``I`` input and
``kill``/``resize`` requests towards the node.  Each hop writes a frame only once the
one before has drained, so a slow reader slows the sandbox's process (the agent stops
reading its pipe) and nothing in between holds more than a frame or two.

Nothing else on the network can drive a node agent: the connection opens with a
challenge, a random nonce from the node agent that the gateway answers with
HMAC-SHA256 under the cluster's secret (the secret itself never crosses the wire).
The bytes themselves are not encrypted: run the cluster on a private network.

A connection, after the handshake::

    node agent -> gateway   J {"nonce": hex}
    gateway -> node agent   J {"op": "hello", "mac": hex, "session_id": id,
                               "spec": the ExecSpec's fields}
    node agent -> gateway   J {"event": "started"}
                         or J {"event": "refused", "not_running": bool, "message": str}
    ... then the agent protocol, until the exit frame.

A job's process is started ``persist_as`` its id (the sandbox's agent keeps it and its
output when the connection drops, as on one machine): a gateway that restarts takes
it up again with ``"attach": {"job_id", "stdout_offset", "stderr_offset"}`` in place
of ``"spec"``.  Once such a process's exit frame is sent, the node agent keeps the
connection until the gateway says ``forget`` (its end is recorded: the sandbox may
drop it) or goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bastion_server.runtime import agent_protocol as protocol
from bastion_server.runtime.agent_client import AgentProcess, exit_event_frame
from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    JobLimits,
    Process,
    SandboxError,
    SandboxNotRunning,
)

if TYPE_CHECKING:
    from bastion_server.runtime.files import SandboxFiles

log = logging.getLogger("bastion.cluster")

#: How long either side waits for the other's handshake frames.
HANDSHAKE_TIMEOUT = 10.0
#: The largest handshake or request frame (a job's command and env fit well within).
MAX_REQUEST = 4 * 1024 * 1024
#: How much a connection's reader buffers ahead of its consumer before it stops reading
#: from the socket (a frame larger than this is still read whole, when it is asked for).
BUFFER_LIMIT = 1024 * 1024
_OUTPUT = {"stdout": protocol.FRAME_STDOUT, "stderr": protocol.FRAME_STDERR}


class HandshakeFailed(SandboxError):
    """The other end is not a node agent of this cluster (or the gateway's secret is wrong)."""


def mac(secret: bytes, nonce: bytes) -> str:
    return hmac.new(secret, nonce, hashlib.sha256).hexdigest()


async def read_frame(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes] | None:
    try:
        header = await reader.readexactly(protocol.FRAME_HEADER.size)
        kind, length = protocol.decode_header(header)
        if length > limit:
            raise protocol.FrameTooLarge(f"frame of {length} bytes")
        return kind, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def read_json(reader: asyncio.StreamReader) -> dict[str, Any]:
    frame = await asyncio.wait_for(read_frame(reader, MAX_REQUEST), HANDSHAKE_TIMEOUT)
    if frame is None or frame[0] != protocol.FRAME_JSON:
        raise HandshakeFailed("the connection ended or sent no JSON frame")
    msg = json.loads(frame[1])
    if not isinstance(msg, dict):
        raise HandshakeFailed("a handshake frame is not a JSON object")
    return msg


def encode_spec(spec: ExecSpec) -> dict[str, Any]:
    """An ExecSpec whole, as JSON (the node agent's runtime gets every field)."""
    return dataclasses.asdict(spec)


def decode_spec(raw: Any) -> ExecSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("argv"), list):
        raise HandshakeFailed("the request names no process to run")
    fields = {f.name for f in dataclasses.fields(ExecSpec)}
    values = {k: v for k, v in raw.items() if k in fields}
    limits = values.pop("limits", None) or {}
    try:
        return ExecSpec(**values, limits=JobLimits(**limits))
    except TypeError as exc:
        raise HandshakeFailed(f"a malformed process request: {exc}") from exc


#: What the server side runs a process with: (session id, spec) -> a started Process.
Exec = Callable[[str, ExecSpec], Awaitable[Process]]
#: How it takes a persistent one up again: (session id, job id, stdout offset, stderr
#: offset) -> the Process (see Runtime.attach).
Attach = Callable[[str, str, int, int], Awaitable[Process]]


class DataPlaneServer:
    """The node agent's end: accepts authenticated connections and runs each one's
    process in the named sandbox of this node."""

    def __init__(
        self,
        exec_: Exec,
        secret: bytes,
        files: Callable[[str], SandboxFiles] | None = None,
        attach: Attach | None = None,
    ) -> None:
        self._exec = exec_
        self._files = files
        self._attach = attach
        self.secret = secret
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=BUFFER_LIMIT)
        bound = self._server.sockets[0].getsockname()
        return host, int(bound[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve_one(reader, writer)
        except (HandshakeFailed, ValueError, TimeoutError) as exc:
            log.warning("data plane connection refused: %s", exc)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = secrets.token_bytes(32)
        writer.write(protocol.encode_json({"nonce": nonce.hex()}))
        await writer.drain()
        hello = await read_json(reader)
        answer = hello.get("mac")
        if (
            hello.get("op") != "hello"
            or not isinstance(answer, str)
            or not hmac.compare_digest(answer, mac(self.secret, nonce))
        ):
            raise HandshakeFailed("wrong handshake (not this cluster's secret)")
        session_id = str(hello.get("session_id"))
        if "files" in hello:
            if self._files is None:
                raise HandshakeFailed("this node agent serves no files")
            from bastion_server.cluster.remote_files import serve_files

            files = self._files
            await serve_files(lambda: files(session_id), hello["files"], reader, writer)
            return
        try:
            if "attach" in hello:
                process = await self._take_up(session_id, hello["attach"])
                persistent = True
            else:
                spec = decode_spec(hello.get("spec"))
                process = await self._exec(session_id, spec)
                persistent = spec.persist_as is not None
        except SandboxError as exc:
            writer.write(
                protocol.encode_json(
                    {
                        "event": "refused",
                        "not_running": isinstance(exc, SandboxNotRunning),
                        "message": str(exc),
                    }
                )
            )
            await writer.drain()
            return
        writer.write(protocol.encode_json({"event": "started"}))
        await writer.drain()
        await _relay(process, reader, writer, persistent)

    async def _take_up(self, session_id: str, raw: Any) -> Process:
        if self._attach is None:
            raise HandshakeFailed("this node agent takes up no jobs")
        if not isinstance(raw, dict) or not isinstance(raw.get("job_id"), str):
            raise HandshakeFailed("an attach request names no job")
        try:
            offsets = int(raw.get("stdout_offset", 0)), int(raw.get("stderr_offset", 0))
        except (TypeError, ValueError) as exc:
            raise HandshakeFailed(f"a malformed attach request: {exc}") from exc
        return await self._attach(session_id, raw["job_id"], *offsets)


async def _relay(
    process: Process,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    persistent: bool = False,
) -> None:
    """Carry a process's events to the gateway and its input and requests back, until
    it exits (or the gateway goes: then the process is killed with its tree, unless it
    is persistent).  A persistent process's end is kept until the gateway forgets it."""

    async def inbound() -> None:
        while True:
            frame = await read_frame(reader, protocol.MAX_FRAME)
            if frame is None:
                return  # the gateway went away
            kind, payload = frame
            if kind == protocol.FRAME_STDIN:
                await process.send_input(payload)
            elif kind == protocol.FRAME_JSON:
                msg = json.loads(payload)
                if msg.get("op") == "kill":
                    await process.kill(msg.get("signal"))
                elif msg.get("op") == "close_stdin":
                    await process.close_input()
                elif msg.get("op") == "resize":
                    await process.resize(int(msg["rows"]), int(msg["cols"]))
                elif msg.get("op") == "forget":
                    await process.forget()
                    return

    requests = asyncio.create_task(inbound())
    try:
        events = process.events()
        pending_event = asyncio.ensure_future(anext(events))
        while True:
            done, _ = await asyncio.wait(
                {pending_event, requests}, return_when=asyncio.FIRST_COMPLETED
            )
            if pending_event not in done:
                return  # the gateway closed its end: close the process (finally)
            try:
                event = pending_event.result()
            except StopAsyncIteration:
                return
            if isinstance(event, ExitEvent):
                writer.write(exit_event_frame(event))
                await writer.drain()
                if persistent:  # kept until the gateway has recorded it
                    with contextlib.suppress(Exception):
                        await requests
                return
            writer.write(protocol.encode_frame(_OUTPUT[event.stream], event.data))
            await writer.drain()  # backpressure: the next event waits for the gateway
            pending_event = asyncio.ensure_future(anext(events))
    finally:
        requests.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await requests
        await process.close()


async def connect(
    address: tuple[str, int], secret: bytes, hello: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    """Open a connection to the node agent at ``address``, answer its challenge, send
    ``hello``'s request and return the connection with the agent's first reply."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*address, limit=BUFFER_LIMIT),
            HANDSHAKE_TIMEOUT,
        )
    except (OSError, TimeoutError) as exc:
        where = f"{address[0]}:{address[1]}"
        raise SandboxError(f"the node agent at {where} is unreachable: {exc}") from exc
    try:
        challenge = await read_json(reader)
        nonce = bytes.fromhex(str(challenge.get("nonce")))
        writer.write(protocol.encode_json({**hello, "op": "hello", "mac": mac(secret, nonce)}))
        await writer.drain()
        reply = await read_json(reader)
    except (HandshakeFailed, ValueError, TimeoutError, ConnectionError) as exc:
        writer.close()
        raise SandboxError(f"the node agent did not take the request: {exc}") from exc
    return reader, writer, reply


async def open_process(
    address: tuple[str, int], secret: bytes, session_id: str, spec: ExecSpec
) -> Process:
    """The gateway's end: run ``spec`` in the session's sandbox on the node agent at
    ``address``; the Process reads and writes straight over the connection."""
    hello = {"session_id": session_id, "spec": encode_spec(spec)}
    return await _opened(address, secret, hello, persistent=spec.persist_as is not None)


async def attach_process(
    address: tuple[str, int],
    secret: bytes,
    session_id: str,
    job_id: str,
    stdout_offset: int,
    stderr_offset: int,
) -> Process:
    """The gateway's end of a persistent job taken up again (see Runtime.attach)."""
    request = {"job_id": job_id, "stdout_offset": stdout_offset, "stderr_offset": stderr_offset}
    hello = {"session_id": session_id, "attach": request}
    return await _opened(address, secret, hello, persistent=True)


async def _opened(
    address: tuple[str, int], secret: bytes, hello: dict[str, Any], *, persistent: bool
) -> Process:
    reader, writer, reply = await connect(address, secret, hello)
    if reply.get("event") != "started":
        writer.close()
        message = str(reply.get("message") or "refused")
        if reply.get("not_running"):
            raise SandboxNotRunning(message)
        raise SandboxError(message)
    process = AgentProcess(reader, writer)
    process.persistent = persistent  # its end kept on the node until forget()
    return process
