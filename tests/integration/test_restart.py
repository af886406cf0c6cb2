"""Nothing finished is lost when the server stops and starts again."""

from __future__ import annotations

import subprocess
import time

import pytest
from tests.conftest import ServerProcess

from bastion import Bastion
from bastion_server.runtime.oci import OciRuntime

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_restart_keeps_sessions_files_and_results(private_server: ServerProcess) -> None:
    srv = private_server
    srv.start()
    with Bastion(base_url=srv.url) as c:
        running = c.sessions.create(metadata={"name": "running"})["session_id"]
        c.sessions.start(running)
        c.files.upload(running, b"survives", "/home/user/keep.txt")
        done = c.jobs.run_and_wait(running, ["sh", "-c", "echo finished; echo note >&2"])
        long_job = c.jobs.run(running, ["sh", "-c", "echo started; sleep 120"])
        time.sleep(0.5)

        stopped = c.sessions.create()["session_id"]
        c.sessions.start(stopped)
        c.files.upload(stopped, b"on disk", "/home/user/disk.txt")
        c.sessions.stop(stopped)

        vanished = c.sessions.create()["session_id"]
        c.sessions.start(vanished)

    assert srv.stop() == 0, srv.log_tail()
    # While the server is down, one sandbox dies (as after a reboot).
    state_root = OciRuntime.state_root_for(srv.data_dir)
    # (A session from the warm pool keeps its container's pool name.)
    name_file = srv.data_dir / "sessions" / vanished / "container"
    container = name_file.read_text() if name_file.exists() else vanished
    subprocess.run(["crun", "--root", state_root, "delete", "--force", container], check=True)
    srv.start()

    with Bastion(base_url=srv.url) as c:
        assert c.sessions.get(running)["status"] == "running"  # adopted as it was
        assert c.sessions.get(running)["metadata"] == {"name": "running"}
        assert c.files.download(running, "/home/user/keep.txt") == b"survives"
        again = c.jobs.get(running, done["job_id"])
        assert again["status"] == "completed"
        assert again["output"] == {
            "console_output": "finished\n",
            "errout": "note\n",
            "status_code": 0,
        }
        taken_up = c.jobs.get(running, long_job["job_id"])
        assert taken_up["status"] == "running"  # it ran on (tests/.../test_job_restart.py)
        ps = c.jobs.run_and_wait(running, ["ps", "-eo", "args"])["output"]["console_output"]
        assert "sleep 120" in ps

        assert c.sessions.get(stopped)["status"] == "stopped"
        c.sessions.start(stopped)
        assert c.files.download(stopped, "/home/user/disk.txt") == b"on disk"

        gone = c.sessions.get(vanished)
        assert gone["status"] == "stopped" and gone["status_reason"]
        c.sessions.start(vanished)  # and it can be started again
        assert c.jobs.run_and_wait(vanished, ["true"])["status"] == "completed"


def test_sigint_shuts_down_cleanly(private_server: ServerProcess) -> None:
    import signal

    private_server.start()
    assert private_server.stop(signal.SIGINT) == 0
    log = private_server.log_tail(20000)
    assert '"msg": "stopped"' in log
