"""The terminal SDK against a real local WebSocket server that speaks the protocol.

``FakeTerminalServer`` runs ``websockets.sync.server.serve`` on 127.0.0.1 in a thread.
What it does depends on the session id in the URL (see ``_handle``): a working shell
that echoes input, or a refusal with one of the documented close codes.  The CLI tests
use it too.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from bastion import (
    AuthenticationError,
    Bastion,
    SessionNotFoundError,
    SessionStateError,
    Terminal,
    TerminalAuthenticationError,
    TerminalConnectionError,
    TerminalError,
    TerminalSendError,
    TerminalSessionNotFoundError,
    TerminalSessionStateError,
    TerminalTimeoutError,
)
from bastion._terminal_base import (
    CLIENT_CLOSED,
    close_error,
    exec_input,
    handshake_error,
    parse_message,
    terminal_url,
)
from bastion.wire import TerminalMessage

#: A hang (a bug) fails one test quickly instead of stalling the run.
pytestmark = pytest.mark.timeout(60)

API_KEY = "secret-key"
_SESSION = re.compile(r"^/v1/sessions/([^/]+)/terminal$")


@dataclass
class Connection:
    """What the fake server saw on one WebSocket."""

    session_id: str
    query: dict[str, str]
    headers: Headers
    received: list[dict[str, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class FakeTerminalServer:
    """A WebSocket server speaking the terminal protocol of ``bastion.wire``.

    Session ids:
        ``s1`` (or anything else): init, each input echoed as ``term_output``, each
            resize acknowledged as ``term_output`` ``[resize RxC]``, ``ping`` answered
            by ``pong``; a line ``exit N`` (or Ctrl-D) sends ``exit`` and closes 1000.
        ``missing`` / ``stopped``: ``error`` then close 4004 / 4009 (before init).
        ``stop-later``: like ``s1``, but the line ``stop`` sends ``exit`` with reason
            ``session_stopped`` and closes 4009.
        ``vanish``: like ``s1``, but the line ``vanish`` closes 1011 without ``exit``.
        ``garbage``: init, then a frame that is not JSON.
        ``silent``: accepts and never sends init.
        ``http404``: refuses the handshake with an HTTP 404 error body.
    A request without ``Authorization: Bearer secret-key`` gets ``error`` and 4001.
    """

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self._server: Server = serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            ping_interval=None,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join()

    def last(self) -> Connection:
        return self.connections[-1]

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if "/http404/" in request.path:
            body = {"error": {"code": "not_found", "message": "no route"}}
            response = connection.respond(404, json.dumps(body))
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        parts = urlsplit(ws.request.path)
        match = _SESSION.match(parts.path)
        sid = match.group(1) if match else "?"
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        conn = Connection(sid, query, ws.request.headers)
        self.connections.append(conn)
        try:
            self._serve(ws, conn)
        finally:
            conn.done.set()

    def _serve(self, ws: ServerConnection, conn: Connection) -> None:
        def send(kind: str, **payload: Any) -> None:
            ws.send(json.dumps({"type": kind, "payload": payload}))

        if conn.headers.get("Authorization") != f"Bearer {API_KEY}":
            send("error", code="unauthorized", message="invalid API key")
            ws.close(4001, "unauthorized")
            return
        if conn.session_id in ("missing", "stopped"):
            code = 4004 if conn.session_id == "missing" else 4009
            error = "session_not_found" if code == 4004 else "session_state"
            send("error", code=error, message=f"session {conn.session_id}: {error}")
            ws.close(code, error)
            return
        if conn.session_id == "silent":
            ws.recv()  # until the client gives up
            return
        rows, cols = int(conn.query.get("rows", 24)), int(conn.query.get("cols", 80))
        send(
            "init",
            terminal_id="t1",
            session_id=conn.session_id,
            shell="/bin/sh",
            rows=rows,
            cols=cols,
        )
        if conn.session_id == "garbage":
            ws.send("this is not json")
            ws.recv()
            return
        line = ""
        for raw in ws:
            message = json.loads(raw)
            conn.received.append(message)
            kind, payload = message["type"], message["payload"]
            if kind == "ping":
                send("pong")
            elif kind == "resize":
                send("term_output", data=f"[resize {payload['rows']}x{payload['cols']}]")
            elif kind == "input":
                data = payload["data"]
                send("term_output", data=data)
                if data == "\x04" and not line:
                    send("exit", exit_code=0, reason="exited")
                    ws.close(1000)
                    return
                line += data
                while "\n" in line or "\r" in line:
                    current, line = re.split(r"[\r\n]", line, maxsplit=1)
                    if self._command(ws, conn, current.strip(), send):
                        return

    @staticmethod
    def _command(
        ws: ServerConnection, conn: Connection, command: str, send: Callable[..., None]
    ) -> bool:
        """Act on one typed line; ``True`` when the connection is over."""
        if command.startswith("exit"):
            words = command.split()
            send("exit", exit_code=int(words[1]) if len(words) > 1 else 0, reason="exited")
            ws.close(1000)
            return True
        if command == "stop" and conn.session_id == "stop-later":
            send("exit", exit_code=None, reason="session_stopped")
            ws.close(4009, "session stopped")
            return True
        if command == "vanish" and conn.session_id == "vanish":
            ws.close(1011, "runtime gone")
            return True
        if command == "flood":
            for i in range(200):
                send("term_output", data=f"line {i}\n")
        return False


@pytest.fixture
def server() -> Iterator[FakeTerminalServer]:
    srv = FakeTerminalServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def client(server: FakeTerminalServer) -> Iterator[Bastion]:
    with Bastion(server.url, API_KEY, timeout=5.0) as bastion:
        yield bastion


class Inbox:
    """An ``on_message`` callback that records messages and the threads they came on."""

    def __init__(self) -> None:
        self.messages: list[TerminalMessage] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, message: TerminalMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def output(self) -> str:
        return "".join(
            str(m["payload"]["data"]) for m in self.messages if m["type"] == "term_output"
        )

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), self.messages


def terminal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bastion-terminal")]


def settle(baseline: int, timeout: float = 5.0) -> int:
    """The thread count once the server side has also finished (it ends on its own)."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


