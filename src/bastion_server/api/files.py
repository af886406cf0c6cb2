"""/v1/sessions/{id}/files: upload (streamed), list, download (streamed), delete."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from bastion.wire import ErrorCode, FileDeleteResult, FileList, FileUploadResult
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.views import file_view
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError


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


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect as exc:
        raise ServiceError(
            ErrorCode.INVALID_REQUEST, "the client went away before the upload finished"
        ) from exc


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
) -> FileUploadResult:
    """Write the request body to ``path`` (parents created), streamed, all or nothing."""
    path = exact_path(request)
    declared = request.headers.get("content-length")
    size = await svc.files.upload(
        who,
        session_id,
        path,
        _body(request),
        int(declared) if declared and declared.isdigit() else None,
        mode=_parse_mode(mode),
        as_root=as_root,
    )
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
    path: PathParam = "/",
) -> FileList:
    path = exact_path(request)
    entries = await svc.files.list(who, session_id, path, as_root=as_root)
    return {"path": path, "files": [file_view(e) for e in entries]}


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
    chunks, size = await svc.files.download(who, session_id, exact_path(request), as_root=as_root)
    return StreamingResponse(
        chunks, media_type="application/octet-stream", headers={"Content-Length": str(size)}
    )


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
