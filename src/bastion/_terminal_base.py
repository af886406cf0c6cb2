"""Everything the terminal clients share that does no I/O.

:class:`bastion.Terminal` (threads, ``websockets.sync``) and
:class:`bastion.AsyncTerminal` (tasks, ``websockets.asyncio``) only open the
WebSocket, send text frames and receive them.  Building the URL and headers, shaping
and parsing the JSON messages, keeping track of what the server said (init, exit,
error) and turning a close code, a refused handshake or a failed connect into an
exception all live here, once.

The protocol itself is defined in :mod:`bastion.wire` (section "terminal").
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from typing import cast
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from ._base import BaseBastion, __version__, error_class, parse_error_body
from ._exceptions import (
    AuthenticationError,
    SessionNotFoundError,
    SessionStateError,
    TerminalAuthenticationError,
    TerminalConnectionError,
    TerminalForbiddenError,
    TerminalSessionNotFoundError,
    TerminalSessionStateError,
)
from .wire import (
    ErrorCode,
    ErrorDetail,
    TerminalCloseCode,
    TerminalExit,
    TerminalInit,
    TerminalMessage,
)

USER_AGENT = f"bastion-py-sdk/{__version__}"
DEFAULT_ROWS = 24
DEFAULT_COLS = 80

#: Seconds between the client's WebSocket pings, and how long a pong may take before
#: the connection counts as dead.  The server pings too; either side's pings keep
#: idle terminals (and the proxies in between) from timing out.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
#: Seconds ``close()`` waits for the server to answer the close handshake.
CLOSE_TIMEOUT = 5.0
#: Largest message accepted from the server (a burst of pty output is far smaller).
MAX_MESSAGE_SIZE = 8 * 1024 * 1024
#: Used when the client's HTTP timeouts are disabled and none is given.
DEFAULT_OPEN_TIMEOUT = 30.0
#: WebSocket close code sent when the server's frames cannot be understood.
PROTOCOL_ERROR = 1002

#: ``reason`` of the exit info :meth:`Terminal.wait` reports when the client closed
#: the terminal before the shell exited (the server never sent an "exit" message).
CLIENT_CLOSED = "client_closed"

_CLOSE_CODE_ERRORS: dict[int, type[TerminalConnectionError]] = {
    TerminalCloseCode.UNAUTHORIZED: TerminalAuthenticationError,
    TerminalCloseCode.FORBIDDEN: TerminalForbiddenError,
    TerminalCloseCode.SESSION_NOT_FOUND: TerminalSessionNotFoundError,
    TerminalCloseCode.SESSION_NOT_RUNNING: TerminalSessionStateError,
}

_ERROR_CODE_ERRORS: dict[str, type[TerminalConnectionError]] = {
    ErrorCode.UNAUTHORIZED: TerminalAuthenticationError,
    ErrorCode.INSUFFICIENT_SCOPE: TerminalForbiddenError,
    ErrorCode.SESSION_NOT_FOUND: TerminalSessionNotFoundError,
    ErrorCode.SESSION_STATE: TerminalSessionStateError,
    ErrorCode.SESSION_PAUSED: TerminalSessionStateError,
}

_DEFAULT_ERROR_CODES: dict[type[TerminalConnectionError], str] = {
    TerminalAuthenticationError: ErrorCode.UNAUTHORIZED,
    TerminalForbiddenError: ErrorCode.INSUFFICIENT_SCOPE,
    TerminalSessionNotFoundError: ErrorCode.SESSION_NOT_FOUND,
    TerminalSessionStateError: ErrorCode.SESSION_STATE,
}

_CLOSE_CODE_TEXT: dict[int, str] = {
    TerminalCloseCode.NORMAL: "the server closed the terminal without reporting an exit",
    TerminalCloseCode.INTERNAL_ERROR: "the server failed to run the terminal",
    TerminalCloseCode.UNAUTHORIZED: "missing or invalid API key",
    TerminalCloseCode.FORBIDDEN: "the API key's scope does not allow terminals",
    TerminalCloseCode.SESSION_NOT_FOUND: "no such session",
    TerminalCloseCode.SESSION_NOT_RUNNING: "the session is not running",
    TerminalCloseCode.BAD_MESSAGE: "the server could not understand a message from the client",
}


# --------------------------------------------------------------------------- requests


def terminal_url(
    base_url: str,
    session_id: str,
    rows: int = DEFAULT_ROWS,
    cols: int = DEFAULT_COLS,
    user: str | None = None,
) -> str:
    """The WebSocket URL of a session's terminal: ``http`` becomes ``ws``, ``https`` ``wss``.

    A path prefix of ``base_url`` (a server behind a reverse proxy) is kept.

    Raises:
        ValueError: ``base_url`` is not an http(s) or ws(s) URL, or the size is invalid.
    """
    rows, cols = check_size(rows, cols)
    parts = urlsplit(base_url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    scheme = schemes.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"cannot derive a WebSocket URL from base_url {base_url!r}")
    path = parts.path.rstrip("/") + BaseBastion._url("sessions", session_id, "terminal")
    query = urlencode({"rows": rows, "cols": cols, **({"user": user} if user else {})})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def open_timeout_for(timeout: httpx.Timeout, open_timeout: float | None) -> float:
    """Seconds to open a terminal: ``open_timeout``, else the client's timeouts.

    Opening is a connect (the handshake) and then a wait for an answer (the server
    starts the shell and sends ``init``), so the default is the larger of the
    client's connect and read timeouts.
    """
    if open_timeout is not None:
        return open_timeout
    parts = [t for t in (timeout.connect, timeout.read) if t is not None]
    return max(parts) if parts else DEFAULT_OPEN_TIMEOUT


def terminal_headers(api_key: str | None) -> dict[str, str]:
    """Headers of the WebSocket handshake: the API key, as on every HTTP request."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def check_size(rows: int, cols: int) -> tuple[int, int]:
    """Validate a window size.

    Raises:
        TypeError: ``rows`` or ``cols`` is not an ``int``.
        ValueError: ``rows`` or ``cols`` is not in 1..65535 (a ``struct winsize`` field).
    """
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 1 <= value <= 0xFFFF:
            raise ValueError(f"{name} must be between 1 and 65535, got {value}")
    return rows, cols


