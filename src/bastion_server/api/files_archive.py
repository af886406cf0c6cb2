"""/v1/sessions/{id}/files/archive: a directory tree in or out as a streamed tar."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from bastion.wire import ArchiveUploadResult, ErrorCode
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.files import AsRoot, PathJSONResponse, PathParam, exact_path
from bastion_server.service.archives import ArchiveService
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError

router = APIRouter(
    prefix="/v1/sessions/{session_id}/files/archive",
    tags=["files"],
    default_response_class=PathJSONResponse,
)
Owner = Annotated[str, Depends(owner)]


async def archives(svc: Annotated[Services, Depends(services)]) -> ArchiveService:
    return ArchiveService(svc.files, svc.config)


Archives = Annotated[ArchiveService, Depends(archives)]
_TAR = "application/x-tar"


async def request_body(request: Request) -> AsyncIterator[bytes]:
    """A streamed upload's body as it arrives; a client that leaves mid-way is an error."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect as exc:
        raise ServiceError(
            ErrorCode.INVALID_REQUEST, "the client went away before the upload finished"
        ) from exc


@router.post(
    "",
    response_model=ArchiveUploadResult,
    openapi_extra={
        "requestBody": {
            "content": {_TAR: {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def upload_archive(
    session_id: str,
    path: PathParam,
    request: Request,
    who: Owner,
    archive: Archives,
    as_root: AsRoot,
) -> ArchiveUploadResult:
    """Extract the tar body (plain, gzip, bzip2 or xz) into directory ``path``, made if
    missing, streamed as it arrives.  Refused members (``invalid_path``): absolute
    names, ``..``, symlinks leading out, hard links, devices, FIFOs; setuid, setgid
    and sticky bits are dropped and the archive's owners ignored."""
    path = exact_path(request)
    declared = request.headers.get("content-length")
    result = await archive.upload(
        who,
        session_id,
        path,
        request_body(request),
        int(declared) if declared and declared.isdigit() else None,
        as_root=as_root,
    )
    return {
        "path": path,
        "files": result.files,
        "directories": result.directories,
        "symlinks": result.symlinks,
        "bytes": result.bytes,
    }


@router.get(
    "",
    response_class=StreamingResponse,
    responses={200: {"content": {_TAR: {}}}},
)
async def download_archive(
    session_id: str,
    path: PathParam,
    request: Request,
    who: Owner,
    archive: Archives,
    as_root: AsRoot,
) -> StreamingResponse:
    """Directory ``path`` as a tar, made while it is walked: directories, regular files
    and symlinks (not followed), names relative to ``path``; mount points, special
    files and entries the acting user cannot read are left out."""
    chunks = await archive.download(who, session_id, exact_path(request), as_root=as_root)
    return TarResponse(chunks)


class TarResponse(StreamingResponse):
    """A tar made as it is sent; its making ends with the answer however that ends
    (a client gone mid-way included), so the session's files are let go at once."""

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        self.chunks = chunks
        super().__init__(chunks, media_type=_TAR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.chunks.aclose()
