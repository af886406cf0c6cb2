"""/v1/sessions/{id}/files: upload (streamed), list, download (streamed), delete."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Send

from bastion.wire import ErrorCode, FileDeleteResult, FileList, FileUploadResult
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.errors import error_response
from bastion_server.api.paging import PageParams
from bastion_server.api.views import file_view
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.service.files import Download

log = logging.getLogger("bastion.files")


class PathJSONResponse(JSONResponse):
    """JSON written in ASCII: a file name that is not UTF-8 travels as ``\\udcXX``
    escapes (its bytes as Python's lone surrogates, PEP 383), which round-trip."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


router = APIRouter(
    prefix="/v1/sessions/{session_id}/files",
    tags=["files"],
    default_response_class=PathJSONResponse,
)
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]
PathParam = Annotated[
    str,
    Query(
        description="absolute path inside the session; percent-encoded bytes that are not "
        "UTF-8 name those very bytes"
    ),
]


def _as_root(
    user: Annotated[
        Literal["user", "root"],
        Query(
            description="act as the session's user (the default: what a job could do) or its root"
        ),
    ] = "user",
) -> bool:
    return user == "root"


AsRoot = Annotated[bool, Depends(_as_root)]


def exact_path(request: Request, default: str = "/") -> str:
    """The ``path`` query parameter with its bytes kept: Starlette's decoding would turn
    bytes that are not UTF-8 into U+FFFD; here they become lone surrogates."""
    query = bytes(request.scope.get("query_string", b"")).decode("latin-1")
    for key, value in parse_qsl(
        query, keep_blank_values=True, encoding="utf-8", errors="surrogateescape"
    ):
        if key == "path":
            return str(value)
    return default


def request_body(request: Request) -> AsyncIterator[bytes]:
    """A request body's bytes as they arrive (see :class:`RequestBody`)."""
    return RequestBody(request).chunks()


class RequestBody:
    """A request body's bytes as they arrive (a client leaving mid-way is a
    ServiceError); ``complete`` once the client has sent them all."""

    def __init__(self, request: Request) -> None:
        self.request, self.complete = request, False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.request.stream():
                if chunk:
                    yield chunk
        except ClientDisconnect as exc:
            raise ServiceError(
                ErrorCode.INVALID_REQUEST, "the client went away before the upload finished"
            ) from exc
        self.complete = True


@router.put(
    "",
    response_model=FileUploadResult,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "required": True,
        }
    },
)
async def upload_file(
    session_id: str,
    path: PathParam,
    request: Request,
    who: Owner,
    svc: Svc,
    as_root: AsRoot,
    mode: Annotated[
        str | None, Query(description="the file's mode in octal, e.g. 755 (default 644)")
    ] = None,
) -> FileUploadResult | JSONResponse:
    """Write the request body to ``path`` (parents created), streamed, all or nothing."""
    path = exact_path(request)
    declared = request.headers.get("content-length")
    body = RequestBody(request)
    try:
        size = await svc.files.upload(
            who,
            session_id,
            path,
            body.chunks(),
            int(declared) if declared and declared.isdigit() else None,
            mode=_parse_mode(mode),
            as_root=as_root,
        )
    except ServiceError as exc:
        if body.complete:
            raise
        # Failed before the body's end (the session stopped, the disk is full...): the
        # rest is not read, so the connection closes after the answer, or the client
        # would go on sending into a connection nobody reads and never see it.
        return error_response(exc.code, exc.message, {"Connection": "close"})
    return {"path": path, "size": size}


def _parse_mode(mode: str | None) -> int | None:
    if mode is None:
        return None
    try:
        value = int(mode, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise ServiceError(
            ErrorCode.INVALID_REQUEST, f"mode must be octal permission bits 000-777, not {mode!r}"
        )
    return value


@router.get("", response_model=FileList)
async def list_files(
    session_id: str,
    request: Request,
    who: Owner,
    svc: Svc,
    as_root: AsRoot,
    page: PageParams,
    path: PathParam = "/",
) -> FileList:
    """The directory's entries in the order of their names' bytes, a page at a time:
    pass ``next_cursor`` back as ``cursor`` for the next page."""
    path = exact_path(request)
    found = await svc.files.list(who, session_id, path, page, as_root=as_root)
    return {
        "path": path,
        "files": [file_view(e) for e in found.items],
        "next_cursor": found.next_cursor,
    }


@router.get(
    "/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_file(
    session_id: str,
    path: PathParam,
    request: Request,
    who: Owner,
    svc: Svc,
    as_root: AsRoot,
) -> StreamingResponse:
    """The file's bytes, streamed."""
    download = await svc.files.download(who, session_id, exact_path(request), as_root=as_root)
    return DownloadResponse(download)


class DownloadResponse(StreamingResponse):
    """A file's bytes.  One whose session stops meanwhile is cut short: the connection
    is closed before the ``Content-Length`` is reached, which the client sees as an
    incomplete body (there is no other way to fail an answer already begun)."""

    def __init__(self, download: Download) -> None:
        self.download, self.chunks = download, download.chunks()
        super().__init__(
            self.chunks,
            media_type="application/octet-stream",
            headers={"Content-Length": str(download.size)},
        )

    async def stream_response(self, send: Send) -> None:
        body = self.chunks
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            async for chunk in body:
                message = {"type": "http.response.body", "body": chunk, "more_body": True}
                await self.download.send(send, message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ServiceError as exc:  # the session stopped: the server closes the connection
            log.info("download cut short", extra={"error": exc.message})
        finally:
            await body.aclose()
            await self.download.close()


@router.delete("", response_model=FileDeleteResult)
async def delete_file(
    session_id: str,
    path: PathParam,
    request: Request,
    who: Owner,
    svc: Svc,
    as_root: AsRoot,
    recursive: bool = False,
) -> FileDeleteResult:
    path = exact_path(request)
    await svc.files.delete(who, session_id, path, recursive=recursive, as_root=as_root)
    return {"path": path, "deleted": True}
