"""API keys: who is asking, as an owner fingerprint the records are filed under.

Keys are compared in constant time, every configured key every time, so the time an
answer takes says nothing about how close a guess was.  Only a fingerprint (a hash)
of a key is ever stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import HTTPConnection

from bastion.wire import ErrorCode
from bastion_server.service.errors import ServiceError

ANONYMOUS = "anonymous"


def fingerprint(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def supplied_key(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return conn.headers.get("x-api-key") or None


def authenticate(keys: tuple[str, ...], supplied: str | None) -> str:
    """The owner for ``supplied``; raises ``unauthorized`` when keys are set and it fails."""
    if not keys:
        return ANONYMOUS
    if supplied is None:
        raise ServiceError(
            ErrorCode.UNAUTHORIZED, "an API key is required (Authorization: Bearer <key>)"
        )
    given = supplied.encode()
    matched: str | None = None
    for key in keys:
        if hmac.compare_digest(key.encode(), given) and matched is None:
            matched = key
    if matched is None:
        raise ServiceError(ErrorCode.UNAUTHORIZED, "invalid API key")
    return fingerprint(matched)


async def owner(conn: HTTPConnection) -> str:
    """FastAPI dependency: the authenticated owner of this request.

    :class:`bastion_server.api.guard.RequestGuard` has already authenticated every
    ``/v1`` request from its headers (before its body was read) and left the owner in
    the scope; the check here stays for an app mounted without the guard."""
    found = conn.scope.get("bastion.owner")
    if isinstance(found, str):
        return found
    result = authenticate(conn.app.state.config.api_keys, supplied_key(conn))
    conn.scope["bastion.owner"] = result
    return result
