"""The OpenAPI document, made to say what the server really answers.

FastAPI's generated document lists a route's success and a ``422`` with its own
``{"detail": ...}`` body; the server answers every error as
``{"error": {"code", "message"}}`` (:mod:`bastion_server.api.errors`), with the status
the wire contract gives its code, and refuses requests before any route runs (the
guard's ``401``/``403``/``429``, the body limits' ``400``/``408``/``413``/``422``).
:func:`describe` rewrites the generated document once, for every ``/v1`` operation:

* its error responses: the statuses every request can get, those that follow from
  its shape (a JSON or streamed body, parameters, a path parameter, a page cursor),
  and those its routes raise (:data:`PREFIX_STATUSES`, :data:`ROUTE_STATUSES`), each
  with the error body's schema and the codes that travel with that status;
* its security: an API key, as ``Authorization: Bearer`` or ``X-API-Key``, on every
  operation but the open ones (:data:`bastion_server.api.guard.OPEN_PATHS`), so the
  docs page's Authorize button works.

The original server's API (``/session/...``, ``/health``) keeps its own shapes.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bastion.wire import API_PREFIX, ERROR_HTTP_STATUS
from bastion_server.api.guard import needs_key

#: Statuses a route answers beyond those its shape implies, by (method, path).
ROUTE_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    # image or snapshot not found; limit_exceeded; session_start_failed (no storage)
    ("post", "/v1/sessions"): (404, 422, 500),
    ("delete", "/v1/sessions/{session_id}"): (409,),
    # session_start_failed
    ("post", "/v1/sessions/{session_id}/start"): (409, 500),
    ("post", "/v1/sessions/{session_id}/stop"): (409,),
    # the session must be running; invalid_command
    ("post", "/v1/sessions/{session_id}/jobs"): (409,),
}
#: Statuses of every route under a path: file operations need a running session
#: (session_state), may be denied (permission_denied) or fail (file_operation_failed).
PREFIX_STATUSES: dict[str, tuple[int, ...]] = {
    "/v1/sessions/{session_id}/files": (403, 409, 500),
}

#: Every request can be refused so: forbidden_host (a keyless server asked under a
#: foreign Host), too_many_requests (the key's share, the server's connections),
#: internal_error, server_shutdown.
ANY_REQUEST = (403, 429, 500, 503)
#: A request with a key: unauthorized.
KEYED = (401,)
#: A JSON body: malformed_json, request_timeout, request_too_large, invalid_request.
JSON_BODY = (400, 408, 413, 422)
#: A streamed body (a file, an archive): request_timeout, file_too_large, disk_full.
STREAMED_BODY = (408, 413, 507)
#: Parameters (path or query) that the route checks: invalid_request.
PARAMETERS = (422,)
#: A parameter in the path names something that may not exist (*_not_found) or be in
#: a state that forbids the operation (session_state, session_paused, job_state,
#: image_state, snapshot_state).
PATH_PARAMETER = (404, 409)
#: A page cursor that this server did not hand out: invalid_cursor.
CURSOR = (400,)

ERROR_SCHEMA = "ErrorBody"
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key the server was started with (`--api-key`), as "
        "`Authorization: Bearer KEY`.",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same key in an `X-API-Key` header.",
    },
}

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install(app: FastAPI) -> None:
    """Serve :func:`describe`'s document at the app's ``openapi_url``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = describe(document)
        return app.openapi_schema

    setattr(app, "openapi", openapi)  # noqa: B010  (FastAPI's documented override)


def describe(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (as FastAPI generated it) with real error responses and security."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_error_schemas())
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in document.get("paths", {}).items():
        if not _is_v1(path):
            continue
        for method, operation in operations.items():
            _describe_operation(path, method, operation)
    if not _refers_to(document, _FASTAPI_VALIDATION_SCHEMAS):
        for name in _FASTAPI_VALIDATION_SCHEMAS:
            schemas.pop(name, None)
    return document


def error_statuses(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    """The error statuses of one operation, by the rules above."""
    statuses = set(ANY_REQUEST)
    if needs_key(path):
        statuses.update(KEYED)
    body = operation.get("requestBody", {}).get("content", {})
    if "application/json" in body:
        statuses.update(JSON_BODY)
    elif body:
        statuses.update(STREAMED_BODY)
    parameters = operation.get("parameters", [])
    if parameters:
        statuses.update(PARAMETERS)
    if any(p.get("in") == "path" for p in parameters):
        statuses.update(PATH_PARAMETER)
    if any(p.get("name") == "cursor" for p in parameters):
        statuses.update(CURSOR)
    for prefix, extra in PREFIX_STATUSES.items():
        if path == prefix or path.startswith(prefix + "/"):
            statuses.update(extra)
    statuses.update(ROUTE_STATUSES.get((method, path), ()))
    return sorted(statuses)


def _describe_operation(path: str, method: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    for status in error_statuses(path, method, operation):
        responses[str(status)] = _error_response(status)
    operation["responses"] = dict(sorted(responses.items()))
    operation["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}] if needs_key(path) else []


def _error_response(status: int) -> dict[str, Any]:
    codes = sorted(code.value for code, s in ERROR_HTTP_STATUS.items() if s == status)
    return {
        "description": "Error: " + ", ".join(f"`{c}`" for c in codes),
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}
        },
    }


def _error_schemas() -> dict[str, Any]:
    return {
        "ErrorDetail": {
            "type": "object",
            "properties": {
                "code": {
                    "type": "string",
                    "description": "Machine-readable error code (bastion.wire.ErrorCode).",
                },
                "message": {"type": "string", "description": "What went wrong, for people."},
            },
            "required": ["code", "message"],
            "additionalProperties": False,
        },
        ERROR_SCHEMA: {
            "type": "object",
            "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
            "required": ["error"],
            "additionalProperties": False,
        },
    }


def _is_v1(path: str) -> bool:
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def _refers_to(document: dict[str, Any], names: tuple[str, ...]) -> bool:
    """Whether any operation's ``$ref`` names one of the component schemas."""
    text = json.dumps(document.get("paths", {}))
    return any(f'"#/components/schemas/{name}"' in text for name in names)
