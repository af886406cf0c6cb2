"""stdin of jobs on real sandboxes: given whole, streamed big, or driven interactively."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import select
import subprocess

import pytest
from tests.conftest import ServerProcess

from bastion import AsyncBastion, Bastion, JobStateError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_small_stdin_is_fed_and_closed(client: Bastion, sid: str) -> None:
    job = client.jobs.run_and_wait(sid, ["sh", "-c", "cat; echo done"], stdin="one\ntwo\n")
    assert job["output"]["console_output"] == "one\ntwo\ndone\n"  # type: ignore[index]


def test_binary_and_big_stdin_are_streamed_whole(client: Bastion, sid: str) -> None:
    data = os.urandom(24 << 20)
    job = client.jobs.run_and_wait(sid, ["sha256sum"], stdin=io.BytesIO(data), wait_timeout=120)
    digest = job["output"]["console_output"].split()[0]  # type: ignore[index]
    assert digest == hashlib.sha256(data).hexdigest()
    small_binary = b"\xff\x00\xfe"
    job = client.jobs.run_and_wait(sid, ["wc", "-c"], stdin=small_binary)
    assert job["output"]["console_output"].strip() == "3"  # type: ignore[index]


def test_interactive_stdin_drives_python(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["python3", "-u", "-i", "-q"], stdin=True)
    jid = job["job_id"]
    with client.jobs.stream(sid, jid) as events:
        client.jobs.write_stdin(sid, jid, "x = 6 * 7\nprint(x)\n")
        seen = ""
        for event in events:
            if event["type"] == "stdout":
                seen += event["data"]
                if "42" in seen:
                    break
        # It answered while its stdin is still open: now a second exchange, then EOF.
        client.jobs.write_stdin(sid, jid, "print(x + 1)\n")
        for event in events:
            if event["type"] == "stdout":
                seen += event["data"]
                if "43" in seen:
                    break
        client.jobs.close_stdin(sid, jid)
    final = client.jobs.wait(sid, jid, timeout=30)
    assert final["status"] == "completed"
    assert final["output"]["console_output"] == "42\n43\n"  # type: ignore[index]
    with pytest.raises(JobStateError):
        client.jobs.write_stdin(sid, jid, "too late\n")


def test_stdin_without_an_open_one_is_refused(client: Bastion, sid: str) -> None:
    job = client.jobs.run(sid, ["sleep", "30"])
    with pytest.raises(JobStateError, match="no open stdin"):
        client.jobs.write_stdin(sid, job["job_id"], "x")
    client.jobs.kill(sid, job["job_id"], "SIGKILL")


def test_async_stdin_and_kill(server: ServerProcess, sid: str) -> None:
    asyncio.run(_async_stdin_and_kill(server, sid))


async def _async_stdin_and_kill(server: ServerProcess, sid: str) -> None:
    async with AsyncBastion(base_url=server.url) as c:
        job = await c.jobs.run_and_wait(sid, ["tr", "a-z", "A-Z"], stdin=b"shout\n")
        assert job["output"]["console_output"] == "SHOUT\n"  # type: ignore[index]
        running = await c.jobs.run(sid, ["cat"], stdin=True)
        await c.jobs.write_stdin(sid, running["job_id"], b"part")
        async with c.jobs.stream(sid, running["job_id"]) as events:
            async for event in events:
                if event["type"] == "stdout" and "part" in event["data"]:
                    break  # cat echoed it: its stdin is live
        await c.jobs.kill(sid, running["job_id"], "SIGINT")
        final = await c.jobs.get(sid, running["job_id"])
        while final["status"] not in ("completed", "failed"):
            await asyncio.sleep(0.05)
            final = await c.jobs.get(sid, running["job_id"])
        assert final["failure_reason"] == "killed" and final["signal"] == "SIGINT"
        assert final["output"]["console_output"] == "part"  # type: ignore[index]


def test_a_job_that_never_reads_its_streamed_stdin_is_no_error(client: Bastion, sid: str) -> None:
    job = client.jobs.run_and_wait(sid, ["true"], stdin=io.BytesIO(os.urandom(4 << 20)))
    assert job["status"] == "completed"


def test_exec_forwards_a_pipe_and_answers_live(server: ServerProcess, sid: str) -> None:
    # `producer | bastion exec`: each line is answered while the pipe is still open.
    from tests.integration.test_cli import BIN, client_env

    script = "import sys\nfor line in sys.stdin: print(line.upper(), end='', flush=True)"
    proc = subprocess.Popen(
        [str(BIN / "bastion"), "exec", sid, "--", "python3", "-u", "-c", script],
        env=client_env(server.url),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    with proc:
        proc.stdin.write(b"first\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no answer while stdin was open"
        assert proc.stdout.readline() == b"FIRST\n"
        rest, errors = proc.communicate(b"second\n", timeout=30)
        assert rest == b"SECOND\n", errors
        assert proc.returncode == 0


def test_jobs_run_forwards_a_file_and_not_dev_null(server: ServerProcess, sid: str) -> None:
    from tests.integration.test_cli import BIN, client_env

    argv = [str(BIN / "bastion"), "jobs", "run", sid, "--", "wc", "-c"]
    env = client_env(server.url)
    piped = subprocess.run(argv, env=env, input=b"12345", capture_output=True, timeout=60)
    assert piped.stdout.strip() == b"5", piped.stderr
    empty = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert empty.stdout.strip() == b"0", empty.stderr
