"""``AsyncBastion.terminal``: a live shell in a session, over a WebSocket, with asyncio.

One :class:`AsyncTerminal` is one ``websockets.asyncio`` connection.  A task (the
*reader*) receives the server's messages and hands each one, in order, to the
``on_message`` callback (a plain or ``async def`` function, awaited before the next
message); without a callback the messages are kept for ``async for message in
terminal``.  When the connection ends, for whatever reason, the reader ends too, and
its socket is closed once :meth:`AsyncTerminal.close` or :meth:`AsyncTerminal.wait`
returns.  Everything that does no I/O is shared with the sync terminal
(:mod:`bastion._terminal_base`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from types import TracebackType
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from ._base import BaseBastion, await_result
from ._exceptions import (
    TerminalConnectionError,
    TerminalSendError,
    TerminalTimeoutError,
)
from ._terminal_base import (
    CLOSE_TIMEOUT,
    DEFAULT_COLS,
    DEFAULT_ROWS,
    MAX_MESSAGE_SIZE,
    OPEN_ERRORS,
    PING_INTERVAL,
    PING_TIMEOUT,
    PROTOCOL_ERROR,
    USER_AGENT,
    TerminalState,
    bad_init_error,
    close_info,
    exec_input,
    input_message,
    no_init_error,
    open_error,
    open_timeout_for,
    parse_message,
    resize_message,
    terminal_headers,
    terminal_url,
)
from .wire import TerminalCloseCode, TerminalExit, TerminalInit, TerminalMessage

__all__ = ["AsyncMessageCallback", "AsyncTerminal", "AsyncTerminals"]

#: ``on_message(message)``: a plain or ``async def`` function, called in the reader
#: task with each server message (what it returns is awaited if awaitable).
AsyncMessageCallback = Callable[[TerminalMessage], object]


class AsyncTerminal:
    """A shell attached to a session (what :meth:`AsyncTerminals.connect` gives).

    The async twin of :class:`bastion.Terminal`.  Messages from the server go to
    ``on_message`` from a reader task, one at a time and in the order they came; the
    first is always ``init``.  Without ``on_message`` they are kept until read with
    ``async for``, which ends when the connection does (raising
    :class:`TerminalConnectionError` if it ended abnormally)::

        async with bastion.terminal.connect(session_id=sid) as term:
            await term.exec("echo hello; exit")
            async for message in term:
                if message["type"] == "term_output":
                    print(message["payload"]["data"], end="")
            await term.wait()             # {"exit_code": 0, "reason": "exited"}

    Kept messages use memory until read: pass ``on_message`` for a long, chatty
    shell nobody iterates.  If ``on_message`` raises, the terminal closes and
    :meth:`wait` re-raises that exception.  Do not await :meth:`wait` in
    ``on_message`` (it would wait for itself).
    """

    def __init__(
        self,
        connection: ClientConnection,
        state: TerminalState,
        pending: list[TerminalMessage],
        on_message: AsyncMessageCallback | None,
    ) -> None:
        # Built by ``open_async_terminal`` once the server's ``init`` has arrived.
        if state.init is None:
            raise ValueError("an AsyncTerminal needs the server's init message")
        self._ws = connection
        self._state = state
        self._info: TerminalInit = state.init
        self._on_message = on_message
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._finished = False
        #: Messages kept for ``async for`` (only without ``on_message``).
        self._kept: deque[TerminalMessage] | None = deque() if on_message is None else None
        self._news = asyncio.Event()
        self._reader = asyncio.create_task(
            self._read(pending), name=f"bastion-terminal-{self._info.get('terminal_id', '?')}"
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AsyncTerminal {self.terminal_id} session={self.session_id} {state}>"

    # ----------------------------------------------------------------------- state

    @property
    def terminal_id(self) -> str:
        """The server's id of this terminal (from its ``init`` message)."""
        return str(self._info.get("terminal_id", ""))

    @property
    def session_id(self) -> str:
        return self._state.session_id

    @property
    def info(self) -> TerminalInit:
        """The ``init`` payload: ``terminal_id``, ``session_id``, ``shell``, ``rows``, ``cols``."""
        return self._info

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` was called or the connection has ended."""
        return self._closing or self._finished

    @property
    def exit_info(self) -> TerminalExit | None:
        """The ``exit`` payload (``exit_code``, ``reason``) once the shell has ended."""
        return self._state.exit

    @property
    def exit_code(self) -> int | None:
        """The shell's exit status once it has exited, else ``None``."""
        return self._state.exit["exit_code"] if self._state.exit is not None else None

    @property
    def close_code(self) -> int | None:
        """The close code of the server's close frame, once the connection has ended."""
        return self._state.close_code

    # ----------------------------------------------------------------------- input

    async def send_input(self, text: str) -> None:
        """Send ``text`` to the shell as if typed (``"ls -la\\n"``, ``"\\x03"`` for Ctrl-C).

        Args:
            text: The characters to send.

        Returns:
            ``None``.

        Raises:
            TypeError: ``text`` is not a ``str``.
            TerminalSendError: The terminal is closed or its connection broke.
        """
        await self._send(input_message(text))

    async def exec(self, command: str | Sequence[str]) -> None:
        """Type a command line and Enter: ``exec("echo hello")`` sends ``"echo hello\\n"``.

        Args:
            command: The line to run; a sequence is quoted for the shell.

        Returns:
            ``None``.

        Raises:
            TerminalSendError: The terminal is closed or its connection broke.
        """
        await self._send(input_message(exec_input(command)))

    async def resize(self, rows: int, cols: int) -> None:
        """Tell the shell the window is now ``rows`` x ``cols`` (it gets ``SIGWINCH``).

        Returns:
            ``None``.

        Raises:
            ValueError: ``rows`` or ``cols`` is not in 1..65535.
            TerminalSendError: The terminal is closed or its connection broke.
        """
        await self._send(resize_message(rows, cols))

    async def _send(self, frame: str) -> None:
        if self.closed:
            raise TerminalSendError(self._state.describe_closed())
        try:
            await self._ws.send(frame)
        except (ConnectionClosed, OSError) as exc:
            raise TerminalSendError(f"{self._state.describe_closed()} ({exc})") from exc

    # ----------------------------------------------------------------------- messages

    def __aiter__(self) -> AsyncTerminal:
        if self._kept is None:
            raise TypeError(
                "this terminal delivers its messages to on_message; connect without "
                "on_message to read them with `async for`"
            )
        return self

    async def __anext__(self) -> TerminalMessage:
        """The next message; ends when the connection has ended and all were read.

        Raises:
            TerminalConnectionError: The connection ended without an exit.
        """
        kept = self._kept
        if kept is None:
            raise TypeError("this terminal delivers its messages to on_message")
        while not kept:
            if self._finished:
                if self._state.failure is not None:
                    raise self._state.failure
                raise StopAsyncIteration
            self._news.clear()
            await self._news.wait()
        return kept.popleft()

    # ----------------------------------------------------------------------- ending

    async def wait(self, timeout: float | None = None) -> TerminalExit:
        """Wait until the shell exits and every message has been delivered.

        Args:
            timeout: Seconds to wait at most; ``None`` waits for ever.

        Returns:
            The ``exit`` payload: ``{"exit_code": int | None, "reason": str}``
            (``reason`` ``"client_closed"`` if the client closed it first).

        Raises:
            TerminalTimeoutError: The shell did not exit in time (also a
                ``TimeoutError``); the terminal stays open.
            TerminalConnectionError: The connection ended without an exit.
            Exception: What ``on_message`` raised, if it did.
        """
        if asyncio.current_task() is self._reader and not self._reader.done():
            raise RuntimeError("AsyncTerminal.wait() cannot be awaited in on_message")
        # asyncio.wait, unlike wait_for, never cancels the reader on a timeout.
        done, _ = await asyncio.wait({self._reader}, timeout=timeout)
        if not done:
            raise TerminalTimeoutError(f"terminal {self.terminal_id} still open after {timeout} s")
        return self._state.outcome()

    async def close(self) -> None:
        """Close the terminal (the server ends the shell) and release its connection.

        Waits for the reader task to finish, so no ``on_message`` call happens after
        ``close()`` returns (unless it is awaited in ``on_message`` itself).
        Idempotent, and never raises for a terminal that is already gone.

        Returns:
            ``None``.
        """
        self._begin_close(TerminalCloseCode.NORMAL, "")
        if asyncio.current_task() is not self._reader:
            await asyncio.wait({self._reader})

    async def __aenter__(self) -> AsyncTerminal:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _begin_close(self, code: int, reason: str) -> None:
        """Start the closing handshake in a task of its own; the reader keeps
        receiving meanwhile (the handshake's answer is among what it receives)."""
        if self._closing or self._finished:
            return
        self._closing = True
        self._state.closed_by_client = True
        self._closer = asyncio.create_task(
            self._close_connection(code, reason), name=f"{self._reader.get_name()}-close"
        )

    async def _close_connection(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close(code, reason)

    # ----------------------------------------------------------------------- reader

    async def _read(self, pending: list[TerminalMessage]) -> None:
        try:
            for message in pending:
                await self._deliver(message)
            while True:
                try:
                    raw = await self._ws.recv()
                except ConnectionClosed as exc:
                    self._state.connection_closed(*close_info(exc), connecting=False)
                    return
                try:
                    message = parse_message(raw)
                except ValueError as exc:
                    self._state.protocol_error(exc)
                    self._begin_close(PROTOCOL_ERROR, "bad message")
                    continue
                self._state.record(message)
                await self._deliver(message)
        except asyncio.CancelledError:
            # The loop is shutting down (or someone cancelled the task): the
            # connection is closed below all the same.
            if self._state.failure is None and not self._state.closed_by_client:
                self._state.failure = TerminalConnectionError("the terminal reader was cancelled")
            raise
        except Exception as exc:  # a bug here must not leave wait() hanging
            if self._state.failure is None:
                self._state.failure = TerminalConnectionError(f"terminal reader failed: {exc!r}")
        finally:
            await self._finish()

    async def _deliver(self, message: TerminalMessage) -> None:
        # After close() (or a failed callback) messages still drain, unseen: the
        # closing handshake needs the reader to keep receiving.
        if self._closing:
            return
        if self._kept is not None:
            self._kept.append(message)
            self._news.set()
            return
        if self._on_message is None:
            return
        try:
            await await_result(self._on_message(message))
        except Exception as exc:
            self._state.callback_error = exc
            self._begin_close(TerminalCloseCode.NORMAL, "")

    async def _finish(self) -> None:
        """The connection has ended: make sure its socket is closed."""
        closer = self._closer
        with contextlib.suppress(BaseException):
            if closer is not None:
                await closer
            # Returns at once on a closed connection; else closes it (a reader that
            # failed or was cancelled leaves it open).
            await self._ws.close()
        self._state.ended = True
        self._finished = True
        self._news.set()


async def open_async_terminal(
    client: BaseBastion,
    session_id: str,
    on_message: AsyncMessageCallback | None,
    *,
    rows: int,
    cols: int,
    open_timeout: float | None,
    user: Literal["user", "root"] | None = None,
) -> AsyncTerminal:
    """Open the WebSocket and wait for ``init``; see :meth:`AsyncTerminals.connect`."""
    url = terminal_url(client.base_url, session_id, rows, cols, user)
    seconds = open_timeout_for(client.timeout, open_timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        connection = await ws_connect(
            url,
            additional_headers=terminal_headers(client.api_key),
            user_agent_header=USER_AGENT,
            open_timeout=seconds,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_MESSAGE_SIZE,
        )
    except OPEN_ERRORS as exc:
        raise open_error(
            exc, session_id=session_id, url=url, base_url=client.base_url, open_timeout=seconds
        ) from exc

    state = TerminalState(session_id)
    pending: list[TerminalMessage] = []
    try:
        while state.init is None:
            try:
                async with asyncio.timeout_at(deadline):
                    raw = await connection.recv()
            except ConnectionClosed as exc:
                state.connection_closed(*close_info(exc), connecting=True)
                raise state.failure or TerminalConnectionError(
                    f"cannot open terminal of session {session_id}"
                ) from exc
            except TimeoutError as exc:
                raise no_init_error(session_id, seconds) from exc
            try:
                message = parse_message(raw)
            except ValueError as exc:
                raise bad_init_error(session_id, exc) from exc
            state.record(message)
            # Anything before init (there should be nothing) is delivered, in order.
            pending.append(message)
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return AsyncTerminal(connection, state, pending, on_message)


class _Connecting(Awaitable[AsyncTerminal]):
    """What :meth:`AsyncTerminals.connect` returns: await it for the terminal, or use
    it in ``async with`` to close the terminal at the end of the block."""

    def __init__(self, opening: Callable[[], Coroutine[Any, Any, AsyncTerminal]]) -> None:
        self._opening = opening
        self._terminal: AsyncTerminal | None = None

    def __await__(self) -> Generator[Any, None, AsyncTerminal]:
        return self._opening().__await__()

    async def __aenter__(self) -> AsyncTerminal:
        self._terminal = await self._opening()
        return self._terminal

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._terminal is not None:
            await self._terminal.close()


class AsyncTerminals:
    """Live shells in running sessions (``bastion.terminal`` of :class:`AsyncBastion`).

    The async twin of :class:`bastion._terminal.Terminals`: :meth:`connect` gives an
    :class:`AsyncTerminal` (await it, or use it in ``async with``); the other methods
    are coroutines acting on the terminal connected most recently::

        await bastion.terminal.connect(session_id=sid, on_message=print)
        await bastion.terminal.exec("echo hello")
        await bastion.terminal.close()

    Closing the client closes every terminal it opened.
    """

    def __init__(self, client: BaseBastion) -> None:
        self._client = client
        self._current: AsyncTerminal | None = None
        # Strong references: asyncio keeps only weak ones to tasks, and a terminal
        # nobody holds must still be read to its end and closed.  Each one leaves the
        # set when its reader task is done.
        self._open: set[AsyncTerminal] = set()

    def connect(
        self,
        session_id: str,
        on_message: AsyncMessageCallback | None = None,
        *,
        rows: int = DEFAULT_ROWS,
        cols: int = DEFAULT_COLS,
        open_timeout: float | None = None,
        user: Literal["user", "root"] | None = None,
    ) -> _Connecting:
        """Attach a new shell to a running session.

        ``await connect(...)`` returns the terminal once the server has started the
        shell (its ``init`` message came); ``async with connect(...) as term:`` also
        closes it when the block ends.

        Args:
            session_id: A running session's id.
            on_message: Called (and awaited, if ``async def``) in the reader task
                with each message, in order; ``None`` keeps them for ``async for``.
            rows: Window height in character cells.
            cols: Window width in character cells.
            open_timeout: Seconds to wait for the connection and the shell; ``None``
                uses the larger of the client's connect and read timeouts.
            user: ``"root"`` runs the shell as the sandbox's root (root of the
                session's own user namespace); default: the sandbox user.

        Returns:
            An awaitable (and async context manager) giving the
            :class:`AsyncTerminal`, which also becomes :attr:`current`.

        Raises:
            TerminalAuthenticationError: The API key is missing or wrong (4001).
            TerminalSessionNotFoundError: No session has this id (4004).
            TerminalSessionStateError: The session is not running (4009).
            TerminalConnectionError: The server is unreachable, refused the
                handshake, timed out or failed to start the shell.
        """

        async def opening() -> AsyncTerminal:
            terminal = await open_async_terminal(
                self._client,
                session_id,
                on_message,
                rows=rows,
                cols=cols,
                open_timeout=open_timeout,
                user=user,
            )
            self._current = terminal
            self._open.add(terminal)
            terminal._reader.add_done_callback(lambda _: self._open.discard(terminal))
            return terminal

        return _Connecting(opening)

    @property
    def current(self) -> AsyncTerminal | None:
        """The terminal connected most recently (open or not), or ``None``."""
        return self._current

    async def send_input(self, text: str) -> None:
        """Send ``text`` to the current terminal's shell (see :meth:`AsyncTerminal.send_input`).

        Returns:
            ``None``.

        Raises:
            TerminalSendError: No terminal was connected, or it is closed.
        """
        await self._require().send_input(text)

    async def exec(self, command: str | Sequence[str]) -> None:
        """Type ``command`` and Enter in the current terminal (see :meth:`AsyncTerminal.exec`).

        Returns:
            ``None``.

        Raises:
            TerminalSendError: No terminal was connected, or it is closed.
        """
        await self._require().exec(command)

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the current terminal (see :meth:`AsyncTerminal.resize`).

        Returns:
            ``None``.

        Raises:
            TerminalSendError: No terminal was connected, or it is closed.
        """
        await self._require().resize(rows, cols)

    async def wait(self, timeout: float | None = None) -> TerminalExit:
        """Wait for the current terminal's shell to exit (see :meth:`AsyncTerminal.wait`).

        Returns:
            The ``exit`` payload.

        Raises:
            TerminalError: No terminal was connected; or as :meth:`AsyncTerminal.wait`.
        """
        return await self._require().wait(timeout)

    async def close(self) -> None:
        """Close the current terminal, if there is one (idempotent).

        Returns:
            ``None``.
        """
        terminal = self._current
        if terminal is not None:
            await terminal.close()

    async def close_all(self) -> None:
        """Close every terminal this client opened (the client's ``close()`` does).

        Returns:
            ``None``.
        """
        for terminal in list(self._open):
            await terminal.close()

    def _require(self) -> AsyncTerminal:
        terminal = self._current
        if terminal is None:
            raise TerminalSendError(
                "no terminal is connected: call bastion.terminal.connect(session_id=...) first"
            )
        return terminal