def _encode(message_type: str, payload: dict[str, object]) -> str:
    return json.dumps({"type": message_type, "payload": payload}, separators=(",", ":"))


def input_message(data: str) -> str:
    """The ``input`` message carrying ``data`` (keystrokes, as text).

    Raises:
        TypeError: ``data`` is not a ``str``.
    """
    if not isinstance(data, str):
        raise TypeError(f"terminal input must be str, not {type(data).__name__}")
    return _encode("input", {"data": data})


def resize_message(rows: int, cols: int) -> str:
    """The ``resize`` message for a new window size."""
    rows, cols = check_size(rows, cols)
    return _encode("resize", {"rows": rows, "cols": cols})


def exec_input(command: str | Sequence[str]) -> str:
    """The input that runs ``command`` at the shell prompt: the line and a newline.

    A sequence is quoted for the shell (``shlex.join``) so each item stays one word.
    """
    if isinstance(command, str):
        line = command
    elif isinstance(command, bytes | bytearray) or not isinstance(command, Sequence):
        raise TypeError(f"command must be a str or a sequence of str, not {type(command).__name__}")
    else:
        line = shlex.join(command)
    return line + "\n"


# --------------------------------------------------------------------------- responses


def parse_message(raw: str | bytes) -> TerminalMessage:
    """Parse one frame from the server: a JSON object ``{"type": str, "payload": {...}}``.

    Raises:
        ValueError: The frame is not such an object.
    """
    try:
        message = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"terminal message is not JSON: {_preview(raw)}") from exc
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("type"), str)
        or not isinstance(message.get("payload", {}), dict)
    ):
        raise ValueError(f"terminal message is not {{type, payload}}: {_preview(raw)}")
    message.setdefault("payload", {})
    return cast(TerminalMessage, message)


