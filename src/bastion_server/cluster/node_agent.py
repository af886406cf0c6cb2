"""The node agent: one Ray actor per node of the cluster, owning that node's sandboxes.

The gateway starts it (named, detached, pinned to its node by a hard node-affinity
strategy; see :mod:`.gateway_runtime`), so it outlives a gateway restart and a
restarted gateway finds it again by name.  It runs the node's sandboxes with the
single-machine :class:`~bastion_server.runtime.oci.OciRuntime` over a data directory
of its own (``<data_dir>/nodes/<node name>``), answers the gateway's lifecycle calls
over Ray, and serves the processes' bytes over its :mod:`.data_plane` port.

A node's images are those of its own images directory: the gateway's
``--images-dir`` path on the node, or the directory named by ``BASTION_NODE_IMAGES_DIR``
in the environment of the node's ``ray start``.

A node's name is stable across a restart of the node: the part after
``bastion_node_`` of a custom resource the node was started with
(``ray start --resources='{"bastion_node_w1": 1}'``), else the node's IP address.  The
same name finds the same data directory again, so a node that comes back finds what
its sandboxes left, and the gateway removes what no session owns any more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from bastion_server.cluster.data_plane import DataPlaneServer
from bastion_server.cluster.node_images import HeldImages
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import (
    ExecSpec,
    Process,
    Runtime,
    SandboxError,
    SandboxLimits,
    SandboxProcess,
)
from bastion_server.runtime.network import NetworkPolicy
from bastion_server.runtime.sandbox_image import SandboxImage

log = logging.getLogger("bastion.cluster")
T = TypeVar("T")

#: The Ray namespace of every Bastion actor (so that names are found across drivers).
NAMESPACE = "bastion"
#: A node named by the operator carries a custom resource ``bastion_node_<name>``.
NODE_RESOURCE_PREFIX = "bastion_node_"
#: Names a node's own images directory, where it is not the gateway's ``--images-dir``.
NODE_IMAGES_ENV = "BASTION_NODE_IMAGES_DIR"
#: The longest path a Unix socket's name holds (sun_path, less its NUL).
UNIX_PATH_MAX = 107
#: Longest a sandbox's writable layer stays mounted for the gateway (storing a built
#: layer; a gateway that died meanwhile never releases it).
HOLD_TIMEOUT = 600.0


def node_name(resources: dict[str, float], address: str) -> str:
    """A node's Bastion name: from its ``bastion_node_<name>`` resource, else its IP."""
    for resource in sorted(resources):
        if resource.startswith(NODE_RESOURCE_PREFIX) and len(resource) > len(NODE_RESOURCE_PREFIX):
            return resource[len(NODE_RESOURCE_PREFIX) :]
    return address


def actor_name(name: str) -> str:
    return f"bastion-node-{name}"


def _memory_available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


