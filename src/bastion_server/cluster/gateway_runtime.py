"""The gateway's runtime: every sandbox on a node of a Ray cluster, behind one Runtime.

``bastion serve --ray ADDRESS`` serves the same API with this :class:`ClusterRuntime`
in place of the OCI runtime.  It joins the cluster as a Ray driver, starts (or finds
again) one :class:`~.node_agent.NodeAgent` per node, places each new session on a
node (:mod:`.placement`) and forwards each call about a session to the agent of the
node that holds it, over Ray; the bytes of jobs and terminals go over the
:mod:`.data_plane`, never through Ray's object store.

Where a session is, is recorded in the store (its ``node``), which a restarted
gateway takes up (:meth:`ClusterRuntime.adopt_placements`); at start (and whenever a
node joins) the gateway also asks each agent which sandboxes it has, and logs where
an agent and the store disagree (the agent, which has the sandbox, is followed).  A
watcher polls Ray's view of the nodes; a node that Ray declares dead, or that a
restarted gateway finds gone, has each of its sessions reported to
:attr:`lost_listeners`.

A snapshot lives on the node of the session it was taken of: a session made from one
is created on that node, and a restore only takes a snapshot of the session's own
node (refused before the session is stopped: :meth:`ClusterRuntime.check_layers`).
Jobs are started persistent on their nodes, so a restarted gateway takes them up
again (:meth:`ClusterRuntime.attach`).  An image build's sandbox runs on the
gateway's own node, whose images directory the gateway shares: the built layer is
stored there, and sessions of it go to the nodes that hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.wire import ErrorCode
from bastion_server.cluster import data_plane
from bastion_server.cluster.data_plane import attach_process, open_process
from bastion_server.cluster.node_agent import NAMESPACE, NodeAgent, actor_name, node_name
from bastion_server.cluster.placement import ImageOnNoNode, NoCapacity, NodeLoad, choose_node
from bastion_server.cluster.remote_files import RemoteFiles
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    OutputEvent,
    Process,
    Runtime,
    SandboxError,
    SandboxLimits,
    SandboxNotRunning,
    SandboxProcess,
    SandboxUsage,
)
from bastion_server.runtime.host import HostNotReady
from bastion_server.tasks import spawn

if TYPE_CHECKING:
    from bastion_server.runtime.files import SandboxFiles
    from bastion_server.runtime.network import NetworkPolicy
    from bastion_server.runtime.sandbox_image import SandboxImage

log = logging.getLogger("bastion.cluster")
T = TypeVar("T")

#: How often the gateway looks at Ray's view of the nodes (seconds).
WATCH_INTERVAL = 0.5
#: How long a node agent has to prepare its host (first start: the warm pool, mounts).
AGENT_READY_TIMEOUT = 120.0
#: How long a lifecycle call may take before the node is taken for unreachable.
CALL_TIMEOUT = 300.0
#: How long a session's view waits for its node's word on the sandbox's consumption.
USAGE_TIMEOUT = 1.0
SECRET_FILE = "cluster-secret"

#: Called with (session id, reason) for each session of a node that left the cluster.
LostListener = Callable[[str, str], Awaitable[None]]


class NodeLost(SandboxError):
    """The session's node has left the cluster (its agent and sandboxes are gone)."""


class ImageOnNoReadyNode(SandboxError):
    """No ready node holds the session's image: the image cannot be used here now."""

    code = ErrorCode.IMAGE_STATE


class SnapshotOnAnotherNode(SandboxError):
    """A session that ran can only be given a snapshot of its own node."""

    code = ErrorCode.SNAPSHOT_STATE


def cluster_secret(data_dir: Path) -> bytes:
    """The secret node agents demand on their data plane: made once, kept in the
    gateway's data dir (0600) so that a restarted gateway drives the same agents."""
    path = data_dir / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


def _unwrapped(cause: SandboxError, message: str) -> SandboxError:
    """The agent's error as its own kind (SandboxNotRunning stays one), with ``message``."""
    try:
        return type(cause)(message)
    except TypeError:  # a kind made with other arguments
        return SandboxError(message)