# --------------------------------------------------------------------------- the session


def test_product_page_style(client: Bastion, server: FakeTerminalServer) -> None:
    inbox = Inbox()
    client.terminal.connect(session_id="s1", on_message=inbox)
    client.terminal.send_input("ls -la\n")
    client.terminal.exec("echo hello")
    inbox.wait_for(lambda: "echo hello\n" in inbox.output())
    client.terminal.close()
    assert [m["type"] for m in inbox.messages] == ["init", "term_output", "term_output"]
    assert inbox.messages[0]["payload"]["terminal_id"] == "t1"
    assert inbox.output() == "ls -la\necho hello\n"
    assert server.last().received == [
        {"type": "input", "payload": {"data": "ls -la\n"}},
        {"type": "input", "payload": {"data": "echo hello\n"}},
    ]
    assert client.terminal.current is not None and client.terminal.current.closed


def test_messages_arrive_in_order_on_the_reader_thread(client: Bastion) -> None:
    inbox = Inbox()
    with client.terminal.connect("s1", inbox) as term:
        for i in range(50):
            term.send_input(f"{i},")
        term.send_input("\n")
        term.exec("flood")
        inbox.wait_for(lambda: "line 199\n" in inbox.output())
    typed = "".join(f"{i}," for i in range(50)) + "\nflood\n"
    assert inbox.output() == typed + "".join(f"line {i}\n" for i in range(200))
    assert inbox.threads == {"bastion-terminal-t1"}
    assert threading.current_thread().name not in inbox.threads


