"""Placement: which node a new session goes to (pure; no Ray, no I/O).

A node is a candidate when its agent is ready (it has the image and its host is
prepared) and its available memory holds the session's memory limit.  Among the
candidates the session goes to the one with the most free capacity: the fewest
sessions (running ones, those created and not started yet, and those being placed
there right now), then the most available memory, then the lowest node name (so
that the choice is the same every time for the same loads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeLoad:
    node: str
    #: The agent is up, its host prepared and the image there.
    ready: bool
    #: Sessions that hold (or will soon hold) the node's CPU and memory.
    sessions: int
    #: What the node's kernel says is available now (MemAvailable), in MiB.
    memory_available_mb: int


class NoCapacity(Exception):
    """No node can take the session; the message says why."""


def choose_node(loads: Iterable[NodeLoad], memory_mb: int) -> str:
    """The node a session of ``memory_mb`` goes to; :class:`NoCapacity` if none can."""
    loads = list(loads)
    ready = [n for n in loads if n.ready]
    if not ready:
        raise NoCapacity(
            "no node of the cluster is ready for sessions"
            if loads
            else "the cluster has no node with a Bastion node agent"
        )
    fitting = [n for n in ready if n.memory_available_mb >= memory_mb]
    if not fitting:
        most = max(n.memory_available_mb for n in ready)
        raise NoCapacity(
            f"no node has {memory_mb} MiB of memory available (the most is {most} MiB)"
        )
    best = min(fitting, key=lambda n: (n.sessions, -n.memory_available_mb, n.node))
    return best.node
