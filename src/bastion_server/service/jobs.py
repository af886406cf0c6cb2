"""Jobs: commands run in a session's sandbox in the background, with durable results.

A job is recorded ``queued`` and answered at once; a task then starts it through the
runtime (``running``), appends its output to the job's log as it arrives, and records
the end (``completed`` for exit status 0, else ``failed`` with a reason); the start
and the end are each one compare-and-set in the store (``queued`` -> ``running`` ->
final), so any process on the store reads a job as it is.  Output goes to a
:class:`~bastion_server.store.joblog.JobLogStore`, and waiters and followers are woken
through :class:`~bastion_server.service.job_events.JobEvents`, so ``wait`` holds a
request open without polling.  The process of a running job, and the live registry
holding it, are the runner's: the server that owns the job's session.  The job's
timeout is enforced inside the sandbox by the agent (it kills the job's whole process
tree), with a server-side backstop a little later.

When the server begins to shut down, every hold ends at once with its documented
ending: a ``wait`` with the ``server_shutdown`` error, an event stream with an ``end``
event that says so; new jobs are refused.  The jobs themselves run on in their
sandboxes (started ``persist_as`` their id: the agent keeps each one's output,
bounded, and its end), and the next server takes them up again (:meth:`recover`):
it attaches to each past what its log holds, and the job ends as any other.  Only a
job whose sandbox died meanwhile is failed, ``sandbox_lost``.  Once its end is
recorded, the sandbox is told to forget it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import signal as signals
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bastion.wire import (
    FINAL_JOB_STATUSES,
    MAX_COMMAND_ARGS,
    MAX_COMMAND_BYTES,
    MAX_INLINE_STDIN,
    ErrorCode,
    JobEvent,
    JobInfo,
    JobOutput,
    JobStatus,
    JobUsageInfo,
    ProcessInfo,
    SessionStatus,
)
from bastion_server import faults
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    JobLimits,
    OutputEvent,
    Process,
    Runtime,
    SandboxError,
)
from bastion_server.service.environment import validate_env
from bastion_server.service.errors import ServiceError, invalid, job_not_found, shutting_down
from bastion_server.service.job_events import JobEvents, LocalJobEvents
from bastion_server.service.paging import Page, PageRequest, creation_key, take_page
from bastion_server.service.sessions import SessionService, new_id, now_iso
from bastion_server.store.joblog import JobLogAppender, JobLogStore, LocalJobLogs, stream_decoders
from bastion_server.store.sqlite import JobRecord, Store
from bastion_server.tasks import spawn

log = logging.getLogger("bastion.jobs")

MAX_TIMEOUT = 7 * 24 * 3600.0
#: How long after its timeout the server stops waiting for the agent to end a job.
TIMEOUT_BACKSTOP = 5.0

_FAILURE_MESSAGES = {
    "timeout": "the job ran past its timeout of {timeout}s and was killed",
    "session_stopped": "the session was stopped while the job ran",
    "session_deleted": "the session was deleted while the job ran",
    "server_restarted": "the server restarted while the job ran; its processes were killed",
    "sandbox_lost": "the session's sandbox stopped while the server was down; the job too",
    "lost": "the sandbox went away while the job ran",
    "node_lost": "the session's node left the cluster while the job ran",
    "killed": "the job was killed",
    "oom": "the job ran out of memory and the kernel's OOM killer ended it",
    "cpu_time": "the job used its CPU time limit of {cpu_seconds}s and was killed",
    "pids_limit": "the job reached its limit of {pids} processes (a fork was refused)",
    "output_limit": "the job's output exceeded its limit of {output_bytes} bytes per stream"
    " and the job was killed",
}

#: The statuses a job's end may be recorded from (its start: from queued only).
_UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)

#: The per-job limits a run may set: name -> the session limit it must stay within.
_JOB_LIMITS = {"memory_mb": "memory_mb", "cpu_seconds": None, "pids": "pids", "output_bytes": None}


def signal_number(value: Any) -> int:
    """A signal given by name ("SIGTERM", "TERM") or number, checked."""
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in signals.Signals.__members__:
            return int(signals.Signals[name])
    elif isinstance(value, int) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return int(signals.Signals(value))
    raise invalid(f"signal must be a signal name such as 'SIGTERM' or its number, not {value!r}")


def signal_name(number: int | None) -> str | None:
    if number is None:
        return None
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _job_state(message: str) -> ServiceError:
    return ServiceError(ErrorCode.JOB_STATE, message)


def _internal_failure(doing: str, exc: Exception) -> str:
    """What the job's record says of a failure inside the server (no host paths)."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"internal error: the server could not {doing}: {detail or type(exc).__name__}"


