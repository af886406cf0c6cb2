"""Connections to sandbox agents kept open from one job to the next.

A job's exec asks its agent to keep the connection (``"keep_open"``, see
:mod:`.agent_protocol`); once the job's conversation is over the connection comes back
here, and the next job for the same agent takes it instead of connecting again.  A
connect and an accept per job, each waking the other side, cost about as much as the
rest of the agent's round trip for a short job.

Bounded: at most :data:`PER_AGENT` idle connections per agent and :data:`TOTAL` in
all, the longest idle closed first.  A connection whose agent went away (its sandbox
stopped or restarted) has seen the end of its stream and is dropped, never handed out.
A connection belongs to the event loop that made it, so each loop has its own set.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from dataclasses import dataclass

#: Idle connections kept per agent socket: enough for a few jobs in parallel.
PER_AGENT = 4
#: Idle connections kept in all (the least recently used go first).
TOTAL = 64

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: Frames owed to an idle connection's agent (a finished persistent job's ``forget``)
#: go with the next request on it, in the same send; one not reused this soon sends
#: them by themselves.  (Each send wakes the agent: on a small machine that is the
#: dearest part of a short job.)
OWED_DELAY = 0.5


def _usable(conn: Connection) -> bool:
    reader, writer = conn
    return not (writer.is_closing() or reader.at_eof() or reader.exception() is not None)


@dataclass(eq=False)
class _Idle:
    conn: Connection
    owed: bytes = b""
    timer: asyncio.TimerHandle | None = None

    def pay(self) -> None:
        """Send what is owed now (it goes before a close)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.owed and _usable(self.conn):
            self.conn[1].write(self.owed)
        self.owed = b""

    def close(self) -> None:
        self.pay()
        self.conn[1].close()


class IdleConnections:
    """Idle agent connections by socket path, for one event loop."""

    def __init__(self, per_agent: int = PER_AGENT, total: int = TOTAL) -> None:
        self.per_agent, self.total = per_agent, total
        self._idle: OrderedDict[str, list[_Idle]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    def take(self, socket_path: str) -> tuple[Connection, bytes] | None:
        """An idle connection to the agent at ``socket_path`` and the frames owed to
        its agent (to send first, with the request), or None."""
        conns = self._idle.get(socket_path)
        while conns:
            idle = conns.pop()
            if idle.timer is not None:
                idle.timer.cancel()
            if _usable(idle.conn):
                if not conns:
                    del self._idle[socket_path]
                return idle.conn, idle.owed
            idle.close()
        self._idle.pop(socket_path, None)
        return None

    def put(self, socket_path: str, conn: Connection, owed: bytes = b"") -> None:
        """Keep ``conn`` (its job's conversation is over, but for the frames ``owed``)
        for the next job, or close it if it cannot be used again or too many are kept
        (what is owed is sent first)."""
        idle = _Idle(conn, owed)
        if not _usable(conn):
            idle.close()
            return
        if owed:
            idle.timer = asyncio.get_running_loop().call_later(OWED_DELAY, idle.pay)
        conns = self._idle.setdefault(socket_path, [])
        self._idle.move_to_end(socket_path)
        for stale in [c for c in conns if not _usable(c.conn)]:
            conns.remove(stale)
            stale.close()
        conns.append(idle)
        while len(conns) > self.per_agent:
            conns.pop(0).close()
        while len(self) > self.total:
            oldest, old = next(iter(self._idle.items()))
            old.pop(0).close()
            if not old:
                del self._idle[oldest]

    def close_all(self) -> None:
        for conns in self._idle.values():
            for idle in conns:
                idle.close()
        self._idle.clear()


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdleConnections] = (
    weakref.WeakKeyDictionary()
)


def idle_connections() -> IdleConnections:
    """The running event loop's idle agent connections."""
    loop = asyncio.get_running_loop()
    pool = _BY_LOOP.get(loop)
    if pool is None:
        pool = _BY_LOOP[loop] = IdleConnections()
    return pool
