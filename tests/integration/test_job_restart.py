"""Jobs outlive a restart of the server: the agent in the sandbox runs them on and keeps
their output, and the next server takes them up again, on real sandboxes.

A job prints, then waits for a gate file the test makes from the host (in the
sandbox's root filesystem), then prints again: so it is known to be mid-run when the
server dies, and to end exactly when the test says (while the server is down, or
after it is back).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServerProcess

from bastion import Bastion
from bastion_server.runtime import agent_protocol as protocol
from bastion_server.runtime.oci import OciRuntime

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GATE = "/tmp/bastion-test-gate"
SCRIPT = (
    "echo before; echo early >&2; "
    f"while [ ! -e {GATE} ]; do sleep 0.05; done; "
    "echo after; echo late >&2"
)
FULL = {"console_output": "before\nafter\n", "errout": "early\nlate\n", "status_code": 0}


def open_gate(srv: ServerProcess, sid: str) -> None:
    """Make the gate file in the sandbox's root filesystem, from the host."""
    (srv.data_dir / "sessions" / sid / "rootfs" / GATE.lstrip("/")).write_bytes(b"")


def job_then_server_down(srv: ServerProcess, how: int) -> tuple[str, str]:
    """Start the server and the job; once the job has printed, stop the server ``how``."""
    srv.start()
    with Bastion(base_url=srv.url) as c:
        sid, jid = start_job(c)
    srv.stop(how)
    return sid, jid


def start_job(c: Bastion) -> tuple[str, str]:
    sid = c.sessions.create()["session_id"]
    c.sessions.start(sid)
    jid = c.jobs.run(sid, ["sh", "-c", SCRIPT])["job_id"]
    with c.jobs.stream(sid, jid) as events:  # until its first words are recorded
        seen = ""
        for event in events:
            seen += event.get("data", "") if event["type"] == "stdout" else ""
            if "before" in seen:
                break
    return sid, jid


def follow(c: Bastion, sid: str, jid: str, into: list[dict[str, Any]]) -> threading.Thread:
    def read() -> None:
        with c.jobs.stream(sid, jid) as events:
            into.extend(events)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def ask_agent(srv: ServerProcess, sid: str, request: dict[str, Any]) -> dict[str, Any]:
    """The first event the sandbox's agent answers ``request`` with (from the host)."""
    path = srv.data_dir / "sessions" / sid / "run" / protocol.SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(protocol.encode_json(request))
        reader = protocol.FrameReader()
        while True:
            data = sock.recv(65536)
            assert data, "the agent closed the connection without an answer"
            for kind, payload in reader.feed(data):
                if kind == protocol.FRAME_JSON:
                    return dict(json.loads(payload))


def agent_processes(c: Bastion, sid: str) -> str:
    ps = c.jobs.run_and_wait(sid, ["ps", "-eo", "args"])
    return str(ps["output"]["console_output"] if ps["output"] else "")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_job_runs_through_a_restart_and_its_stream_resumes(
    private_server: ServerProcess, how: signal.Signals
) -> None:
    srv = private_server
    sid, jid = job_then_server_down(srv, how)
    time.sleep(0.5)  # it runs on with nobody listening
    srv.start()
    with Bastion(base_url=srv.url) as c:
        assert c.jobs.get(sid, jid)["status"] == "running", srv.log_tail()
        events: list[dict[str, Any]] = []
        reader = follow(c, sid, jid, events)
        time.sleep(0.5)
        assert reader.is_alive()  # live: the job has not ended
        open_gate(srv, sid)
        done = c.jobs.wait(sid, jid, timeout=30)
        reader.join(30)
    assert done["status"] == "completed", done
    assert done["output"] == FULL  # all of it, nothing twice
    assert "".join(e["data"] for e in events if e["type"] == "stdout") == "before\nafter\n"
    assert "".join(e["data"] for e in events if e["type"] == "stderr") == "early\nlate\n"
    assert events[-1]["type"] == "end" and events[-1]["job"]["output"] == FULL


def test_a_job_that_ends_while_the_server_is_down_keeps_its_result(
    private_server: ServerProcess,
) -> None:
    srv = private_server
    sid, jid = job_then_server_down(srv, signal.SIGKILL)
    open_gate(srv, sid)
    time.sleep(1.0)  # it has ended, and nobody recorded it
    srv.start()
    with Bastion(base_url=srv.url) as c:
        done = c.jobs.wait(sid, jid, timeout=30)
        assert done["status"] == "completed", done
        assert done["output"] == FULL
        assert "sh -c echo before" not in agent_processes(c, sid)
    # Recorded, so the agent was told to forget it: it keeps nothing of it.
    assert ask_agent(srv, sid, {"op": "attach", "job_id": jid})["error"] == "unknown_job"


def test_a_job_whose_sandbox_died_while_the_server_was_down_is_sandbox_lost(
    private_server: ServerProcess,
) -> None:
    srv = private_server
    sid, jid = job_then_server_down(srv, signal.SIGKILL)
    state_root = OciRuntime.state_root_for(srv.data_dir)
    name_file = Path(srv.data_dir / "sessions" / sid / "container")
    container = name_file.read_text() if name_file.exists() else sid
    subprocess.run(["crun", "--root", state_root, "delete", "--force", container], check=True)
    srv.start()
    with Bastion(base_url=srv.url) as c:
        lost = c.jobs.get(sid, jid)
    assert lost["status"] == "failed" and lost["failure_reason"] == "sandbox_lost", lost
    assert lost["output"] is not None
    assert lost["output"]["console_output"] == "before\n"  # what was recorded stays
    assert "sandbox stopped while the server was down" in lost["output"]["errout"]
