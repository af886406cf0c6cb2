"""/v1/docs: the Swagger UI page, with its assets served from here, not from a CDN.

FastAPI's page loads Swagger UI from a CDN, so without internet it is blank.  The
assets come from an installed package instead (``fastapi-offline``, which ships
Swagger UI's bundle and stylesheet and nothing the server runs) and are served under
``/v1/docs/assets/``: the page works wherever the server does.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from bastion.wire import API_PREFIX, ErrorCode
from bastion_server.service.errors import ServiceError

DOCS_PATH = f"{API_PREFIX}/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"

#: The files the page needs, with their media types.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}

#: The page and its assets: open to anyone, like the OpenAPI document they show.
DOCS_PATHS = frozenset({DOCS_PATH, *(f"{ASSETS_PATH}/{name}" for name in ASSETS)})

router = APIRouter(include_in_schema=False)
#: Assets read so far (once each, off the event loop).
_loaded: dict[str, bytes] = {}


def _read(name: str) -> bytes:
    return (files("fastapi_offline") / "static" / name).read_bytes()


@router.get(DOCS_PATH)
async def docs_page() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=f"{API_PREFIX}/openapi.json",
        title="Bastion API",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        swagger_ui_parameters={"persistAuthorization": True},
    )


@router.get(ASSETS_PATH + "/{name}")
async def docs_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no such docs asset: {name}")
    if name not in _loaded:
        _loaded[name] = await asyncio.to_thread(_read, name)
    return Response(
        _loaded[name],
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=86400"},
    )
