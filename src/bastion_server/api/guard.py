"""Who may ask, decided from the headers alone: Host/Origin, API key, per-key share.

:class:`RequestGuard` runs before any route and before a byte of a body is read, so a
client without a valid key cannot make the server buffer or parse anything:

* **Host and Origin** (keyless servers only): a server without API keys listens on
  loopback, but a web page can still reach it through DNS rebinding (its own name
  re-pointed at 127.0.0.1) or a cross-origin request.  Unless ``Host`` names a
  loopback address (``localhost``, ``127.0.0.1``, ``[::1]``, any port) or the
  configured ``--host``, and any ``Origin`` is such an address too, the request is
  refused ``403 forbidden_host``; a terminal WebSocket gets an ``error`` message and
  close code 1008 (policy violation).  With keys, every ``Host`` is answered.
* **API key**: every ``/v1`` route but health, the docs and the OpenAPI document
  needs one; a missing or wrong key is ``401 unauthorized`` right after the headers.
  The terminal WebSocket keeps refusing by itself, with its close code 4001.
* **Per-key share**: one key may have ``max_requests_per_key`` requests in flight,
  terminals included; past that, ``429 too_many_requests`` (a terminal: an ``error``
  message and close code 1013, try again later), and the refused request's connection
  is closed at once, so one tenant cannot take every connection the server keeps.  A
  keyless server counts all its callers as one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections import Counter
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from bastion.wire import API_PREFIX, ErrorCode
from bastion_server.api.auth import authorize, identify
from bastion_server.api.docs import DOCS_PATHS
from bastion_server.api.errors import error_response
from bastion_server.api.legacy import is_legacy, legacy_error, legacy_status
from bastion_server.config import ServerConfig
from bastion_server.service.errors import ServiceError

#: Routes anyone may call.
OPEN_PATHS = frozenset(
    {
        f"{API_PREFIX}/health",
        f"{API_PREFIX}/openapi.json",
        *DOCS_PATHS,
    }
)

#: WebSocket close codes of refusals made here (standard codes, RFC 6455 / IANA).
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


def needs_key(path: str) -> bool:
    """Every /v1 route but the open ones, and the original server's session routes."""
    in_v1 = path == API_PREFIX or path.startswith(API_PREFIX + "/")
    return (in_v1 and path not in OPEN_PATHS) or is_legacy(path)


def refusal(
    scope: Scope, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> ASGIApp:
    """The error response, in the original server's shape on its routes."""
    if is_legacy(scope["path"]):
        response = legacy_error(legacy_status(code), message)
        response.headers.update(headers or {})
        return response
    return error_response(code, message, headers)


def _is_loopback_name(name: str, configured: str) -> bool:
    name = name.lower()
    if name in ("localhost", configured.lower().strip("[]")):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host: str | None, configured: str) -> bool:
    """Whether a ``Host`` header names this loopback server (absent: not a browser)."""
    if host is None:
        return True
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (host[end + 1 :] and not host[end + 1 :].startswith(":")):
            return False
        name = host[1:end]
    else:
        name, _, _ = host.partition(":")
    return _is_loopback_name(name, configured)


def origin_allowed(origin: str | None, configured: str) -> bool:
    """Whether an ``Origin`` header is a loopback page (absent: not a browser)."""
    if origin is None:
        return True
    try:
        name = urlsplit(origin.strip()).hostname
    except ValueError:
        return False
    return name is not None and _is_loopback_name(name, configured)


class RequestGuard:
    """ASGI middleware: the Host/Origin check, authentication and per-key share."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.keys = config.api_keys
        self.host = config.host
        self.share = config.max_requests_per_key
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if not self.keys and not (
            host_allowed(conn.headers.get("host"), self.host)
            and origin_allowed(conn.headers.get("origin"), self.host)
        ):
            message = (
                "this server has no API keys and answers only to loopback names "
                "(localhost, 127.0.0.1, [::1]): refused to protect it from web pages"
            )
            await self._refuse(scope, receive, send, ErrorCode.FORBIDDEN_HOST, message)
            return
        owner: str | None = None
        if scope["type"] == "websocket":
            # The terminal refuses a wrong key (or a viewer's) itself, with its own
            # close code; a good key is only noted here, to count the terminal against
            # its share.
            try:
                owner = identify(conn).key_id
            except ServiceError:
                owner = None
        elif needs_key(scope["path"]):
            try:
                who = identify(conn)
                authorize(who, scope["method"], scope["path"])
            except ServiceError as exc:
                headers = (
                    {"WWW-Authenticate": "Bearer"} if exc.code == ErrorCode.UNAUTHORIZED else None
                )
                await refusal(scope, exc.code, exc.message, headers)(scope, receive, send)
                return
            scope["bastion.authorized"] = True
            scope["bastion.owner"] = owner = who.key_id  # the request log names the key
        if owner is None:
            await self.app(scope, receive, send)
            return
        if self.in_flight[owner] >= self.share:
            message = (
                f"this API key already has {self.share} requests in flight "
                "(terminals included); retry when some have ended"
            )
            await self._refuse(scope, receive, send, ErrorCode.TOO_MANY_REQUESTS, message)
            return
        self.in_flight[owner] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[owner] -= 1
            if not self.in_flight[owner]:
                del self.in_flight[owner]

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, code: ErrorCode, message: str
    ) -> None:
        if scope["type"] == "http":
            # A refused request's connection is closed at once: a key over its share
            # holds no more connections than that share (its body may still be coming).
            headers = (
                {"Retry-After": "1", "Connection": "close"}
                if code == ErrorCode.TOO_MANY_REQUESTS
                else None
            )
            await refusal(scope, code, message, headers)(scope, receive, send)
            return
        close = (
            CLOSE_TRY_AGAIN_LATER if code == ErrorCode.TOO_MANY_REQUESTS else CLOSE_POLICY_VIOLATION
        )
        ws = WebSocket(scope, receive, send)
        with contextlib.suppress(Exception):  # the client may be gone already
            await ws.accept()
            await ws.send_text(
                json.dumps({"type": "error", "payload": {"code": code.value, "message": message}})
            )
            await ws.close(close, message[:120])
