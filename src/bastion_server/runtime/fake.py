"""An in-memory backend that honours the runtime contract, for fast tests without root.

:class:`FakeRuntime` keeps each sandbox's state in memory and its files in a plain host
directory of its own (acted on as the current user), and runs *programs*: small async
functions named by ``argv[0]`` that write output, read input and return an exit status.
A handful are built in (``echo``, ``cat``, ``sleep``, ``true``, ``false``, ``exit``,
``pwd``, ``env``); a test registers more with :meth:`FakeRuntime.program`.  Nothing is
isolated: it exists so that the session state machine, the job lifecycle and the reaper
can be tested in milliseconds, and every real-sandbox suite stays as it is.

Faults are injected with :meth:`FakeRuntime.fail`: the next call of the named operation
raises the given :class:`SandboxError` instead of doing its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import signal as signals
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    JobUsage,
    OutputEvent,
    Process,
    Runtime,
    SandboxError,
    SandboxLimits,
    SandboxNotRunning,
    SandboxProcess,
    SandboxUsage,
)
from bastion_server.runtime.files import SandboxFiles
from bastion_server.runtime.host_files import HostFiles
from bastion_server.runtime.sandbox_fs import SandboxFS

if TYPE_CHECKING:
    from bastion_server.runtime.network import NetworkPolicy
    from bastion_server.runtime.sandbox_image import SandboxImage


_PIDS = itertools.count(2)


class FakeProcess(Process):
    """A running program: what it writes becomes events; ``kill`` cancels it (with a
    signal, the program ends as if killed by it).  Its exit event carries usage (the
    wall time; no CPU time); a program that returns an ExitEvent reports that one (a
    test's OOM kill, say)."""

    def __init__(self, spec: ExecSpec, sandbox: FakeSandbox) -> None:
        self.spec, self.sandbox = spec, sandbox
        self._events: asyncio.Queue[OutputEvent | ExitEvent] = asyncio.Queue()
        self._input: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._killed = False
        self._kill_signal: int | None = None
        self.input_closed = False
        self.pid: int = next(_PIDS)
        self.size = (spec.rows, spec.cols)
        # A persistent process (spec.persist_as) is kept as the agent keeps one: its
        # output spooled (up to spec.spool_bytes per stream), its end recorded.
        self.spool: list[OutputEvent] = []
        self.spooled = {"stdout": 0, "stderr": 0}
        self.produced = {"stdout": 0, "stderr": 0}
        self.ended: ExitEvent | None = None
        self.changed = asyncio.Event()

    # -- what a program sees ------------------------------------------------------------

    def write(self, data: bytes | str, stream: str = "stdout") -> None:
        if isinstance(data, str):
            data = data.encode()
        if data:
            self._events.put_nowait(OutputEvent(stream, data))
            if self.spec.persist_as is not None:
                self.produced[stream] += len(data)
                cap = self.spec.spool_bytes
                kept = data if cap is None else data[: max(cap - self.spooled[stream], 0)]
                if kept:
                    self.spooled[stream] += len(kept)
                    self.spool.append(OutputEvent(stream, kept))
                self.changed.set()

    async def read(self) -> bytes | None:
        """The next chunk of input; None once input is closed."""
        return await self._input.get()

    # -- the Process contract -------------------------------------------------------------

    def begin(self, program: Program) -> None:
        self._task = asyncio.create_task(self._run(program), name=f"fake:{self.spec.argv[0]}")
        self.sandbox.processes.add(self)

    async def _run(self, program: Program) -> None:
        exit_event: ExitEvent
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.spec.timeout):
                status = await program(self)
            exit_event = status if isinstance(status, ExitEvent) else ExitEvent(exit_code=status)
        except TimeoutError:
            exit_event = ExitEvent(exit_code=None, signal=9, timed_out=True, error="timeout")
        except asyncio.CancelledError:
            sig = self._kill_signal or signals.SIGKILL
            exit_event = ExitEvent(
                exit_code=None, signal=sig, error="killed", kill_signal=self._kill_signal
            )
        except Exception as exc:  # a program's bug is the test's: report it as a crash
            exit_event = ExitEvent(exit_code=None, error="lost", message=repr(exc))
        if exit_event.usage is None and exit_event.error != "lost":
            usage = JobUsage(time.monotonic() - began, 0.0, 0.0, None)
            exit_event = dataclasses.replace(exit_event, usage=usage)
        self.sandbox.processes.discard(self)
        self.end(exit_event)

    def end(self, exit_event: ExitEvent) -> None:
        if self.spec.persist_as is not None:
            exit_event = dataclasses.replace(exit_event, output_bytes=dict(self.produced))
            self.ended = exit_event
            self.changed.set()
        self._events.put_nowait(exit_event)

    async def events(self) -> AsyncIterator[OutputEvent | ExitEvent]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, ExitEvent):
                return

    async def kill(self, signal: int | None = None) -> None:
        self._killed = True
        self._kill_signal = signal
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def send_input(self, data: bytes) -> None:
        self._input.put_nowait(data)

    async def close_input(self) -> None:
        self.input_closed = True
        self._input.put_nowait(None)

    async def resize(self, rows: int, cols: int) -> None:
        self.size = (rows, cols)

    async def close(self) -> None:
        if self.spec.persist_as is None:
            await self.kill()  # a persistent one runs on, for FakeRuntime.attach

    async def forget(self) -> None:
        if self.spec.persist_as is not None and self.ended is not None:
            self.sandbox.jobs.pop(self.spec.persist_as, None)


