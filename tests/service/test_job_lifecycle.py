"""The job lifecycle on the fake runtime: queued -> running -> final, every way it ends."""

from __future__ import annotations

import asyncio

import pytest
from tests.service.conftest import OTHER, OWNER, Run

from bastion.wire import ErrorCode, JobStatus
from bastion_server.runtime.base import SandboxError
from bastion_server.runtime.fake import FakeProcess
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.store.sqlite import JobRecord
from bastion_server.testing import FakeRuntime


async def _running_session(s: Services) -> str:
    record = await s.sessions.create(OWNER)
    await s.sessions.start(OWNER, record.id)
    return record.id


async def _run_to_end(s: Services, sid: str, command: list[str], **kw: object) -> JobRecord:
    job = await s.jobs.run(OWNER, sid, command, **kw)  # type: ignore[arg-type]
    return await s.jobs.wait(OWNER, sid, job.id, timeout=10)


def test_a_job_completes_with_its_output(run: Run) -> None:
    async def body(s: Services) -> tuple[str, int | None, tuple[str, str]]:
        sid = await _running_session(s)
        done = await _run_to_end(s, sid, ["echo", "hello", "world"])
        return done.status, done.exit_code, s.jobs.output(done)

    assert run(body) == (JobStatus.COMPLETED, 0, ("hello world\n", ""))


@pytest.mark.parametrize(
    ("command", "reason", "exit_code"),
    [
        (["exit", "3"], "nonzero_exit", 3),
        (["no-such-program"], "not_found", None),
        (["sleep", "5"], "timeout", None),
    ],
)
def test_each_ending_has_its_reason(
    run: Run, command: list[str], reason: str, exit_code: int | None
) -> None:
    async def body(s: Services) -> tuple[str, str | None, int | None]:
        sid = await _running_session(s)
        done = await _run_to_end(s, sid, command, timeout=0.2)
        return done.status, done.failure_reason, done.exit_code

    assert run(body) == (JobStatus.FAILED, reason, exit_code)


def test_env_and_cwd_reach_the_process(run: Run) -> None:
    async def body(s: Services) -> tuple[str, str]:
        sid = await _running_session(s)
        env = await _run_to_end(s, sid, ["env"], env={"GREETING": "hi"})
        cwd = await _run_to_end(s, sid, ["pwd"], cwd="/tmp")
        return s.jobs.output(env)[0], s.jobs.output(cwd)[0]

    env_out, cwd_out = run(body)
    assert "GREETING=hi\n" in env_out
    assert cwd_out == "/tmp\n"


def test_stopping_the_session_ends_its_running_jobs(run: Run) -> None:
    async def body(s: Services) -> tuple[str, str | None]:
        sid = await _running_session(s)
        job = await s.jobs.run(OWNER, sid, ["sleep", "30"])
        await asyncio.sleep(0.05)
        assert s.jobs.has_running_jobs(sid)
        await s.sessions.stop(OWNER, sid)
        done = s.jobs.get(OWNER, sid, job.id)
        return done.status, done.failure_reason

    assert run(body) == (JobStatus.FAILED, "session_stopped")


def test_a_busy_session_is_never_idle(run: Run) -> None:
    async def body(s: Services) -> str:
        record = await s.sessions.create(OWNER, idle_timeout=0.1)
        await s.sessions.start(OWNER, record.id)
        job = await s.jobs.run(OWNER, record.id, ["sleep", "0.4"])
        await s.jobs.wait(OWNER, record.id, job.id, timeout=5)
        status = s.sessions.get(OWNER, record.id).status
        assert s.jobs.get(OWNER, record.id, job.id).status == JobStatus.COMPLETED
        return status

    # The reaper ran every 50 ms while the job slept 400 ms past a 100 ms idle timeout.
    assert run(body) == "running"


