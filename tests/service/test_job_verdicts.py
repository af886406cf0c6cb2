"""Verdicts, per-job limits, stdin and kill on the fake runtime: the service's logic.

The kernel's part (a real OOM kill, SIGXCPU, a segfault) is in
tests/integration/test_job_verdicts.py; here the runtime's exit events are given, and
what the service makes of them is checked: reasons, signals, usage, limits checked
against the session's, stdin fed and closed, signals sent.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.service.conftest import OWNER, Run

from bastion.wire import ErrorCode, JobStatus
from bastion_server.runtime.base import ExitEvent, JobUsage
from bastion_server.runtime.fake import FakeProcess
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.store.sqlite import JobRecord, Store
from bastion_server.testing import FakeRuntime


async def _session(s: Services) -> str:
    record = await s.sessions.create(OWNER, limits={"memory_mb": 256, "pids": 64})
    await s.sessions.start(OWNER, record.id)
    return record.id


async def _end(s: Services, sid: str, command: list[str], **kw: object) -> JobRecord:
    job = await s.jobs.run(OWNER, sid, command, **kw)  # type: ignore[arg-type]
    return await s.jobs.wait(OWNER, sid, job.id, timeout=10)


def _exits_with(event: ExitEvent) -> object:
    async def program(p: FakeProcess) -> ExitEvent:
        return event

    return program


@pytest.mark.parametrize(
    ("event", "limits", "reason", "sig"),
    [
        (ExitEvent(exit_code=137, signal=9, oom_killed=True), {"memory_mb": 64}, "oom", "SIGKILL"),
        (
            ExitEvent(exit_code=152, signal=signal.SIGXCPU),
            {"cpu_seconds": 1},
            "cpu_time",
            "SIGXCPU",
        ),
        (
            ExitEvent(exit_code=137, signal=9, usage=JobUsage(2.0, 1.99, 0.01, None)),
            {"cpu_seconds": 2},
            "cpu_time",
            "SIGKILL",
        ),
        (ExitEvent(exit_code=1, pids_refused=True), {"pids": 4}, "pids_limit", None),
        (ExitEvent(exit_code=139, signal=signal.SIGSEGV), None, "nonzero_exit", "SIGSEGV"),
        # A SIGKILL with no CPU limit to explain it is no CPU verdict.
        (ExitEvent(exit_code=137, signal=9), None, "nonzero_exit", "SIGKILL"),
    ],
)
def test_each_verdict_has_its_reason_and_signal(
    run: Run,
    runtime: FakeRuntime,
    event: ExitEvent,
    limits: dict[str, int] | None,
    reason: str,
    sig: str | None,
) -> None:
    runtime.program("judge", _exits_with(event))  # type: ignore[arg-type]

    async def body(s: Services) -> tuple[str, str | None, str | None, str]:
        sid = await _session(s)
        done = await _end(s, sid, ["judge"], limits=limits)
        return done.status, done.failure_reason, done.signal, s.jobs.output(done)[1]

    status, got_reason, got_signal, errout = run(body)
    assert (status, got_reason, got_signal) == (JobStatus.FAILED, reason, sig)
    if reason != "nonzero_exit":
        assert errout.startswith("bastion: ")


def test_usage_is_recorded_and_shown(run: Run, runtime: FakeRuntime) -> None:
    usage = JobUsage(0.5, 0.25, 0.125, 42 << 20)
    runtime.program("work", _exits_with(ExitEvent(exit_code=0, usage=usage)))  # type: ignore[arg-type]

    async def body(s: Services) -> tuple[object, object]:
        sid = await _session(s)
        done = await _end(s, sid, ["work"])
        return s.jobs.view(done)["usage"], s.store.get_job(done.id).usage  # type: ignore[union-attr]

    shown, stored = run(body)
    assert (
        shown
        == stored
        == {
            "wall_seconds": 0.5,
            "user_cpu_seconds": 0.25,
            "system_cpu_seconds": 0.125,
            "peak_memory_bytes": 42 << 20,
        }
    )


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        ({"memory_mb": 512}, ErrorCode.LIMIT_EXCEEDED),  # the session has 256
        ({"pids": 65}, ErrorCode.LIMIT_EXCEEDED),
        ({"output_bytes": 1 << 40}, ErrorCode.LIMIT_EXCEEDED),
        ({"memory_mb": 0}, ErrorCode.INVALID_REQUEST),
        ({"memory_mb": "64"}, ErrorCode.INVALID_REQUEST),
        ({"disk_mb": 1}, ErrorCode.INVALID_REQUEST),
    ],
)
def test_job_limits_must_fit_the_session(run: Run, limits: dict[str, object], code: str) -> None:
    async def body(s: Services) -> str:
        sid = await _session(s)
        with pytest.raises(ServiceError) as caught:
            await s.jobs.run(OWNER, sid, ["true"], limits=limits)
        return caught.value.code

    assert run(body) == code


def test_limits_reach_the_runtime(run: Run, runtime: FakeRuntime) -> None:
    seen = []

    async def program(p: FakeProcess) -> int:
        seen.append(p.spec.limits)
        return 0

    runtime.program("probe", program)

    async def body(s: Services) -> None:
        sid = await _session(s)
        await _end(s, sid, ["probe"], limits={"memory_mb": 64, "cpu_seconds": 2, "pids": 8})
        await _end(s, sid, ["probe"])

    run(body)
    assert (seen[0].memory_mb, seen[0].cpu_seconds, seen[0].pids) == (64, 2, 8)
    assert not seen[1].needs_cgroup and seen[1].cpu_seconds is None


def test_output_over_its_limit_kills_the_job(run: Run, runtime: FakeRuntime) -> None:
    async def chatty(p: FakeProcess) -> int:
        for _ in range(1000):
            p.write(b"x" * 1000)
            await asyncio.sleep(0.001)
        return 0

    runtime.program("chatty", chatty)

    async def body(s: Services) -> tuple[str | None, int, float]:
        sid = await _session(s)
        started = asyncio.get_running_loop().time()
        done = await _end(s, sid, ["chatty"], limits={"output_bytes": 4096})
        return (
            done.failure_reason,
            len(s.jobs.output(done)[0]),
            (asyncio.get_running_loop().time() - started),
        )

    reason, kept, took = run(body)
    assert reason == "output_limit"
    assert kept == 4096
    assert took < 0.9  # killed, not run to its end (about a second)


def test_inline_stdin_is_fed_and_closed(run: Run) -> None:
    async def body(s: Services) -> tuple[str, str]:
        sid = await _session(s)
        done = await _end(s, sid, ["cat"], stdin="line one\nline two\n")
        return done.status, s.jobs.output(done)[0]

    assert run(body) == (JobStatus.COMPLETED, "line one\nline two\n")


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_open_stdin_is_written_then_closed(run: Run) -> None:
    async def body(s: Services) -> tuple[tuple[int, bool], tuple[int, bool], str, str]:
        sid = await _session(s)
        job = await s.jobs.run(OWNER, sid, ["cat"], stdin=True)
        first = await s.jobs.write_stdin(OWNER, sid, job.id, _chunks(b"a", b"bc"))
        second = await s.jobs.write_stdin(OWNER, sid, job.id, _chunks(b"d"), close=True)
        done = await s.jobs.wait(OWNER, sid, job.id, timeout=10)
        return first, second, done.status, s.jobs.output(done)[0]

    assert run(body) == ((3, False), (1, True), JobStatus.COMPLETED, "abcd")


@pytest.mark.parametrize("stdin", [None, "closed"])
def test_stdin_to_a_job_without_an_open_one_is_refused(run: Run, stdin: str | None) -> None:
    async def body(s: Services) -> str:
        sid = await _session(s)
        job = await s.jobs.run(OWNER, sid, ["sleep", "5"], stdin=stdin == "closed" or None)
        if stdin == "closed":
            await s.jobs.write_stdin(OWNER, sid, job.id, _chunks(), close=True)
        with pytest.raises(ServiceError) as caught:
            await s.jobs.write_stdin(OWNER, sid, job.id, _chunks(b"x"))
        await s.jobs.kill(OWNER, sid, job.id, "SIGKILL")
        return caught.value.code

    assert run(body) == ErrorCode.JOB_STATE


def test_stdin_to_an_ended_job_is_refused(run: Run) -> None:
    async def body(s: Services) -> str:
        sid = await _session(s)
        done = await _end(s, sid, ["true"], stdin=True)
        with pytest.raises(ServiceError) as caught:
            await s.jobs.write_stdin(OWNER, sid, done.id, _chunks(b"x"))
        return caught.value.code

    assert run(body) == ErrorCode.JOB_STATE


def test_kill_sends_the_signal_and_the_job_ends_killed(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> tuple[str, str | None, str | None, str, list[str | None]]:
        sid = await _session(s)
        job = await s.jobs.run(OWNER, sid, ["sleep", "30"])
        await s.jobs.kill(OWNER, sid, job.id, "TERM")
        done = await s.jobs.wait(OWNER, sid, job.id, timeout=10)
        with pytest.raises(ServiceError) as again:
            await s.jobs.kill(OWNER, sid, job.id, "SIGTERM")
        with pytest.raises(ServiceError) as bad:
            await s.jobs.kill(OWNER, sid, job.id, "SIGNOPE")
        return (
            done.status,
            done.failure_reason,
            done.signal,
            done.error_message or "",
            [
                again.value.code,
                bad.value.code,
            ],
        )

    status, reason, sig, message, codes = run(body)
    assert (status, reason, sig) == (JobStatus.FAILED, "killed", "SIGTERM")
    assert "SIGTERM" in message
    assert codes == [ErrorCode.JOB_STATE, ErrorCode.INVALID_REQUEST]


def test_processes_name_their_job(run: Run) -> None:
    async def body(s: Services) -> tuple[list[str | None], list[str]]:
        sid = await _session(s)
        job = await s.jobs.run(OWNER, sid, ["sleep", "30"])
        await asyncio.sleep(0.05)
        found = await s.jobs.processes(OWNER, sid)
        await s.jobs.kill(OWNER, sid, job.id, None)
        return [p["job_id"] for p in found], [job.id]

    owners, expected = run(body)
    assert owners == expected


def test_old_job_records_read_back(tmp_path: Path) -> None:
    # A database of the first schema, with a finished job: migrated, it reads back
    # with no usage and no signal, and the job can be recorded anew.
    old = sqlite3.connect(tmp_path / "old.db")
    old.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL,"
        " status_reason TEXT, limits TEXT NOT NULL, metadata TEXT NOT NULL,"
        " idempotency_key TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);"
        "INSERT INTO sessions VALUES ('ses_1', 'o', 'stopped', NULL, '{}', '{}', NULL, 't', 't');"
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),"
        " status TEXT NOT NULL, command TEXT NOT NULL, spec TEXT NOT NULL, exit_code INTEGER,"
        " failure_reason TEXT, error_message TEXT, created_at TEXT NOT NULL, started_at TEXT,"
        " finished_at TEXT);"
        "INSERT INTO jobs VALUES ('job_1', 'ses_1', 'failed', '[\"x\"]', '{}', 137,"
        " 'nonzero_exit', NULL, 't', 't', 't');"
    )
    old.commit()
    old.close()
    store = Store(tmp_path / "old.db")
    record = store.get_job("job_1")
    assert record is not None
    assert (record.usage, record.signal, record.exit_code) == (None, None, 137)
    record.signal, record.usage = "SIGKILL", {"wall_seconds": 1.0}
    store.update_job(record)
    again = store.get_job("job_1")
    assert again is not None and again.signal == "SIGKILL" and again.usage == {"wall_seconds": 1.0}
