"""The runtime interface: what the service layer may ask of a sandbox backend.

The service layer reaches sandboxes only through :class:`Runtime`.  A backend knows
nothing of HTTP, API keys or job records; it creates, starts, stops and deletes
sandboxes named by a session id, runs processes in them and exposes their files.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion_server.runtime.files import SandboxFiles
    from bastion_server.runtime.network import NetworkPolicy
    from bastion_server.runtime.sandbox_image import SandboxImage


class SandboxError(Exception):
    """A sandbox operation failed for a reason the caller cannot fix by retrying."""

    #: The error code (a :class:`bastion.wire.ErrorCode` value) the service reports
    #: this failure with: a kind that says more than the operation's own failure
    #: (an image no machine holds, say) sets it.  None: the operation's code
    #: (``session_start_failed`` for a create or a start...).
    code: str | None = None


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
class JobLimits:
    """Kernel limits of one job, inside its sandbox's: ``memory_mb`` and ``pids`` for
    the job's whole tree (a cgroup of its own), ``cpu_seconds`` per process (an
    rlimit: SIGXCPU, then SIGKILL).  None: only the sandbox's own limits apply."""

    memory_mb: int | None = None
    pids: int | None = None
    cpu_seconds: int | None = None

    @property
    def needs_cgroup(self) -> bool:
        return self.memory_mb is not None or self.pids is not None


@dataclass(frozen=True)
class SandboxProcess:
    """One process of a running sandbox, as its own pid namespace names it."""

    pid: int
    ppid: int
    #: "root", "user" (the sandbox's ordinary user), else the uid inside the sandbox.
    user: str
    command: list[str]
    cpu_seconds: float
    memory_bytes: int


@dataclass(frozen=True)
class ExecSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    pty: bool = False
    rows: int = 24
    cols: int = 80
    #: True: the process's stdin is a pipe fed by ``send_input`` until ``close_input``.
    stdin: bool = False
    #: "root": the process runs as the sandbox's root; None: as its ordinary user.
    user: str | None = None
    limits: JobLimits = field(default_factory=JobLimits)
    #: A job's id: its process outlives a lost connection (it runs on, its output
    #: kept in the sandbox, up to ``spool_bytes`` per stream) until the runtime's
    #: :meth:`Runtime.attach` takes it up again.  Only for a runtime that
    #: ``reattaches_jobs``; never with a pty.
    persist_as: str | None = None
    spool_bytes: int | None = None


@dataclass(frozen=True)
class JobUsage:
    """What a finished process and its descendants used."""

    wall_seconds: float
    user_cpu_seconds: float
    system_cpu_seconds: float
    #: The job cgroup's peak when it had one, else the largest process's peak RSS.
    peak_memory_bytes: int | None


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
    #: The signal a ``kill(signal)`` sent (the process may have handled it).
    kill_signal: int | None = None
    usage: JobUsage | None = None
    #: The kernel's OOM killer killed a process of the job (its cgroup's counter, or
    #: with no job cgroup the sandbox's counter moved while the job ran).
    oom_killed: bool = False
    #: The job's pids limit refused a fork.
    pids_refused: bool = False
    #: A persistent process's: every byte it wrote to each stream ("stdout",
    #: "stderr"), also what was past its spool's cap (so what was dropped is known).
    output_bytes: dict[str, int] | None = None


