"""Verdicts and per-job limits on real sandboxes: the kernel ends the job, the server
says why (OOM, CPU time, a signal, an output cap, a kill), with usage to grade by."""

from __future__ import annotations

import glob
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess

from bastion import Bastion, JobFailedError, JobStateError
from bastion.wire import JobInfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Touches 200 MiB (a bytes object is written, unlike a calloc'd bytearray).
HOG = ["python3", "-c", "b = b'x' * (200 << 20); print(len(b))"]


def _fails(client: Bastion, sid: str, command: list[str], **kw: object) -> JobInfo:
    with pytest.raises(JobFailedError) as caught:
        client.jobs.run_and_wait(sid, command, wait_timeout=60, **kw)  # type: ignore[arg-type]
    return caught.value.result


def test_an_oom_kill_is_its_own_verdict(client: Bastion, sid: str) -> None:
    job = _fails(client, sid, HOG, limits={"memory_mb": 64})
    assert job["failure_reason"] == "oom", job
    assert job["signal"] == "SIGKILL"
    assert "OOM" in job["output"]["errout"]  # type: ignore[index]
    usage = job["usage"]
    assert usage is not None and usage["peak_memory_bytes"] is not None
    assert usage["peak_memory_bytes"] <= 64 << 20


def test_a_cpu_time_limit_is_its_own_verdict(client: Bastion, sid: str) -> None:
    job = _fails(client, sid, ["sh", "-c", "while :; do :; done"], limits={"cpu_seconds": 1})
    assert job["failure_reason"] == "cpu_time", job
    assert job["signal"] in ("SIGXCPU", "SIGKILL")
    usage = job["usage"]
    assert usage is not None
    # The kernel checks the limit at its ticks; rusage may count a little less.
    assert usage["user_cpu_seconds"] + usage["system_cpu_seconds"] >= 0.8


def test_a_segfault_is_reported_by_its_signal(client: Bastion, sid: str) -> None:
    job = _fails(client, sid, ["sh", "-c", "kill -SEGV $$"])
    assert job["failure_reason"] == "nonzero_exit"
    assert job["signal"] == "SIGSEGV"
    assert job["output"]["status_code"] == 139  # type: ignore[index]


def test_a_finished_job_reports_its_usage(client: Bastion, sid: str) -> None:
    script = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    job = client.jobs.run_and_wait(sid, ["python3", "-c", script])
    usage = job["usage"]
    assert usage is not None
    assert usage["user_cpu_seconds"] + usage["system_cpu_seconds"] >= 0.25
    assert usage["wall_seconds"] >= 0.25
    assert usage["peak_memory_bytes"] is not None and usage["peak_memory_bytes"] > 1 << 20
    assert job["signal"] is None


def test_two_jobs_limits_do_not_touch_each_other(client: Bastion, sid: str) -> None:
    # A job's limit is its own: the next job of the session has the session's memory.
    client.sessions.delete(sid)
    sid = client.sessions.create(limits={"memory_mb": 512})["session_id"]
    client.sessions.start(sid)
    try:
        limited = _fails(client, sid, HOG, limits={"memory_mb": 64})
        assert limited["failure_reason"] == "oom"
        free = client.jobs.run_and_wait(sid, HOG, wait_timeout=60)
        assert free["output"]["console_output"] == f"{200 << 20}\n"  # type: ignore[index]
        again = _fails(client, sid, HOG, limits={"memory_mb": 48})
        assert again["failure_reason"] == "oom"
    finally:
        client.sessions.delete(sid)


def test_output_over_its_cap_kills_the_job(client: Bastion, sid: str) -> None:
    started = time.monotonic()
    job = _fails(client, sid, ["yes"], limits={"output_bytes": 65536})
    assert job["failure_reason"] == "output_limit"
    assert len(job["output"]["console_output"]) == 65536  # type: ignore[index]
    assert time.monotonic() - started < 20


def test_a_pids_limit_refuses_forks(client: Bastion, sid: str) -> None:
    script = (
        "import os, time\nfor _ in range(16):\n    if os.fork() == 0: time.sleep(2); os._exit(0)"
    )
    job = _fails(client, sid, ["python3", "-c", script], limits={"pids": 4})
    assert job["failure_reason"] == "pids_limit", job


def test_limits_above_the_session_are_refused(client: Bastion, sid: str) -> None:
    from bastion import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="memory_mb"):
        client.jobs.run(sid, ["true"], limits={"memory_mb": 1 << 20})