def _seconds_since(iso: str | None) -> float:
    """Seconds from an ISO timestamp of now_iso() to now (0 without one)."""
    if iso is None:
        return 0.0
    started = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return max((datetime.now(UTC) - started).total_seconds(), 0.0)


def _dropped(writer: JobLogAppender, event: ExitEvent | None) -> dict[str, int]:
    """What the log lacks of each stream: what it dropped, or what a persistent job
    wrote past it (its sandbox counted it, say while no server listened)."""
    produced = (event.output_bytes if event is not None else None) or {}
    return {
        stream: max(dropped, produced.get(stream, 0) - writer.kept[stream])
        for stream, dropped in writer.dropped.items()
    }


@dataclass
class _LiveJob:
    """What only a running job has: its process, waiters and a reason to stop it."""

    record: JobRecord
    process: Process | None = None
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    #: Set when the server itself failed while running the job (the record's message).
    internal_error: str | None = None
    #: Set once the process started (or the job ended without starting).
    started: asyncio.Event = field(default_factory=asyncio.Event)
    #: The job's whole stdin, given with the run request (fed, then closed).
    inline_stdin: bytes | None = None
    #: Its stdin pipe is open for ``write_stdin`` (``"stdin": true``).
    stdin_open: bool = False
    #: One writer of stdin at a time (chunks of two bodies must not interleave).
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The signal a kill request sent (the job may have handled it).
    kill_signal: int | None = None
    #: A stream went past the job's ``output_bytes``: it was killed for it.
    output_limited: bool = False
    #: Started by an earlier server and taken up again (Runtime.attach).
    reattach: bool = False
    #: The server shuts down: the job runs on in its sandbox, for the next server.
    detached: bool = False


