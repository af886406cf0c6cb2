"""``bastion.terminal``: a live shell in a session, over a WebSocket.

One :class:`Terminal` is one WebSocket.  A background thread (the *reader*) receives
the server's messages and hands each one, in order, to the ``on_message`` callback;
the calling thread sends input.  When the connection ends, for whatever reason, the
reader ends too, and every thread the terminal started is gone once :meth:`close`
or :meth:`wait` returns.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Literal

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from ._base import BaseBastion
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

__all__ = ["MessageCallback", "Terminal", "Terminals"]

#: ``on_message(message)``: called in the reader thread with each server message.
MessageCallback = Callable[[TerminalMessage], object]


class Terminal:
    """A shell attached to a session (what :meth:`Terminals.connect` returns).

    Messages from the server (``{"type": "init" | "term_output" | "exit" | "error" |
    "pong", "payload": {...}}``) go to ``on_message`` from a background thread, one at
    a time and in the order they came; the first is always ``init``.  Use it as a
    context manager, or call :meth:`close`, to end the shell and release the
    connection::

        with bastion.terminal.connect(session_id=sid, on_message=print) as term:
            term.exec("echo hello")
            term.send_input("exit\\n")
            term.wait(timeout=10)         # {"exit_code": 0, "reason": "exited"}

    If ``on_message`` raises, the terminal closes and :meth:`wait` re-raises that
    exception.  Do not call :meth:`wait` from ``on_message`` (it would wait for itself).
    """

    def __init__(
        self,
        connection: ClientConnection,
        stack: ExitStack,
        state: TerminalState,
        pending: list[TerminalMessage],
        on_message: MessageCallback | None,
    ) -> None:
        # Built by ``open_terminal`` once the server's ``init`` has arrived.
        if state.init is None:
            raise ValueError("a Terminal needs the server's init message")
        self._ws = connection
        self._stack = stack
        self._state = state
        self._info: TerminalInit = state.init
        self._on_message = on_message
        self._lock = threading.Lock()
        self._closing = False
        self._closer: threading.Thread | None = None
        self._done = threading.Event()
        self._reader = threading.Thread(
            target=self._read,
            args=(pending,),
            name=f"bastion-terminal-{self._info.get('terminal_id', '?')}",
            daemon=True,
        )
        self._reader.start()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Terminal {self.terminal_id} session={self.session_id} {state}>"

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
        return self._closing or self._done.is_set()

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

    def send_input(self, text: str) -> None:
        """Send ``text`` to the shell as if typed (``"ls -la\\n"``, ``"\\x03"`` for Ctrl-C).

        Args:
            text: The characters to send.

        Raises:
            TypeError: ``text`` is not a ``str``.
            TerminalSendError: The terminal is closed or its connection broke; raised
                at once, without waiting on the network.
        """
        self._send(input_message(text))

    def exec(self, command: str | Sequence[str]) -> None:
        """Type a command line and Enter: ``exec("echo hello")`` sends ``"echo hello\\n"``.

        Output arrives through ``on_message`` like any other terminal output.

        Args:
            command: The line to run; a sequence is quoted for the shell
                (``["ls", "my dir"]`` -> ``ls 'my dir'``).

        Raises:
            TerminalSendError: The terminal is closed or its connection broke.
        """
        self._send(input_message(exec_input(command)))

    def resize(self, rows: int, cols: int) -> None:
        """Tell the shell the window is now ``rows`` x ``cols`` (it gets ``SIGWINCH``).

        Raises:
            ValueError: ``rows`` or ``cols`` is not in 1..65535.
            TerminalSendError: The terminal is closed or its connection broke.
        """
        self._send(resize_message(rows, cols))

    def _send(self, frame: str) -> None:
        if self.closed:
            raise TerminalSendError(self._state.describe_closed())
        try:
            self._ws.send(frame)
        except (ConnectionClosed, OSError) as exc:
            raise TerminalSendError(f"{self._state.describe_closed()} ({exc})") from exc

    # ----------------------------------------------------------------------- ending

    def wait(self, timeout: float | None = None) -> TerminalExit:
        """Wait until the shell exits and every message has been delivered.

        Args:
            timeout: Seconds to wait at most; ``None`` waits for ever.

        Returns:
            The ``exit`` payload: ``{"exit_code": int | None, "reason": str}``.  If
            the client closed the terminal before the shell ended, ``exit_code`` is
            ``None`` and ``reason`` is ``"client_closed"``.

        Raises:
            TerminalTimeoutError: The shell did not exit in time (also a
                ``TimeoutError``); the terminal stays open.
            TerminalConnectionError: The connection ended without an exit (session
                stopped, server gone, ...); the subclass tells which.
            Exception: What ``on_message`` raised, if it did.
        """
        if threading.current_thread() is self._reader and not self._done.is_set():
            raise RuntimeError("Terminal.wait() cannot be called from on_message")
        if not self._done.wait(timeout):
            raise TerminalTimeoutError(f"terminal {self.terminal_id} still open after {timeout} s")
        if threading.current_thread() is not self._reader:
            self._reader.join()
        return self._state.outcome()

    def close(self) -> None:
        """Close the terminal (the server ends the shell) and release its connection.

        Waits for the reader thread to finish, so no ``on_message`` call happens
        after ``close()`` returns (unless it is called from ``on_message`` itself).
        Idempotent, and never raises for a terminal that is already gone.
        """
        self._begin_close(TerminalCloseCode.NORMAL, "")
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def __enter__(self) -> Terminal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _begin_close(self, code: int, reason: str) -> None:
        """Start the closing handshake without blocking the calling thread.

        ``ClientConnection.close`` waits for the server's answer, which only arrives
        if someone keeps receiving; the reader does, so the handshake runs in a short
        thread of its own that the reader joins when the connection is gone.
        """
        with self._lock:
            if self._closing or self._done.is_set():
                return
            self._closing = True
            self._state.closed_by_client = True
            self._closer = threading.Thread(
                target=self._close_connection,
                args=(code, reason),
                name=f"{self._reader.name}-close",
                daemon=True,
            )
            self._closer.start()

    def _close_connection(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            self._ws.close(code, reason)

    # ----------------------------------------------------------------------- reader

    def _read(self, pending: list[TerminalMessage]) -> None:
        try:
            for message in pending:
                self._deliver(message)
            while True:
                try:
                    raw = self._ws.recv()
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
                self._deliver(message)
        except Exception as exc:  # a bug here must not leave wait() hanging
            if self._state.failure is None:
                self._state.failure = TerminalConnectionError(f"terminal reader failed: {exc!r}")
        finally:
            self._finish()

    def _deliver(self, message: TerminalMessage) -> None:
        # After close() (or a failed callback) messages still drain, unseen: the
        # closing handshake needs the reader to keep receiving.
        if self._on_message is None or self._closing:
            return
        try:
            self._on_message(message)
        except Exception as exc:
            self._state.callback_error = exc
            self._begin_close(TerminalCloseCode.NORMAL, "")

    def _finish(self) -> None:
        """The connection has ended: make sure its socket and threads are gone."""
        closer = self._closer
        if closer is not None:
            closer.join()
        # Idempotent; on an ended connection it only waits for websockets' receiving
        # thread to close the socket.
        with contextlib.suppress(Exception):
            self._stack.close()
        keepalive = getattr(self._ws, "keepalive_thread", None)
        if isinstance(keepalive, threading.Thread) and keepalive is not threading.current_thread():
            keepalive.join(timeout=1.0)
        self._state.ended = True
        self._done.set()


def open_terminal(
    client: BaseBastion,
    session_id: str,
    on_message: MessageCallback | None,
    *,
    rows: int,
    cols: int,
    open_timeout: float | None,
    user: Literal["user", "root"] | None = None,
) -> Terminal:
    """Open the WebSocket and wait for ``init``; see :meth:`Terminals.connect`."""
    url = terminal_url(client.base_url, session_id, rows, cols, user)
    open_timeout = open_timeout_for(client.timeout, open_timeout)
    deadline = time.monotonic() + open_timeout
    stack = ExitStack()
    try:
        connection = stack.enter_context(
            ws_connect(
                url,
                additional_headers=terminal_headers(client.api_key),
                user_agent_header=USER_AGENT,
                open_timeout=open_timeout,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                max_size=MAX_MESSAGE_SIZE,
            )
        )
    except OPEN_ERRORS as exc:
        raise open_error(
            exc, session_id=session_id, url=url, base_url=client.base_url, open_timeout=open_timeout
        ) from exc

    state = TerminalState(session_id)
    pending: list[TerminalMessage] = []
    try:
        while state.init is None:
            try:
                raw = connection.recv(timeout=max(0.0, deadline - time.monotonic()))
            except ConnectionClosed as exc:
                state.connection_closed(*close_info(exc), connecting=True)
                raise state.failure or TerminalConnectionError(
                    f"cannot open terminal of session {session_id}"
                ) from exc
            except TimeoutError as exc:
                raise no_init_error(session_id, open_timeout) from exc
            try:
                message = parse_message(raw)
            except ValueError as exc:
                raise bad_init_error(session_id, exc) from exc
            state.record(message)
            # Anything before init (there should be nothing) is delivered, in order.
            pending.append(message)
    except BaseException:
        with contextlib.suppress(Exception):
            stack.close()
        raise
    return Terminal(connection, stack, state, pending, on_message)


class Terminals:
    """Live shells in running sessions (``bastion.terminal``).

    :meth:`connect` returns a :class:`Terminal`.  The methods ``send_input``,
    ``exec``, ``resize``, ``wait`` and ``close`` here act on the terminal connected
    most recently, so the short style works too::

        bastion.terminal.connect(session_id=sid, on_message=print)
        bastion.terminal.exec("echo hello")
        bastion.terminal.close()

    Closing the client closes every terminal it opened.
    """

    def __init__(self, client: BaseBastion) -> None:
        self._client = client
        self._current: Terminal | None = None
        self._open: weakref.WeakSet[Terminal] = weakref.WeakSet()
        self._lock = threading.Lock()

    def connect(
        self,
        session_id: str,
        on_message: MessageCallback | None = None,
        *,
        rows: int = DEFAULT_ROWS,
        cols: int = DEFAULT_COLS,
        open_timeout: float | None = None,
        user: Literal["user", "root"] | None = None,
    ) -> Terminal:
        """Attach a new shell to a running session.

        Returns once the server has started the shell (its ``init`` message came).

        Args:
            session_id: A running session's id.
            on_message: Called from a background thread with each message, in order
                (``{"type": "init" | "term_output" | "exit" | ..., "payload": {...}}``);
                ``None`` ignores them (``wait()`` still reports the exit).
            rows: Window height in character cells.
            cols: Window width in character cells.
            open_timeout: Seconds to wait for the connection and the shell; ``None``
                uses the larger of the client's connect and read timeouts.
            user: ``"root"`` runs the shell as the sandbox's root (root of the
                session's own user namespace); default: the sandbox user.

        Returns:
            The :class:`Terminal`; it also becomes :attr:`current`.

        Raises:
            TerminalAuthenticationError: The API key is missing or wrong (4001).
            TerminalSessionNotFoundError: No session has this id (4004).
            TerminalSessionStateError: The session is not running (4009).
            TerminalConnectionError: The server is unreachable, refused the
                handshake, timed out or failed to start the shell.
        """
        terminal = open_terminal(
            self._client,
            session_id,
            on_message,
            rows=rows,
            cols=cols,
            open_timeout=open_timeout,
            user=user,
        )
        with self._lock:
            self._current = terminal
            self._open.add(terminal)
        return terminal

    @property
    def current(self) -> Terminal | None:
        """The terminal connected most recently (open or not), or ``None``."""
        return self._current

    def send_input(self, text: str) -> None:
        """Send ``text`` to the current terminal's shell (see :meth:`Terminal.send_input`).

        Returns:
            ``None``.

        Raises:
            TerminalSendError: No terminal was connected, or it is closed.
        """
        self._require().send_input(text)

    def exec(self, command: str | Sequence[str]) -> None:
        """Type ``command`` and Enter in the current terminal (see :meth:`Terminal.exec`).

        Returns:
            ``None``.

        Raises:
            TerminalSendError: No terminal was connected, or it is closed.
        """
        self._require().exec(command)

    def resize(self, rows: int, cols: int) -> None:
        """Resize the current terminal (see :meth:`Terminal.resize`).

        Returns:
            ``None``.

        Raises:
            TerminalSendError: No terminal was connected, or it is closed.
        """
        self._require().resize(rows, cols)

    def wait(self, timeout: float | None = None) -> TerminalExit:
        """Wait for the current terminal's shell to exit (see :meth:`Terminal.wait`).

        Returns:
            The ``exit`` payload.

        Raises:
            TerminalError: No terminal was connected; or as :meth:`Terminal.wait`.
        """
        return self._require().wait(timeout)

    def close(self) -> None:
        """Close the current terminal, if there is one (idempotent).

        Returns:
            ``None``.
        """
        terminal = self._current
        if terminal is not None:
            terminal.close()

    def close_all(self) -> None:
        """Close every terminal this client opened (the client's ``close()`` does).

        Returns:
            ``None``.
        """
        with self._lock:
            terminals = list(self._open)
        for terminal in terminals:
            terminal.close()

    def _require(self) -> Terminal:
        terminal = self._current
        if terminal is None:
            raise TerminalSendError(
                "no terminal is connected: call bastion.terminal.connect(session_id=...) first"
            )
        return terminal
