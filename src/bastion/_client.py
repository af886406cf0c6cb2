"""The synchronous Bastion client."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, cast

import httpx

from ._base import (
    DEFAULT_TIMEOUT,
    BaseBastion,
    FileOperation,
    TimeoutTypes,
    make_api_error,
    parse_json,
    translate_transport_errors,
)
from ._resources.files import Files
from ._resources.jobs import Jobs
from ._resources.sessions import Sessions
from ._terminal import Terminals
from .wire import API_PREFIX, HealthInfo

__all__ = ["Bastion"]

_RequestContent = bytes | Iterator[bytes] | None


class Bastion(BaseBastion):
    """Client of a Bastion server.

    Args:
        base_url: Server URL; defaults to ``$BASTION_URL``, else ``http://localhost:8080``.
        api_key: Sent as ``Authorization: Bearer <api_key>``; defaults to
            ``$BASTION_API_KEY``, else no key.
        timeout: Seconds (or an ``httpx.Timeout``) for each HTTP request; ``None``
            disables timeouts.  Long-poll requests (``jobs.wait``) get the server's
            hold added to the read timeout.
        transport: An ``httpx`` transport to use instead of the network (tests pass
            ``httpx.MockTransport``).

    Use it as a context manager, or call :meth:`close`, to release its connections::

        with Bastion() as bastion:
            sid = bastion.sessions.create()["session_id"]

    Attributes:
        sessions: Create, start, stop and delete sessions.
        jobs: Run commands in a session and wait for their results.
        files: Upload, list, download and delete files in a session.
        terminal: Attach live shells to a session over a WebSocket.
    """

    sessions: Sessions
    jobs: Jobs
    files: Files
    terminal: Terminals

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._default_headers(),
            timeout=self.timeout,
            transport=transport,
        )
        self.sessions = Sessions(self)
        self.jobs = Jobs(self)
        self.files = Files(self)
        self.terminal = Terminals(self)

    def health(self) -> HealthInfo:
        """The server's health, version and runtime.

        Raises:
            APIConnectionError: The server cannot be reached.
        """
        return cast(HealthInfo, self._request("GET", f"{API_PREFIX}/health"))

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
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: _RequestContent = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        stream: bool = False,
        file_op: FileOperation | None = None,
    ) -> httpx.Response:
        """Send one request; return the response or raise the mapped error.

        Every request goes through here, so transport errors are translated once and
        an error response is always read and closed before its exception is raised.
        With ``stream=True`` a successful response is returned unread and the caller
        must close it.  ``timeout=None`` means the client's timeouts (pass
        ``httpx.Timeout(None)`` to disable them).
        """
        request = self._http.build_request(
            method,
            url,
            params=params,
            json=json,
            content=content,
            headers=headers,
            timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
        )
        with translate_transport_errors():
            response = self._http.send(request, stream=stream)
        if response.is_success:
            return response
        try:
            with translate_transport_errors():
                response.read()
            raise make_api_error(response, file_op)
        finally:
            response.close()

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: _RequestContent = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        file_op: FileOperation | None = None,
    ) -> Any:
        """Send one request and return its JSON body."""
        response = self._send(
            method,
            url,
            params=params,
            json=json,
            content=content,
            headers=headers,
            timeout=timeout,
            file_op=file_op,
        )
        return parse_json(response)

    @contextmanager
    def _stream(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        file_op: FileOperation | None = None,
    ) -> Iterator[httpx.Response]:
        """A successful response with its body unread, closed when the block exits."""
        response = self._send(
            method,
            url,
            params=params,
            headers=headers,
            timeout=timeout,
            stream=True,
            file_op=file_op,
        )
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
