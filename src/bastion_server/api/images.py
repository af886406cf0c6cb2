"""/v1/images: build recipes, list, show, follow a build's log, delete (service/images.py)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from bastion.wire import (
    BuildImageRequest,
    ErrorCode,
    ImageInfo,
    ImageList,
    KeyScope,
    PullImageRequest,
)
from bastion_server.api.auth import principal
from bastion_server.api.deps import services
from bastion_server.api.files import request_body
from bastion_server.api.paging import PageParams
from bastion_server.blocking import run_to_end_or_undo
from bastion_server.image.recipe import Recipe, RecipeError, parse_recipe
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.service.images import image_view
from bastion_server.service.keys import Principal
from bastion_server.service.paging import encode_cursor

router = APIRouter(prefix="/v1/images", tags=["images"])
Caller = Annotated[Principal, Depends(principal)]
Svc = Annotated[Services, Depends(services)]


def _recipe(svc: Services, value: Any) -> tuple[Recipe, bool]:
    """The recipe of a build request, and whether it is a stock one (shared)."""
    try:
        if isinstance(value, str):
            stock = svc.images.stock_recipe(value)
            if stock is None:
                raise ServiceError(
                    ErrorCode.INVALID_RECIPE, f"there is no stock recipe named {value!r}"
                )
            return stock, True
        if not isinstance(value, dict):
            raise RecipeError("(recipe)", "must be a table of keys, or a stock recipe's name")
        files = value.get("files")
        if isinstance(files, dict):
            decoded: dict[str, bytes] = {}
            for path, content in files.items():
                if not isinstance(content, str):
                    raise RecipeError(f"files.{path}", "must be the file's bytes in base64")
                try:
                    decoded[path] = base64.b64decode(content, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise RecipeError(f"files.{path}", "is not valid base64") from exc
            value = {**value, "files": decoded}
        return parse_recipe(value), False
    except RecipeError as exc:
        raise ServiceError(ErrorCode.INVALID_RECIPE, str(exc)) from exc


@router.post("", status_code=202, response_model=ImageInfo)
async def build_image(body: BuildImageRequest, who: Caller, svc: Svc) -> ImageInfo:
    """Start building a recipe (or a stock recipe, by name) and answer at once: the
    image is ``building`` (follow ``GET /v1/images/{name}/log``), or ``ready`` at once
    when the same recipe over the same base is already built (a cache hit).  An image
    an admin key builds, and a stock one, is shared with every key; any other is the
    key's alone."""
    recipe, stock = _recipe(svc, body.get("recipe"))
    shared = stock or who.scope == KeyScope.ADMIN
    record = await svc.images.build(
        who.owner, recipe, shared=shared, no_cache=bool(body.get("no_cache"))
    )
    svc.audit.record("image_build", target=record.name, shared=shared)
    return image_view(record)


@router.post(
    "/import",
    status_code=202,
    response_model=ImageInfo,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "required": True,
        }
    },
)
async def import_image(
    request: Request, who: Caller, svc: Svc, name: Annotated[str, Query()]
) -> ImageInfo:
    """Import an OCI image from the raw body: a ``docker save`` / ``podman save``
    archive or an OCI layout tarball, streamed (at most the server's upload size).
    Answers once the archive is received and known to be an image: the image is
    ``building`` while its layers are unpacked (follow ``GET /v1/images/{name}/log``),
    then ``ready`` or ``failed`` (a member that may not be unpacked).  Its layers
    become one read-only layer; its config's ``Env`` and ``WorkingDir`` apply to its
    sessions, whose jobs run as the sandbox user (uid 1000)."""
    archive = await _receive(svc, request)
    # The service owns the file from here: removed once imported, failed or refused.
    record = await svc.images.import_archive(
        who.owner, name, archive, shared=who.scope == KeyScope.ADMIN
    )
    svc.audit.record("image_import", target=record.name)
    return image_view(record)


async def _receive(svc: Services, request: Request) -> Path:
    """The request body, in a file of the server's (bounded by max_upload_bytes)."""
    tmp = svc.images.tmp_dir
    await asyncio.to_thread(tmp.mkdir, mode=0o700, parents=True, exist_ok=True)
    path = tmp / f"import-{secrets.token_hex(8)}.tar"
    # Opened to its end even if the client leaves meanwhile: the file is then closed.
    f = await run_to_end_or_undo(lambda opened: opened.close(), path.open, "wb")
    size = 0
    try:
        async for chunk in request_body(request):
            size += len(chunk)
            if size > svc.config.max_upload_bytes:
                raise ServiceError(
                    ErrorCode.FILE_TOO_LARGE,
                    f"the archive is over {svc.config.max_upload_bytes} bytes",
                )
            await asyncio.to_thread(f.write, chunk)
    except BaseException:
        await asyncio.to_thread(f.close)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(f.close)
    return path


@router.post("/pull", status_code=202, response_model=ImageInfo)
async def pull_image(body: PullImageRequest, who: Caller, svc: Svc) -> ImageInfo:
    """Pull an image from a registry (``registry[:port]/repo:tag``) and import it as
    ``name``; answers at once, the image ``building`` while the server fetches and
    unpacks it (skopeo's progress in ``GET /v1/images/{name}/log``), then ``ready``
    or ``failed`` (no such image in the registry, a registry out of reach)."""
    record = await svc.images.pull(
        who.owner, body["name"], body["ref"], shared=who.scope == KeyScope.ADMIN
    )
    svc.audit.record("image_pull", target=record.name, ref=body["ref"])
    return image_view(record)


@router.get("", response_model=ImageList)
async def list_images(who: Caller, svc: Svc, page: PageParams) -> ImageList:
    """The images the caller's key may use (its own, the shared ones), by name."""
    after = page.after("images", 1)
    records = [r for r in await svc.images.list(who.owner) if after is None or r.name > after[0]]
    shown = records[: page.limit]
    more = len(records) > page.limit
    return {
        "images": [image_view(r) for r in shown],
        "next_cursor": encode_cursor("images", (shown[-1].name,)) if more else None,
    }


@router.get("/{name}", response_model=ImageInfo)
async def get_image(name: str, who: Caller, svc: Svc) -> ImageInfo:
    """One image: its status (``building``, ``ready``, ``failed``), digest and size."""
    return image_view(await svc.images.get(who.owner, name))


@router.get("/{name}/log", response_class=StreamingResponse)
async def image_log(
    name: str, who: Caller, svc: Svc, follow: Annotated[bool, Query()] = False
) -> StreamingResponse:
    """The image's build log (text); with ``follow=true`` it streams until the build
    ends, then ``GET /v1/images/{name}`` tells how."""
    await svc.images.get(who.owner, name)  # image_not_found before the stream begins
    chunks: AsyncIterator[bytes] = svc.images.follow_log(who.owner, name, follow=follow)
    return StreamingResponse(chunks, media_type="text/plain; charset=utf-8")


@router.delete("/{name}", response_model=ImageInfo)
async def delete_image(name: str, who: Caller, svc: Svc) -> ImageInfo:
    """Delete an image: refused (409 ``image_state``) while sessions run it or images
    are built over it; a shared image only by an admin key."""
    record = await svc.images.delete(who.owner, name, admin=who.scope == KeyScope.ADMIN)
    svc.audit.record("image_delete", target=name)
    return image_view(record)