def _log_disagreement(session_id: str, recorded: str, reported: str) -> None:
    log.warning(
        "session found on another node than recorded",
        extra={"session_id": session_id, "recorded": recorded, "reported": reported},
    )


@dataclass
class Node:
    name: str
    ray_id: str
    actor: Any
    address: tuple[str, int] | None = None
    ready: bool = False
    error: str | None = None
    alive: bool = True


class _NodeProcess(Process):
    """A process on a node: its data-plane stream, with a stream that ends without an
    exit told apart (``node_lost`` when the node has gone, else the sandbox's ``lost``)."""

    def __init__(self, inner: Process, node: Node, runtime: ClusterRuntime) -> None:
        self._inner, self._node, self._runtime = inner, node, runtime

    async def events(self) -> AsyncIterator[OutputEvent | ExitEvent]:
        async for event in self._inner.events():
            if isinstance(event, ExitEvent) and event.error == "lost":
                if not await self._runtime.node_answers(self._node):
                    event = ExitEvent(
                        exit_code=None,
                        error="node_lost",
                        message=f"the session's node {self._node.name} left the cluster",
                    )
            yield event

    @property
    def pid(self) -> int | None:  # type: ignore[override]
        return self._inner.pid

    async def kill(self, signal: int | None = None) -> None:
        await self._inner.kill(signal)

    async def send_input(self, data: bytes) -> None:
        await self._inner.send_input(data)

    async def close_input(self) -> None:
        await self._inner.close_input()

    async def resize(self, rows: int, cols: int) -> None:
        await self._inner.resize(rows, cols)

    async def close(self) -> None:
        await self._inner.close()

    async def forget(self) -> None:
        await self._inner.forget()


