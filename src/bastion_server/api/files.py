"""/v1/sessions/{id}/files: upload (streamed), list, download (streamed), delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from bastion.wire import ErrorCode, FileDeleteResult, FileList, FileUploadResult
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.views import file_view
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError

router = APIRouter(prefix="/v1/sessions/{session_id}/files", tags=["files"])
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]
PathParam = Annotated[str, Query(description="absolute path inside the session")]


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
    session_id: str, path: PathParam, request: Request, who: Owner, svc: Svc
) -> FileUploadResult:
    """Write the request body to ``path`` (parents created), streamed, all or nothing."""
    declared = request.headers.get("content-length")
    size = await svc.files.upload(
        who,
        session_id,
        path,
        _body(request),
        int(declared) if declared and declared.isdigit() else None,
    )
    return {"path": path, "size": size}


@router.get("", response_model=FileList)
async def list_files(session_id: str, who: Owner, svc: Svc, path: PathParam = "/") -> FileList:
    return {"path": path, "files": [file_view(e) for e in svc.files.list(who, session_id, path)]}


@router.get(
    "/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_file(
    session_id: str, path: PathParam, who: Owner, svc: Svc
) -> StreamingResponse:
    """The file's bytes, streamed."""
    chunks, size = svc.files.download(who, session_id, path)
    return StreamingResponse(
        chunks, media_type="application/octet-stream", headers={"Content-Length": str(size)}
    )


@router.delete("", response_model=FileDeleteResult)
async def delete_file(
    session_id: str, path: PathParam, who: Owner, svc: Svc, recursive: bool = False
) -> FileDeleteResult:
    svc.files.delete(who, session_id, path, recursive=recursive)
    return {"path": path, "deleted": True}
