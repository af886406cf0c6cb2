"""Request bodies, bounded before anything parses them: size, depth and progress.

FastAPI reads a whole body into memory and hands it to ``json.loads`` whatever its
content type, so every body that is not a file upload is a JSON body here, and
:class:`BodyLimits` reads it first:

* **size**: a ``Content-Length`` over ``max_json_bytes`` is refused before a byte of
  the body is read, and a body without one (chunked) is counted while it streams in
  and refused once past the limit: ``413 request_too_large``.
* **depth**: arrays and objects nested deeper than ``max_json_depth`` are refused,
  ``422 invalid_request``, by a linear scan that never recurses (the JSON parser
  would hit the interpreter's recursion limit, and the models' validation would walk
  every level).
* **text**: bytes that are not UTF-8 are ``400 malformed_json``, and a string holding
  a lone surrogate (``"\\ud800"``) is ``422 invalid_request``
  (:mod:`bastion_server.api.text`).
* **progress**: a body that goes ``body_timeout`` seconds without a byte arriving is
  abandoned: ``408 request_timeout`` and the connection closed.  This holds for
  uploads too (their size has its own limit, ``max_upload_bytes``); only the time the
  server waits for the client counts, not the time it takes to write what arrived.
"""

from __future__ import annotations

import asyncio
import re
from array import array
from itertools import accumulate

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.wire import ErrorCode
from bastion_server.api.errors import error_response, is_routed
from bastion_server.api.text import TextProblem, check_body_text
from bastion_server.config import ServerConfig

#: The streamed uploads, the routes whose body is not JSON: a file, a directory's tar
#: archive, a job's stdin, and the original server's multipart upload.
_UPLOADS = (
    ("PUT", re.compile(r"/v1/sessions/[^/]+/files/?")),
    ("POST", re.compile(r"/v1/sessions/[^/]+/files/archive")),
    ("POST", re.compile(r"/v1/sessions/[^/]+/jobs/[^/]+/stdin")),
    ("POST", re.compile(r"/v1/images/import")),
    ("POST", re.compile(r"/session/[^/]+/upload")),
)

#: A JSON string, escapes included, or an unterminated one up to the end.  Possessive,
#: and matching from every quote it starts at, so the scan stays linear on any input.
_STRING = re.compile(rb'"(?:[^"\\]|\\.?)*+(?:"|\Z)', re.DOTALL)
_OPEN, _CLOSE = b"[{", b"]}"
_NESTING = bytes.maketrans(_OPEN + _CLOSE, b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _OPEN + _CLOSE)


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body`` (brackets inside strings aside)."""
    brackets = _STRING.sub(b"", body).translate(_NESTING, _NOT_BRACKETS)
    return max(accumulate(array("b", brackets)), default=0)


def is_upload(scope: Scope) -> bool:
    return any(
        scope["method"] == method and pattern.fullmatch(scope["path"]) is not None
        for method, pattern in _UPLOADS
    )


class BodyLimits:
    """ASGI middleware: the size, depth and progress limits above."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.max_bytes = config.max_json_bytes
        self.max_depth = config.max_json_depth
        self.timeout = config.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif is_upload(scope):
            await self._upload(scope, receive, send)
        else:
            await self._json(scope, receive, send)

    async def _json(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._declared(scope) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    message = await receive()
            except TimeoutError:
                await self._stalled(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # the client went away: there is no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        if body and json_depth(body) > self.max_depth:
            await error_response(
                ErrorCode.INVALID_REQUEST,
                f"the JSON body nests arrays and objects deeper than {self.max_depth} levels",
            )(scope, receive, send)
            return
        try:
            check_body_text(body)
        except TextProblem as problem:
            # (Routing is asked only about a bad body, the rare case: a request no
            # route takes is answered 404 or 405 by the router, whatever its body.)
            app = scope.get("app")
            if app is None or is_routed(app, scope):
                code = ErrorCode.MALFORMED_JSON if problem.malformed else ErrorCode.INVALID_REQUEST
                await error_response(code, problem.message)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_done = False
        stalled = False
        started = False

        async def timed_receive() -> Message:
            nonlocal body_done, stalled
            if body_done or stalled:
                return await receive()
            try:
                async with asyncio.timeout(self.timeout):
                    message = await receive()
            except TimeoutError:
                # The app sees the client leave (an upload then ends as aborted); the
                # client is told why below, once the app has cleaned up.
                stalled = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if stalled:
                return
            started = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)
        if stalled and not started:
            await self._stalled(scope, receive, send)

    @staticmethod
    def _declared(scope: Scope) -> int:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(
            ErrorCode.REQUEST_TOO_LARGE,
            f"JSON request bodies are limited to {self.max_bytes} bytes "
            "(files go through the upload endpoint)",
        )(scope, receive, send)

    async def _stalled(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(
            ErrorCode.REQUEST_TIMEOUT,
            f"no part of the request body arrived for {self.timeout:g} seconds",
            {"Connection": "close"},
        )(scope, receive, send)
