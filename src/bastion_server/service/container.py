"""The service layer assembled: store, runtime and the three services over them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from bastion_server.config import ServerConfig
from bastion_server.runtime.base import Runtime
from bastion_server.service.audit import AuditLog
from bastion_server.service.environment import load_env_file
from bastion_server.service.files import FileService
from bastion_server.service.images import ImageService
from bastion_server.service.jobs import JobService
from bastion_server.service.keys import KeyService
from bastion_server.service.sessions import SessionService
from bastion_server.service.snapshots import SnapshotService
from bastion_server.service.terminals import TerminalService
from bastion_server.store.sqlite import Store
from bastion_server.tasks import spawn

log = logging.getLogger("bastion.server")


def make_runtime(config: ServerConfig) -> Runtime:
    """The configured backend (``--backend``, see runtime/factory.py), or with ``ray``
    set the gateway's runtime over the nodes of that Ray cluster."""
    if config.ray is not None:
        from bastion_server.cluster.gateway_runtime import ClusterRuntime

        return ClusterRuntime(config.ray, config)
    from bastion_server.runtime.factory import make_backend

    return make_backend(config)


@dataclass
class Services:
    config: ServerConfig
    store: Store
    runtime: Runtime
    sessions: SessionService
    jobs: JobService
    files: FileService
    terminals: TerminalService
    keys: KeyService
    audit: AuditLog
    snapshots: SnapshotService
    images: ImageService
    reaper: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: ServerConfig, runtime: Runtime | None = None) -> Services:
        runtime = runtime or make_runtime(config)
        await runtime.prepare_host()
        store = Store(config.data_dir / "bastion.db")
        base_env = (
            await asyncio.to_thread(load_env_file, config.env_file) if config.env_file else {}
        )
        audit = await asyncio.to_thread(AuditLog, config.audit_log)
        sessions = SessionService(store, runtime, config, audit=audit, base_env=base_env)
        jobs = JobService(store, runtime, sessions, config)
        files = FileService(runtime, sessions, config)
        terminals = TerminalService(runtime, sessions)
        snapshots = SnapshotService(store, runtime, sessions, config)
        if config.ray is not None:
            from bastion_server.cluster.gateway_runtime import ClusterRuntime

            if isinstance(runtime, ClusterRuntime):  # a node that left: its sessions lost
                runtime.lost_listeners.append(sessions.sandbox_lost)
                runtime.joined_listeners.append(sessions.reap_orphans)
        await sessions.reconcile()
        jobs.recover()  # after it: the jobs of a sandbox still running are taken up again
        await snapshots.reconcile()
        log.info(
            "services ready", extra={"runtime": runtime.name, "data_dir": str(config.data_dir)}
        )
        keys = KeyService(store, config.api_keys)
        from bastion_server.image.store import ImageStore

        images = ImageService(store, runtime, config, ImageStore(config.images_dir))
        await images.prepare()
        await images.start_pools()
        services = cls(
            config, store, runtime, sessions, jobs, files, terminals, keys, audit, snapshots,
            images,
        )  # fmt: skip
        services.reaper = spawn(sessions.run_reaper(), name="reaper")
        await runtime.warm_up()
        return services

    async def begin_shutdown(self) -> None:
        """The server is about to stop serving: end every held request and terminal now,
        each with its documented ending (a job wait its ``server_shutdown`` error, an
        event stream its ``end`` event, a terminal its ``exit`` message), before the
        server waits for connections to close.  Jobs run on until :meth:`close`."""
        self.jobs.begin_shutdown()
        await self.terminals.shutdown()

    async def close(self) -> None:
        # By default (on_shutdown = "keep") sandboxes keep running across a server
        # restart (the next start adopts them), and their jobs with them (the next
        # start takes them up again: JobService.recover).
        await self.begin_shutdown()
        if self.reaper is not None:
            self.reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reaper
        await self.snapshots.shutdown()  # copies under way finish: none is cut off
        await self.images.shutdown()  # builds under way fail ("the server shut down")
        if self.config.on_shutdown != "keep":
            # The operator's exit policy: nothing is left running (or kept) behind.
            action = self.config.on_shutdown
            done = await self.sessions.retire_all(
                action, f"the server shut down (on_shutdown = {action})"
            )
            log.info("exit policy applied", extra={"action": action, "sessions": done})
        await self.jobs.shutdown()
        await self.runtime.close()
        await asyncio.to_thread(self.audit.close)
        self.store.close()
