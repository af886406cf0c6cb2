"""Terminals: interactive shells on a real pty inside a session, several per session.

A terminal is a shell the agent starts on a pseudo-terminal as the sandbox user, with
its own session and controlling tty (so job control works: Ctrl-C reaches the
foreground command).  The service keeps a registry per session so that stopping or
deleting a session ends its terminals, each told why; so does a server shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from bastion.wire import ErrorCode
from bastion_server.runtime.base import ExecSpec, Process, Runtime, SandboxError
from bastion_server.service.errors import ServiceError, shutting_down
from bastion_server.service.sessions import SessionService, new_id

log = logging.getLogger("bastion.terminals")

MAX_ROWS_COLS = 1000
#: How long a shutdown waits for its terminals to tell their clients and close.
SHUTDOWN_GRACE = 5.0
_SHELLS = ("/bin/bash", "/bin/sh")


@dataclass
class Terminal:
    id: str
    session_id: str
    shell: str
    rows: int
    cols: int
    process: Process
    #: Set when the server ends the terminal ("session_stopped", "session_deleted", ...).
    end_reason: str | None = field(default=None)
    #: Set once the terminal is released (its client told, its shell gone).
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def check_size(rows: int, cols: int) -> None:
    if not (1 <= rows <= MAX_ROWS_COLS and 1 <= cols <= MAX_ROWS_COLS):
        raise ServiceError(
            ErrorCode.INVALID_REQUEST, f"rows and cols must be between 1 and {MAX_ROWS_COLS}"
        )


class TerminalService:
    def __init__(self, runtime: Runtime, sessions: SessionService) -> None:
        self.runtime, self.sessions = runtime, sessions
        self._open: dict[str, dict[str, Terminal]] = {}
        self._shutting_down = False
        sessions.before_sandbox_stops.append(self.close_session_terminals)
        sessions.busy_checks.append(lambda session_id: bool(self._open.get(session_id)))

    async def _shell(self, session_id: str) -> str:
        """bash where the image has it, else sh (looked up inside the sandbox's root)."""
        return await self.runtime.find_file(session_id, _SHELLS) or _SHELLS[-1]

    async def open(
        self, owner: str, session_id: str, rows: int, cols: int, user: str | None = None
    ) -> Terminal:
        """``user`` "root": the shell runs as the sandbox's root (of its own user
        namespace); "user" or None: as the sandbox user."""
        check_size(rows, cols)
        if user not in (None, "user", "root"):
            raise ServiceError(ErrorCode.INVALID_REQUEST, 'user must be "user" or "root"')
        self.sessions.require_running(owner, session_id)
        if self._shutting_down:
            raise shutting_down()
        shell = await self._shell(session_id)
        try:
            process = await self.runtime.exec(
                session_id,
                ExecSpec(
                    argv=[shell, "-l"],
                    env=self.sessions.job_env(session_id),
                    pty=True,
                    rows=rows,
                    cols=cols,
                    user="root" if user == "root" else None,
                ),
            )
        except SandboxError as exc:
            raise ServiceError(ErrorCode.SESSION_STATE, f"cannot open a terminal: {exc}") from exc
        terminal = Terminal(new_id("term"), session_id, shell, rows, cols, process)
        self._open.setdefault(session_id, {})[terminal.id] = terminal
        log.info("terminal opened", extra={"session_id": session_id, "terminal_id": terminal.id})
        return terminal

    async def release(self, terminal: Terminal) -> None:
        """Forget a terminal and make sure its shell and everything it started end."""
        self._open.get(terminal.session_id, {}).pop(terminal.id, None)
        self.sessions.touch(terminal.session_id)
        try:
            await terminal.process.close()
        finally:
            terminal.closed.set()
        log.info("terminal closed", extra={"terminal_id": terminal.id})

    async def close_session_terminals(self, session_id: str, reason: str) -> None:
        for terminal in list(self._open.get(session_id, {}).values()):
            terminal.end_reason = reason
            await terminal.process.kill()

    async def shutdown(self) -> None:
        """End every terminal with the reason "server_shutdown" and wait (a while) until
        each has told its client so and closed; refuse new ones from now on."""
        self._shutting_down = True
        terminals = [t for open_ in self._open.values() for t in open_.values()]
        for session_id in list(self._open):
            await self.close_session_terminals(session_id, "server_shutdown")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE):
                for terminal in terminals:
                    await terminal.closed.wait()
        for terminal in terminals:
            if not terminal.closed.is_set():
                # Its shell did not end: cut it, so that its socket still gets the exit.
                log.warning("terminal did not end in time", extra={"terminal_id": terminal.id})
                await terminal.process.close()
