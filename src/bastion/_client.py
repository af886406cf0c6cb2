"""The Bastion clients: :class:`Bastion` (sync) and :class:`AsyncBastion`.

Both take the same arguments and offer the same sub-APIs; everything that does no
I/O is elsewhere: configuration, retry decisions and error mapping in
:mod:`bastion._base`, each endpoint's requests beside its resource in
:mod:`bastion._resources`.  What is repeated here is only the I/O core: send a
request with its retries, read a response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, cast

import httpx

from ._async_terminal import AsyncTerminals
from ._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    NOT_GIVEN,
    APIRequest,
    Attempts,
    BaseBastion,
    NotGiven,
    TimeoutTypes,
    build_http_request,
    make_api_error,
    map_http_error,
    parse_json,
    translate_transport_errors,
)
from ._pages import PageRequestFor, next_cursor
from ._resources.files import AsyncFiles, Files
from ._resources.images import AsyncImages, Images
from ._resources.jobs import AsyncJobs, Jobs
from ._resources.keys import AsyncKeys, Keys
from ._resources.sessions import AsyncSessions, Sessions
from ._resources.snapshots import AsyncSnapshots, Snapshots
from ._terminal import Terminals
from .wire import API_PREFIX, HealthInfo

__all__ = ["AsyncBastion", "Bastion"]


def health_request() -> APIRequest:
    """``GET /health``: the server's health, version and runtime (no key needed)."""
    return APIRequest("GET", f"{API_PREFIX}/health")


