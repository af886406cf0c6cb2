"""The original Bastion server's REST API, served beside ``/v1`` for old clients.

The public ``bastion-py-sdk`` 1.0.0 wheel on PyPI ships ``generated_client``, an
OpenAPI client of the first Bastion server (Go, Docker).  These routes speak its wire
format exactly, so that client works unmodified against this server:

=======  ==================================  ===========================================
GET      /health                             ``{"status": "ok"}`` (no key needed)
POST     /session/create                     201 ``{session_id, status, created_at}``
POST     /session/{id}/start | /stop         ``{id, container_id, created_at,
GET      /session/{id}/status                last_used_at, status}``
DELETE   /session/{id}                       ``{session_id, status: "deleted"}``
POST     /session/{id}/exec                  ``{"cmd": [...]}`` -> ``{job_id, status}``
GET      /session/{id}/job/{job_id}          ``{job_id, cmd, status, created_at, output:
                                             {console_output, errout, status_code}}``
POST     /session/{id}/upload                multipart: ``file`` and ``metadata``
                                             (JSON ``{"path": ...}``)
GET      /session/{id}/list?path=&page=&limit=  ``{page, limit, total, total_pages,
                                             files: [{name, is_dir, size, mode,
                                             mod_time}]}``
GET      /session/{id}/download?path=        the file's bytes
DELETE   /session/{id}/delete                ``{"path": ...}`` -> ``{"status": ...}``
WS       /session/{id}/terminal?api_token=   JSON messages ``init``, ``term_input``,
                                             ``term_output``, ``error``
=======  ==================================  ===========================================

Everything maps onto the same services as ``/v1``: the same API keys (``Authorization:
Bearer``; the terminal may carry its key as ``api_token`` in the URL, as browsers
cannot set headers on a WebSocket), the same tenancy (a key sees only its sessions) and
the same confinement of file operations.  What differs is only the shape:

* errors are ``{"error": "<message>"}``, with the old statuses: 400 for a bad request
  or path, 403 for an operation the session's state or a path's type forbids, 404,
  409, 429, 500 as before;
* file paths are relative to the sandbox user's home, where jobs start (the old
  server's ``/workspace``): ``/`` or ``""`` is the home itself;
* start of a running session and stop of a stopped one answer its status, as before.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import math
import mimetypes
import posixpath
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.websockets import WebSocketDisconnect

from bastion.wire import ERROR_HTTP_STATUS, FINAL_JOB_STATUSES, ErrorCode, SessionStatus
from bastion_server.api.auth import LEGACY_PREFIX, owner, terminal_owner
from bastion_server.api.deps import services
from bastion_server.api.files import DownloadResponse, exact_path
from bastion_server.api.files_archive import request_body
from bastion_server.api.jobs import INLINE_OUTPUT, json_with_output
from bastion_server.api.multipart import MultipartError, MultipartReader, boundary_of
from bastion_server.runtime.base import OutputEvent
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.store.sqlite import JobRecord, SessionRecord

#: The old server's statuses where they differ from ``/v1``'s.
_LEGACY_STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_COMMAND: 400,
    ErrorCode.INVALID_PATH: 400,
    ErrorCode.LIMIT_EXCEEDED: 400,
    ErrorCode.SESSION_STATE: 403,
    ErrorCode.IS_A_DIRECTORY: 403,
    ErrorCode.NOT_A_DIRECTORY: 403,
}
_MAX_METADATA_BYTES = 64 * 1024


def is_legacy(path: str) -> bool:
    return path.startswith(LEGACY_PREFIX)


def legacy_error(status: int, message: str) -> JSONResponse:
    message = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return JSONResponse({"error": message}, status_code=status)


def legacy_status(code: ErrorCode) -> int:
    return _LEGACY_STATUS.get(code, ERROR_HTTP_STATUS[code])


def legacy_service_error(exc: ServiceError) -> JSONResponse:
    return legacy_error(legacy_status(exc.code), exc.message)


class _FileExists(Exception):
    """The old upload never replaced a file: 409."""


class LegacyRoute(APIRoute):
    """A route whose errors leave in the old shape, ``{"error": "<message>"}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def legacy_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return legacy_service_error(exc)
            except _FileExists:
                return legacy_error(409, "File already exists")
            except RequestValidationError as exc:
                where = [".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:3]]
                return legacy_error(400, "Invalid request: " + ", ".join(where))

        return legacy_handler


router = APIRouter(tags=["legacy (original server API)"], route_class=LegacyRoute)
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]


def _bad(message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_REQUEST, message)


# -- views ---------------------------------------------------------------------------


def _session_status(record: SessionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "container_id": record.id,
        "created_at": record.created_at,
        "last_used_at": record.updated_at,
        "status": record.status,
    }


def _job_head(record: JobRecord) -> dict[str, Any]:
    return {
        "job_id": record.id,
        "cmd": record.command,
        "status": record.status,
        "created_at": record.created_at,
    }


def _exit_status(record: JobRecord) -> int:
    return record.exit_code if record.exit_code is not None else -1


