"""Pause and resume on real sandboxes: frozen processes keep their memory and their
work, get no CPU, and see no timer fire until they are thawed."""

from __future__ import annotations

import itertools
import time

import pytest

from bastion import Bastion, SessionStateError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Prints 0..29 and the time (ns), one line every 0.1 s of the job's own time.
_TICKER = 'i=0; while [ $i -lt 30 ]; do echo "$i $(date +%s%N)"; i=$((i+1)); sleep 0.1; done'


def test_a_job_survives_pause_and_resume_with_its_whole_output(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["sh", "-c", _TICKER])
    time.sleep(0.8)
    assert client.sessions.pause(sid)["status"] == "paused"
    frozen_cpu = client.sessions.get(sid)["usage"]["cpu_seconds"]  # type: ignore[index]
    time.sleep(1.5)  # its sleeps would have ended 15 times over, were it awake
    assert client.jobs.get(sid, job["job_id"])["status"] == "running"
    assert client.sessions.get(sid)["usage"]["cpu_seconds"] == frozen_cpu  # type: ignore[index]
    assert client.sessions.resume(sid)["status"] == "running"
    done = client.jobs.wait(sid, job["job_id"], timeout=30)
    assert done["status"] == "completed" and done["output"] is not None
    lines = [line.split() for line in done["output"]["console_output"].splitlines()]
    assert [n for n, _ in lines] == [str(i) for i in range(30)]  # the whole output
    stamps = [int(t) / 1e9 for _, t in lines]
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    # One gap is the pause (nothing printed meanwhile); the others are its own ticks.
    assert gaps[-1] >= 1.4
    assert gaps[-2] < 1.0


def test_a_paused_session_refuses_work_with_409(client: Bastion, sid: str) -> None:
    client.sessions.pause(sid)
    for attempt in (
        lambda: client.jobs.run(sid, ["true"]),
        lambda: client.files.list(sid, "/"),
        lambda: client.files.upload(sid, b"x", "/tmp/x"),
    ):
        with pytest.raises(SessionStateError) as err:
            attempt()
        assert err.value.code == "session_paused" and err.value.status_code == 409
    with pytest.raises(SessionStateError) as err:
        client.sessions.pause(sid)
    assert err.value.code == "session_state"
    client.sessions.resume(sid)
    awake = client.jobs.run_and_wait(sid, ["echo", "awake"])["output"]
    assert awake is not None and awake["console_output"] == "awake\n"


def test_a_paused_session_can_be_stopped_started_and_deleted(client: Bastion) -> None:
    sid = client.sessions.create()["session_id"]
    client.sessions.start(sid)
    client.files.upload(sid, b"kept", "/home/user/kept.txt")
    job = client.jobs.run(sid, ["sleep", "600"])
    client.sessions.pause(sid)
    assert client.sessions.stop(sid)["status"] == "stopped"
    ended = client.jobs.get(sid, job["job_id"])
    assert ended["status"] == "failed" and ended["failure_reason"] == "session_stopped"
    client.sessions.start(sid)
    assert client.files.download(sid, "/home/user/kept.txt") == b"kept"
    client.sessions.pause(sid)
    assert client.sessions.delete(sid)["status"] == "deleted"