def test_jobs_need_a_running_session(run: Run) -> None:
    async def body(s: Services) -> None:
        record = await s.sessions.create(OWNER)
        with pytest.raises(ServiceError) as caught:
            await s.jobs.run(OWNER, record.id, ["true"])
        assert caught.value.code == ErrorCode.SESSION_STATE

    run(body)


def test_another_owner_cannot_see_a_job(run: Run) -> None:
    async def body(s: Services) -> None:
        sid = await _running_session(s)
        done = await _run_to_end(s, sid, ["true"])
        with pytest.raises(ServiceError) as caught:
            s.jobs.get(OTHER, sid, done.id)
        assert caught.value.code == ErrorCode.SESSION_NOT_FOUND

    run(body)


def test_a_sandbox_lost_under_a_job_fails_it_as_lost(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> tuple[str | None, str]:
        sid = await _running_session(s)
        runtime.fail("exec", SandboxError("agent gone"))
        done = await _run_to_end(s, sid, ["true"])
        return done.failure_reason, done.error_message or ""

    reason, message = run(body)
    assert reason == "lost"
    assert "agent gone" in message


def test_output_streams_live_before_the_end(run: Run, runtime: FakeRuntime) -> None:
    gate = asyncio.Event()

    async def talk(p: FakeProcess) -> int:
        p.write("first\n")
        await gate.wait()
        p.write("second\n", "stderr")
        return 0

    runtime.program("talk", talk)

    async def body(s: Services) -> list[tuple[str, str]]:
        sid = await _running_session(s)
        job = await s.jobs.run(OWNER, sid, ["talk"])
        seen: list[tuple[str, str]] = []
        async for event in s.jobs.follow(OWNER, sid, job.id):
            kind = event.get("type") if isinstance(event, dict) else getattr(event, "type", "")
            seen.append((str(kind), str(event)))
            if "first" in str(event):
                gate.set()
        return seen

    seen = run(body)
    text = " ".join(e for _, e in seen)
    assert text.index("first") < text.index("second")


def test_restart_recovery_fails_unfinished_jobs_of_a_runtime_that_cannot_keep_them(
    run: Run, runtime: FakeRuntime
) -> None:
    # (A runtime that keeps them: tests/service/test_job_reattach.py.)
    runtime.reattaches_jobs = False

    async def first(s: Services) -> str:
        sid = await _running_session(s)
        job = await s.jobs.run(OWNER, sid, ["sleep", "30"])
        await asyncio.sleep(0.05)
        return f"{sid}/{job.id}"

    sid, jid = run(first).split("/")

    async def second(s: Services) -> tuple[str, str | None]:
        done = s.jobs.get(OWNER, sid, jid)
        return done.status, done.failure_reason

    assert run(second) == (JobStatus.FAILED, "server_restarted")


def test_a_session_lost_with_its_node_ends_every_job_of_it_node_lost(
    run: Run, runtime: FakeRuntime
) -> None:
    """Its live jobs, and one recorded running by an earlier server that this one has
    not taken up (a node found gone at a gateway's restart, before jobs are recovered)."""
    gate = asyncio.Event()

    async def held(p: FakeProcess) -> int:
        await gate.wait()
        return 0

    runtime.program("held", held)

    async def body(s: Services) -> list[tuple[str, str | None]]:
        sid = await _running_session(s)
        live = await s.jobs.run(OWNER, sid, ["held"])
        earlier = JobRecord(
            id="job_of_an_earlier_server",
            session_id=sid,
            status=JobStatus.QUEUED,
            command=["held"],
            spec={},
            created_at=live.created_at,
        )
        s.store.insert_job(earlier)
        earlier.status, earlier.started_at = JobStatus.RUNNING, live.created_at
        assert s.store.update_job(earlier)
        await s.sessions.sandbox_lost(sid, "its node left the cluster")
        ended = [s.store.get_job(job_id) for job_id in (live.id, earlier.id)]
        return [(job.status, job.failure_reason) for job in ended if job is not None]

    assert run(body) == [(JobStatus.FAILED, "node_lost")] * 2
