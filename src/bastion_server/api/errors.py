"""The one table from exception to error response.

Every error leaves the server as ``{"error": {"code": ..., "message": ...}}`` with the
HTTP status the wire contract assigns to its code.  Domain code raises
:class:`ServiceError`; framework errors (validation, unknown routes) are mapped here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from bastion.wire import ERROR_HTTP_STATUS, ErrorCode
from bastion_server.service.errors import ServiceError
from bastion_server.unicode_text import printable

log = logging.getLogger("bastion.api")


def error_response(
    code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code.value, "message": printable(message)}},
        status_code=ERROR_HTTP_STATUS[code],
        headers=headers,
    )


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.code == ErrorCode.UNAUTHORIZED else None
    return error_response(exc.code, exc.message, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" or _unparsable_body(e) for e in errors):
        return error_response(ErrorCode.MALFORMED_JSON, "the request body is not valid JSON")
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return error_response(ErrorCode.INVALID_REQUEST, "invalid request: " + "; ".join(parts))


def _unparsable_body(error: Any) -> bool:
    """A body sent without a JSON content type that is not JSON either."""
    raw = error.get("input")
    if tuple(error.get("loc", ())) != ("body",) or not isinstance(raw, bytes | str):
        return False
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(ErrorCode.NOT_FOUND, f"no such endpoint: {request.url.path}")
    if exc.status_code == 405:
        return error_response(
            ErrorCode.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.url.path}",
            {"Allow": ", ".join(allowed_methods(request.app, request.scope))},
        )
    return error_response(ErrorCode.INVALID_REQUEST, str(exc.detail))


#: The methods a route may take, in the order ``Allow`` lists them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: Starlette, scope: Scope) -> list[str]:
    """Every method some route takes at this path (RFC 9110's ``Allow``): Starlette's
    own 405 names only the first route's, and there is one route per method.  As in
    OpenAPI, a concrete path (``/v1/images/import``) is matched before a templated one
    (``/v1/images/{name}``): where routes have this very path, only theirs count."""
    literal = [
        methods for path, methods in _route_paths(app.router.routes) if path == scope.get("path")
    ]
    if literal:
        return [m for m in _METHODS if any(m in methods for methods in literal)]
    return [m for m in _METHODS if is_routed(app, {**scope, "method": m})]


def _route_paths(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """``(full path, methods)`` of every route, through the routers the app includes."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from _route_paths(included.routes, prefix + getattr(context, "prefix", ""))
        elif isinstance(route, Route):
            yield prefix + route.path, set(route.methods or ())


def is_routed(app: Starlette, scope: Scope) -> bool:
    """Whether a route takes this request (its path and method)."""
    return _takes(app.router.routes, scope)


def _takes(routes: Sequence[BaseRoute], scope: Scope) -> bool:
    return any(route.matches(scope)[0] == Match.FULL for route in routes)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response(ErrorCode.INTERNAL_ERROR, "internal server error (see the server log)")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
