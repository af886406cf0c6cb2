"""WS /v1/sessions/{id}/terminal: a live shell in a session over a WebSocket.

The socket is accepted before anything is checked so that every refusal can carry a
documented close code (a refused handshake could only say "403").  Protocol and close
codes: the "terminal" section of :mod:`bastion.wire`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from bastion.wire import ErrorCode, TerminalCloseCode
from bastion_server.api.auth import terminal_owner
from bastion_server.api.deps import services
from bastion_server.runtime.base import ExitEvent, OutputEvent
from bastion_server.service.errors import ServiceError
from bastion_server.service.terminals import Terminal, check_size

log = logging.getLogger("bastion.api")
router = APIRouter(tags=["terminal"])

_CLOSE_CODES = {
    ErrorCode.UNAUTHORIZED: TerminalCloseCode.UNAUTHORIZED,
    ErrorCode.INSUFFICIENT_SCOPE: TerminalCloseCode.FORBIDDEN,
    ErrorCode.SESSION_NOT_FOUND: TerminalCloseCode.SESSION_NOT_FOUND,
    ErrorCode.SESSION_STATE: TerminalCloseCode.SESSION_NOT_RUNNING,
    ErrorCode.SESSION_PAUSED: TerminalCloseCode.SESSION_NOT_RUNNING,
    ErrorCode.INVALID_REQUEST: TerminalCloseCode.BAD_MESSAGE,
    ErrorCode.SERVER_SHUTDOWN: TerminalCloseCode.GOING_AWAY,
}
#: The close code after an "exit" message, by its reason (else NORMAL).
_ENDING_CLOSE_CODES = {
    "session_stopped": TerminalCloseCode.SESSION_NOT_RUNNING,
    "session_deleted": TerminalCloseCode.SESSION_NOT_RUNNING,
    "server_shutdown": TerminalCloseCode.GOING_AWAY,
}


class BadMessage(Exception):
    pass


async def _send(ws: WebSocket, kind: str, payload: dict[str, Any]) -> None:
    await ws.send_text(json.dumps({"type": kind, "payload": payload}))


async def _refuse(ws: WebSocket, exc: ServiceError) -> None:
    with contextlib.suppress(Exception):
        await _send(ws, "error", {"code": exc.code.value, "message": exc.message})
        await ws.close(_CLOSE_CODES.get(exc.code, TerminalCloseCode.INTERNAL_ERROR), exc.message)


def _parse(raw: str) -> tuple[str, dict[str, Any]]:
    try:
        message = json.loads(raw)
    except ValueError as exc:
        raise BadMessage("messages must be JSON") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise BadMessage('messages must be objects with a "type"')
    payload = message.get("payload") or {}
    if not isinstance(payload, dict):
        raise BadMessage('"payload" must be an object')
    return message["type"], payload


async def _pump_input(ws: WebSocket, terminal: Terminal) -> None:
    """Client -> shell: input, resizes and pings, until the client goes away."""
    while True:
        kind, payload = _parse(await ws.receive_text())
        if kind == "input":
            data = payload.get("data")
            if not isinstance(data, str):
                raise BadMessage('"input" needs a string "data"')
            try:
                raw = data.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError as exc:
                raise BadMessage('"input" must be valid Unicode (no lone surrogates)') from exc
            await terminal.process.send_input(raw)
        elif kind == "resize":
            rows, cols = payload.get("rows"), payload.get("cols")
            if not isinstance(rows, int) or not isinstance(cols, int):
                raise BadMessage('"resize" needs integer "rows" and "cols"')
            try:
                check_size(rows, cols)
            except ServiceError as exc:
                raise BadMessage(exc.message) from exc
            terminal.rows, terminal.cols = rows, cols
            await terminal.process.resize(rows, cols)
        elif kind == "ping":
            await _send(ws, "pong", {})
        else:
            raise BadMessage(f"unknown message type {kind!r}")


async def _pump_output(ws: WebSocket, terminal: Terminal) -> ExitEvent:
    """Shell -> client, as valid UTF-8 even when a character is split across reads."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    async for event in terminal.process.events():
        if isinstance(event, OutputEvent):
            if text := decoder.decode(event.data):
                await _send(ws, "term_output", {"data": text})
        else:
            if text := decoder.decode(b"", final=True):
                await _send(ws, "term_output", {"data": text})
            return event
    return ExitEvent(exit_code=None, error="lost")


@router.websocket("/v1/sessions/{session_id}/terminal")
async def terminal_socket(
    ws: WebSocket, session_id: str, rows: int = 24, cols: int = 80, user: str | None = None
) -> None:
    await ws.accept()
    svc = await services(ws)
    try:
        owner = terminal_owner(ws)
        terminal = await svc.terminals.open(owner, session_id, rows, cols, user)
    except ServiceError as exc:
        await _refuse(ws, exc)
        return
    pumps: list[asyncio.Task[Any]] = []
    try:
        await _send(
            ws,
            "init",
            {
                "terminal_id": terminal.id,
                "session_id": session_id,
                "shell": terminal.shell,
                "rows": rows,
                "cols": cols,
            },
        )
        # Both pumps live only within this handler: the finally below ends and awaits
        # them on every path, so neither can fail unobserved.
        output = asyncio.create_task(_pump_output(ws, terminal))
        reader = asyncio.create_task(_pump_input(ws, terminal))
        pumps += (output, reader)
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        if reader in done and output not in done:
            output.cancel()
            await asyncio.gather(output, return_exceptions=True)
            failure = reader.exception()
            if isinstance(failure, BadMessage):
                await _refuse(ws, ServiceError(ErrorCode.INVALID_REQUEST, str(failure)))
            elif failure is not None and not isinstance(failure, WebSocketDisconnect):
                log.warning(
                    "terminal input failed: %s",
                    failure,
                    exc_info=failure,
                    extra={"terminal_id": terminal.id},
                )
            return  # the client left (or misbehaved): the shell goes with the socket
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        exit_event = output.result()
        reason = terminal.end_reason or ("exited" if exit_event.error is None else "lost")
        await _send(ws, "exit", {"exit_code": exit_event.exit_code, "reason": reason})
        await ws.close(_ENDING_CLOSE_CODES.get(reason, TerminalCloseCode.NORMAL), reason)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await svc.terminals.release(terminal)
        if ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(TerminalCloseCode.INTERNAL_ERROR)
