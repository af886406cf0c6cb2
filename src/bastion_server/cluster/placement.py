"""Placement: which node a new session goes to (pure; no Ray, no I/O).

A node is a candidate when its agent is ready (its host is prepared), it holds the
session's image (by digest: see :mod:`.node_images`) and its available memory holds
the session's memory limit.  Among the candidates the session goes to the one with
the most free capacity: the fewest sessions (running ones, those created and not
started yet, and those being placed there right now), then the most available
memory, then the lowest node name (so that the choice is the same every time for the
same loads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeLoad:
    node: str
    #: The agent is up and its host prepared.
    ready: bool
    #: Sessions that hold (or will soon hold) the node's CPU and memory.
    sessions: int
    #: What the node's kernel says is available now (MemAvailable), in MiB.
    memory_available_mb: int
    #: The digests of the images the node holds whole.
    images: frozenset[str] = field(default_factory=frozenset)


class NoCapacity(Exception):
    """No node can take the session; the message says why."""


class ImageOnNoNode(NoCapacity):
    """No ready node holds the session's image."""


def choose_node(
    loads: Iterable[NodeLoad], memory_mb: int, image: tuple[str, str] | None = None
) -> str:
    """The node a session of ``memory_mb`` over ``image`` ((name, digest); None: each
    node's default image) goes to; :class:`NoCapacity` if none can take it."""
    loads = list(loads)
    ready = [n for n in loads if n.ready]
    if not ready:
        raise NoCapacity(
            "no node of the cluster is ready for sessions"
            if loads
            else "the cluster has no node with a Bastion node agent"
        )
    if image is not None and image[1]:
        name, digest = image
        ready = [n for n in ready if digest in n.images]
        if not ready:
            raise ImageOnNoNode(
                f"no ready node of the cluster holds image {name!r} ({digest}): it is on "
                "the nodes whose images directory has it (the gateway's own node for an "
                "image built, imported or pulled through the gateway)"
            )
    fitting = [n for n in ready if n.memory_available_mb >= memory_mb]
    if not fitting:
        most = max(n.memory_available_mb for n in ready)
        raise NoCapacity(
            f"no node has {memory_mb} MiB of memory available (the most is {most} MiB)"
        )
    best = min(fitting, key=lambda n: (n.sessions, -n.memory_available_mb, n.node))
    return best.node
