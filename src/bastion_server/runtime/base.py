"""The runtime interface: what the service layer may ask of a sandbox backend.

The service layer reaches sandboxes only through :class:`Runtime`.  A backend knows
nothing of HTTP, API keys or job records; it creates, starts, stops and deletes
sandboxes named by a session id, runs processes in them and exposes their files.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion_server.runtime.network import NetworkPolicy
    from bastion_server.runtime.sandbox_fs import SandboxFS


class SandboxError(Exception):
    """A sandbox operation failed for a reason the caller cannot fix by retrying."""


class SandboxNotRunning(SandboxError):
    """The sandbox is not running (stopped, crashed, or never started)."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_mb: int
    pids: int
    cpus: float
    disk_mb: int


@dataclass(frozen=True)
class SandboxUsage:
    """What a running sandbox consumes now (None where the host cannot tell)."""

    cpu_seconds: float | None
    memory_bytes: int | None
    processes: int | None
    disk_bytes: int | None


@dataclass(frozen=True)
class ExecSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    pty: bool = False
    rows: int = 24
    cols: int = 80


@dataclass(frozen=True)
class OutputEvent:
    stream: str  # "stdout" | "stderr"
    data: bytes


@dataclass(frozen=True)
class ExitEvent:
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    #: None for a process that ran and exited; else why it did not finish normally:
    #: "not_found", "exec_failed", "start_failed", "timeout", "killed", "lost".
    error: str | None = None
    message: str | None = None


class Process(abc.ABC):
    """A process running in a sandbox, as a stream of events ending in one ExitEvent."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[OutputEvent | ExitEvent]: ...

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the process and everything it started."""

    @abc.abstractmethod
    async def send_input(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def resize(self, rows: int, cols: int) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Drop the connection; a process still running is killed with its tree."""


class Runtime(abc.ABC):
    name: str
    #: Where a job starts when it names no ``cwd`` (the sandbox user's home).
    home: str = "/"

    @abc.abstractmethod
    async def prepare_host(self) -> None:
        """Check and fix what the host needs before any sandbox can start."""

    async def warm_up(self) -> None:  # noqa: B027 - optional hook, nothing by default
        """Begin background preparation (such as a warm pool); called once serving."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing by default
        """Release what the runtime holds for itself (never a session's sandbox)."""

    @abc.abstractmethod
    async def create(self, session_id: str, limits: SandboxLimits) -> None:
        """Allocate the sandbox's storage (of ``limits.disk_mb``); nothing runs yet."""

    @abc.abstractmethod
    async def start(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None = None
    ) -> None:
        """Run the sandbox; with an enabled ``network`` it also gets outbound access."""

    async def restore_network(self, session_id: str, network: NetworkPolicy) -> None:
        """Check a running sandbox's network (adopted after a server restart) against its
        policy and put back what is missing; raise if that cannot be done (the caller
        then stops the sandbox).  Nothing to do for a runtime without network."""
        if network.enabled:
            raise SandboxError(f"{self.name} cannot restore a sandbox's network")

    @abc.abstractmethod
    async def stop(self, session_id: str) -> None:
        """Kill every process; the sandbox's own files are kept."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None:
        """Stop if needed and remove every trace of the sandbox."""

    async def pause(self, session_id: str) -> None:
        """Freeze every process of a running sandbox (memory kept, no CPU, no time
        passing for its timers).  Pausing a paused sandbox does nothing."""
        raise SandboxError(f"the {self.name} runtime cannot pause a sandbox")

    async def resume(self, session_id: str) -> None:
        """Thaw a paused sandbox's processes.  Resuming one not paused does nothing
        (so, for a runtime that cannot pause, this never has anything to do)."""

    @abc.abstractmethod
    async def is_running(self, session_id: str) -> bool:
        """Whether the sandbox is up (running, or paused)."""

    @abc.abstractmethod
    async def running_sandboxes(self) -> set[str]:
        """Session ids of every sandbox up now, running or paused (one look)."""

    @abc.abstractmethod
    async def list_sandboxes(self) -> set[str]:
        """Session ids of every sandbox this runtime has running or on disk."""

    async def started_sandboxes(self) -> set[str]:
        """Session ids of every sandbox with anything of a run on the host (running,
        or left half started or half stopped by a crash): what ``stop`` has to undo."""
        return await self.running_sandboxes()

    @abc.abstractmethod
    async def usage(self, session_id: str) -> SandboxUsage:
        """Current consumption of a running sandbox."""

    @abc.abstractmethod
    async def exec(self, session_id: str, spec: ExecSpec) -> Process: ...

    @abc.abstractmethod
    def files(self, session_id: str) -> SandboxFS:
        """File access confined to the sandbox's root filesystem."""