class FakeAttachment(Process):
    """A persistent process taken up again: its spool past the offsets, then what it
    writes live, then its exit (as the agent's attach gives them)."""

    def __init__(self, process: FakeProcess, stdout_offset: int, stderr_offset: int) -> None:
        self.process = process
        self.pid = process.pid
        self._skip = {"stdout": stdout_offset, "stderr": stderr_offset}

    async def events(self) -> AsyncIterator[OutputEvent | ExitEvent]:
        p, at = self.process, 0
        while True:
            p.changed.clear()
            for event in p.spool[at:]:
                await asyncio.sleep(0)  # as a read from the agent's socket would
                at += 1
                cut = min(self._skip[event.stream], len(event.data))
                self._skip[event.stream] -= cut
                if event.data[cut:]:
                    yield OutputEvent(event.stream, event.data[cut:])
            if p.ended is not None:
                yield p.ended
                return
            await p.changed.wait()

    async def kill(self, signal: int | None = None) -> None:
        await self.process.kill(signal)

    async def send_input(self, data: bytes) -> None:
        await self.process.send_input(data)

    async def close_input(self) -> None:
        await self.process.close_input()

    async def resize(self, rows: int, cols: int) -> None:
        await self.process.resize(rows, cols)

    async def close(self) -> None:
        pass  # detached again: it runs on

    async def forget(self) -> None:
        await self.process.forget()


#: A program: given its process, writes output, reads input, returns the exit status
#: (or the whole exit event).
Program = Callable[[FakeProcess], Awaitable[int | ExitEvent]]


async def _echo(p: FakeProcess) -> int:
    p.write(" ".join(p.spec.argv[1:]) + "\n")
    return 0


async def _cat(p: FakeProcess) -> int:
    while (chunk := await p.read()) is not None:
        p.write(chunk)
    return 0


async def _sleep(p: FakeProcess) -> int:
    await asyncio.sleep(float(p.spec.argv[1]) if len(p.spec.argv) > 1 else 0)
    return 0


async def _true(p: FakeProcess) -> int:
    return 0


async def _false(p: FakeProcess) -> int:
    return 1


async def _exit(p: FakeProcess) -> int:
    return int(p.spec.argv[1]) if len(p.spec.argv) > 1 else 0


async def _pwd(p: FakeProcess) -> int:
    p.write((p.spec.cwd or "/") + "\n")
    return 0


async def _env(p: FakeProcess) -> int:
    p.write("".join(f"{k}={v}\n" for k, v in sorted(p.spec.env.items())))
    return 0


BUILTIN_PROGRAMS: dict[str, Program] = {
    "echo": _echo,
    "cat": _cat,
    "sleep": _sleep,
    "true": _true,
    "false": _false,
    "exit": _exit,
    "pwd": _pwd,
    "env": _env,
}


def _empty_root(root: Path) -> None:
    """A new sandbox's files: a home and /tmp."""
    (root / "home" / "user").mkdir(parents=True)
    (root / "tmp").mkdir()


@dataclass
class FakeSandbox:
    root: Path
    limits: SandboxLimits
    running: bool = False
    #: Frozen by pause (still running: its processes wait for resume).
    paused: bool = False
    network: NetworkPolicy | None = None
    processes: set[FakeProcess] = field(default_factory=set)
    #: Persistent processes by job id, until forgotten (what its agent keeps).
    jobs: dict[str, FakeProcess] = field(default_factory=dict)