def _preview(raw: str | bytes) -> str:
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
    return repr(text[:200] + ("..." if len(text) > 200 else ""))


def close_error(
    close_code: int | None,
    reason: str = "",
    error: ErrorDetail | None = None,
    *,
    session_id: str = "",
    connecting: bool = False,
) -> TerminalConnectionError:
    """The exception for a terminal connection that closed without an exit.

    The class comes from the close code (4001, 4004, 4009), else from the code of an
    ``error`` message the server sent before closing; the message text from that
    ``error`` message, else the close reason, else the close code's meaning.

    Args:
        close_code: The code of the server's close frame, ``None`` without one.
        reason: The close frame's reason.
        error: The payload of the last ``error`` message, if one came.
        session_id: For the message.
        connecting: The connection closed before the terminal was ready.
    """
    cls = _CLOSE_CODE_ERRORS.get(close_code or 0)
    if cls is None and error is not None:
        cls = _ERROR_CODE_ERRORS.get(error.get("code", ""))
    cls = cls or TerminalConnectionError
    if error is not None and error.get("message"):
        detail = error["message"]
    elif reason:
        detail = reason
    elif close_code is None:
        detail = "the connection was lost without a close frame"
    else:
        detail = _CLOSE_CODE_TEXT.get(close_code, "closed by the server")
    code = error.get("code") if error is not None else None
    what = f"terminal of session {session_id}" if session_id else "terminal"
    doing = f"cannot open {what}" if connecting else f"{what} closed"
    suffix = f" (close code {close_code})" if close_code is not None else ""
    return cls(
        f"{doing}: {detail}{suffix}",
        code=code or _DEFAULT_ERROR_CODES.get(cls),
        close_code=close_code,
    )


def handshake_error(
    status_code: int, body: bytes, reason_phrase: str = "", *, session_id: str = ""
) -> TerminalConnectionError:
    """The exception for a WebSocket handshake the server refused with an HTTP answer.

    The body is read like any error response (``{"error": {"code", "message"}}``); the
    class follows the SDK's usual code-then-status mapping.
    """
    code, message = parse_error_body(status_code, body, reason_phrase)
    general = error_class(code, status_code)
    cls: type[TerminalConnectionError]
    if issubclass(general, AuthenticationError):
        cls = TerminalAuthenticationError
    elif issubclass(general, SessionNotFoundError):
        cls = TerminalSessionNotFoundError
    elif issubclass(general, SessionStateError):
        cls = TerminalSessionStateError
    else:
        cls = TerminalConnectionError
        if status_code == 404 and code in (None, ErrorCode.NOT_FOUND):
            message += " (does this server offer terminals?)"
    what = f"terminal of session {session_id}" if session_id else "terminal"
    return cls(f"cannot open {what}: {message}", code=code, status_code=status_code)


def close_info(exc: ConnectionClosed) -> tuple[int | None, str]:
    """The server's close code and reason; ``None`` if no close frame came."""
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    cause = exc.__cause__
    if cause is not None:
        return None, f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    if exc.sent is not None and exc.sent.reason:
        return None, exc.sent.reason
    return None, ""


def open_error(
    exc: Exception, *, session_id: str, url: str, base_url: str, open_timeout: float
) -> TerminalConnectionError:
    """The exception for a WebSocket that could not be opened (raise it ``from exc``).

    Handles what ``websockets`` (sync or asyncio) raises from ``connect``: a refused
    handshake (``InvalidStatus``), a timeout, a network error, a protocol error.
    Anything else is returned as a generic :class:`TerminalConnectionError`.
    """
    where = f"terminal of session {session_id}"
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return handshake_error(
            response.status_code,
            bytes(response.body or b""),
            response.reason_phrase,
            session_id=session_id,
        )
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return TerminalConnectionError(
            f"cannot open {where}: timed out after {open_timeout} s connecting to {url}"
        )
    if isinstance(exc, OSError):
        return TerminalConnectionError(
            f"cannot open {where}: cannot reach the Bastion server at {base_url}: {exc}"
        )
    if isinstance(exc, WebSocketException):
        return TerminalConnectionError(f"cannot open {where}: {exc}")
    return TerminalConnectionError(f"cannot open {where}: {exc!r}")