def test_init_exit_and_wait(client: Bastion, server: FakeTerminalServer) -> None:
    inbox = Inbox()
    term = client.terminal.connect("s1", inbox, rows=30, cols=100)
    assert isinstance(term, Terminal)
    assert term.terminal_id == "t1" and term.session_id == "s1"
    assert term.info["rows"] == 30 and term.info["cols"] == 100
    assert server.last().query == {"rows": "30", "cols": "100"}
    assert term.exit_code is None and term.exit_info is None and not term.closed
    term.exec("exit 7")
    assert term.wait(timeout=5) == {"exit_code": 7, "reason": "exited"}
    assert term.exit_code == 7 and term.closed and term.close_code == 1000
    assert [m["type"] for m in inbox.messages] == ["init", "term_output", "exit"]
    term.close()  # after the server closed: a no-op


def test_resize_and_ping_messages(client: Bastion, server: FakeTerminalServer) -> None:
    inbox = Inbox()
    with client.terminal.connect("s1", inbox) as term:
        term.resize(40, 120)
        client.terminal.resize(41, 121)
        inbox.wait_for(lambda: "[resize 41x121]" in inbox.output())
    assert inbox.output() == "[resize 40x120][resize 41x121]"
    assert server.last().received == [
        {"type": "resize", "payload": {"rows": 40, "cols": 120}},
        {"type": "resize", "payload": {"rows": 41, "cols": 121}},
    ]
    with client.terminal.connect("s1") as term, pytest.raises(ValueError):
        term.resize(0, 80)


def test_api_key_is_sent_as_bearer(client: Bastion, server: FakeTerminalServer) -> None:
    with client.terminal.connect("s1"):
        pass
    headers = server.last().headers
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["User-Agent"].startswith("bastion-py-sdk/")


def test_exec_quotes_a_sequence(client: Bastion, server: FakeTerminalServer) -> None:
    inbox = Inbox()
    with client.terminal.connect("s1", inbox) as term:
        term.exec(["ls", "my dir", "$HOME"])
        inbox.wait_for(lambda: "\n" in inbox.output())
    assert inbox.output() == "ls 'my dir' '$HOME'\n"
    assert exec_input("echo hi") == "echo hi\n"
    with pytest.raises(TypeError):
        exec_input(b"ls")  # type: ignore[arg-type]


def test_context_manager_closes(client: Bastion) -> None:
    with client.terminal.connect("s1") as term:
        assert not term.closed
    assert term.closed
    assert term.wait(timeout=1) == {"exit_code": None, "reason": CLIENT_CLOSED}
    assert terminal_threads() == []


def test_no_callback_still_reports_exit(client: Bastion) -> None:
    term = client.terminal.connect("s1")
    term.exec("exit 3")
    assert term.wait(5)["exit_code"] == 3


# --------------------------------------------------------------------------- after the end


def test_send_after_close_raises_at_once(client: Bastion) -> None:
    term = client.terminal.connect("s1")
    term.close()
    started = time.monotonic()
    for send in (
        lambda: term.send_input("x"),
        lambda: term.exec("ls"),
        lambda: term.resize(10, 10),
        lambda: client.terminal.send_input("x"),
    ):
        with pytest.raises(TerminalSendError, match="closed"):
            send()
    assert time.monotonic() - started < 0.5


def test_send_after_the_shell_exited_raises(client: Bastion) -> None:
    term = client.terminal.connect("s1")
    term.exec("exit 0")
    term.wait(5)
    with pytest.raises(TerminalSendError, match="exit code 0"):
        term.send_input("ls\n")


def test_send_without_a_terminal_raises(client: Bastion) -> None:
    with pytest.raises(TerminalSendError, match="connect"):
        client.terminal.send_input("ls\n")
    client.terminal.close()  # nothing to close: no error


def test_close_is_idempotent(client: Bastion) -> None:
    term = client.terminal.connect("s1")
    term.close()
    term.close()
    client.terminal.close()


