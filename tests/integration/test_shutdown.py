"""SIGTERM with requests in flight: every client gets a clean, documented ending.

A held ``wait`` gets the ``server_shutdown`` error (503, the usual JSON body), an event
stream its ``end`` event saying so, a terminal its ``exit`` message and a close, and the
SDK raises :class:`ServerShutdownError` - all at once, not after uvicorn's grace period.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tests.conftest import ServerProcess
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bastion import APIConnectionError, Bastion, ServerShutdownError
from bastion.wire import TerminalCloseCode

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class InFlight(threading.Thread):
    """Runs one client call in a thread; ``outcome`` is what it returned or raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.outcome: Any = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.outcome = self.call()
        except Exception as exc:
            self.outcome = exc
        self.ended_at = time.monotonic()


def _events(url: str) -> list[dict[str, Any]]:
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def _terminal(url: str, opened: threading.Event) -> tuple[list[dict[str, Any]], int | None]:
    messages: list[dict[str, Any]] = []
    with connect(url, open_timeout=30) as ws:
        try:
            while True:
                messages.append(json.loads(ws.recv(timeout=60)))
                if messages[-1]["type"] == "init":
                    opened.set()
        except ConnectionClosed:
            pass
        return messages, ws.close_code


def test_sigterm_ends_every_held_request_with_its_documented_ending(
    private_server: ServerProcess,
) -> None:
    srv = private_server
    srv.start()
    assert srv.proc is not None
    with Bastion(base_url=srv.url) as c:  # its default retries
        sid = c.sessions.create()["session_id"]
        c.sessions.start(sid)
        job = c.jobs.run(sid, ["sh", "-c", "echo started; sleep 120"])
        jid = job["job_id"]
        base = f"{srv.url}/v1/sessions/{sid}/jobs/{jid}"
        opened = threading.Event()
        clients = {
            "wait": InFlight(lambda: httpx.get(f"{base}/wait", params={"timeout": 60}, timeout=60)),
            "run_wait": InFlight(
                lambda: httpx.post(
                    f"{srv.url}/v1/sessions/{sid}/jobs",
                    params={"wait": 60},
                    json={"command": ["sleep", "120"]},
                    timeout=60,
                )
            ),
            "events": InFlight(lambda: _events(f"{base}/events")),
            "sdk_wait": InFlight(lambda: c.jobs.wait(sid, jid, timeout=60)),
            "sdk_stream": InFlight(lambda: list(c.jobs.stream(sid, jid))),
            "terminal": InFlight(
                lambda: _terminal(
                    srv.url.replace("http", "ws", 1) + f"/v1/sessions/{sid}/terminal", opened
                )
            ),
        }
        for client in clients.values():
            client.start()
        assert opened.wait(30), "the terminal did not open"
        time.sleep(1.0)  # every request is now held by the server
        assert all(client.is_alive() for client in clients.values())

        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for client in clients.values():
            client.join(30)
        assert srv.proc.wait(30) == 0

    # All at once, not after uvicorn's 10 s grace period.
    for name, client in clients.items():
        assert client.ended_at is not None, f"{name} is still held"
        assert client.ended_at - signalled < 5, f"{name} took {client.ended_at - signalled:.1f} s"

    wait = clients["wait"].outcome
    assert isinstance(wait, httpx.Response), wait
    assert wait.status_code == 503
    assert wait.headers["content-type"] == "application/json"
    assert wait.json()["error"]["code"] == "server_shutdown"

    # A job run with ?wait= was made: its answer carries its id, as a wait that ran out.
    run_wait = clients["run_wait"].outcome
    assert isinstance(run_wait, httpx.Response), run_wait
    assert run_wait.status_code == 202
    assert run_wait.json()["status"] == "running"
    second = run_wait.json()["job_id"]

    events = clients["events"].outcome
    assert isinstance(events, list), events
    assert {"type": "stdout", "data": "started\n"} in events
    assert events[-1]["type"] == "end"
    assert events[-1]["reason"] == "server_shutdown"
    assert events[-1]["job"]["job_id"] == jid
    assert events[-1]["job"]["status"] == "running"

    for name in ("sdk_wait", "sdk_stream"):
        error = clients[name].outcome
        assert isinstance(error, ServerShutdownError), (name, error)
        assert isinstance(error, APIConnectionError)  # what a cut stream raised before
        assert error.code == "server_shutdown"

    outcome = clients["terminal"].outcome
    assert isinstance(outcome, tuple), outcome
    messages, close_code = outcome
    assert messages[-1] == {
        "type": "exit",
        "payload": {"exit_code": messages[-1]["payload"]["exit_code"], "reason": "server_shutdown"},
    }
    assert close_code == TerminalCloseCode.GOING_AWAY

    log = srv.log_tail(200_000)
    assert "Cancel" not in log  # uvicorn never had to cut anything off
    assert "Task exception was never retrieved" not in log

    # After the restart the jobs run on, taken up again (tests/integration/test_job_restart.py).
    srv.start()
    with Bastion(base_url=srv.url) as c:
        for job_id in (jid, second):
            again = c.jobs.get(sid, job_id)
            assert again["status"] == "running", again