class ClusterRuntime(Runtime):
    """A :class:`Runtime` whose sandboxes live on the node agents of a Ray cluster."""

    #: Jobs run persistent on their nodes (the sandbox agents keep them).
    reattaches_jobs = True

    def __init__(self, address: str, config: ServerConfig) -> None:
        self.name = "ray"
        self.address = address
        self.config = config
        self.secret = b""
        self.nodes: dict[str, Node] = {}
        #: The node of each session: as recorded in the store (adopt_placements) and
        #: as the node agents report them.
        self._where: dict[str, str] = {}
        #: Sessions being placed on each node right now (counted as its load).
        self._placing: dict[str, int] = {}
        #: The node of each snapshot (where the session it was taken of ran).
        self._snapshots: dict[str, str] = {}
        #: Sandboxes of the server's own (image builds): on the gateway's own node.
        self.private: set[str] = set()
        #: The Ray id of the node the gateway runs on.
        self._own_ray_id: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._prepared = False
        #: The sandbox user's home on each ready node (one image: one home).
        self._homes: set[str] = set()
        self.lost_listeners: list[LostListener] = []
        #: Called (no arguments) after a node joined and its sandboxes were listed.
        self.joined_listeners: list[Callable[[], Awaitable[None]]] = []

    # -- joining the cluster -------------------------------------------------------

    async def prepare_host(self) -> None:
        if self._prepared:
            return
        self.secret = await asyncio.to_thread(cluster_secret, self.config.data_dir)
        await asyncio.to_thread(self._connect)
        await self.refresh_nodes()
        if not any(n.ready for n in self.nodes.values()):
            errors = "; ".join(f"{n.name}: {n.error}" for n in self.nodes.values())
            raise HostNotReady(f"no node of the Ray cluster at {self.address} is ready: {errors}")
        self.home = next(iter(self._homes)) if self._homes else "/"
        self._prepared = True

    def _connect(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self.address,
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=False,
            )
        self._own_ray_id = str(ray.get_runtime_context().get_node_id())

    async def refresh_nodes(self) -> None:
        """Bring the gateway's list of nodes in line with Ray's: start an agent on
        each new node, and report the sessions of each node that died."""
        import ray

        seen = await asyncio.to_thread(ray.nodes)
        alive: dict[str, dict[str, Any]] = {}
        for info in sorted(seen, key=lambda i: str(i["NodeID"])):
            if not info.get("Alive"):
                continue
            name = node_name(info.get("Resources") or {}, info["NodeManagerAddress"])
            if name in alive:  # unnamed nodes of one address: told apart by their ids
                name = f"{name}-{str(info['NodeID'])[:8]}"
            alive[name] = info
        for name, node in list(self.nodes.items()):
            if node.alive and (name not in alive or alive[name]["NodeID"] != node.ray_id):
                await self._lose(name)
        joined = False
        for name, info in alive.items():
            known = self.nodes.get(name)
            if known is not None and known.alive and known.ray_id == info["NodeID"]:
                continue
            await self._join(name, info["NodeID"])
            joined = True
        if joined:
            for listener in self.joined_listeners:
                await listener()

    async def _join(self, name: str, ray_id: str) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor: Any = (
            ray.remote(NodeAgent)
            .options(
                name=actor_name(name),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=0,
                max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(ray_id, soft=False),
            )
            # The node agents need no API keys (the gateway checks them).
            .remote(name, dataclasses.replace(self.config, api_keys=()), self.secret)
        )
        node = Node(name, ray_id, actor)
        self.nodes[name] = node
        try:
            info = await asyncio.wait_for(actor.ready.remote(self.secret), AGENT_READY_TIMEOUT)
            node.ready, node.error = bool(info["ready"]), info["error"]
            node.address = tuple(info["address"]) if info["address"] else None
            self._homes.add(info["home"])
            if node.ready:
                for session_id in await actor.list_sandboxes.remote():
                    self._reported(session_id, name)
                for snapshot_id in await actor.snapshot_ids.remote():
                    self._snapshots[snapshot_id] = name
        except Exception as exc:
            node.ready, node.error = False, f"its agent did not start: {exc}"
        log.info(
            "node joined",
            extra={"node": name, "ready": node.ready, "error": node.error, "ray_id": ray_id},
        )

    def _reported(self, session_id: str, name: str) -> None:
        """An agent has the session's sandbox on node ``name``: it is routed there (the
        sandbox is there), and a disagreement with what was known is logged."""
        known = self._where.get(session_id)
        if known is not None and known != name:
            _log_disagreement(session_id, known, name)
        self._where[session_id] = name

    async def adopt_placements(self, nodes: Mapping[str, str]) -> None:
        """The store's node for each session (the gateway's start, after joining the
        cluster): a session no agent reported goes by it, one an agent reported on
        another node by the agent (logged); the sessions of each node no longer in
        the cluster are reported lost, as if it had died while this gateway ran."""
        for session_id, recorded in nodes.items():
            reported = self._where.setdefault(session_id, recorded)
            if reported != recorded:
                _log_disagreement(session_id, recorded, reported)
        gone = {n for n in self._where.values() if n not in self.nodes or not self.nodes[n].alive}
        for name in sorted(gone):
            await self._lose(name)

    async def _lose(self, name: str) -> None:
        """Node ``name`` left the cluster (or was gone before this gateway started):
        each session placed on it is reported to the lost listeners."""
        node = self.nodes.get(name)
        if node is not None:
            node.alive = node.ready = False
        lost = [sid for sid, where in self._where.items() if where == name]
        log.error("node lost", extra={"node": name, "sessions": len(lost)})
        for session_id in lost:
            del self._where[session_id]
        reason = f"lost: its node {name} left the cluster"
        for session_id in lost:
            for listener in self.lost_listeners:
                try:
                    await listener(session_id, reason)
                except Exception:
                    log.exception("reporting a lost session failed")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self.refresh_nodes()
            except Exception:  # the watcher must outlive one failed look
                log.exception("looking at the cluster's nodes failed")

    async def warm_up(self) -> None:
        if self._watcher is None:
            self._watcher = spawn(self._watch(), name="cluster watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def node_answers(self, node: Node, timeout: float = 3.0) -> bool:
        """Whether the node's agent still answers (a stream cut by a dead node, or by
        a dead sandbox, looks the same from here)."""
        if not node.alive:
            return False
        try:
            await asyncio.wait_for(node.actor.load.remote(), timeout)
            return True
        except Exception:
            return False

    # -- where a session is --------------------------------------------------------

    def node_of(self, session_id: str) -> str | None:
        return self._where.get(session_id)

    def _node(self, session_id: str) -> Node | None:
        name = self._where.get(session_id)
        return None if name is None else self.nodes.get(name)

    def _live_node(self, session_id: str) -> Node:
        node = self._node(session_id)
        if node is None:
            raise NodeLost(f"sandbox {session_id} is on no node of the cluster")
        if not node.alive:
            raise NodeLost(f"the node {node.name} of sandbox {session_id} left the cluster")
        return node

    async def _call(self, node: Node, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(node.actor, method).remote(*args), CALL_TIMEOUT)
        except Exception as exc:
            import ray.exceptions

            cause = getattr(exc, "cause", None)
            if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, SandboxError):
                # The agent's own error, without Ray's wrapping (its actor, pid, traceback).
                raise _unwrapped(cause, f"on node {node.name}: {cause}") from None
            if isinstance(exc, SandboxError):
                raise
            if isinstance(exc, ray.exceptions.RayActorError | TimeoutError):
                raise NodeLost(f"the node {node.name} does not answer: {exc}") from exc
            raise

    def own_node(self) -> Node | None:
        """The node the gateway runs on (None before it joined the cluster)."""
        return next((n for n in self.nodes.values() if n.ray_id == self._own_ray_id), None)

    async def loads(self) -> list[NodeLoad]:
        ready = [n for n in self.nodes.values() if n.ready and n.alive]
        answers = await asyncio.gather(
            *(n.actor.load.remote() for n in ready), return_exceptions=True
        )
        loads = [
            NodeLoad(n.name, False, 0, 0)
            if isinstance(a, BaseException)
            else NodeLoad(
                n.name,
                True,
                int(a["sessions"]) + self._placing.get(n.name, 0),
                int(a["memory_available_mb"]),
                frozenset(a.get("images", ())),
            )
            for n, a in zip(ready, answers, strict=True)
        ]
        loads += [
            NodeLoad(n.name, False, 0, 0) for n in self.nodes.values() if not (n.ready and n.alive)
        ]
        return loads

    # -- the Runtime ---------------------------------------------------------------

    async def create(
        self,
        session_id: str,
        limits: SandboxLimits,
        image: SandboxImage | None = None,
        layers: Sequence[str] = (),
    ) -> None:
        """Place the session (see :mod:`.placement`), or with ``layers`` make it on
        the node that holds the snapshots (no other can give it their files)."""
        if layers:
            holder = self._snapshot_node(layers[0])
            await self._create_on(holder, session_id, limits, image, layers)
            log.info("session placed", extra={"session_id": session_id, "node": holder.name})
            return
        private = session_id in self.private
        loads = await self.loads()
        if private:  # an image build: its layer is stored where the gateway is
            own = self.own_node()
            loads = [n for n in loads if own is not None and n.node == own.name]
        try:
            wanted = None if image is None else (image.name, image.digest)
            name = choose_node(loads, limits.memory_mb, wanted)
        except NoCapacity as exc:
            where = " (an image build runs on the gateway's own node)" if private else ""
            kind = ImageOnNoReadyNode if isinstance(exc, ImageOnNoNode) else SandboxError
            raise kind(f"{exc}{where}") from exc
        await self._create_on(self.nodes[name], session_id, limits, image)
        log.info("session placed", extra={"session_id": session_id, "node": name})

    async def _create_on(
        self,
        node: Node,
        session_id: str,
        limits: SandboxLimits,
        image: SandboxImage | None,
        layers: Sequence[str] = (),
    ) -> None:
        private = session_id in self.private
        self._placing[node.name] = self._placing.get(node.name, 0) + 1
        try:
            self._where[session_id] = node.name
            await self._call(node, "create", session_id, limits, image, private, list(layers))
        except BaseException:
            self._where.pop(session_id, None)
            raise
        finally:
            self._placing[node.name] -= 1

    async def start(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None = None
    ) -> None:
        await self._call(self._live_node(session_id), "start", session_id, limits, network)

    async def restore_network(self, session_id: str, network: NetworkPolicy) -> None:
        await self._call(self._live_node(session_id), "restore_network", session_id, network)

    async def stop(self, session_id: str) -> None:
        node = self._node(session_id)
        if node is None or not node.alive:
            return  # nothing of it runs anywhere the gateway can reach
        await self._call(node, "stop", session_id)

    async def delete(self, session_id: str) -> None:
        node = self._node(session_id)
        if node is None or not node.alive:
            self._where.pop(session_id, None)
            return
        await self._call(node, "delete", session_id)
        self._where.pop(session_id, None)

    async def pause(self, session_id: str) -> None:
        await self._call(self._live_node(session_id), "pause", session_id)

    async def resume(self, session_id: str) -> None:
        await self._call(self._live_node(session_id), "resume", session_id)

    async def processes(self, session_id: str) -> list[SandboxProcess]:
        found: list[SandboxProcess] = await self._call(
            self._live_node(session_id), "processes", session_id
        )
        return found

    # -- snapshots -----------------------------------------------------------------

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        node = self._live_node(session_id)
        size: int = await self._call(node, "capture", session_id, snapshot_id)
        self._snapshots[snapshot_id] = node.name
        return size

    def _snapshot_node(self, snapshot_id: str) -> Node:
        name = self._snapshots.get(snapshot_id)
        node = None if name is None else self.nodes.get(name)
        if node is None:
            raise SandboxError(f"no node of the cluster holds snapshot {snapshot_id}")
        if not node.alive:
            raise NodeLost(
                f"snapshot {snapshot_id} is on the node {node.name}, which left the cluster"
            )
        return node

    async def check_layers(self, session_id: str, layers: Sequence[str]) -> None:
        """A session stays on its node: it can only be given a snapshot of that node
        (refused here, before a restore stops it)."""
        node = self._live_node(session_id)
        holder = self._snapshot_node(layers[0]) if layers else node
        if holder is not node:
            raise SnapshotOnAnotherNode(
                f"snapshot {layers[0]} is on the node {holder.name} and session "
                f"{session_id} on {node.name}: a session can only take a snapshot of its "
                "own node (start a new session from it instead)"
            )

    async def set_layers(self, session_id: str, layers: list[str]) -> None:
        """The session's files become the snapshots' (see Runtime.set_layers), on its
        node, which must hold them (:meth:`check_layers`)."""
        await self.check_layers(session_id, layers)
        await self._call(self._live_node(session_id), "set_layers", session_id, layers)

    async def restore(
        self,
        session_id: str,
        layers: list[str],
        limits: SandboxLimits,
        network: NetworkPolicy | None = None,
    ) -> None:
        """The node's own restore (its standby, its kept mounts), of snapshots it
        holds (:meth:`check_layers`)."""
        await self.check_layers(session_id, layers)
        node = self._live_node(session_id)
        await self._call(node, "restore", session_id, layers, limits, network)

    async def remove_snapshot(self, snapshot_id: str) -> None:
        """Remove the snapshot's layer on its node; a node away keeps it (an error: the
        caller retries), one not known to hold it is asked, as every node is."""
        name = self._snapshots.get(snapshot_id)
        if name is not None:
            await self._call(self._snapshot_node(snapshot_id), "remove_snapshot", snapshot_id)
        else:
            live = [n for n in self.nodes.values() if n.ready and n.alive]
            await asyncio.gather(*(self._call(n, "remove_snapshot", snapshot_id) for n in live))
        self._snapshots.pop(snapshot_id, None)

    async def snapshot_ids(self) -> set[str]:
        """Every node's snapshots; a node that does not answer is left out (its
        snapshots are not taken for unowned)."""
        live = [n for n in self.nodes.values() if n.ready and n.alive]
        answers = await asyncio.gather(
            *(self._call(n, "snapshot_ids") for n in live), return_exceptions=True
        )
        found: set[str] = set()
        for node, ids in zip(live, answers, strict=True):
            if isinstance(ids, BaseException):
                log.warning("node did not list its snapshots", extra={"node": node.name})
                continue
            for snapshot_id in ids:
                self._snapshots[snapshot_id] = node.name
            found |= set(ids)
        return found

    # -- an image build's result ---------------------------------------------------

    async def with_upper(self, session_id: str, use: Callable[[Path | None, int], T]) -> T:
        """``use(upper, shift)`` in a worker thread on a stopped sandbox's writable
        layer (see the OCI runtime's): the sandbox is on the gateway's own node, whose
        agent holds the layer mounted meanwhile, so this process reads it in place."""
        node = self._live_node(session_id)
        own = self.own_node()
        if own is None or node is not own:
            raise SandboxError(
                f"sandbox {session_id} is on the node {node.name}, not the gateway's own: "
                "its files cannot be stored here"
            )
        upper, shift = await self._call(node, "hold_upper", session_id)
        try:
            return await asyncio.to_thread(use, None if upper is None else Path(upper), shift)
        finally:
            with contextlib.suppress(Exception):
                await self._call(node, "release_upper", session_id)

    async def find_file(self, session_id: str, paths: Sequence[str]) -> str | None:
        found: str | None = await self._call(
            self._live_node(session_id), "find_file", session_id, list(paths)
        )
        return found

    async def is_running(self, session_id: str) -> bool:
        node = self._node(session_id)
        if node is None or not node.alive:
            return False
        try:
            return bool(await self._call(node, "is_running", session_id))
        except NodeLost:
            return False

    async def _union(self, method: str) -> set[str]:
        live = [n for n in self.nodes.values() if n.ready and n.alive]
        answers = await asyncio.gather(
            *(self._call(n, method) for n in live), return_exceptions=True
        )
        found: set[str] = set()
        for node, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("node did not list its sandboxes", extra={"node": node.name})
                continue
            for session_id in answer:
                self._where.setdefault(session_id, node.name)
                found.add(session_id)
        return found

    async def running_sandboxes(self) -> set[str]:
        return await self._union("running_sandboxes")

    async def list_sandboxes(self) -> set[str]:
        return await self._union("list_sandboxes")

    async def started_sandboxes(self) -> set[str]:
        return await self._union("started_sandboxes")

    async def usage(self, session_id: str) -> SandboxUsage:
        """The sandbox's consumption, as its node tells; nothing known (all None) while
        the node does not answer (a session's view must not fail with its node)."""
        try:
            node = self._live_node(session_id)
            result: SandboxUsage = await asyncio.wait_for(
                self._call(node, "usage", session_id), USAGE_TIMEOUT
            )
        except (NodeLost, TimeoutError):
            return SandboxUsage(None, None, None, None)
        return result

    async def exec(self, session_id: str, spec: ExecSpec) -> Process:
        node = self._live_node(session_id)
        if node.address is None:
            raise SandboxNotRunning(f"the node {node.name} has no data plane")
        process = await open_process(node.address, self.secret, session_id, spec)
        return _NodeProcess(process, node, self)

    async def attach(
        self, session_id: str, job_id: str, stdout_offset: int, stderr_offset: int
    ) -> Process:
        """Take up a job an earlier gateway started, over a new data-plane stream to
        the node that runs it (its output from the given bytes on, then its exit)."""
        node = self._live_node(session_id)
        if node.address is None:
            raise SandboxNotRunning(f"the node {node.name} has no data plane")
        process = await attach_process(
            node.address, self.secret, session_id, job_id, stdout_offset, stderr_offset
        )
        return _NodeProcess(process, node, self)

    def files(self, session_id: str) -> SandboxFiles:
        """The session's files on its node, each operation over the data plane."""
        node = self._live_node(session_id)
        address = node.address
        if address is None:
            raise SandboxNotRunning(f"the node {node.name} has no data plane")

        async def connect(
            request: dict[str, Any],
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
            hello = {"session_id": session_id, "files": request}
            return await data_plane.connect(address, self.secret, hello)

        return RemoteFiles(connect)