def test_wait_timeout_is_a_timeout_error(client: Bastion) -> None:
    with client.terminal.connect("s1") as term:
        with pytest.raises(TerminalTimeoutError) as info:
            term.wait(timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert not term.closed


# --------------------------------------------------------------------------- threads, sockets


def test_close_joins_every_thread(client: Bastion) -> None:
    baseline = threading.active_count()
    terms = [client.terminal.connect("s1", Inbox()) for _ in range(3)]
    assert len(terminal_threads()) == 3
    assert threading.active_count() > baseline
    for term in terms:
        term.close()
        assert not term._reader.is_alive()
        assert term._ws.socket.fileno() == -1  # released, not left to the GC
    assert terminal_threads() == []
    assert settle(baseline) == baseline


def test_server_side_exit_leaves_no_thread(client: Bastion) -> None:
    baseline = threading.active_count()
    term = client.terminal.connect("s1")
    term.exec("exit 0")
    term.wait(5)
    assert terminal_threads() == []
    assert settle(baseline) == baseline


def test_failed_connects_leave_no_thread(client: Bastion, server: FakeTerminalServer) -> None:
    baseline = threading.active_count()
    for sid in ("missing", "stopped", "http404", "garbage"):
        with pytest.raises(TerminalError):
            term = client.terminal.connect(sid)
            term.wait(5)
    assert settle(baseline) == baseline


def test_client_close_closes_its_terminals(server: FakeTerminalServer) -> None:
    baseline = threading.active_count()
    bastion = Bastion(server.url, API_KEY)
    first = bastion.terminal.connect("s1")
    second = bastion.terminal.connect("s1")
    bastion.close()
    assert first.closed and second.closed
    assert terminal_threads() == []
    assert settle(baseline) == baseline


def test_close_from_the_callback(client: Bastion) -> None:
    seen: list[str] = []
    holder: list[Terminal] = []

    def on_message(message: TerminalMessage) -> None:
        seen.append(message["type"])
        if message["type"] == "term_output":
            holder[0].close()  # must not deadlock joining its own thread

    term = client.terminal.connect("s1", on_message)
    holder.append(term)
    term.exec("flood")
    assert term.wait(5)["reason"] == CLIENT_CLOSED
    assert seen == ["init", "term_output"]  # nothing delivered after close()


def test_callback_error_closes_and_is_reraised(client: Bastion) -> None:
    def on_message(message: TerminalMessage) -> None:
        if message["type"] == "term_output":
            raise RuntimeError("callback bug")

    term = client.terminal.connect("s1", on_message)
    term.send_input("x")
    with pytest.raises(RuntimeError, match="callback bug"):
        term.wait(5)
    assert term.closed
    with pytest.raises(TerminalSendError, match="on_message raised"):
        term.send_input("y")


# --------------------------------------------------------------------------- refusals


def test_session_not_found_4004(client: Bastion) -> None:
    with pytest.raises(TerminalSessionNotFoundError) as info:
        client.terminal.connect("missing")
    err = info.value
    assert isinstance(err, TerminalConnectionError)
    assert isinstance(err, SessionNotFoundError)  # also caught as the HTTP API's error
    assert err.close_code == 4004 and err.code == "session_not_found"
    assert "session missing" in str(err) and "cannot open" in str(err)


def test_session_not_running_4009(client: Bastion) -> None:
    with pytest.raises(TerminalSessionStateError) as info:
        client.terminal.connect("stopped")
    assert isinstance(info.value, SessionStateError)
    assert info.value.close_code == 4009 and info.value.code == "session_state"


def test_bad_api_key_4001(server: FakeTerminalServer) -> None:
    with Bastion(server.url, "wrong") as bastion:
        with pytest.raises(TerminalAuthenticationError) as info:
            bastion.terminal.connect("s1")
    assert isinstance(info.value, AuthenticationError)
    assert info.value.close_code == 4001 and info.value.code == "unauthorized"
    assert "invalid API key" in str(info.value)


def test_handshake_refused_with_http_status(client: Bastion) -> None:
    with pytest.raises(TerminalConnectionError) as info:
        client.terminal.connect("http404")
    assert info.value.status_code == 404 and info.value.close_code is None
    assert "no route" in str(info.value) and "offer terminals" in str(info.value)


def test_unreachable_server() -> None:
    with Bastion("http://127.0.0.1:1") as bastion:
        with pytest.raises(TerminalConnectionError, match="cannot reach"):
            bastion.terminal.connect("s1")


def test_no_init_within_open_timeout(client: Bastion) -> None:
    started = time.monotonic()
    with pytest.raises(TerminalConnectionError, match="no init message"):
        client.terminal.connect("silent", open_timeout=0.2)
    assert time.monotonic() - started < 2


def test_session_stopped_while_attached(client: Bastion) -> None:
    term = client.terminal.connect("stop-later")
    term.exec("stop")
    # The exit message came first: it is the outcome, not the 4009 that followed.
    assert term.wait(5) == {"exit_code": None, "reason": "session_stopped"}
    assert term.close_code == 4009


def test_connection_lost_without_exit(client: Bastion) -> None:
    term = client.terminal.connect("vanish")
    term.exec("vanish")
    with pytest.raises(TerminalConnectionError) as info:
        term.wait(5)
    assert info.value.close_code == 1011 and "runtime gone" in str(info.value)
    with pytest.raises(TerminalSendError, match="runtime gone"):
        term.send_input("x")


def test_malformed_server_message(client: Bastion) -> None:
    inbox = Inbox()
    term = client.terminal.connect("garbage", inbox)
    with pytest.raises(TerminalConnectionError, match="not JSON"):
        term.wait(5)
    assert [m["type"] for m in inbox.messages] == ["init"]


# --------------------------------------------------------------------------- no I/O


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://h:8080", "ws://h:8080/v1/sessions/s%2F1/terminal?rows=24&cols=80"),
        ("https://h", "wss://h/v1/sessions/s%2F1/terminal?rows=24&cols=80"),
        ("https://h/prefix/", "wss://h/prefix/v1/sessions/s%2F1/terminal?rows=24&cols=80"),
    ],
)
def test_terminal_url(base_url: str, expected: str) -> None:
    assert terminal_url(base_url, "s/1") == expected