class Process(abc.ABC):
    """A process running in a sandbox, as a stream of events ending in one ExitEvent."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[OutputEvent | ExitEvent]: ...

    #: The process's pid inside the sandbox once it started (its supervisor's, for
    #: the agent: an ancestor of every process of the job), else None.
    pid: int | None = None

    @abc.abstractmethod
    async def kill(self, signal: int | None = None) -> None:
        """Kill the process and everything it started; with ``signal`` (other than
        SIGKILL), send that signal to every process of its tree instead."""

    @abc.abstractmethod
    async def send_input(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close_input(self) -> None:
        """End the process's stdin (with a terminal: send end-of-file)."""

    @abc.abstractmethod
    async def resize(self, rows: int, cols: int) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Drop the connection; a process still running is killed with its tree
        (a persistent one runs on, for :meth:`Runtime.attach`)."""

    async def forget(self) -> None:  # noqa: B027 - only persistent processes need it
        """A persistent process ended and its end is recorded: the sandbox may drop
        what it kept of it (its exit and output)."""


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
    async def create(
        self,
        session_id: str,
        limits: SandboxLimits,
        image: SandboxImage | None = None,
        layers: Sequence[str] = (),
    ) -> None:
        """Allocate the sandbox's storage (of ``limits.disk_mb``) over ``image`` (None:
        the runtime's default image), and record the image for every later start;
        nothing runs yet.  With ``layers`` (snapshots, top first) its files are those
        snapshots' from the start, as after :meth:`set_layers` (a runtime of several
        machines creates it on the one that holds them)."""

    def image_of(self, session_id: str) -> SandboxImage | None:
        """The image a sandbox was created from (None: a runtime without images)."""
        return None

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

    async def kill_all(self, session_id: str) -> None:
        """Kill every process of a sandbox about to be replaced (renamed away by
        :meth:`hand_over`, then deleted), leaving the rest of a stop (unmounts, the
        runtime's records) to that :meth:`stop` or :meth:`delete`.  By default a
        whole stop."""
        await self.stop(session_id)

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None:
        """Stop if needed and remove every trace of the sandbox."""

    async def pause(self, session_id: str) -> None:
        """Freeze every process of a running sandbox (memory kept, no CPU, no time
        passing for its timers).  Pausing a paused sandbox does nothing."""
        raise SandboxError(f"the {self.name} runtime cannot pause a sandbox")

    async def resume(self, session_id: str) -> None:  # noqa: B027 - nothing by default
        """Thaw a paused sandbox's processes.  Resuming one not paused does nothing
        (so, for a runtime that cannot pause, this never has anything to do)."""

    # Snapshots: a sandbox's writable layer copied whole, as a layer that sandboxes
    # can stand on (read-only, above the image); see runtime/snapshots.py.

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        """Copy the sandbox's files (its writable layer, over the layers it stands on)
        as snapshot ``snapshot_id``: whole or not at all, across a crash too.  A running
        sandbox is frozen for the copy, so no write is torn.  Returns its size in bytes."""
        raise SandboxError(f"the {self.name} runtime cannot snapshot a sandbox")

    async def check_layers(self, session_id: str, layers: Sequence[str]) -> None:  # noqa: B027
        """Raise SandboxError if :meth:`set_layers` would refuse ``layers`` for this
        sandbox for a reason known now (a snapshot on another machine than the
        sandbox): asked before a restore stops the session.  Nothing by default."""

    async def set_layers(self, session_id: str, layers: list[str]) -> None:
        """Make a stopped (or created) sandbox's files those of the snapshots
        ``layers`` (top first: a snapshot, then its parent's...), its own writes gone."""
        raise SandboxError(f"the {self.name} runtime cannot start a sandbox from a snapshot")

    async def restore(
        self,
        session_id: str,
        layers: list[str],
        limits: SandboxLimits,
        network: NetworkPolicy | None = None,
    ) -> None:
        """Start a running sandbox again over the snapshots ``layers`` (as
        :meth:`set_layers`): every process ended, its own writes gone, the snapshots'
        files and nothing else, then running with ``limits`` and ``network`` (the RL
        "reset").  If it fails, the sandbox is left stopped.  By default a stop, a
        :meth:`set_layers` and a start; a backend may keep what a start would make the
        same again (the OCI runtime keeps the disk and its mounts, a warm pool swaps in
        a sandbox started ahead)."""
        try:
            await self.stop(session_id)
            await self.set_layers(session_id, layers)
            await self.start(session_id, limits, network)
        except SandboxError:
            with contextlib.suppress(SandboxError):
                await self.stop(session_id)
            raise

    async def remove_snapshot(self, snapshot_id: str) -> None:  # noqa: B027 - nothing by default
        """Remove a snapshot's layer (nothing if it is not there)."""

    async def snapshot_ids(self) -> set[str]:
        """Every whole snapshot this runtime keeps."""
        return set()

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

    #: Whether processes started with ``persist_as`` outlive the server (see attach).
    reattaches_jobs: bool = False

    async def attach(
        self, session_id: str, job_id: str, stdout_offset: int, stderr_offset: int
    ) -> Process:
        """Take up again the persistent process ``job_id`` (started by an earlier
        server): its output from the given byte of each stream (what is already
        recorded), then live, then its exit.  A job the sandbox does not know (never
        ran, or ran in an earlier start of the sandbox) ends at once with error
        "unknown_job"; SandboxError if the sandbox does not answer."""
        raise SandboxError(f"the {self.name} runtime cannot reattach a job")

    async def processes(self, session_id: str) -> list[SandboxProcess]:
        """Every process of a running sandbox now (a runtime that cannot look says so)."""
        raise SandboxError(f"the {self.name} runtime cannot list a sandbox's processes")

    @abc.abstractmethod
    def files(self, session_id: str) -> SandboxFiles:
        """The running sandbox's files, confined to its root (runtime/files.py: an
        async contract; no host file descriptor crosses it).  SandboxNotRunning if the
        sandbox does not run."""

    # Handing over sandboxes started ahead (runtime/warm_pool.py wraps any runtime
    # that can do these two).

    async def hand_over(self, sandbox_id: str, session_id: str, image: SandboxImage) -> None:
        """Give the created (and maybe running) sandbox ``sandbox_id`` to ``session_id``
        from now on, as of ``image`` (of the same layers as the one it was created
        from): crash-safe, so that a delete of either id removes it whole."""
        raise SandboxError(f"the {self.name} runtime cannot hand a sandbox over")

    async def connect(self, session_id: str, network: NetworkPolicy | None) -> None:
        """Give a sandbox started ahead, then handed over, its session's network (None
        or not enabled: none); SandboxNotRunning if it does not run any more."""
        raise SandboxError(f"the {self.name} runtime cannot hand a sandbox over")

    async def adopt_placements(self, nodes: Mapping[str, str]) -> None:  # noqa: B027
        """Take the machine recorded for each session (the store's ``node``) when the
        server starts, before it reconciles: a runtime of several machines routes by
        it, and reports the sessions of a machine that is gone as lost.  Nothing to do
        for one that runs everything where it is."""

    def node_of(self, session_id: str) -> str | None:
        """The name of the machine that holds the sandbox, for a runtime of several
        (a cluster's); None for one that runs everything where it is."""
        return None

    def sandbox_ref(self, session_id: str) -> str:
        """What this runtime calls the session's sandbox once created (a container's
        name, a VM's id), recorded on the session: by default its session id."""
        return session_id

    async def find_file(self, session_id: str, paths: Sequence[str]) -> str | None:
        """The first of ``paths`` the sandbox user can open in the sandbox (a terminal's
        shell, say), or None.  A runtime whose files are elsewhere looks there."""
        return await self.files(session_id).find_openable(paths)
