"""The product-page flow with AsyncBastion against a real `bastion serve`, real sandboxes.

Each test is a sync function that runs its own event loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.conftest import ServerProcess

from bastion import (
    APIConnectionError,
    AsyncBastion,
    AsyncTerminal,
    JobEvent,
    JobFailedError,
    JobInfo,
    SessionStateError,
    TerminalMessage,
    TerminalSendError,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Screen:
    """Terminal output collected by an ``async def`` on_message callback."""

    def __init__(self) -> None:
        self.messages: list[TerminalMessage] = []
        self.text = ""
        self._changed = asyncio.Event()

    async def __call__(self, message: TerminalMessage) -> None:
        self.messages.append(message)
        if message["type"] == "term_output":
            self.text += str(message["payload"]["data"])
        self._changed.set()

    async def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        async with asyncio.timeout(timeout):
            while (match := re.search(pattern, self.text)) is None:
                self._changed.clear()
                await self._changed.wait()
        return match


def test_product_page_flow(server: ServerProcess, tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncBastion(base_url=server.url) as bastion:
            assert (await bastion.health())["status"] == "ok"
            sid = (await bastion.sessions.create(metadata={"test": "async"}))["session_id"]
            assert (await bastion.sessions.status(sid))["status"] == "created"
            assert (await bastion.sessions.start(sid))["status"] == "running"
            try:
                await flow(bastion, sid, tmp_path)
            finally:
                if (await bastion.sessions.get(sid))["status"] != "deleted":
                    await bastion.sessions.delete(sid)
            assert (await bastion.sessions.get(sid))["status"] == "deleted"
            assert sid not in {s["session_id"] for s in (await bastion.sessions.list())["sessions"]}

    run(main())


async def flow(bastion: AsyncBastion, sid: str, tmp_path: Path) -> None:
    # Files in: bytes, a sync file object, an async iterable.
    assert (await bastion.files.upload(sid, b'print("hi")', "/main.py"))["size"] == 11
    await bastion.files.upload(sid, io.BytesIO(b"a,b\n1,2\n"), "/home/user/data/in.csv")

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(4):
            await asyncio.sleep(0)
            yield f"line {i}\n".encode()

    await bastion.files.upload(sid, pieces(), "/home/user/lines.txt")

    # Jobs: run_and_wait, run + wait, watch, failure as the result, live output.
    result = await bastion.jobs.run_and_wait(sid, ["python3", "/main.py"])
    assert result["output"] is not None and result["output"]["console_output"] == "hi\n"
    job = await bastion.jobs.run(sid, ["sleep", "0.5"])
    assert (await bastion.jobs.get(sid, job["job_id"]))["status"] in ("queued", "running")
    assert (await bastion.jobs.wait(sid, job["job_id"], timeout=30))["status"] == "completed"
    statuses: list[str] = []

    async def on_update(info: JobInfo) -> None:
        statuses.append(info["status"])

    watched = await bastion.jobs.run(sid, ["sh", "-c", "sleep 0.3; true"])
    final = await bastion.jobs.watch(sid, watched["job_id"], on_update, timeout=30)
    assert final["status"] == "completed" and statuses[-1] == "completed"
    assert statuses == sorted(statuses, key=["queued", "running", "completed"].index)
    with pytest.raises(JobFailedError) as failed:
        await bastion.jobs.run_and_wait(sid, ["python3", "-c", "import sys; sys.exit(3)"])
    assert failed.value.status_code == 3
    live: list[str] = []
    await bastion.jobs.run_and_wait(
        sid,
        ["sh", "-c", 'wc -l < in.csv; echo "$MODE" >&2'],
        cwd="/home/user/data",
        env={"MODE": "fast"},
        on_stdout=live.append,
        on_stderr=live.append,
    )
    assert sorted("".join(live).split()) == ["2", "fast"]
    jobs = (await bastion.jobs.list(sid))["jobs"]
    assert len(jobs) >= 5

    # Files out: list, download, iter_download, download_to a path and an object.
    names = {f["name"] for f in (await bastion.files.list(sid, "/"))["files"]}
    assert "main.py" in names
    assert await bastion.files.download(sid, "/main.py") == b'print("hi")'
    chunks = [c async for c in bastion.files.iter_download(sid, "/home/user/lines.txt", 4)]
    assert b"".join(chunks) == b"line 0\nline 1\nline 2\nline 3\n"
    dest = tmp_path / "copy.csv"
    assert await bastion.files.download_to(sid, "/home/user/data/in.csv", dest) == 8
    assert dest.read_bytes() == b"a,b\n1,2\n"
    out = io.BytesIO()
    await bastion.files.download_to(sid, "/main.py", out)
    assert out.getvalue() == b'print("hi")'
    assert (await bastion.files.delete(sid, "/main.py"))["deleted"] is True
    await bastion.files.delete(sid, "/home/user/data", recursive=True)

    # A live terminal: connect, exec, resize, iterate, close.
    screen = Screen()
    term = await bastion.terminal.connect(session_id=sid, on_message=screen)
    assert isinstance(term, AsyncTerminal) and term.info["session_id"] == sid
    await bastion.terminal.send_input("ls -la /home/user\n")
    await bastion.terminal.exec("echo hello-$((6*7))")
    await screen.wait_for(r"hello-42")
    await bastion.terminal.resize(40, 120)
    await bastion.terminal.exec("stty size")
    await screen.wait_for(r"40 120")
    await bastion.terminal.close()
    assert term.closed and screen.messages[0]["type"] == "init"
    with pytest.raises(TerminalSendError):
        await term.send_input("x")
    async with bastion.terminal.connect(session_id=sid) as term:
        await term.exec("echo iterated; exit 3")
        text = "".join(
            [str(m["payload"]["data"]) async for m in term if m["type"] == "term_output"]
        )
        assert "iterated" in text
        assert await term.wait(timeout=10) == {"exit_code": 3, "reason": "exited"}

    # A job's events as an async stream.
    job = await bastion.jobs.run(sid, ["sh", "-c", "echo one; sleep 0.5; echo two >&2"])
    events: list[JobEvent] = []
    async with bastion.jobs.stream(sid, job["job_id"]) as stream:
        async for event in stream:
            events.append(event)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "end" and "stdout" in kinds and "stderr" in kinds
    assert "".join(e.get("data", "") for e in events if e["type"] == "stdout") == "one\n"

    # Stop keeps the files; a stopped session refuses jobs; delete ends it.
    assert (await bastion.sessions.stop(sid))["status"] == "stopped"
    with pytest.raises(SessionStateError):
        await bastion.jobs.run(sid, ["true"])
    assert (await bastion.sessions.start(sid))["status"] == "running"
    listed = await bastion.files.list(sid, "/home/user")
    assert "lines.txt" in {f["name"] for f in listed["files"]}
    assert (await bastion.sessions.delete(sid))["status"] == "deleted"


def test_concurrent_sessions_and_jobs(server: ServerProcess) -> None:
    """One client, many coroutines: jobs in several sessions at once."""

    async def one(bastion: AsyncBastion, n: int) -> str:
        sid = (await bastion.sessions.create())["session_id"]
        try:
            await bastion.sessions.start(sid)
            result = await bastion.jobs.run_and_wait(sid, ["sh", "-c", f"sleep 0.5; echo {n}"])
            assert result["output"] is not None
            return result["output"]["console_output"].strip()
        finally:
            await bastion.sessions.delete(sid)

    async def main() -> list[str]:
        async with AsyncBastion(base_url=server.url) as bastion:
            return await asyncio.gather(*(one(bastion, n) for n in range(4)))

    assert run(main()) == ["0", "1", "2", "3"]


# --------------------------------------------------------------------------- lost answers


class AnswerDroppingProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy that forwards each request, and for the first request of each
    listed kind lets the server do the work but drops its answer (closes the client's
    connection instead): the lost answer a retry has to cope with.

    One request per connection (``Connection: close`` both ways) keeps it simple.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, drop: list[str]) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.drop = list(drop)  # regexes of "METHOD /path" lines, each dropped once
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


class _ProxyHandler(socketserver.StreamRequestHandler):
    server: AnswerDroppingProxy

    def handle(self) -> None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                return
            head += line
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        kept = []
        for header in lines[1:]:
            name = header.split(":", 1)[0].lower()
            if name == "content-length":
                length = int(header.split(":", 1)[1])
            if header and name not in ("connection", "transfer-encoding"):
                kept.append(header)
        body = self.rfile.read(length) if length else b""
        if "chunked" in head.decode("latin-1").lower():
            body = _read_chunked(self.rfile)
            kept.append(f"Content-Length: {len(body)}")
        request_line = lines[0]
        with socket.create_connection(self.server.upstream) as upstream:
            upstream.sendall(
                "\r\n".join([request_line, *kept, "Connection: close", "", ""]).encode("latin-1")
                + body
            )
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
        what = " ".join(request_line.split()[:2]).split("?")[0]
        self.server.seen.append(what)
        for pattern in self.server.drop:
            if re.fullmatch(pattern, what):
                self.server.drop.remove(pattern)
                return  # the work is done; the answer is lost
        self.wfile.write(answer)


def _read_chunked(rfile: Any) -> bytes:
    body = b""
    while True:
        size = int(rfile.readline().strip(), 16)
        if size == 0:
            rfile.readline()
            return body
        body += rfile.read(size)
        rfile.readline()


def test_lost_answers_are_retried_safely(server: ServerProcess) -> None:
    sessions = r"POST /v1/sessions"
    one = r"/v1/sessions/[^/]+"
    proxy = AnswerDroppingProxy(
        server.url,
        drop=[
            sessions,
            f"POST {one}/start",
            f"PUT {one}/files",
            f"DELETE {one}/files",
            f"POST {one}/stop",
            f"POST {one}/jobs",
            f"DELETE {one}",
        ],
    )

    async def main() -> None:
        async with (
            AsyncBastion(base_url=server.url) as direct,
            AsyncBastion(base_url=proxy.url) as bastion,
        ):
            before = {s["session_id"] for s in (await direct.sessions.list())["sessions"]}
            info = await bastion.sessions.create(metadata={"test": "lost-answers"})
            sid = info["session_id"]
            after = {s["session_id"] for s in (await direct.sessions.list())["sessions"]}
            assert after - before == {sid}  # one session, though created "twice"
            assert (await bastion.sessions.start(sid))["status"] == "running"
            assert (await bastion.files.upload(sid, b"data", "/tmp/f"))["size"] == 4
            assert await direct.files.download(sid, "/tmp/f") == b"data"
            assert await bastion.files.delete(sid, "/tmp/f") == {"path": "/tmp/f", "deleted": True}
            with pytest.raises(APIConnectionError):
                await bastion.jobs.run(sid, ["true"])  # never repeated
            assert len((await direct.jobs.list(sid))["jobs"]) == 1
            assert (await bastion.sessions.stop(sid))["status"] == "stopped"
            assert (await bastion.sessions.delete(sid))["status"] == "deleted"
        assert proxy.drop == []  # every kind of request did lose an answer
        assert proxy.seen.count(f"POST /v1/sessions/{sid}/jobs") == 1
        assert proxy.seen.count(f"POST /v1/sessions/{sid}/start") == 2

    try:
        run(main())
    finally:
        proxy.stop()