def _sandbox_path(svc: Services, path: str | None) -> str:
    """A path of the old API (relative to the old ``/workspace``) inside the sandbox."""
    if not path:
        raise _bad("Path required")
    home = svc.runtime.home.rstrip("/")
    rest = path.strip("/")
    return f"{home}/{rest}" if rest else home or "/"


# -- system and sessions -------------------------------------------------------------


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness, as the original server answered it (no key needed)."""
    return {"status": "ok"}


@router.post("/session/create", status_code=201)
async def create_session(who: Owner, svc: Svc) -> dict[str, Any]:
    record = await svc.sessions.create(who)
    return {"session_id": record.id, "status": record.status, "created_at": record.created_at}


@router.post("/session/{session_id}/start")
async def start_session(session_id: str, who: Owner, svc: Svc) -> dict[str, Any]:
    record = svc.sessions.get(who, session_id)
    if record.status != SessionStatus.RUNNING:
        record = await svc.sessions.start(who, session_id)
    return _session_status(record)


@router.post("/session/{session_id}/stop")
async def stop_session(session_id: str, who: Owner, svc: Svc) -> dict[str, Any]:
    record = svc.sessions.get(who, session_id)
    if record.status != SessionStatus.STOPPED:
        record = await svc.sessions.stop(who, session_id)
    return _session_status(record)


@router.get("/session/{session_id}/status")
async def session_status(session_id: str, who: Owner, svc: Svc) -> dict[str, Any]:
    return _session_status(svc.sessions.get(who, session_id))


@router.delete("/session/{session_id}")
async def delete_session(session_id: str, who: Owner, svc: Svc) -> dict[str, Any]:
    record = svc.sessions.get(who, session_id)
    if record.status != SessionStatus.DELETED:
        record = await svc.sessions.delete(who, session_id)
    return {"session_id": record.id, "status": record.status}


# -- jobs ----------------------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise _bad("Invalid request body") from exc
    if not isinstance(body, dict):
        raise _bad("Invalid request body")
    return body


@router.post("/session/{session_id}/exec")
async def execute_command(
    session_id: str, request: Request, who: Owner, svc: Svc
) -> dict[str, Any]:
    """Start ``cmd`` (an argv list) in the background; poll the job for its output."""
    body = await _json_body(request)
    if body.get("cmd") is None:
        raise _bad("Command required")
    record = await svc.jobs.run(who, session_id, body["cmd"])
    return {"job_id": record.id, "status": record.status}


@router.get("/session/{session_id}/job/{job_id}")
async def job_status(session_id: str, job_id: str, who: Owner, svc: Svc) -> Response:
    """The job; its ``output`` once it is final (large output streamed as it is read)."""
    record = svc.jobs.get(who, session_id, job_id)
    head = _job_head(record)
    if record.status not in FINAL_JOB_STATUSES:
        return JSONResponse({**head, "output": None})
    if svc.jobs.output_size(record) < INLINE_OUTPUT:
        stdout, stderr = await asyncio.to_thread(svc.jobs.output, record)
        output = {"console_output": stdout, "errout": stderr, "status_code": _exit_status(record)}
        return JSONResponse({**head, "output": output})
    chunks = json_with_output(head, svc, record, _exit_status(record))
    return StreamingResponse(chunks, media_type="application/json")


# -- files ---------------------------------------------------------------------------


@router.post(
    "/session/{session_id}/upload",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "metadata"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "metadata": {"type": "string", "description": '{"path": "..."}'},
                        },
                    }
                }
            },
        }
    },
)
async def upload_file(session_id: str, request: Request, who: Owner, svc: Svc) -> dict[str, Any]:
    """Write the ``file`` part to ``metadata.path``, streamed as it arrives.

    ``metadata`` must come before ``file`` (as the old client sends them)."""
    svc.sessions.require_running(who, session_id)
    try:
        reader = MultipartReader(
            request_body(request), boundary_of(request.headers.get("content-type"))
        )
        path: str | None = None
        async for part in reader.parts():
            if part.name == "metadata":
                path = _metadata_path(await part.read(_MAX_METADATA_BYTES))
            elif part.name == "file":
                if path is None:
                    raise _bad("Metadata required (send the metadata field before the file)")
                target = _sandbox_path(svc, path)
                if await _exists(svc, who, session_id, target):
                    raise _FileExists()
                await svc.files.upload(who, session_id, target, part.chunks(), None)
                return {"status": "success", "path": posixpath.normpath(path)}
    except MultipartError as exc:
        raise _bad(f"Cannot parse form: {exc}") from exc
    raise _bad("Failed to retrieve file" if path is not None else "Metadata required")


async def _exists(svc: Services, who: str, session_id: str, path: str) -> bool:
    """Whether ``path`` names something (as the old server's ``stat`` before writing:
    a file created meanwhile by the session itself is replaced, as it could be anyway)."""
    try:
        await (await svc.files.download(who, session_id, path)).close()
    except ServiceError as exc:
        return exc.code not in (ErrorCode.FILE_NOT_FOUND, ErrorCode.NOT_A_DIRECTORY)
    return True


def _metadata_path(raw: bytes) -> str:
    try:
        metadata = json.loads(raw)
    except ValueError as exc:
        raise _bad("Invalid metadata") from exc
    path = metadata.get("path") if isinstance(metadata, dict) else None
    if not isinstance(path, str) or not path.strip("/"):
        raise _bad("Invalid upload path")
    return path


@router.get("/session/{session_id}/list")
async def list_files(
    session_id: str,
    request: Request,
    who: Owner,
    svc: Svc,
    page: int = 1,
    limit: int | None = None,
) -> dict[str, Any]:
    """The directory's entries (symlinks left out, as before), a page at a time."""
    path = _sandbox_path(svc, exact_path(request, ""))
    if page < 1 or (limit is not None and limit < 1):
        raise _bad("page and limit must be positive")
    listing = await svc.files.list(who, session_id, path)
    entries = [e for e in listing.items if e.type != "symlink"]
    size = limit or max(len(entries), 1)
    chosen = entries[(page - 1) * size : page * size]
    return {
        "page": page,
        "limit": size,
        "total": len(entries),
        "total_pages": math.ceil(len(entries) / size),
        "files": [
            {
                "name": e.name,
                "is_dir": e.type == "directory",
                "size": e.size,
                "mode": e.mode,
                "mod_time": e.modified_at,
            }
            for e in chosen
        ],
    }


