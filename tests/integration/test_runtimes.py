"""runc is a drop-in for crun: the same sandbox, limits and policy."""

from __future__ import annotations

import shutil

import pytest
from tests.conftest import ServerProcess

from bastion import Bastion

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("runc") is None, reason="make setup installs runc"),
]


def test_runc_runs_the_same_sandbox(private_server: ServerProcess) -> None:
    private_server.extra_args = ("--runtime", "runc")
    private_server.start()
    with Bastion(base_url=private_server.url) as c:
        assert c.health()["runtime"] == "runc"
        sid = c.sessions.create(limits={"memory_mb": 128})["session_id"]
        c.sessions.start(sid)
        out = c.jobs.run_and_wait(
            sid, ["sh", "-c", "id -u; grep -c Seccomp:.2 /proc/self/status; ip -o link | wc -l"]
        )["output"]["console_output"]
        assert out == "1000\n1\n1\n"
        c.files.upload(sid, b"kept", "/home/user/f")
        c.sessions.stop(sid)
        c.sessions.start(sid)
        assert c.files.download(sid, "/home/user/f") == b"kept"
        usage = c.sessions.get(sid)["usage"]
        assert usage is not None and usage["memory_bytes"]
        c.sessions.delete(sid)
