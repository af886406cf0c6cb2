"""A job the server itself fails is recorded with the true reason, and the failure is
logged, never left as an unretrieved task exception."""

from __future__ import annotations

import resource
import time

import pytest
from tests.conftest import ServerProcess

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_job_whose_log_cannot_be_opened_fails_as_internal_error(
    private_server: ServerProcess,
) -> None:
    srv = private_server
    srv.start()
    assert srv.proc is not None
    pid = srv.proc.pid
    with Bastion(base_url=srv.url) as c:
        sid = c.sessions.create()["session_id"]
        c.sessions.start(sid)
        # Its first output comes after a pause, when the server cannot open a file.
        job = c.jobs.run(sid, ["sh", "-c", "sleep 2; echo late"])
        deadline = time.monotonic() + 10
        while c.jobs.get(sid, job["job_id"])["status"] != "running":
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # Descriptors already open stay usable; every new one fails with EMFILE.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
        try:
            time.sleep(3.5)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        final = c.jobs.get(sid, job["job_id"])
        assert final["status"] == "failed"
        assert final["failure_reason"] == "internal_error"
        assert final["output"] is not None
        errout = final["output"]["errout"]
        assert "internal error" in errout and "Too many open files" in errout, errout
        assert str(srv.data_dir) not in errout  # no host path reaches the tenant
        # The server goes on: the session still runs jobs.
        assert c.jobs.run_and_wait(sid, ["echo", "ok"])["output"]["console_output"] == "ok\n"
        c.sessions.delete(sid)
    log = srv.log_tail(200_000)
    assert "Task exception was never retrieved" not in log
    assert "job failed inside the server" in log