class NodeAgent:
    """The actor's class (made a Ray actor by the gateway, with ``ray.remote``).

    Every method is a coroutine Ray runs on the actor's event loop, which hands the
    work to the agent's own: a plain asyncio loop in a thread of its own, where the OCI
    runtime and the data plane's server live.  (Ray's loop runs off the main thread
    under uvloop, whose child processes never report their exit there: the OCI
    runtime's nft and slirp4netns calls would fail.)
    """

    def __init__(self, name: str, config: ServerConfig, secret: bytes) -> None:
        self.name = name
        self.config = dataclasses.replace(
            config,
            data_dir=Path(config.data_dir) / "nodes" / name,
            images_dir=Path(os.environ.get(NODE_IMAGES_ENV) or config.images_dir),
            ray=None,
        )
        self.secret = secret
        self.runtime: Runtime | None = None
        self.data_plane: DataPlaneServer | None = None
        self.address: tuple[str, int] | None = None
        self.error: str | None = None
        #: Sessions created here and not started yet: they count as load.
        self._fresh: set[str] = set()
        #: The images this node's own images directory holds.
        self.images = HeldImages(self.config.images_dir)
        #: Sandboxes whose writable layer is held mounted for the gateway (a build's
        #: result being stored): the event that lets each go.
        self._held: dict[str, threading.Event] = {}
        # Ray made its loop with uvloop's policy, under which a loop of another thread
        # has no child watcher: the plain policy gives this one asyncio's own.
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="node agent", daemon=True).start()

    async def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def ready(self, secret: bytes) -> dict[str, Any]:
        """Prepare the node once (host, image, data plane); then say how it went.

        ``secret`` is the gateway's: a gateway that restarted with the same data dir
        has the same, and one that did not takes the agent over."""
        self.secret = secret
        if self.data_plane is not None:
            self.data_plane.secret = secret
        if self.runtime is None and self.error is None:
            await self._on_loop(self._prepare())
        return {
            "name": self.name,
            "ready": self.runtime is not None,
            "error": self.error,
            "address": self.address,
            "home": self.runtime.home if self.runtime is not None else "/",
            "data_dir": str(self.config.data_dir),
        }

    async def _prepare(self) -> None:
        import ray

        from bastion_server.service.container import make_runtime

        # A sandbox agent's socket is reached by its host path, which a Unix socket
        # name holds at most 107 bytes of.
        longest = self.config.data_dir / "sessions" / ("s" * 28) / "run" / "agent.sock"
        if len(str(longest).encode()) > UNIX_PATH_MAX:
            self.error = (
                f"the node's data dir {self.config.data_dir} is too long for the sandboxes' "
                f"sockets (at most {UNIX_PATH_MAX} bytes for {longest}): choose a shorter "
                "--data-dir"
            )
            return
        try:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
            runtime = make_runtime(self.config)
            await runtime.prepare_host()
            await runtime.warm_up()
        except Exception as exc:  # reported to the gateway: the node takes no sessions
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("node agent not ready: %s", self.error)
            return
        self.runtime = runtime
        self.data_plane = DataPlaneServer(
            self._exec, self.secret, runtime.files, attach=runtime.attach
        )
        ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.address = await self.data_plane.start(ip)

    def _rt(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError(f"node {self.name} is not ready: {self.error}")
        return self.runtime

    async def _exec(self, session_id: str, spec: ExecSpec) -> Process:
        return await self._rt().exec(session_id, spec)

    async def load(self) -> dict[str, Any]:
        running = await self._on_loop(self._rt().running_sandboxes())
        self._fresh -= running
        return {
            "sessions": len(running | self._fresh),
            "memory_available_mb": _memory_available_mb(),
            "images": await asyncio.to_thread(self.images.digests),
        }

    # -- the Runtime's calls, forwarded -------------------------------------------

    async def create(
        self,
        session_id: str,
        limits: SandboxLimits,
        image: SandboxImage | None,
        private: bool = False,
        layers: list[str] | None = None,
    ) -> None:
        """Create the sandbox over this node's own copy of ``image`` (by digest), with
        the files of the snapshots ``layers`` (kept on this node; see Runtime.create);
        ``private``: a sandbox of the server's own (an image build), never a session's."""
        runtime = self._rt()
        if image is not None:
            image = await asyncio.to_thread(self.images.local, image)
        if private:
            self._private(runtime).add(session_id)
        try:
            await self._on_loop(runtime.create(session_id, limits, image, layers or ()))
        except BaseException:
            if private:
                self._private(runtime).discard(session_id)
            raise
        if not private:
            self._fresh.add(session_id)

    @staticmethod
    def _private(runtime: Runtime) -> set[str]:
        private = getattr(runtime, "private", None)
        if not isinstance(private, set):
            raise SandboxError(f"the {runtime.name} runtime cannot build images")
        return private

    async def start(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None
    ) -> None:
        try:
            await self._on_loop(self._rt().start(session_id, limits, network))
        finally:
            self._fresh.discard(session_id)

    async def restore_network(self, session_id: str, network: NetworkPolicy) -> None:
        await self._on_loop(self._rt().restore_network(session_id, network))

    async def stop(self, session_id: str) -> None:
        await self._on_loop(self._rt().stop(session_id))

    async def delete(self, session_id: str) -> None:
        self._fresh.discard(session_id)
        runtime = self._rt()
        await self._on_loop(runtime.delete(session_id))
        private = getattr(runtime, "private", None)
        if isinstance(private, set):
            private.discard(session_id)

    async def pause(self, session_id: str) -> None:
        await self._on_loop(self._rt().pause(session_id))

    async def resume(self, session_id: str) -> None:
        await self._on_loop(self._rt().resume(session_id))

    async def find_file(self, session_id: str, paths: list[str]) -> str | None:
        return await self._on_loop(self._rt().find_file(session_id, paths))

    async def is_running(self, session_id: str) -> bool:
        return await self._on_loop(self._rt().is_running(session_id))

    async def running_sandboxes(self) -> set[str]:
        return await self._on_loop(self._rt().running_sandboxes())

    async def list_sandboxes(self) -> set[str]:
        return await self._on_loop(self._rt().list_sandboxes())

    async def started_sandboxes(self) -> set[str]:
        return await self._on_loop(self._rt().started_sandboxes())

    async def usage(self, session_id: str) -> Any:
        return await self._on_loop(self._rt().usage(session_id))

    async def processes(self, session_id: str) -> list[SandboxProcess]:
        return await self._on_loop(self._rt().processes(session_id))

    # -- snapshots: each lives on the node of the session it was taken of ----------

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        return await self._on_loop(self._rt().capture(session_id, snapshot_id))

    async def set_layers(self, session_id: str, layers: list[str]) -> None:
        await self._on_loop(self._rt().set_layers(session_id, layers))

    async def restore(
        self,
        session_id: str,
        layers: list[str],
        limits: SandboxLimits,
        network: NetworkPolicy | None,
    ) -> None:
        await self._on_loop(self._rt().restore(session_id, layers, limits, network))

    async def remove_snapshot(self, snapshot_id: str) -> None:
        await self._on_loop(self._rt().remove_snapshot(snapshot_id))

    async def snapshot_ids(self) -> set[str]:
        return await self._on_loop(self._rt().snapshot_ids())

    # -- an image build's result: the sandbox's writable layer, held mounted -------

    async def hold_upper(self, session_id: str) -> tuple[str | None, int]:
        """Mount a stopped sandbox's writable layer and keep it mounted until
        :meth:`release_upper`: (its upper directory, None if it wrote nothing; the
        first host id its files are owned in).  For the gateway on this same machine
        to store it as a layer image (see gateway_runtime.py, ``with_upper``)."""
        runtime = self._rt()
        with_upper: Callable[..., Coroutine[Any, Any, None]] | None = getattr(
            runtime, "with_upper", None
        )
        if with_upper is None:
            raise SandboxError(f"the {runtime.name} runtime cannot build images")
        release = threading.Event()
        mounted: asyncio.Future[tuple[str | None, int]] = asyncio.get_running_loop().create_future()
        ray_loop = asyncio.get_running_loop()

        def hold(upper: Path | None, shift: int) -> None:
            ray_loop.call_soon_threadsafe(
                mounted.set_result, (None if upper is None else str(upper), shift)
            )
            release.wait(timeout=HOLD_TIMEOUT)

        self._held[session_id] = release
        held = asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(with_upper(session_id, hold), self._loop)
        )
        either: set[asyncio.Future[Any]] = {mounted, held}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if mounted not in done:
            self._held.pop(session_id, None)
            held.result()  # its error
            raise SandboxError(f"the writable layer of {session_id} was not mounted")
        return mounted.result()

    async def release_upper(self, session_id: str) -> None:
        release = self._held.pop(session_id, None)
        if release is not None:
            release.set()

    async def shutdown(self) -> None:
        """Release what the agent holds for itself (the warm pool), sandboxes kept."""
        if self.data_plane is not None:
            await self._on_loop(self.data_plane.close())
        if self.runtime is not None:
            await self._on_loop(self.runtime.close())
