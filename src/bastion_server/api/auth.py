"""API keys at the HTTP edge: who is asking, and whether their key's scope allows it.

Who a key is, and the keys themselves, are :mod:`bastion_server.service.keys`; here
a request's key is read from its headers, turned into a
:class:`~bastion_server.service.keys.Principal` once (kept in the ASGI scope), and
checked against the scope rules:

* ``admin``: everything, ``/v1/keys`` included;
* ``agent``: everything on its tenant's sessions; not ``/v1/keys``;
* ``viewer``: only reads (``GET``/``HEAD``) of its tenant's sessions; no terminals.

A refusal is ``403 insufficient_scope``.  Keys are compared in constant time and
never logged: only a fingerprint (a hash) of a key is ever stored or logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from bastion.wire import API_PREFIX, ErrorCode, KeyScope
from bastion_server.service.errors import ServiceError
from bastion_server.service.keys import (
    ANONYMOUS,
    Principal,
    current_principal,
    fingerprint,
    match_configured,
)

if TYPE_CHECKING:
    from bastion_server.service.container import Services

__all__ = [
    "ANONYMOUS",
    "authenticate",
    "authorize",
    "fingerprint",
    "identify",
    "owner",
    "principal",
    "supplied_key",
    "terminal_owner",
]

#: Methods a viewer may use: those that change nothing.
_READS = frozenset({"GET", "HEAD"})
_KEYS_PATH = f"{API_PREFIX}/keys"


#: The original server's API (see :mod:`bastion_server.api.legacy`) lies under this.
LEGACY_PREFIX = "/session/"


def supplied_key(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if found := conn.headers.get("x-api-key"):
        return found
    # The original server's terminal took its key in the URL (a browser cannot set
    # headers on a WebSocket); only there, never on /v1.
    if conn.scope["type"] == "websocket" and conn.url.path.startswith(LEGACY_PREFIX):
        return conn.query_params.get("api_token") or None
    return None


def authenticate(keys: tuple[str, ...], supplied: str | None) -> str:
    """The owner for ``supplied`` among configured keys only; raises ``unauthorized``
    when keys are set and it fails.  (Requests use :func:`identify`, which knows the
    managed keys too.)"""
    if not keys:
        return ANONYMOUS
    if supplied is None:
        raise ServiceError(
            ErrorCode.UNAUTHORIZED, "an API key is required (Authorization: Bearer <key>)"
        )
    matched = match_configured(keys, supplied)
    if matched is None:
        raise ServiceError(ErrorCode.UNAUTHORIZED, "invalid API key")
    return fingerprint(matched)


def identify(conn: HTTPConnection) -> Principal:
    """The principal of this request or WebSocket, authenticated once from its headers
    (``unauthorized`` when the key is missing or wrong on a server with keys)."""
    found = conn.scope.get("bastion.principal")
    if isinstance(found, Principal):
        return found
    services: Services | None = getattr(conn.app.state, "services", None)
    result: Principal
    if services is not None:
        result = services.keys.identify(supplied_key(conn))
    else:  # an app without its lifespan: the configured keys only
        fp = authenticate(conn.app.state.config.api_keys, supplied_key(conn))
        result = Principal(fp, fp, KeyScope.ADMIN)
    conn.scope["bastion.principal"] = result
    current_principal.set(result)
    return result


def authorize(who: Principal, method: str, path: str) -> None:
    """Raise ``insufficient_scope`` unless ``who``'s scope allows ``method path``."""
    if who.scope == KeyScope.ADMIN:
        return
    if path == _KEYS_PATH or path.startswith(_KEYS_PATH + "/"):
        raise ServiceError(
            ErrorCode.INSUFFICIENT_SCOPE, f"managing API keys needs an admin key ({who.scope})"
        )
    if who.scope == KeyScope.VIEWER and method.upper() not in _READS:
        raise ServiceError(
            ErrorCode.INSUFFICIENT_SCOPE,
            f"a viewer key may only read (GET); {method} {path} needs an agent or admin key",
        )


async def principal(conn: HTTPConnection) -> Principal:
    """FastAPI dependency: the authenticated, authorized caller of this request."""
    who = identify(conn)
    if not conn.scope.get("bastion.authorized"):
        authorize(who, conn.scope.get("method", "GET"), conn.url.path)
        conn.scope["bastion.authorized"] = True
    return who


async def owner(conn: HTTPConnection) -> str:
    """FastAPI dependency: the tenant this request works on (its key's).

    :class:`bastion_server.api.guard.RequestGuard` has already authenticated and
    authorized every ``/v1`` request from its headers (before its body was read); the
    checks here stay for an app mounted without the guard."""
    return (await principal(conn)).owner


def terminal_owner(conn: HTTPConnection) -> str:
    """The tenant of a terminal WebSocket; a viewer key may not open one."""
    who = identify(conn)
    if who.scope == KeyScope.VIEWER:
        raise ServiceError(
            ErrorCode.INSUFFICIENT_SCOPE, "a viewer key cannot open terminals (read only)"
        )
    return who.owner