class FakeRuntime(Runtime):
    """Sandboxes as records in memory and a directory each; see the module docstring."""

    name = "fake"

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="bastion-fake-"))
        self.sandboxes: dict[str, FakeSandbox] = {}
        #: The image each sandbox was created from, when one was named.
        self.images: dict[str, SandboxImage] = {}
        self.programs: dict[str, Program] = dict(BUILTIN_PROGRAMS)
        self._faults: dict[str, SandboxError] = {}
        #: Every operation asked of the runtime, in order: ``(operation, session_id)``.
        self.calls: list[tuple[str, str]] = []

    # -- test controls ----------------------------------------------------------------

    def program(self, name: str, program: Program) -> None:
        """Make ``argv[0] == name`` run ``program``."""
        self.programs[name] = program

    def fail(self, operation: str, error: SandboxError | None = None) -> None:
        """The next call of ``operation`` ("create", "start", "stop", "delete", "exec",
        "pause", "resume", "check_layers", ...) raises ``error`` instead of doing anything."""
        self._faults[operation] = error or SandboxError(f"injected failure of {operation}")

    def crash(self, session_id: str) -> None:
        """The sandbox dies on its own, as if its init were killed: processes end lost."""
        sandbox = self.sandboxes[session_id]
        sandbox.running = False
        sandbox.jobs.clear()
        for process in list(sandbox.processes):
            if process._task is not None:
                process._task.cancel()

    def _enter(self, operation: str, session_id: str) -> None:
        self.calls.append((operation, session_id))
        fault = self._faults.pop(operation, None)
        if fault is not None:
            raise fault

    def _sandbox(self, session_id: str) -> FakeSandbox:
        sandbox = self.sandboxes.get(session_id)
        if sandbox is None:
            raise SandboxError(f"sandbox {session_id} has no storage")
        return sandbox

    def _running(self, session_id: str) -> FakeSandbox:
        sandbox = self.sandboxes.get(session_id)
        if sandbox is None or not sandbox.running:
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        return sandbox

    # -- the Runtime contract ---------------------------------------------------------

    async def prepare_host(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        for sandbox in self.sandboxes.values():
            for process in list(sandbox.processes):
                if process.spec.persist_as is None:  # the sandbox's: it outlives the server
                    await process.kill()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    async def create(
        self,
        session_id: str,
        limits: SandboxLimits,
        image: SandboxImage | None = None,
        layers: Sequence[str] = (),
    ) -> None:
        self._enter("create", session_id)
        if image is not None:
            self.images[session_id] = image
        if session_id in self.sandboxes:
            raise SandboxError(f"sandbox {session_id} already exists")
        root = self.root / session_id
        _empty_root(root)
        self.sandboxes[session_id] = FakeSandbox(root, limits)
        if layers:
            await self._copy_layers(self.sandboxes[session_id], layers)

    async def start(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None = None
    ) -> None:
        self._enter("start", session_id)
        sandbox = self._sandbox(session_id)
        sandbox.limits, sandbox.network, sandbox.running = limits, network, True

    async def restore_network(self, session_id: str, network: NetworkPolicy) -> None:
        self._enter("restore_network", session_id)
        self._running(session_id).network = network

    async def stop(self, session_id: str) -> None:
        self._enter("stop", session_id)
        sandbox = self.sandboxes.get(session_id)
        if sandbox is None:
            return
        for process in list(sandbox.processes):
            await process.kill()
        sandbox.running = sandbox.paused = False
        sandbox.jobs.clear()

    def image_of(self, session_id: str) -> SandboxImage | None:
        return self.images.get(session_id)

    async def delete(self, session_id: str) -> None:
        self._enter("delete", session_id)
        self.images.pop(session_id, None)
        sandbox = self.sandboxes.pop(session_id, None)
        if sandbox is None:
            return
        for process in list(sandbox.processes):
            await process.kill()
        await asyncio.to_thread(shutil.rmtree, sandbox.root, True)

    # Snapshots are whole copies of a sandbox's directory (no layers: nothing is shared).

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        return self.root / ".snapshots" / snapshot_id

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        self._enter("capture", session_id)
        sandbox = self._sandbox(session_id)
        target = self._snapshot_dir(snapshot_id)
        await asyncio.to_thread(shutil.copytree, sandbox.root, target, symlinks=True)
        return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())

    async def check_layers(self, session_id: str, layers: Sequence[str]) -> None:
        self._enter("check_layers", session_id)

    async def set_layers(self, session_id: str, layers: list[str]) -> None:
        self._enter("set_layers", session_id)
        sandbox = self._sandbox(session_id)
        if sandbox.running:
            raise SandboxError(f"sandbox {session_id} is running: stop it first")
        await self._copy_layers(sandbox, layers)

    async def restore(
        self,
        session_id: str,
        layers: list[str],
        limits: SandboxLimits,
        network: NetworkPolicy | None = None,
    ) -> None:
        try:
            self._enter("restore", session_id)
        except SandboxError:
            await self.stop(session_id)  # a restore that fails leaves it stopped
            raise
        await super().restore(session_id, layers, limits, network)

    async def _copy_layers(self, sandbox: FakeSandbox, layers: Sequence[str]) -> None:
        """The sandbox's files become the top snapshot's copy (none: empty again)."""
        if not all(self._snapshot_dir(name).is_dir() for name in layers):
            raise SandboxError(f"a snapshot of {layers} is missing")
        await asyncio.to_thread(shutil.rmtree, sandbox.root)
        if layers:  # the top snapshot is a whole copy already
            await asyncio.to_thread(
                shutil.copytree, self._snapshot_dir(layers[0]), sandbox.root, symlinks=True
            )
        else:
            _empty_root(sandbox.root)

    async def remove_snapshot(self, snapshot_id: str) -> None:
        self._enter("remove_snapshot", snapshot_id)
        await asyncio.to_thread(shutil.rmtree, self._snapshot_dir(snapshot_id), True)

    async def snapshot_ids(self) -> set[str]:
        snapshots = self.root / ".snapshots"
        return {p.name for p in snapshots.iterdir()} if snapshots.is_dir() else set()

    async def pause(self, session_id: str) -> None:
        self._enter("pause", session_id)
        self._running(session_id).paused = True

    async def resume(self, session_id: str) -> None:
        self._enter("resume", session_id)
        sandbox = self.sandboxes.get(session_id)
        if sandbox is not None:
            sandbox.paused = False

    async def is_running(self, session_id: str) -> bool:
        sandbox = self.sandboxes.get(session_id)
        return sandbox is not None and sandbox.running

    async def running_sandboxes(self) -> set[str]:
        return {sid for sid, s in self.sandboxes.items() if s.running}

    async def list_sandboxes(self) -> set[str]:
        return set(self.sandboxes)

    async def usage(self, session_id: str) -> SandboxUsage:
        sandbox = self._running(session_id)
        return SandboxUsage(
            cpu_seconds=0.0, memory_bytes=0, processes=len(sandbox.processes), disk_bytes=0
        )

    async def exec(self, session_id: str, spec: ExecSpec) -> Process:
        self._enter("exec", session_id)
        sandbox = self._running(session_id)
        process = FakeProcess(spec, sandbox)
        if spec.persist_as is not None:
            sandbox.jobs[spec.persist_as] = process
        program = self.programs.get(spec.argv[0]) if spec.argv else None
        if program is None:
            process.end(
                ExitEvent(exit_code=None, error="not_found", message=f"{spec.argv[0]}: not found")
            )
            return process
        process.begin(program)
        return process

    reattaches_jobs = True

    async def attach(
        self, session_id: str, job_id: str, stdout_offset: int, stderr_offset: int
    ) -> Process:
        self._enter("attach", session_id)
        process = self._running(session_id).jobs.get(job_id)
        if process is None:
            unknown = FakeProcess(ExecSpec(argv=["?"]), self._running(session_id))
            unknown.end(ExitEvent(exit_code=None, error="unknown_job", message="no such job"))
            return unknown
        return FakeAttachment(process, stdout_offset, stderr_offset)

    async def processes(self, session_id: str) -> list[SandboxProcess]:
        sandbox = self._running(session_id)
        return [
            SandboxProcess(
                pid=p.pid,
                ppid=1,
                user=p.spec.user or "user",
                command=list(p.spec.argv),
                cpu_seconds=0.0,
                memory_bytes=0,
            )
            for p in sorted(sandbox.processes, key=lambda p: p.pid)
        ]

    def files(self, session_id: str) -> SandboxFiles:
        sandbox = self._running(session_id)
        me = (os.getuid(), os.getgid())
        return HostFiles(SandboxFS(str(sandbox.root), user=me, superuser=me))