class JobService:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        sessions: SessionService,
        config: ServerConfig,
        *,
        logs: JobLogStore | None = None,
        events: JobEvents | None = None,
    ) -> None:
        self.store, self.runtime, self.sessions, self.config = store, runtime, sessions, config
        self.logs: JobLogStore = logs or LocalJobLogs(config.data_dir / "jobs")
        self.events: JobEvents = events or LocalJobEvents()
        #: The jobs this server runs now (their processes): the live registry.
        self._live: dict[str, _LiveJob] = {}
        self._shutting_down = False
        sessions.before_sandbox_stops.append(self.stop_session_jobs)
        sessions.busy_checks.append(self.has_running_jobs)

    def has_running_jobs(self, session_id: str) -> bool:
        return any(j.record.session_id == session_id for j in self._live.values())

    # -- validation -----------------------------------------------------------------

    @staticmethod
    def _validate(command: Any, env: Any, cwd: Any, timeout: Any) -> None:
        if not isinstance(command, list) or not command:
            raise ServiceError(
                ErrorCode.INVALID_COMMAND, "command must be a non-empty list of strings"
            )
        if len(command) > MAX_COMMAND_ARGS or not all(isinstance(a, str) for a in command):
            raise ServiceError(
                ErrorCode.INVALID_COMMAND, f"command must be at most {MAX_COMMAND_ARGS} strings"
            )
        if not command[0]:
            raise ServiceError(ErrorCode.INVALID_COMMAND, "command[0] must not be empty")
        if (
            any("\x00" in a for a in command)
            or sum(len(a.encode()) for a in command) > MAX_COMMAND_BYTES
        ):
            raise ServiceError(
                ErrorCode.INVALID_COMMAND,
                f"command must hold no NUL bytes and at most {MAX_COMMAND_BYTES} bytes",
            )
        validate_env(env)
        if cwd is not None and (
            not isinstance(cwd, str) or not cwd.startswith("/") or "\x00" in cwd or len(cwd) > 4096
        ):
            raise invalid("cwd must be an absolute path")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TIMEOUT
        ):
            raise invalid(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:.0f}]")

    @staticmethod
    def _validate_stdin(stdin: Any) -> bytes | None:
        """The job's whole stdin if given inline (None for none, or an open pipe)."""
        if stdin is None or isinstance(stdin, bool):
            return None
        if not isinstance(stdin, str):
            raise invalid("stdin must be true, false or a string (the job's whole input)")
        data = stdin.encode("utf-8", "surrogateescape")
        if len(data) > MAX_INLINE_STDIN:
            raise ServiceError(
                ErrorCode.LIMIT_EXCEEDED,
                f"inline stdin is {len(data)} bytes, over {MAX_INLINE_STDIN}: run the job "
                "with stdin true and send its input to POST .../jobs/{job_id}/stdin",
            )
        return data

    def _validate_limits(self, limits: Any, session_limits: dict[str, Any]) -> dict[str, int]:
        """The job's own limits, each a positive integer within the session's."""
        if limits is None:
            return {}
        if not isinstance(limits, dict) or set(limits) - set(_JOB_LIMITS):
            raise invalid(f"limits must be an object of {', '.join(_JOB_LIMITS)}")
        caps: dict[str, tuple[int, str]] = {
            "cpu_seconds": (int(MAX_TIMEOUT), "the longest job"),
            "output_bytes": (self.config.max_output_bytes, "the server's output cap"),
        }
        for name, session_name in _JOB_LIMITS.items():
            if session_name is not None and session_name in session_limits:
                caps[name] = (int(session_limits[session_name]), "the session's own")
        checked: dict[str, int] = {}
        for name, value in limits.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid(f"limits.{name} must be a positive integer")
            cap, whose = caps[name]
            if value > cap:
                raise ServiceError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"limits.{name} of {value} is over {whose} ({cap})",
                )
            checked[name] = value
        return checked

    # -- commands -------------------------------------------------------------------

    async def run(
        self,
        owner: str,
        session_id: str,
        command: Any,
        *,
        env: Any = None,
        cwd: Any = None,
        timeout: Any = None,
        stdin: Any = None,
        limits: Any = None,
        user: Any = None,
    ) -> JobRecord:
        """Record a job and start it.  ``stdin``: True keeps the job's stdin open for
        :meth:`write_stdin`, text is its whole input; ``limits``: see JobLimitsRequest;
        ``user``: "root" runs it as the sandbox's root (root of the session's user
        namespace only), "user" or None as the sandbox user."""
        self._validate(command, env, cwd, timeout)
        if user not in (None, "user", "root"):
            raise invalid('user must be "user" (the default) or "root"')
        inline_stdin = self._validate_stdin(stdin)
        session = self.sessions.require_running(owner, session_id)
        job_limits = self._validate_limits(limits, session.limits)
        if self._shutting_down:
            raise shutting_down()  # it would be killed before it could finish
        job_id = new_id("job")
        self.sessions.quotas.admit_job(job_id, owner, session_id)  # no await until spawned
        record = JobRecord(
            id=job_id,
            session_id=session_id,
            status=JobStatus.QUEUED,
            command=list(command),
            spec={
                "env": env or {},
                "cwd": cwd,
                "timeout": timeout,
                **({"stdin": True} if stdin is True else {}),
                **({"limits": job_limits} if job_limits else {}),
                **({"user": "root"} if user == "root" else {}),
            },
            created_at=now_iso(),
        )
        try:
            self.store.insert_job(record)
        except BaseException:
            self.sessions.quotas.job_ended(job_id)
            raise
        faults.point("job.after_insert")
        live = _LiveJob(record, inline_stdin=inline_stdin, stdin_open=stdin is True)
        self._live[record.id] = live
        live.task = spawn(self._execute(live), name=f"job {record.id}")
        return record

    def get(self, owner: str, session_id: str, job_id: str) -> JobRecord:
        self.sessions.get(owner, session_id)
        live = self._live.get(job_id)
        record = live.record if live else self.store.get_job(job_id)
        if record is None or record.session_id != session_id:
            raise job_not_found(job_id)
        return record

    def list(self, owner: str, session_id: str, page: PageRequest) -> Page[JobRecord]:
        """One page of the session's jobs, oldest first (live ones as they are now)."""
        self.sessions.get(owner, session_id)
        stored = self.store.page_jobs(session_id, page.after("jobs", 2), page.limit + 1)
        rows = [self._live[j.id].record if j.id in self._live else j for j in stored]
        return take_page("jobs", rows, page.limit, creation_key)

    async def wait(
        self, owner: str, session_id: str, job_id: str, timeout: float | None
    ) -> JobRecord:
        """The job once it is final, or as it is when ``timeout`` passes.

        Raises the ``server_shutdown`` error if the server begins to shut down first.
        """
        record = self.get(owner, session_id, job_id)
        hold = (
            self.config.max_wait_seconds
            if timeout is None
            else min(max(timeout, 0.0), self.config.max_wait_seconds)
        )
        live = self._live.get(job_id)
        if live is None or record.status in FINAL_JOB_STATUSES:
            return record
        with self.events.listen(job_id) as waker, contextlib.suppress(TimeoutError):
            async with asyncio.timeout(hold):
                while live.record.status not in FINAL_JOB_STATUSES:
                    if self._shutting_down:
                        raise shutting_down()
                    waker.clear()
                    await waker.wait()
        return live.record

    async def follow(self, owner: str, session_id: str, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's status changes and output from its start, live, then its end.

        Output is replayed from the job's log, so a follower that comes late (even
        after the job finished, or after a server restart) misses nothing.  The final
        status and the "end" event come only after the last byte of output.  If the
        server begins to shut down first, the stream ends with an "end" event of the
        job as it is, with ``"reason": "server_shutdown"``.
        """
        self.get(owner, session_id, job_id)
        decoders = stream_decoders()
        offset, last_status, last_stderr, looked_again = 0, None, "", False
        with self.events.listen(job_id) as waker:
            while True:
                waker.clear()
                current = self._live.get(job_id)
                record = current.record if current else self.store.get_job(job_id)
                if record is None:  # its session was deleted while we followed
                    return
                status = record.status  # read before the output: final means all written
                final = status in FINAL_JOB_STATUSES
                if not final and status != last_status:
                    last_status = status
                    yield {"type": "status", "status": status}  # type: ignore[typeddict-item]
                for stream, data, next_offset in self.logs.records(job_id, offset):
                    offset = next_offset
                    text = decoders[stream].decode(data)
                    if text:
                        last_stderr = text if stream == "stderr" else last_stderr
                        yield {"type": stream, "data": text}  # type: ignore[typeddict-item]
                if final:
                    for stream, decoder in decoders.items():
                        if text := decoder.decode(b"", final=True):
                            last_stderr = text if stream == "stderr" else last_stderr
                            yield {"type": stream, "data": text}  # type: ignore[typeddict-item]
                    # The stream says what errout says, to the letter.
                    if note := self._server_note(record, last_stderr):
                        yield {"type": "stderr", "data": note}
                    yield {"type": "status", "status": status}  # type: ignore[typeddict-item]
                    yield {"type": "end", "job": self.view(record)}
                    return
                if current is None and not looked_again:
                    looked_again = True  # finished between our two reads: go round once
                    continue  # more (one not run here is read again after the wait)
                if self._shutting_down:
                    yield {"type": "end", "job": self.view(record), "reason": "server_shutdown"}
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await waker.wait()

    # -- stdin, signals, processes --------------------------------------------------

    async def _running(self, owner: str, session_id: str, job_id: str) -> _LiveJob:
        """The job, once its process started; JOB_STATE if it ended (or never ran)."""
        record = self.get(owner, session_id, job_id)
        live = self._live.get(job_id)
        if live is not None:
            await live.started.wait()
        if live is None or live.process is None or job_id not in self._live:
            raise _job_state(f"job {job_id!r} is {record.status}: it is not running")
        return live

    async def write_stdin(
        self,
        owner: str,
        session_id: str,
        job_id: str,
        chunks: AsyncIterable[bytes],
        *,
        close: bool = False,
    ) -> tuple[int, bool]:
        """Feed ``chunks`` to the job's stdin as they come (each is sent before the next
        is read: a big input is never held whole), then close it if ``close``.  The
        job must have been run with ``stdin`` true.  Returns (bytes written, closed);
        input the job no longer reads is dropped by the sandbox."""
        live = await self._running(owner, session_id, job_id)
        if not live.stdin_open:
            raise _job_state(
                f"job {job_id!r} has no open stdin (run it with stdin true; "
                "it may have been closed already)"
            )
        written = 0
        async with live.stdin_lock:
            process = live.process
            assert process is not None
            try:
                async for chunk in chunks:
                    if chunk:
                        await process.send_input(chunk)
                        written += len(chunk)
                if close and live.stdin_open:
                    live.stdin_open = False
                    await process.close_input()
            except (SandboxError, ConnectionError) as exc:
                raise _job_state(f"job {job_id!r} ended while its stdin was written") from exc
        return written, not live.stdin_open

    async def kill(self, owner: str, session_id: str, job_id: str, signal: Any) -> JobRecord:
        """Send ``signal`` (default SIGTERM) to every process of the job (SIGKILL: kill
        its tree at once); the job then ends ``failed`` with ``failure_reason``
        "killed"."""
        number = signal_number("SIGTERM" if signal is None else signal)
        live = await self._running(owner, session_id, job_id)
        live.kill_signal = number
        assert live.process is not None
        await live.process.kill(number)
        return live.record

    async def processes(self, owner: str, session_id: str) -> builtins.list[ProcessInfo]:
        """Every process of a running session, with the running job each belongs to
        (the job whose supervisor, the agent's process for it, is an ancestor)."""
        self.sessions.require_running(owner, session_id)
        try:
            found = await self.runtime.processes(session_id)
        except SandboxError as exc:
            raise ServiceError(ErrorCode.SESSION_STATE, str(exc)) from exc
        supervisors = {
            live.process.pid: job_id
            for job_id, live in self._live.items()
            if live.record.session_id == session_id
            and live.process is not None
            and live.process.pid is not None
        }
        parents = {p.pid: p.ppid for p in found}

        def job_of(pid: int) -> str | None:
            for _ in range(len(parents) + 1):
                if pid in supervisors:
                    return supervisors[pid]
                if pid not in parents:
                    return None
                pid = parents[pid]
            return None

        return [
            {
                "pid": p.pid,
                "ppid": p.ppid,
                "user": p.user,
                "command": p.command,
                "cpu_seconds": round(p.cpu_seconds, 3),
                "memory_bytes": p.memory_bytes,
                "job_id": job_of(p.pid),
            }
            for p in found
        ]

    def view(self, record: JobRecord, *, with_output: bool = True) -> JobInfo:
        """The job as the wire shows it; the output only once the job is final (and
        only when asked: a listing of many jobs carries none)."""
        output: JobOutput | None = None
        if with_output and record.status in FINAL_JOB_STATUSES:
            stdout, stderr = self.output(record)
            output = {"console_output": stdout, "errout": stderr, "status_code": record.exit_code}
        return {
            "job_id": record.id,
            "session_id": record.session_id,
            "status": record.status,  # type: ignore[typeddict-item]
            "command": record.command,
            "output": output,
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "failure_reason": record.failure_reason,
            "signal": record.signal,
            "usage": record.usage,  # type: ignore[typeddict-item]
        }

    def output(self, record: JobRecord) -> tuple[str, str]:
        stdout = "".join(self.logs.text(record.id, "stdout"))
        stderr = "".join(self.logs.text(record.id, "stderr"))
        return stdout, stderr + self._server_note(record, stderr)

    def output_size(self, record: JobRecord) -> int:
        """Bytes in the job's output log (both streams, with framing)."""
        return self.logs.size(record.id)

    def iter_output(self, record: JobRecord, stream: str) -> Iterator[str]:
        """One stream of a final job's output in chunks, as ``output()`` would give it
        whole (the server's note ends stderr): for answers that must not hold it all."""
        last = ""
        for text in self.logs.text(record.id, stream):
            last = text
            yield text
        if stream == "stderr" and (note := self._server_note(record, last)):
            yield note

    @staticmethod
    def _server_note(record: JobRecord, stderr_so_far: str) -> str:
        """What the server adds to a job's stderr: why it ended, or what was dropped."""
        if not record.error_message:
            return ""
        newline = "\n" if stderr_so_far and not stderr_so_far.endswith("\n") else ""
        return f"{newline}bastion: {record.error_message}\n"

    async def stop_session_jobs(self, session_id: str, reason: str) -> None:
        """Kill every running job of a session and wait until each is recorded.  A job
        recorded unfinished that this server does not run (an earlier server's, not
        taken up yet: a session lost with its node while the gateway was down) is
        recorded ended for the same ``reason``."""
        for record in self.store.list_unfinished_jobs(session_id):
            if record.id not in self._live:
                self._finish(record, exit_code=None, reason=reason)
        victims = [j for j in self._live.values() if j.record.session_id == session_id]
        for live in victims:
            live.stop_reason = reason
            if live.process is not None:
                await live.process.kill()
        tasks = [j.task for j in victims if j.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if reason == "session_deleted":
            # Delete is irreversible: the output of the session's jobs goes with it
            # (thousands of files, maybe: removed off the event loop).
            jobs = [record.id for record in self.store.list_jobs(session_id)]
            await asyncio.to_thread(self.logs.remove, jobs)

    def begin_shutdown(self) -> None:
        """The server is shutting down: end every wait and stream now, refuse new jobs."""
        self._shutting_down = True
        for job_id in self._live:
            self.events.notify(job_id)

    async def shutdown(self) -> None:
        """Server shutdown: running jobs are left to run on in their sandboxes, for the
        next server to take up (where the runtime cannot keep them, they end as failed,
        their processes killed)."""
        self.begin_shutdown()
        for live in list(self._live.values()):
            if self.runtime.reattaches_jobs:
                live.detached = True
            else:
                live.stop_reason = "server_restarted"
            if live.task is not None:
                live.task.cancel()
        tasks = [j.task for j in self._live.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    def recover(self) -> None:
        """After a restart (and the sessions' reconcile): the jobs an earlier server
        left unfinished.  Those of a session whose sandbox still runs are taken up
        again, their output from where the log ends; the rest failed ``sandbox_lost``
        (``server_restarted`` if the job never started, or the runtime cannot keep
        jobs across a restart)."""
        for record in self.store.unfinished_jobs():
            session = self.store.get_session(record.session_id)
            up = session is not None and session.status in (
                SessionStatus.RUNNING,
                SessionStatus.PAUSED,
            )
            if session is not None and up and self.runtime.reattaches_jobs:
                # Counted as running (the quota admitted it before the restart).
                with contextlib.suppress(ServiceError):
                    self.sessions.quotas.admit_job(record.id, session.owner, record.session_id)
                live = _LiveJob(record, stdin_open=bool(record.spec.get("stdin")), reattach=True)
                self._live[record.id] = live
                live.task = spawn(self._execute(live), name=f"job {record.id}")
            elif record.started_at is None:
                message = "the server restarted before the job started"
                self._finish(record, exit_code=None, reason="server_restarted", message=message)
            else:
                reason = "sandbox_lost" if self.runtime.reattaches_jobs else "server_restarted"
                self._finish(record, exit_code=None, reason=reason)

    # -- execution ------------------------------------------------------------------

    def _finish(
        self,
        record: JobRecord,
        exit_code: int | None,
        reason: str | None,
        message: str | None = None,
        note: str | None = None,
    ) -> None:
        """Record the end of a job in one write; ``note`` adds to what the server says."""
        record.exit_code = exit_code
        record.finished_at = now_iso()
        if reason is None and exit_code == 0:
            record.status = JobStatus.COMPLETED
        else:
            record.status = JobStatus.FAILED
            record.failure_reason = reason or "nonzero_exit"
            if reason is not None:
                record.error_message = message or _FAILURE_MESSAGES.get(reason, reason).format(
                    timeout=record.spec.get("timeout"), **(record.spec.get("limits") or {})
                )
        if note:
            record.error_message = (
                f"{record.error_message}; {note}" if record.error_message else note
            )
        if not self.store.update_job(record, expected=_UNFINISHED):
            # Another process recorded its end first (it took the job over): that stays.
            log.warning("job's end already recorded", extra={"job_id": record.id})
            return
        session = self.store.get_session(record.session_id)
        self.sessions.audit.job_ended(record, session.owner if session else None)

    async def _execute(self, live: _LiveJob) -> None:
        record = live.record
        limits = record.spec.get("limits") or {}
        output_cap = limits.get("output_bytes")
        writer = self.logs.writer(
            record.id,
            min(output_cap or self.config.max_output_bytes, self.config.max_output_bytes),
        )
        exit_event: ExitEvent | None = None
        doing = "start the job"
        try:
            spec = ExecSpec(
                argv=record.command,
                env=self.sessions.job_env(record.session_id, record.spec["env"]),
                cwd=record.spec.get("cwd"),
                timeout=record.spec.get("timeout"),
                stdin=live.stdin_open or live.inline_stdin is not None,
                user=record.spec.get("user"),
                limits=JobLimits(
                    memory_mb=limits.get("memory_mb"),
                    pids=limits.get("pids"),
                    cpu_seconds=limits.get("cpu_seconds"),
                ),
                persist_as=record.id if self.runtime.reattaches_jobs else None,
                spool_bytes=writer.max_bytes_per_stream,
            )
            if live.reattach:
                try:
                    live.process = await self._reattach(live, writer)
                except SandboxError:
                    exit_event = ExitEvent(exit_code=None, error="sandbox_lost")
                    return
            else:
                try:
                    live.process = await self.runtime.exec(record.session_id, spec)
                except SandboxError as exc:
                    exit_event = ExitEvent(exit_code=None, error="lost", message=str(exc))
                    return
            if live.inline_stdin is not None:
                if live.inline_stdin:
                    await live.process.send_input(live.inline_stdin)
                await live.process.close_input()
                live.inline_stdin = None
            live.started.set()
            if not live.reattach:  # (one taken up again keeps its start, or has none)
                # Written now: a job the server's death interrupts keeps its real start.
                live.record.status, live.record.started_at = JobStatus.RUNNING, now_iso()
                if not self.store.update_job(live.record, expected=(JobStatus.QUEUED,)):
                    log.warning("job's start not recorded", extra={"job_id": record.id})
            self.events.notify(record.id)
            doing = "collect the job's output"
            faults.point("job.after_start")
            # From the job's real start (a job taken up again may be past its timeout,
            # its end kept by the agent: time enough is left to read that end).
            backstop = (
                max(spec.timeout - _seconds_since(record.started_at), 0) + TIMEOUT_BACKSTOP
                if spec.timeout
                else None
            )
            try:
                async with asyncio.timeout(backstop):
                    async for event in live.process.events():
                        if isinstance(event, OutputEvent):
                            if writer.append(event.stream, event.data):
                                self.events.notify(record.id)
                            if (
                                output_cap
                                and not live.output_limited
                                and any(writer.dropped.values())
                            ):
                                live.output_limited = True
                                await live.process.kill()
                            faults.point("job.after_output")
                        else:
                            exit_event = event
            except TimeoutError:
                await live.process.kill()
                exit_event = ExitEvent(exit_code=None, timed_out=True, error="timeout")
        except asyncio.CancelledError:
            exit_event = None
        except SandboxError as exc:  # the agent's connection failed under the job
            exit_event = ExitEvent(exit_code=None, error="lost", message=str(exc))
        except Exception as exc:  # a failure of the server itself: say so, and log it
            live.internal_error = _internal_failure(doing, exc)
            log.exception("job failed inside the server", extra={"job_id": record.id})
            if live.process is not None:
                await live.process.kill()  # nobody collects its output any more
        finally:
            try:
                writer.close()
                if not live.detached:
                    self._record_end(live, exit_event, _dropped(writer, exit_event))
                    if live.process is not None and exit_event is not None:
                        await live.process.forget()  # recorded: the sandbox may drop it
            finally:
                if live.process is not None:
                    await live.process.close()  # (a persistent job runs on, detached)
                self._live.pop(record.id, None)
                live.started.set()  # a stdin writer or kill waiting for the start: it ended
                self.sessions.quotas.job_ended(record.id)
                self.events.notify(record.id)
                self.sessions.touch(record.session_id)  # idle time counts from the job's end

    async def _reattach(self, live: _LiveJob, writer: JobLogAppender) -> Process:
        """Take up a job an earlier server started, past what its log holds."""
        await asyncio.to_thread(writer.resume)
        log.info("job taken up again", extra={"job_id": live.record.id})
        return await self.runtime.attach(
            live.record.session_id, live.record.id, writer.kept["stdout"], writer.kept["stderr"]
        )

    @staticmethod
    def _hit_cpu_limit(record: JobRecord, event: ExitEvent) -> bool:
        """The kernel ended the job for its CPU time: SIGXCPU at the soft limit, or
        SIGKILL at the hard one (a second later) with the CPU time to show for it."""
        limit = (record.spec.get("limits") or {}).get("cpu_seconds")
        if limit is None or event.signal not in (signals.SIGXCPU, signals.SIGKILL):
            return False
        if event.signal == signals.SIGXCPU:
            return True
        used = event.usage.user_cpu_seconds + event.usage.system_cpu_seconds if event.usage else 0
        return bool(used >= limit * 0.95)

    @staticmethod
    def _usage_view(event: ExitEvent) -> JobUsageInfo | None:
        if event.usage is None:
            return None
        return {
            "wall_seconds": round(event.usage.wall_seconds, 6),
            "user_cpu_seconds": round(event.usage.user_cpu_seconds, 6),
            "system_cpu_seconds": round(event.usage.system_cpu_seconds, 6),
            "peak_memory_bytes": event.usage.peak_memory_bytes,
        }

    def _record_end(self, live: _LiveJob, event: ExitEvent | None, dropped: dict[str, int]) -> None:
        record = live.record
        reason: str | None = None
        message: str | None = None
        if live.stop_reason is not None and (
            event is None or event.error in ("killed", "lost") or event.exit_code is None
        ):
            reason = live.stop_reason
        elif live.internal_error is not None:
            reason, message = "internal_error", live.internal_error
        elif event is None:
            reason = "server_restarted"
        elif event.timed_out:
            reason = "timeout"
        elif live.kill_signal is not None and event.error == "killed":
            reason = "killed"
            message = f"the job was killed on request with {signal_name(live.kill_signal)}"
        elif live.output_limited:
            reason = "output_limit"
        elif event.oom_killed:
            reason = "oom"
        elif self._hit_cpu_limit(record, event):
            reason = "cpu_time"
        elif event.error == "invalid_cwd":
            reason = event.error
            cwd = record.spec.get("cwd") or "the home directory"
            message = f"cannot enter the working directory {cwd}: {event.message}"
        elif event.error in ("not_found", "exec_failed", "start_failed"):
            reason = event.error
            message = (
                f"command not found: {record.command[0]}"
                if event.error == "not_found"
                else f"cannot run {record.command[0]}: {event.message}"
            )
        elif event.error in ("unknown_job", "sandbox_lost") and record.started_at is None:
            reason, message = "server_restarted", "the server restarted before the job started"
        elif event.error in ("unknown_job", "sandbox_lost"):  # its sandbox is not the one
            reason = "sandbox_lost"  # that ran it (restarted, or gone)
        elif event.error is not None:
            reason, message = event.error, event.message
        elif event.pids_refused and event.exit_code != 0:
            reason = "pids_limit"
        exit_code = event.exit_code if event is not None else None
        if event is not None:
            record.signal = signal_name(event.signal)
            usage = self._usage_view(event)
            record.usage = dict(usage) if usage is not None else None
        truncation = None
        if any(dropped.values()):
            log.warning("job output truncated", extra={"job_id": record.id, "dropped": dropped})
            lost = ", ".join(f"{n} bytes of {s}" for s, n in dropped.items() if n)
            cap = min(
                (record.spec.get("limits") or {}).get("output_bytes")
                or self.config.max_output_bytes,
                self.config.max_output_bytes,
            )
            truncation = f"output truncated at {cap} bytes per stream ({lost} dropped)"
        self._finish(record, exit_code, reason, message, truncation)
        if reason == "lost":
            # The sandbox may have died under the job: let the session say so.
            spawn(self.sessions.check_sandbox(record.session_id), name="check sandbox")
        log.info(
            "job finished",
            extra={
                "job_id": record.id,
                "session_id": record.session_id,
                "status": record.status,
                "exit_code": exit_code,
                "reason": record.failure_reason,
            },
        )
