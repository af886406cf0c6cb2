"""Request-level limits, from the side of a client that has no key or misbehaves.

Against real `bastion serve` processes with short limits set by flags, over raw
sockets where a well-behaved HTTP client would not do what an attacker does: a big
body sent with a wrong key must be refused from the headers alone (the server's memory
does not grow), JSON bodies are bounded in size and depth before they are parsed,
connections that never finish their headers or stall their body are dropped, one key
cannot hold more than its share of concurrent requests, the server as a whole caps its
connections, and a keyless server answers only to loopback ``Host`` names and
``Origin``\\s (DNS rebinding).  No test here needs a sandbox (``--pool-size 0``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.conftest import IMAGES_DIR, ServerProcess
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from websockets.typing import Origin

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.security]

KEY_A = "limits-key-alpha-0123456789"
KEY_B = "limits-key-bravo-9876543210"
MiB = 1024 * 1024

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
PER_KEY = 3
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
MAX_CONNECTIONS = 48

LIMIT_FLAGS: tuple[str, ...] = (
    "--header-timeout", str(HEADER_TIMEOUT),
    "--body-timeout", str(BODY_TIMEOUT),
    "--max-requests-per-key", str(PER_KEY),
    "--max-json-bytes", str(MAX_JSON_BYTES),
    "--max-json-depth", str(MAX_JSON_DEPTH),
    "--max-connections", str(MAX_CONNECTIONS),
)  # fmt: skip


def _server(data_root: Path, keys: tuple[str, ...]) -> Iterator[ServerProcess]:
    if not IMAGES_DIR.is_dir():
        pytest.fail(f"no sandbox image under {IMAGES_DIR}: run `make setup` first")
    parent = Path(tempfile.mkdtemp(dir=data_root))
    parent.chmod(0o711)
    srv = ServerProcess(
        parent / "data", api_keys=keys, extra_args=("--pool-size", "0", *LIMIT_FLAGS)
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def keyed(data_root: Path) -> Iterator[ServerProcess]:
    yield from _server(data_root, (KEY_A, KEY_B))


@pytest.fixture(scope="module")
def keyless(data_root: Path) -> Iterator[ServerProcess]:
    yield from _server(data_root, ())


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str:
        code: str = json.loads(self.body)["error"]["code"]
        return code


def connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def head(method: str, path: str, headers: dict[str, str], host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def read_response(sock: socket.socket, timeout: float) -> Response | None:
    """The next response on ``sock``, or ``None`` if none came within ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    sock.settimeout(max(deadline - time.monotonic(), 0.1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Response(int(status_line.split()[1]), headers, body)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (data before that is read)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def closed_now(sock: socket.socket) -> bool:
    """Whether the server has already answered or closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        sock.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
    return True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def health_ms(srv: ServerProcess) -> float:
    start = time.perf_counter()
    assert httpx.get(srv.url + "/v1/health", timeout=10).status_code == 200
    return (time.perf_counter() - start) * 1000


def assert_error(response: Response | None, status: int, code: str) -> Response:
    assert response is not None, f"no answer: expected {status} {code}"
    assert (response.status, response.error_code()) == (status, code), response
    assert response.headers["content-type"] == "application/json"
    return response


# --------------------------------------------------------------------------- authentication


def test_a_big_body_with_a_wrong_key_is_refused_from_the_headers(keyed: ServerProcess) -> None:
    """100 MiB posted with a wrong key: 401 before the body, and no memory for it."""
    assert keyed.proc is not None
    pid = keyed.proc.pid
    size = 100 * MiB
    baseline = rss_kib(pid)
    peak = baseline
    with connect(keyed) as sock:
        sock.sendall(
            head(
                "POST",
                "/v1/sessions",
                {**auth("not-a-key-0000000000"), "Content-Type": "application/json",
                 "Content-Length": str(size)},
            )
        )  # fmt: skip
        early = read_response(sock, timeout=2)
        # Send the body anyway, as an attacker would, watching the server's memory.
        chunk = b'{"metadata": {"k": "' + b"x" * (MiB - 20)
        sent = 0
        with contextlib.suppress(OSError):
            while sent < size:
                piece = chunk[: min(len(chunk), size - sent)]
                sock.sendall(piece)
                sent += len(piece)
                if sent % (8 * MiB) < len(piece):
                    peak = max(peak, rss_kib(pid))
        for _ in range(10):
            peak = max(peak, rss_kib(pid))
            time.sleep(0.05)
        late = early or read_response(sock, timeout=30)
    assert_error(late, 401, "unauthorized")
    assert early is not None, "the 401 came only after the whole body was read"
    assert early.headers.get("www-authenticate") == "Bearer"
    assert (peak - baseline) < 32 * 1024, f"server RSS grew by {(peak - baseline) // 1024} MiB"


def test_a_body_without_a_key_is_refused_from_the_headers(keyed: ServerProcess) -> None:
    with connect(keyed) as sock:
        sock.sendall(head("POST", "/v1/sessions/ses_x/jobs", {"Content-Length": str(10 * MiB)}))
        assert_error(read_response(sock, timeout=2), 401, "unauthorized")


def test_health_docs_and_openapi_need_no_key(keyed: ServerProcess) -> None:
    for path in ("/v1/health", "/v1/openapi.json", "/v1/docs"):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200, path
    r = httpx.get(keyed.url + "/v1/sessions", timeout=10)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
    r = httpx.get(keyed.url + "/v1/sessions", headers=auth(KEY_A), timeout=10)
    assert r.status_code == 200


def test_terminal_keeps_its_close_code_for_a_wrong_key(keyed: ServerProcess) -> None:
    url = keyed.url.replace("http", "ws") + "/v1/sessions/ses_missing/terminal"
    with ws_connect(url, additional_headers=auth("not-a-key-0000000000")) as ws:
        message = json.loads(ws.recv(timeout=10))
        assert message["payload"]["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4001


# --------------------------------------------------------------------------- JSON bodies


def test_a_declared_oversized_json_body_is_413_before_it_is_sent(keyed: ServerProcess) -> None:
    with connect(keyed) as sock:
        sock.sendall(
            head(
                "POST",
                "/v1/sessions",
                {**auth(KEY_A), "Content-Type": "application/json",
                 "Content-Length": str(100 * MiB)},
            )
        )  # fmt: skip
        response = assert_error(read_response(sock, timeout=2), 413, "request_too_large")
    assert str(MAX_JSON_BYTES) in json.loads(response.body)["error"]["message"]
    assert health_ms(keyed) < 500


def test_a_chunked_json_body_is_cut_off_at_the_limit(keyed: ServerProcess) -> None:
    """No Content-Length: the count is kept while the body streams in."""
    with connect(keyed) as sock:
        sock.sendall(
            head(
                "POST",
                "/v1/sessions",
                {**auth(KEY_A), "Content-Type": "application/json",
                 "Transfer-Encoding": "chunked"},
            )
        )  # fmt: skip
        piece = b'"' + b"y" * 16382 + b'",'
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        with contextlib.suppress(OSError):
            sock.sendall(b"1\r\n[\r\n")
            for _ in range(64):  # 1 MiB in all, 16 times the limit
                sock.sendall(chunk)
            sock.sendall(b"1\r\n0\r\n1\r\n]\r\n0\r\n\r\n")
        assert_error(read_response(sock, timeout=5), 413, "request_too_large")
    assert health_ms(keyed) < 500


@pytest.mark.parametrize(
    "body",
    [
        "[" * 20_000 + "]" * 20_000,  # past the interpreter's recursion limit
        '{"metadata": {"k": ' + "[" * 500 + "]" * 500 + "}}",  # parsable, still too deep
        '{"command": ["sh"], "env": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}",
    ],
    ids=["arrays-20000", "metadata-500", "env-objects-100"],
)
def test_a_deeply_nested_json_body_is_refused_before_parsing(
    keyed: ServerProcess, body: str
) -> None:
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            latencies.append(health_ms(keyed))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for path in ("/v1/sessions", "/v1/sessions/ses_missing/jobs"):
            r = httpx.post(
                keyed.url + path,
                content=body,
                headers={**auth(KEY_A), "Content-Type": "application/json"},
                timeout=10,
            )
            assert r.status_code in (400, 422), r.text
            error = r.json()["error"]
            assert error["code"] in ("invalid_request", "malformed_json")
            assert f"deeper than {MAX_JSON_DEPTH}" in error["message"]
    finally:
        stop.set()
        poller.join()
    assert max(latencies, default=0) < 500


def test_a_string_full_of_brackets_is_not_too_deep(keyed: ServerProcess) -> None:
    body = {"command": ["echo", "[" * 1000 + '\\"{' * 100], "env": {"X": "{" * 500}}
    r = httpx.post(
        keyed.url + "/v1/sessions/ses_missing/jobs", json=body, headers=auth(KEY_A), timeout=10
    )
    assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")


# --------------------------------------------------------------------------- timeouts


def test_connections_that_never_finish_their_headers_are_dropped(keyed: ServerProcess) -> None:
    socks = [connect(keyed) for _ in range(30)]
    try:
        for i, sock in enumerate(socks):
            if i % 3 == 0:
                continue  # says nothing at all
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            if i % 3 == 2:
                sock.sendall(b"X-Slow: ")  # in the middle of a header
        start = time.monotonic()
        assert all(closed_within(sock, HEADER_TIMEOUT + 2 - (time.monotonic() - start))
                   for sock in socks)  # fmt: skip
        assert time.monotonic() - start < HEADER_TIMEOUT + 2
    finally:
        for sock in socks:
            sock.close()
    assert health_ms(keyed) < 500


def test_a_slowloris_trickling_its_headers_is_dropped(keyed: ServerProcess) -> None:
    """Bytes that keep coming do not extend the deadline: the whole head must arrive."""
    with connect(keyed) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        closed = False
        with contextlib.suppress(OSError):
            while time.monotonic() - start < HEADER_TIMEOUT + 3:
                sock.sendall(b"X-A: b\r\n")
                if closed_within(sock, 0.2):
                    closed = True
                    break
        assert closed, "still open after trickling headers for longer than the timeout"


def test_the_header_deadline_starts_again_after_each_response(keyed: ServerProcess) -> None:
    """A kept-alive connection gets a fresh deadline for its next request, not the first one's."""
    with connect(keyed) as sock:
        for _ in range(3):  # over the first request's deadline in all
            time.sleep(HEADER_TIMEOUT * 0.6)
            sock.sendall(head("GET", "/v1/health", {}))
            response = read_response(sock, timeout=5)
            assert response is not None and response.status == 200
        answered = time.monotonic()
        time.sleep(HEADER_TIMEOUT * 0.3)
        sock.sendall(b"GET /v1/health HTTP/1.1\r\n")  # then never finish this one
        assert closed_within(sock, HEADER_TIMEOUT + 2)
        assert time.monotonic() - answered > HEADER_TIMEOUT * 0.8


def test_a_stalled_body_is_aborted(keyed: ServerProcess) -> None:
    with connect(keyed) as sock:
        sock.sendall(
            head("POST", "/v1/sessions", {**auth(KEY_A), "Content-Type": "application/json",
                                          "Content-Length": "100"})
        )  # fmt: skip
        sock.sendall(b'{"metadata": ')
        start = time.monotonic()
        response = read_response(sock, timeout=BODY_TIMEOUT + 3)
        assert_error(response, 408, "request_timeout")
        assert time.monotonic() - start >= BODY_TIMEOUT * 0.8
        assert closed_within(sock, 2)


def test_a_slow_body_that_keeps_coming_is_not_aborted(keyed: ServerProcess) -> None:
    body = b'{"command": ["true"]}'
    with connect(keyed) as sock:
        sock.sendall(
            head("POST", "/v1/sessions/ses_missing/jobs",
                 {**auth(KEY_A), "Content-Type": "application/json",
                  "Content-Length": str(len(body))})
        )  # fmt: skip
        for i in range(0, len(body), 4):  # about 3 s in all, twice the body timeout
            sock.sendall(body[i : i + 4])
            time.sleep(BODY_TIMEOUT / 2.5)
        assert_error(read_response(sock, timeout=5), 404, "session_not_found")


# --------------------------------------------------------------------------- concurrency


def _hold_requests(srv: ServerProcess, key: str, n: int) -> list[socket.socket]:
    """``n`` requests of ``key`` in flight: bodies that are slow to arrive."""
    socks = []
    for _ in range(n):
        sock = connect(srv)
        sock.sendall(
            head("POST", "/v1/sessions", {**auth(key), "Content-Type": "application/json",
                                          "Content-Length": "100"})
        )  # fmt: skip
        sock.sendall(b"{")
        socks.append(sock)
    time.sleep(0.2)
    return socks


def test_one_key_cannot_hold_more_than_its_share(keyed: ServerProcess) -> None:
    held = _hold_requests(keyed, KEY_A, PER_KEY)
    try:
        r = httpx.get(keyed.url + "/v1/sessions", headers=auth(KEY_A), timeout=10)
        assert (r.status_code, r.json()["error"]["code"]) == (429, "too_many_requests")
        r = httpx.get(keyed.url + "/v1/sessions", headers=auth(KEY_B), timeout=10)
        assert r.status_code == 200, "another key must not be starved"
        assert health_ms(keyed) < 500
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = httpx.get(keyed.url + "/v1/sessions", headers=auth(KEY_A), timeout=10)
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200, "the key's share comes back when its requests end"


def test_terminals_count_against_the_share_too(keyed: ServerProcess) -> None:
    held = _hold_requests(keyed, KEY_A, PER_KEY)
    url = keyed.url.replace("http", "ws") + "/v1/sessions/ses_missing/terminal"
    try:
        with ws_connect(url, additional_headers=auth(KEY_A)) as ws:
            message = json.loads(ws.recv(timeout=10))
            assert message["payload"]["code"] == "too_many_requests"
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1013
    finally:
        for sock in held:
            sock.close()


def test_the_server_caps_its_connections(keyed: ServerProcess) -> None:
    socks = [connect(keyed) for _ in range(MAX_CONNECTIONS + 10)]
    try:
        time.sleep(0.3)
        refused = [s for s in socks if closed_now(s)]
        assert 10 <= len(refused) <= 12, f"{len(refused)} of {len(socks)} refused"
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    assert health_ms(keyed) < 500


def test_a_refused_connection_is_told_why(keyed: ServerProcess) -> None:
    socks = [connect(keyed) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        with connect(keyed) as extra:
            extra.sendall(head("GET", "/v1/health", {}))
            assert_error(read_response(extra, timeout=2), 429, "too_many_requests")
    finally:
        for sock in socks:
            sock.close()


# --------------------------------------------------------------------------- Host / Origin


def test_a_keyless_server_refuses_a_foreign_host(keyless: ServerProcess) -> None:
    for host in (
        "evil.example",
        f"evil.example:{keyless.port}",
        "10.0.0.1",
        "127.0.0.1.evil.example",
    ):
        with connect(keyless) as sock:
            sock.sendall(head("GET", "/v1/sessions", {}, host=host))
            assert_error(read_response(sock, timeout=5), 403, "forbidden_host")


def test_a_keyless_server_answers_loopback_hosts(keyless: ServerProcess) -> None:
    port = keyless.port
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}"):
        with connect(keyless) as sock:
            sock.sendall(head("GET", "/v1/sessions", {}, host=host))
            response = read_response(sock, timeout=5)
            assert response is not None and response.status == 200, (host, response)


def test_a_server_with_keys_answers_any_host(keyed: ServerProcess) -> None:
    with connect(keyed) as sock:
        sock.sendall(head("GET", "/v1/sessions", auth(KEY_A), host="bastion.internal:443"))
        response = read_response(sock, timeout=5)
        assert response is not None and response.status == 200


def test_a_keyless_server_refuses_a_foreign_origin_on_the_terminal(keyless: ServerProcess) -> None:
    url = keyless.url.replace("http", "ws") + "/v1/sessions/ses_missing/terminal"
    with ws_connect(url, origin=Origin("http://evil.example")) as ws:
        message = json.loads(ws.recv(timeout=10))
        assert message["payload"]["code"] == "forbidden_host"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008


def test_a_keyless_server_lets_a_loopback_origin_reach_the_terminal(
    keyless: ServerProcess,
) -> None:
    url = keyless.url.replace("http", "ws") + "/v1/sessions/ses_missing/terminal"
    origin = f"http://localhost:{keyless.port}"
    with ws_connect(url, origin=Origin(origin)) as ws:
        message = json.loads(ws.recv(timeout=10))
        assert message["payload"]["code"] == "session_not_found"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4004


# --------------------------------------------------------------------------- the pure parts


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"", 0),
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[{{{{"}', 1),
        (b'{"a": "\\"[[[["}', 1),
        (b'["\\\\", [[]]]', 3),
        (b'"unterminated [[[[', 0),
    ],
)
def test_json_depth(body: bytes, depth: int) -> None:
    from bastion_server.api.bodies import json_depth

    assert json_depth(body) == depth


@pytest.mark.parametrize(
    "body",
    [b'"\\"' * 350_000, b'"' + b"\\" * MiB, b"[" * MiB, b'"a' * 500_000, b'["\\' * 300_000],
    ids=["escaped-quotes", "backslashes", "brackets", "quotes", "mixed"],
)
def test_json_depth_is_linear_on_hostile_input(body: bytes) -> None:
    from bastion_server.api.bodies import json_depth

    start = time.perf_counter()
    json_depth(body)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (None, True),
        ("localhost", True),
        ("LOCALHOST:8080", True),
        ("127.0.0.1:8080", True),
        ("127.9.9.9", True),
        ("[::1]:8080", True),
        ("[::1]", True),
        ("bastion.lan", True),  # the configured --host
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("[::1]evil", False),
        ("[::2]:80", False),
        ("0.0.0.0", False),
        ("", False),
    ],
)
def test_host_allowed(host: str | None, allowed: bool) -> None:
    from bastion_server.api.guard import host_allowed

    assert host_allowed(host, "bastion.lan") is allowed


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("http://localhost:3000", True),
        ("http://127.0.0.1", True),
        ("http://[::1]:8080", True),
        ("null", False),
        ("http://evil.example", False),
        ("http://127.0.0.1.evil.example", False),
    ],
)
def test_origin_allowed(origin: str | None, allowed: bool) -> None:
    from bastion_server.api.guard import origin_allowed

    assert origin_allowed(origin, "127.0.0.1") is allowed