def test_a_cancelled_job_tree_leaves_no_process(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["sh", "-c", "sleep 300 & sleep 300 & sh -c 'sleep 300' & wait"])
    jid = job["job_id"]
    deadline = time.monotonic() + 20
    while True:
        mine = [p for p in client.sessions.processes(sid) if p["job_id"] == jid]
        if sum(p["command"][:1] == ["sleep"] for p in mine) == 3:
            break
        assert time.monotonic() < deadline, mine
        time.sleep(0.1)
    assert all(p["user"] == "user" for p in mine if p["command"][:1] == ["sleep"])
    client.jobs.kill(sid, jid, "SIGTERM")
    with pytest.raises(JobFailedError) as caught:
        client.jobs.wait(sid, jid, timeout=30)
    final = caught.value.result
    assert final["failure_reason"] == "killed"
    assert final["signal"] == "SIGTERM"
    left = client.sessions.processes(sid)
    assert not any("sleep" in " ".join(p["command"]) for p in left), left
    with pytest.raises(JobStateError):
        client.jobs.kill(sid, jid)


def test_an_oom_kill_at_the_session_limit_is_told_too(client: Bastion, sid: str) -> None:
    # No memory_mb of the job's own: the session cgroup's OOM counter tells it.
    client.sessions.delete(sid)
    sid = client.sessions.create(limits={"memory_mb": 96})["session_id"]
    client.sessions.start(sid)
    try:
        job = _fails(client, sid, HOG)
        assert job["failure_reason"] == "oom", job
        # The session lives on, and its next job is judged on its own.
        assert client.jobs.run_and_wait(sid, ["true"])["status"] == "completed"
    finally:
        client.sessions.delete(sid)


def test_bad_kill_stdin_and_process_requests_have_clear_errors(
    client: Bastion, sid: str, server: ServerProcess
) -> None:
    base = f"{server.url}/v1/sessions/{sid}"
    job = client.jobs.run(sid, ["sleep", "30"])
    with httpx.Client(timeout=30) as http:
        bad_signal = http.post(f"{base}/jobs/{job['job_id']}/kill", json={"signal": "SIGNOPE"})
        assert bad_signal.status_code == 422
        assert bad_signal.json()["error"]["code"] == "invalid_request"
        unknown = http.post(f"{base}/jobs/job_nope/stdin", content=b"x")
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "job_not_found")
        no_stdin = http.post(f"{base}/jobs/{job['job_id']}/stdin", content=b"x")
        assert (no_stdin.status_code, no_stdin.json()["error"]["code"]) == (409, "job_state")
        killed = http.post(f"{base}/jobs/{job['job_id']}/kill", json={"signal": "SIGKILL"})
        assert killed.status_code == 202
        client.sessions.stop(sid)
        stopped = http.get(f"{base}/processes")
        assert (stopped.status_code, stopped.json()["error"]["code"]) == (409, "session_state")


def test_a_job_cgroup_goes_when_its_job_ends(
    client: Bastion, sid: str, server: ServerProcess
) -> None:
    from bastion_server.runtime.oci import OciRuntime

    tag = OciRuntime._tag(Path(server.data_dir))
    pattern = f"/sys/fs/cgroup/*/bastion/{tag}/*/job_*"
    for _ in range(10):
        client.jobs.run_and_wait(sid, ["true"], limits={"memory_mb": 16, "pids": 8})
    assert glob.glob(pattern) == []