class Bastion(BaseBastion):
    """Client of a Bastion server.

    Args:
        base_url: Server URL; defaults to ``$BASTION_URL``, else ``http://localhost:8080``.
        api_key: Sent as ``Authorization: Bearer <api_key>``; defaults to
            ``$BASTION_API_KEY``, else no key.
        timeout: Seconds for each HTTP request to connect, send and answer (or an
            ``httpx.Timeout`` with each part apart); ``None`` disables timeouts.
            Long-poll requests (``jobs.wait``) get the server's hold added to the read
            timeout; event streams have no read timeout.
        connect_timeout: Seconds to open a connection; defaults to the smaller of
            ``timeout`` and 5 s (or the connect part of an ``httpx.Timeout``).
        max_retries: Retries after a failed attempt, with exponential backoff and
            jitter, for requests safe to repeat (see "Retries" in :mod:`bastion`);
            ``0`` disables them.
        limits: The connection pool's ``httpx.Limits``; connections are kept alive
            and reused between requests.
        transport: An ``httpx`` transport to use instead of the network (tests pass
            ``httpx.MockTransport``); ``limits`` then do not apply.

    Use it as a context manager, or call :meth:`close`, to release its connections::

        with Bastion() as bastion:
            sid = bastion.sessions.create()["session_id"]

    Attributes:
        sessions: Create, start, stop and delete sessions.
        jobs: Run commands in a session and wait for their results.
        files: Upload, list, download and delete files in a session.
        terminal: Attach live shells to a session over a WebSocket.
        keys: Make, list and revoke the server's API keys (admin keys only).
        snapshots: List, read and delete snapshots of sessions' files.
        images: Build images from recipes; list, show and delete them.
    """

    sessions: Sessions
    jobs: Jobs
    keys: Keys
    snapshots: Snapshots
    images: Images
    files: Files
    terminal: Terminals

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        *,
        connect_timeout: float | NotGiven | None = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout,
            connect_timeout=connect_timeout,
            max_retries=max_retries,
            limits=limits,
        )
        self._http = httpx.Client(**self._http_options(), transport=transport)
        self.sessions = Sessions(self)
        self.jobs = Jobs(self)
        self.keys = Keys(self)
        self.snapshots = Snapshots(self)
        self.images = Images(self)
        self.files = Files(self)
        self.terminal = Terminals(self)

    def health(self) -> HealthInfo:
        """The server's health, version and runtime.

        Returns:
            ``{"status", "version", "runtime"}``.

        Raises:
            APIConnectionError: The server cannot be reached.
        """
        return cast(HealthInfo, self._request(health_request()))

    def close(self) -> None:
        """Close the client's connections and its open terminals.

        The client cannot be used afterwards.
        """
        try:
            self.terminal.close_all()
        finally:
            self._http.close()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def __enter__(self) -> Bastion:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------- I/O core

    def _send(
        self, request: APIRequest, *, stream: bool = False, attempts: Attempts | None = None
    ) -> httpx.Response:
        """Send ``request``, retrying as it allows; the response or the mapped error.

        Every request goes through here, so transport errors are translated once and
        an error response is always read and closed before its exception is raised.
        With ``stream=True`` a successful response is returned unread and the caller
        must close it.  Pass ``attempts`` to learn afterwards what the retries did.
        """
        attempts = attempts or self._attempts(request)
        while True:
            http_request = build_http_request(self._http, request)
            try:
                response = self._http.send(http_request, stream=stream)
            except httpx.HTTPError as exc:
                delay = attempts.retry_after_error(exc)
                if delay is None:
                    raise map_http_error(exc) from exc
            else:
                if response.is_success:
                    return response
                try:
                    with translate_transport_errors():
                        response.read()
                finally:
                    response.close()
                delay = attempts.retry_after_response(response)
                if delay is None:
                    raise make_api_error(response, request.file_op)
            time.sleep(delay)

    def _request(self, request: APIRequest, *, attempts: Attempts | None = None) -> Any:
        """Send ``request`` and return its JSON body."""
        return parse_json(self._send(request, attempts=attempts))

    def _pages(self, request_for: PageRequestFor) -> Iterator[Any]:
        """Every page of a list, each fetched when the caller gets to it."""
        cursor: str | None = None
        while True:
            page = self._request(request_for(cursor))
            yield page
            cursor = next_cursor(page, cursor)
            if cursor is None:
                return

    @contextmanager
    def _stream(self, request: APIRequest) -> Iterator[httpx.Response]:
        """A successful response with its body unread, closed when the block exits."""
        response = self._send(request, stream=True)
        try:
            yield response
        finally:
            response.close()

    @staticmethod
    def _iter_body(response: httpx.Response, chunk_size: int) -> Iterator[bytes]:
        """The body of a streamed response, with transport errors translated."""
        chunks = response.iter_bytes(chunk_size)
        while True:
            with translate_transport_errors():
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    @staticmethod
    def _iter_lines(response: httpx.Response) -> Iterator[str]:
        """The lines of a streamed text response as they arrive, errors translated."""
        lines = response.iter_lines()
        while True:
            with translate_transport_errors():
                line = next(lines, None)
            if line is None:
                return
            yield line