@pytest.mark.slow
def test_a_stalled_upload_is_aborted(keyed: ServerProcess) -> None:
    """The 7000 trickling uploads: an upload that stops sending ends, its file discarded."""
    with Bastion(base_url=keyed.url, api_key=KEY_A) as client:
        sid = client.sessions.create()["session_id"]
        try:
            client.sessions.start(sid)
            with connect(keyed) as sock:
                sock.sendall(
                    head("PUT", f"/v1/sessions/{sid}/files?path=/home/user/slow.bin",
                         {**auth(KEY_A), "Content-Type": "application/octet-stream",
                          "Content-Length": "1000"})
                )  # fmt: skip
                sock.sendall(b"x" * 10)
                start = time.monotonic()
                assert_error(read_response(sock, timeout=BODY_TIMEOUT + 5), 408, "request_timeout")
                assert time.monotonic() - start >= BODY_TIMEOUT * 0.8
                assert closed_within(sock, 2)
            names = [f["name"] for f in client.files.list(sid, "/home/user")["files"]]
            assert "slow.bin" not in names
        finally:
            client.sessions.delete(sid)


@pytest.mark.slow
def test_one_keys_slow_uploads_do_not_starve_another_tenant(data_root: Path) -> None:
    """The 7000 trickling uploads, scaled down: one key opens more slow uploads than the
    server keeps connections; the server holds only that key's share of them (the rest
    are refused and closed at once), and another tenant's job still runs."""
    per_key, max_connections, uploads = 6, 32, 60
    parent = Path(tempfile.mkdtemp(dir=data_root))
    parent.chmod(0o711)
    srv = ServerProcess(
        parent / "data",
        api_keys=(KEY_A, KEY_B),
        extra_args=("--pool-size", "0", "--max-requests-per-key", str(per_key),
                    "--max-connections", str(max_connections)),
    )  # fmt: skip
    srv.start()
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        with Bastion(base_url=srv.url, api_key=KEY_A) as tenant_a:
            sid_a = tenant_a.sessions.create()["session_id"]
            tenant_a.sessions.start(sid_a)
        for i in range(uploads):
            sock = connect(srv)
            with contextlib.suppress(OSError):
                sock.sendall(
                    head("PUT", f"/v1/sessions/{sid_a}/files?path=/home/user/slow{i}",
                         {**auth(KEY_A), "Content-Type": "application/octet-stream",
                          "Content-Length": str(MiB)})
                )  # fmt: skip
                sock.sendall(b"x")
            socks.append(sock)

        def trickle() -> None:  # a byte every half second: never stalled for the server
            while not stop.wait(0.5):
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"x")

        trickler = threading.Thread(target=trickle)
        trickler.start()
        time.sleep(1.0)
        assert srv.proc is not None
        held = len(list(Path(f"/proc/{srv.proc.pid}/fd").iterdir()))
        start = time.monotonic()
        with Bastion(base_url=srv.url, api_key=KEY_B, max_retries=0) as tenant_b:
            sid_b = tenant_b.sessions.create()["session_id"]
            tenant_b.sessions.start(sid_b)
            job = tenant_b.jobs.run_and_wait(sid_b, ["echo", "still served"])
            tenant_b.sessions.delete(sid_b)
        assert job["output"]["console_output"] == "still served\n"
        assert time.monotonic() - start < 20
        open_uploads = sum(not closed_now(s) for s in socks)
        assert open_uploads <= per_key + 2, f"{open_uploads} of {uploads} uploads held open"
        assert held < 120, f"the server held {held} descriptors"
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        srv.delete_all_sessions()
        srv.stop()


@pytest.mark.slow
def test_a_terminal_message_is_bounded_like_a_json_body(keyed: ServerProcess) -> None:
    with Bastion(base_url=keyed.url, api_key=KEY_A) as client:
        sid = client.sessions.create()["session_id"]
        try:
            client.sessions.start(sid)
            url = keyed.url.replace("http", "ws") + f"/v1/sessions/{sid}/terminal"
            with ws_connect(url, additional_headers=auth(KEY_A), max_size=None) as ws:
                assert json.loads(ws.recv(timeout=10))["type"] == "init"
                data = "x" * (MAX_JSON_BYTES + 1)
                with pytest.raises(ConnectionClosed) as info:
                    ws.send(json.dumps({"type": "input", "payload": {"data": data}}))
                    while True:
                        ws.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        finally:
            client.sessions.delete(sid)
