"""A job taken up again after a restart of the server still gets its OOM verdict.

The job is mid-run when the server is killed (it waits for a gate file), and is
OOM-killed while the server is down or after it is back: the next server judges it
from the job's own cgroup (found by the job's id) or, without one, from the sandbox's
OOM count the agent kept with the job.  On real sandboxes.
"""

from __future__ import annotations

import signal

import pytest
from tests.conftest import ServerProcess
from tests.integration.test_job_restart import GATE, open_gate

from bastion import Bastion, JobFailedError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Prints, waits for the gate, then touches 200 MiB.
SCRIPT = (
    "echo before; "
    f"while [ ! -e {GATE} ]; do sleep 0.05; done; "
    "exec python3 -c \"b = b'x' * (200 << 20)\""
)


def _start(
    c: Bastion, session: dict[str, object], limits: dict[str, int] | None
) -> tuple[str, str]:
    sid = c.sessions.create(**session)["session_id"]  # type: ignore[arg-type]
    c.sessions.start(sid)
    jid = c.jobs.run(sid, ["sh", "-c", SCRIPT], limits=limits)["job_id"]
    with c.jobs.stream(sid, jid) as events:  # until it is surely running
        for event in events:
            if event["type"] == "stdout" and "before" in event["data"]:
                break
    return sid, jid


@pytest.mark.parametrize(
    ("session", "limits", "while_down"),
    [
        ({}, {"memory_mb": 64}, True),
        ({}, {"memory_mb": 64}, False),
        ({"limits": {"memory_mb": 96}}, None, True),
        ({"limits": {"memory_mb": 96}}, None, False),
    ],
    ids=["own-cgroup-down", "own-cgroup-back", "session-limit-down", "session-limit-back"],
)
def test_an_oom_kill_across_a_restart_is_told(
    private_server: ServerProcess,
    session: dict[str, object],
    limits: dict[str, int] | None,
    while_down: bool,
) -> None:
    srv = private_server
    srv.start()
    with Bastion(base_url=srv.url) as c:
        sid, jid = _start(c, session, limits)
    srv.stop(signal.SIGKILL)
    if while_down:
        open_gate(srv, sid)
    srv.start()
    with Bastion(base_url=srv.url) as c:
        if not while_down:
            open_gate(srv, sid)
        with pytest.raises(JobFailedError) as failed:
            c.jobs.wait(sid, jid, timeout=60)
        done = failed.value  # the job's result, as a mapping
        assert done["status"] == "failed", done
        assert done["failure_reason"] == "oom", (done, srv.log_tail())
        assert done["signal"] == "SIGKILL"
        # and the next job of the session is not taken for one
        assert c.jobs.run_and_wait(sid, ["true"])["status"] == "completed"
