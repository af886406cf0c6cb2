"""The OCI runtime binary (crun, runc, or another by name), run as a command.

Every invocation is ``<binary> <global args> --root <state root> <command> ...``: the
global args are the operator's runtime-specific flags (``--runtime-arg``, e.g.
``--systemd-cgroup`` or ``--debug``), the state root keeps this server's containers
apart from every other's.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from bastion_server.blocking import run_to_end
from bastion_server.runtime import host
from bastion_server.runtime.base import SandboxError

#: Runtimes known to join a user namespace made ahead (one the session's own root
#: owns).  runc 1.1 then fails to set rlimits, so it makes its own, owned by host root:
#: its sessions still have their own id ranges, but share the per-owner counters.
JOINS_USER_NAMESPACE = frozenset({"crun"})
#: The OCI runtime's statuses of a container that is up: a paused one is frozen, alive.
UP = frozenset({"running", "paused"})


class OciBinary:
    """One OCI runtime binary over one state root."""

    def __init__(self, name: str, state_root: str, global_args: Sequence[str] = ()) -> None:
        self.name = name
        self.state_root = state_root
        self.global_args = tuple(global_args)
        self._path = ""

    def resolve(self) -> None:
        """Find the binary on the host (HostNotReady if it is not there)."""
        self._path = host.find_runtime_binary(self.name)

    @property
    def joins_user_namespace(self) -> bool:
        return os.path.basename(self.name) in JOINS_USER_NAMESPACE

    def argv(self, *args: str) -> list[str]:
        return [self._path or self.name, *self.global_args, "--root", self.state_root, *args]

    async def run(
        self,
        *args: str,
        check: bool = True,
        stdout: int | IO[Any] = subprocess.PIPE,
        stderr: int | IO[Any] = subprocess.PIPE,
    ) -> tuple[int, str]:
        """Run the binary in a worker thread; returns its exit status and what it said.

        Forking from the event loop's thread would stall every other request for the
        fork and exec (milliseconds in a large process); a thread keeps them flowing.
        A caller cancelled meanwhile waits for the binary to finish first: a ``run``
        left going would make its container after the caller's cleanup deleted it.
        """
        proc = await run_to_end(
            subprocess.run,
            self.argv(*args),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            check=False,
        )
        text = (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(
            errors="replace"
        )
        if check and proc.returncode != 0:
            raise SandboxError(f"{self.name} {args[0]} failed: {text.strip()}")
        return proc.returncode, text

    async def run_detached(self, bundle: Path, container: str, log_path: Path) -> tuple[int, str]:
        """``run --detach``; returns its exit status and what it said.

        The container inherits the binary's stdio, so it writes to the agent's log file
        (a pipe would stay open as long as the sandbox runs)."""
        with open(log_path, "ab") as agent_log:
            offset = agent_log.tell()
            code, _ = await self.run(
                "run", "--detach", "--bundle", str(bundle), container,
                check=False, stdout=agent_log, stderr=agent_log,
            )  # fmt: skip
        if code == 0:
            return 0, ""
        with open(log_path, "rb") as f:
            f.seek(offset)
            return code, f.read(4000).decode(errors="replace").strip()

    async def delete(self, container: str) -> None:
        """``delete --force``: kill and forget the container (nothing if there is none)."""
        await self.run("delete", "--force", container, check=False)

    async def pid(self, container: str) -> int:
        """The container's init pid (its agent's, on the host)."""
        _, out = await self.run("state", container)
        try:
            return int(json.loads(out)["pid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SandboxError(f"cannot read the sandbox's pid: {out[:200]}") from exc

    async def is_up(self, container: str) -> bool:
        """Whether the container runs (or is paused)."""
        code, out = await self.run("state", container, check=False, stderr=subprocess.DEVNULL)
        if code != 0:
            return False
        try:
            return json.loads(out).get("status") in UP
        except ValueError:
            return False

    async def statuses(self) -> dict[str, str]:
        """Every container of the state root, by name: its status (one ``list``)."""
        code, out = await self.run("list", "--format", "json", check=False)
        try:
            entries = json.loads(out) if code == 0 else None
        except ValueError:
            entries = None
        states: dict[str, str] = {}
        for entry in entries or ():
            name = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(name, str):
                states[name] = str(entry.get("status"))
        return states