class AsyncBastion(BaseBastion):
    """Async client of a Bastion server: :class:`Bastion` with coroutines.

    Every method of :class:`Bastion` and of its sub-APIs is here with the same name,
    arguments and results, as a coroutine (``await bastion.sessions.create()``) or an
    async iterator (``jobs.stream``, ``files.iter_download``, terminal messages).
    Callbacks (``on_stdout``, ``on_update``, ``on_message``...) may be plain
    functions or ``async def`` functions; they are called in order, one at a time.

    Args:
        base_url: Server URL; defaults to ``$BASTION_URL``, else ``http://localhost:8080``.
        api_key: Sent as ``Authorization: Bearer <api_key>``; defaults to
            ``$BASTION_API_KEY``, else no key.
        timeout: As for :class:`Bastion`.
        connect_timeout: As for :class:`Bastion`.
        max_retries: As for :class:`Bastion`.
        limits: As for :class:`Bastion`.
        transport: An ``httpx`` async transport to use instead of the network (tests
            pass ``httpx.MockTransport`` with an ``async`` handler).

    Use it with ``async with``, or await :meth:`close`, to release its connections::

        async with AsyncBastion() as bastion:
            sid = (await bastion.sessions.create())["session_id"]

    Attributes:
        sessions: Create, start, stop and delete sessions.
        jobs: Run commands in a session and wait for their results.
        files: Upload, list, download and delete files in a session.
        terminal: Attach live shells to a session over a WebSocket.
        keys: Make, list and revoke the server's API keys (admin keys only).
        snapshots: List, read and delete snapshots of sessions' files.
        images: Build images from recipes; list, show and delete them.
    """

    sessions: AsyncSessions
    jobs: AsyncJobs
    keys: AsyncKeys
    snapshots: AsyncSnapshots
    images: AsyncImages
    files: AsyncFiles
    terminal: AsyncTerminals

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        *,
        connect_timeout: float | NotGiven | None = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout,
            connect_timeout=connect_timeout,
            max_retries=max_retries,
            limits=limits,
        )
        self._http = httpx.AsyncClient(**self._http_options(), transport=transport)
        self.sessions = AsyncSessions(self)
        self.jobs = AsyncJobs(self)
        self.keys = AsyncKeys(self)
        self.snapshots = AsyncSnapshots(self)
        self.images = AsyncImages(self)
        self.files = AsyncFiles(self)
        self.terminal = AsyncTerminals(self)

    async def health(self) -> HealthInfo:
        """The server's health, version and runtime.

        Returns:
            ``{"status", "version", "runtime"}``.

        Raises:
            APIConnectionError: The server cannot be reached.
        """
        return cast(HealthInfo, await self._request(health_request()))

    async def close(self) -> None:
        """Close the client's connections and its open terminals.

        The client cannot be used afterwards.
        """
        try:
            await self.terminal.close_all()
        finally:
            await self._http.aclose()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def __aenter__(self) -> AsyncBastion:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------------- I/O core

    async def _send(
        self, request: APIRequest, *, stream: bool = False, attempts: Attempts | None = None
    ) -> httpx.Response:
        """As :meth:`Bastion._send`."""
        attempts = attempts or self._attempts(request)
        while True:
            http_request = build_http_request(self._http, request)
            try:
                response = await self._http.send(http_request, stream=stream)
            except httpx.HTTPError as exc:
                delay = attempts.retry_after_error(exc)
                if delay is None:
                    raise map_http_error(exc) from exc
            else:
                if response.is_success:
                    return response
                try:
                    with translate_transport_errors():
                        await response.aread()
                finally:
                    await response.aclose()
                delay = attempts.retry_after_response(response)
                if delay is None:
                    raise make_api_error(response, request.file_op)
            await asyncio.sleep(delay)

    async def _request(self, request: APIRequest, *, attempts: Attempts | None = None) -> Any:
        """Send ``request`` and return its JSON body."""
        return parse_json(await self._send(request, attempts=attempts))

    async def _pages(self, request_for: PageRequestFor) -> AsyncGenerator[Any, None]:
        """Every page of a list, each fetched when the caller gets to it."""
        cursor: str | None = None
        while True:
            page = await self._request(request_for(cursor))
            yield page
            cursor = next_cursor(page, cursor)
            if cursor is None:
                return

    @asynccontextmanager
    async def _stream(self, request: APIRequest) -> AsyncIterator[httpx.Response]:
        """A successful response with its body unread, closed when the block exits."""
        response = await self._send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    @staticmethod
    async def _iter_body(response: httpx.Response, chunk_size: int) -> AsyncGenerator[bytes, None]:
        """The body of a streamed response, with transport errors translated."""
        chunks = response.aiter_bytes(chunk_size)
        try:
            while True:
                with translate_transport_errors():
                    chunk = await anext(chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    @staticmethod
    async def _iter_lines(response: httpx.Response) -> AsyncGenerator[str, None]:
        """The lines of a streamed text response as they arrive, errors translated."""
        lines = response.aiter_lines()
        try:
            while True:
                with translate_transport_errors():
                    line = await anext(lines, None)
                if line is None:
                    return
                yield line
        finally:
            await lines.aclose()  # type: ignore[attr-defined]