#: What ``websockets.connect`` raises when a terminal cannot be opened.
OPEN_ERRORS = (InvalidStatus, TimeoutError, OSError, WebSocketException)


def no_init_error(session_id: str, open_timeout: float) -> TerminalConnectionError:
    return TerminalConnectionError(
        f"cannot open terminal of session {session_id}: the server sent no init message "
        f"within {open_timeout} s"
    )


def bad_init_error(session_id: str, exc: ValueError) -> TerminalConnectionError:
    return TerminalConnectionError(f"cannot open terminal of session {session_id}: {exc}")


class TerminalState:
    """What the server has said on one terminal connection, and how it ended.

    The I/O side feeds every parsed message to :meth:`record` and the end of the
    connection to :meth:`connection_closed`; :meth:`outcome` then gives what
    ``wait()`` returns or raises.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.init: TerminalInit | None = None
        self.exit: TerminalExit | None = None
        self.error: ErrorDetail | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        #: Why the connection ended abnormally (mapped close code, protocol error).
        self.failure: TerminalConnectionError | None = None
        #: What the ``on_message`` callback raised; it ended the terminal.
        self.callback_error: Exception | None = None
        self.closed_by_client = False
        self.ended = False

    def record(self, message: TerminalMessage) -> None:
        """Take note of an ``init``, ``exit`` or ``error`` message."""
        kind, payload = message["type"], message["payload"]
        if kind == "init" and self.init is None:
            self.init = cast(TerminalInit, payload)
        elif kind == "exit":
            self.exit = cast(TerminalExit, {"exit_code": None, "reason": "exited", **payload})
        elif kind == "error":
            code, text = payload.get("code"), payload.get("message")
            self.error = {
                "code": code if isinstance(code, str) else "",
                "message": text if isinstance(text, str) else "",
            }

    def protocol_error(self, exc: ValueError) -> None:
        """The server sent a frame that is not a terminal message."""
        if self.failure is None:
            self.failure = TerminalConnectionError(f"bad message from the server: {exc}")

    def connection_closed(self, close_code: int | None, reason: str, *, connecting: bool) -> None:
        """The connection ended; ``close_code`` is the server's, ``None`` if none came."""
        self.ended = True
        self.close_code = close_code
        self.close_reason = reason
        if self.exit is not None or self.failure is not None or self.callback_error is not None:
            return
        if self.closed_by_client and not connecting:
            return
        self.failure = close_error(
            close_code,
            reason,
            self.error,
            session_id=self.session_id,
            connecting=connecting,
        )

    def outcome(self) -> TerminalExit:
        """The exit info of an ended terminal, or raise why it ended without one.

        Raises:
            Exception: What the ``on_message`` callback raised, as it is.
            TerminalConnectionError: The connection closed abnormally.
        """
        if self.callback_error is not None:
            raise self.callback_error
        if self.exit is not None:
            return self.exit
        if self.failure is not None:
            raise self.failure
        return {"exit_code": None, "reason": CLIENT_CLOSED}

    def describe_closed(self) -> str:
        """Why input can no longer be sent, for :class:`TerminalSendError`."""
        if self.exit is not None:
            code = self.exit.get("exit_code")
            reason = self.exit.get("reason")
            return f"the terminal has closed: the shell ended ({reason}, exit code {code})"
        if self.failure is not None:
            return f"the terminal connection is gone: {self.failure}"
        if self.callback_error is not None:
            return f"the terminal was closed because on_message raised {self.callback_error!r}"
        if self.closed_by_client:
            return "the terminal is closed"
        return "the terminal connection is gone"