def test_terminal_url_rejects_other_schemes() -> None:
    with pytest.raises(ValueError):
        terminal_url("ftp://h", "s1")
    with pytest.raises(ValueError):
        terminal_url("http://h", "")


def test_parse_message() -> None:
    assert parse_message('{"type": "pong"}') == {"type": "pong", "payload": {}}
    for bad in ("[]", '{"payload": {}}', '{"type": "x", "payload": 1}', "nope"):
        with pytest.raises(ValueError):
            parse_message(bad)


@pytest.mark.parametrize(
    ("close_code", "error_code", "cls"),
    [
        (4001, None, TerminalAuthenticationError),
        (4004, None, TerminalSessionNotFoundError),
        (4009, None, TerminalSessionStateError),
        (4400, None, TerminalConnectionError),
        (1011, None, TerminalConnectionError),
        (None, None, TerminalConnectionError),
        # An unknown close code: the error message's code decides.
        (4999, "session_state", TerminalSessionStateError),
    ],
)
def test_close_code_mapping(close_code: int | None, error_code: str | None, cls: type) -> None:
    error = {"code": error_code, "message": "m"} if error_code else None
    err = close_error(close_code, "", error)  # type: ignore[arg-type]
    assert type(err) is cls
    assert err.close_code == close_code


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (401, b"", TerminalAuthenticationError),
        (403, b"", TerminalAuthenticationError),
        (
            404,
            b'{"error": {"code": "session_not_found", "message": "m"}}',
            TerminalSessionNotFoundError,
        ),
        (409, b'{"error": {"code": "session_state", "message": "m"}}', TerminalSessionStateError),
        (500, b"oops", TerminalConnectionError),
    ],
)
def test_handshake_status_mapping(status: int, body: bytes, cls: type) -> None:
    err = handshake_error(status, body)
    assert type(err) is cls and err.status_code == status