@router.get(
    "/session/{session_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_file(
    session_id: str, request: Request, who: Owner, svc: Svc
) -> StreamingResponse:
    path = _sandbox_path(svc, exact_path(request, ""))
    response = DownloadResponse(await svc.files.download(who, session_id, path))
    name = posixpath.basename(path)
    response.headers["content-type"] = mimetypes.guess_type(name)[0] or "application/octet-stream"
    quoted = quote(name.encode("utf-8", "surrogateescape"), safe="")
    response.headers["content-disposition"] = f"attachment; filename*=utf-8''{quoted}"
    return response


@router.delete("/session/{session_id}/delete")
async def delete_file(session_id: str, request: Request, who: Owner, svc: Svc) -> dict[str, str]:
    """Delete a file, or a directory with everything in it."""
    raw = (await _json_body(request)).get("path")
    if not isinstance(raw, str):
        raise _bad("Path required")
    path = _sandbox_path(svc, raw)
    if path == _sandbox_path(svc, "/"):
        raise ServiceError(ErrorCode.PERMISSION_DENIED, "Cannot delete root directory")
    await svc.files.delete(who, session_id, path, recursive=True)
    return {"status": "deleted successfully"}


# -- terminal ------------------------------------------------------------------------


@router.get("/session/{session_id}/terminal")
async def terminal_without_upgrade(session_id: str) -> Response:
    """The terminal is a WebSocket; a plain GET is told how to connect."""
    return legacy_error(
        426,
        f"the terminal is a WebSocket: connect to ws://HOST{LEGACY_PREFIX}{session_id}"
        "/terminal?api_token=KEY",
    )


async def _send(ws: WebSocket, kind: str, session_id: str, client_id: str, **payload: str) -> None:
    message = {"type": kind, "client_id": client_id, "session_id": session_id, "payload": payload}
    await ws.send_text(json.dumps(message))


@router.websocket("/session/{session_id}/terminal")
async def terminal_socket(ws: WebSocket, session_id: str) -> None:
    """The old terminal protocol: ``init`` on connect, then ``term_input`` messages in
    (``payload.input``) and ``term_output`` out (``payload.output``); a bad message is
    answered ``error`` (``payload.err``).  Each connection gets a shell of its own."""
    await ws.accept()
    svc = await services(ws)
    try:
        who = terminal_owner(ws)
        terminal = await svc.terminals.open(who, session_id, 24, 80)
    except ServiceError as exc:
        with contextlib.suppress(Exception):
            await _send(ws, "error", session_id, "", err=exc.message)
            await ws.close(1008, exc.message[:120])
        return
    client_id = terminal.id

    async def pump_input() -> None:
        while True:
            try:
                message = json.loads(await ws.receive_text())
            except ValueError:
                message = None
            if not isinstance(message, dict) or message.get("type") != "term_input":
                await _send(ws, "error", session_id, client_id, err="invalid msg type")
                continue
            payload = message.get("payload")
            data = payload.get("input") if isinstance(payload, dict) else None
            if isinstance(data, str):
                await terminal.process.send_input(data.encode("utf-8", "surrogateescape"))

    async def pump_output() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        async for event in terminal.process.events():
            if isinstance(event, OutputEvent) and (text := decoder.decode(event.data)):
                await _send(ws, "term_output", session_id, client_id, output=text)

    try:
        await _send(ws, "init", session_id, client_id, msg="connected")
        tasks = {asyncio.create_task(pump_input()), asyncio.create_task(pump_output())}
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await ws.close(1000, terminal.end_reason or "exited")
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        await svc.terminals.release(terminal)
