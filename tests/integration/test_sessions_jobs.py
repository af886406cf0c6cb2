"""Sessions and jobs against a real `bastion serve` with real sandboxes."""

from __future__ import annotations

import threading
import time

import pytest

from bastion import (
    Bastion,
    InvalidCommandError,
    InvalidRequestError,
    JobFailedError,
    JobNotFoundError,
    SessionNotFoundError,
    SessionStateError,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# ------------------------------------------------------------------------- sessions


def test_session_lifecycle_and_states(client: Bastion) -> None:
    info = client.sessions.create(metadata={"owner": "test"})
    sid = info["session_id"]
    assert info["status"] == "created"
    assert info["metadata"] == {"owner": "test"}
    assert info["limits"] == {"memory_mb": 512, "pids": 256, "cpus": 1.0, "disk_mb": 1024}
    with pytest.raises(SessionStateError):
        client.sessions.stop(sid)  # not running yet
    with pytest.raises(SessionStateError):
        client.jobs.run(sid, ["true"])  # jobs need a running session
    assert client.sessions.start(sid)["status"] == "running"
    with pytest.raises(SessionStateError) as err:
        client.sessions.start(sid)
    assert err.value.code == "session_state" and err.value.status_code == 409
    assert client.sessions.get(sid)["status"] == "running"
    assert sid in [s["session_id"] for s in client.sessions.list()["sessions"]]
    assert client.sessions.stop(sid)["status"] == "stopped"
    with pytest.raises(SessionStateError):
        client.files.list(sid, "/")  # files need a running session too
    assert client.sessions.start(sid)["status"] == "running"
    assert client.sessions.delete(sid)["status"] == "deleted"
    assert client.sessions.get(sid)["status"] == "deleted"
    for action in (client.sessions.start, client.sessions.stop, client.sessions.delete):
        with pytest.raises(SessionStateError):
            action(sid)
    assert sid not in [s["session_id"] for s in client.sessions.list()["sessions"]]


def test_unknown_session_is_not_found(client: Bastion) -> None:
    for call in (client.sessions.get, client.sessions.start, client.sessions.delete):
        with pytest.raises(SessionNotFoundError) as err:
            call("ses_doesnotexist")
        assert err.value.status_code == 404 and err.value.code == "session_not_found"


def test_session_limits_are_validated(client: Bastion) -> None:
    with pytest.raises(InvalidRequestError) as err:
        client.sessions.create(limits={"memory_mb": 10**9})
    assert err.value.code == "limit_exceeded"
    with pytest.raises(InvalidRequestError):
        client.sessions.create(limits={"memory_mb": 1})
    with pytest.raises(InvalidRequestError):
        client.sessions.create(limits={"bogus": 1})  # type: ignore[typeddict-unknown-key]
    info = client.sessions.create(limits={"memory_mb": 256, "pids": 100, "cpus": 0.5})
    try:
        assert info["limits"] == {"memory_mb": 256, "pids": 100, "cpus": 0.5, "disk_mb": 1024}
    finally:
        client.sessions.delete(info["session_id"])


def test_writable_layer_survives_stop_start_and_goes_on_delete(client: Bastion) -> None:
    sid = client.sessions.create()["session_id"]
    client.sessions.start(sid)
    client.jobs.run_and_wait(sid, ["sh", "-c", "echo kept > /home/user/state.txt"])
    client.files.upload(sid, b"uploaded", "/home/user/up.bin")
    client.sessions.stop(sid)
    client.sessions.start(sid)
    r = client.jobs.run_and_wait(sid, ["cat", "/home/user/state.txt", "/home/user/up.bin"])
    assert r["output"]["console_output"] == "kept\nuploaded"
    client.sessions.delete(sid)
    fresh = client.sessions.create()["session_id"]
    client.sessions.start(fresh)
    try:
        with pytest.raises(JobFailedError):
            client.jobs.run_and_wait(fresh, ["cat", "/home/user/state.txt"])
    finally:
        client.sessions.delete(fresh)


def test_idempotent_create(client: Bastion) -> None:
    a = client.sessions.create(idempotency_key="same-key-123")
    b = client.sessions.create(idempotency_key="same-key-123")
    try:
        assert a["session_id"] == b["session_id"]
    finally:
        client.sessions.delete(a["session_id"])


# ------------------------------------------------------------------------- jobs


def test_run_and_wait_success(client: Bastion, sid: str) -> None:
    r = client.jobs.run_and_wait(sid, ["python3", "-c", "print('hi')"])
    assert r["status"] == "completed"
    assert r["output"] == {"console_output": "hi\n", "errout": "", "status_code": 0}


def test_failed_job_raises_with_full_result(client: Bastion, sid: str) -> None:
    with pytest.raises(JobFailedError) as err:
        client.jobs.run_and_wait(sid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    e = err.value
    assert e.status_code == 3
    assert e.console_output == "out\n"
    assert e.errout == "err\n"
    assert e.result["status"] == "failed"


def test_missing_binary_fails_clearly(client: Bastion, sid: str) -> None:
    with pytest.raises(JobFailedError) as err:
        client.jobs.run_and_wait(sid, ["no-such-program", "--x"])
    assert err.value.status_code == 127
    assert "command not found: no-such-program" in err.value.errout
    assert err.value.result["failure_reason"] == "not_found"


def test_bad_commands_are_rejected(client: Bastion, sid: str) -> None:
    for bad in ([], [""], ["a\x00b"]):
        with pytest.raises(InvalidCommandError):
            client.jobs.run(sid, bad)
    with pytest.raises(InvalidRequestError):
        client.jobs.run(sid, ["true"], cwd="relative/dir")
    with pytest.raises(InvalidRequestError):
        client.jobs.run(sid, ["true"], timeout=-1)


def test_env_cwd_and_string_command(client: Bastion, sid: str) -> None:
    r = client.jobs.run_and_wait(
        sid, ["sh", "-c", 'echo "$GREETING" && pwd'], env={"GREETING": "hello there"}, cwd="/tmp"
    )
    assert r["output"]["console_output"] == "hello there\n/tmp\n"
    r = client.jobs.run_and_wait(sid, "echo $HOME; whoami")
    assert r["output"]["console_output"] == "/home/user\nuser\n"


def test_async_run_get_wait_and_timeout(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["sleep", "2"])
    assert job["status"] in ("queued", "running")
    assert client.jobs.get(sid, job["job_id"])["status"] in ("queued", "running")
    with pytest.raises(TimeoutError):
        client.jobs.wait(sid, job["job_id"], timeout=0.3)
    done = client.jobs.wait(sid, job["job_id"], timeout=20)
    assert done["status"] == "completed"
    with pytest.raises(JobNotFoundError):
        client.jobs.get(sid, "job_nope")


def test_job_timeout_kills_the_whole_tree(client: Bastion, sid: str) -> None:
    script = "sleep 300 & (setsid sleep 301 &) ; sleep 302"
    with pytest.raises(JobFailedError) as err:
        client.jobs.run_and_wait(sid, ["sh", "-c", script], timeout=1)
    assert err.value.result["failure_reason"] == "timeout"
    assert "timeout" in err.value.errout
    left = client.jobs.run_and_wait(sid, ["ps", "-eo", "args"])["output"]["console_output"]
    assert "sleep 30" not in left, left


def test_watch_reports_every_status_to_the_end(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["sh", "-c", "sleep 1.5; exit 4"])
    seen: list[str] = []
    final = client.jobs.watch(
        sid, job["job_id"], lambda info: seen.append(info["status"]), timeout=30
    )
    assert final["status"] == "failed" and final["output"]["status_code"] == 4
    assert seen[-1] == "failed"
    assert "running" in seen
    assert len(seen) == len(set(seen)) or seen == sorted(seen, key=seen.index)


def test_large_output_is_whole_and_separate(client: Bastion, sid: str) -> None:
    # 6 MB of stdout and 3 MB of stderr, with multi-byte characters across read
    # boundaries: both arrive complete, apart, and decoded without broken characters.
    script = (
        "import sys\n"
        "line = 'é€😀' * 25 + '\\n'\n"
        "sys.stdout.write(line * 20000)\n"
        "sys.stderr.write('Ω' * 1500000)\n"
    )
    r = client.jobs.run_and_wait(sid, ["python3", "-c", script])
    out, err = r["output"]["console_output"], r["output"]["errout"]
    assert out == ("é€😀" * 25 + "\n") * 20000
    assert err == "Ω" * 1500000
    assert len(out.encode()) > 4_500_000


def test_concurrent_jobs_in_one_session(client: Bastion, sid: str) -> None:
    start = time.monotonic()
    jobs = [client.jobs.run(sid, ["sh", "-c", f"sleep 1; echo {i}"]) for i in range(6)]
    outs = [
        client.jobs.wait(sid, j["job_id"], timeout=30)["output"]["console_output"] for j in jobs
    ]
    assert outs == [f"{i}\n" for i in range(6)]
    assert time.monotonic() - start < 5.5  # they ran side by side, not one after another
    listed = [j["job_id"] for j in client.jobs.list(sid)["jobs"]]
    assert all(j["job_id"] in listed for j in jobs)


def test_session_deleted_while_a_job_runs(client: Bastion) -> None:
    sid = client.sessions.create()["session_id"]
    client.sessions.start(sid)
    job = client.jobs.run(sid, ["sleep", "60"])
    time.sleep(0.3)
    waiter: dict[str, object] = {}

    def wait() -> None:
        try:
            waiter["result"] = client.jobs.wait(sid, job["job_id"], timeout=30)
        except Exception as exc:
            waiter["error"] = exc

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    client.sessions.delete(sid)
    t.join(30)
    err = waiter.get("error")
    assert isinstance(err, JobFailedError), waiter
    assert err.result["failure_reason"] == "session_deleted"


def test_session_stopped_while_a_job_runs(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["sleep", "60"])
    time.sleep(0.3)
    client.sessions.stop(sid)
    info = client.jobs.get(sid, job["job_id"])
    assert info["status"] == "failed" and info["failure_reason"] == "session_stopped"
    client.sessions.start(sid)
    ps = client.jobs.run_and_wait(sid, ["ps", "-eo", "args"])["output"]["console_output"]
    assert "sleep 60" not in ps


def test_missing_working_directory_fails_as_invalid_cwd(client: Bastion, sid: str) -> None:
    with pytest.raises(JobFailedError) as err:
        client.jobs.run_and_wait(sid, ["pwd"], cwd="/no/such/dir")
    assert err.value.result["failure_reason"] == "invalid_cwd"
    assert "cannot enter the working directory /no/such/dir" in err.value.errout
    assert "command not found" not in err.value.errout
