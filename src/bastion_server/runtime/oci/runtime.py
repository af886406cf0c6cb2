"""The OCI backend: sandboxes as OCI containers run by crun (or runc, or another).

:class:`OciRuntime` is the lifecycle (create, start, stop, delete, pause, snapshots,
processes, files) over four parts of its own, one concern each:

* :mod:`.host_setup`: what the host needs first (the share every sandbox mounts);
* :mod:`.storage`: a sandbox's directory, disk, overlay root and mounts;
* :mod:`.spec`: the ``config.json`` it runs with (pure: namespaces, limits, seccomp...);
* :mod:`.binary`: the OCI runtime binary, with the operator's extra flags.

Warm pools are no concern of this module: :mod:`bastion_server.runtime.warm_pool`
wraps this runtime (or any other) and hands its pre-started sandboxes over with
:meth:`OciRuntime.hand_over`.  Every public method raises :class:`SandboxError` only
(:mod:`bastion_server.runtime.boundary`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import resource
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from bastion_server import faults
from bastion_server.blocking import run_to_end_or_undo
from bastion_server.runtime import agent_protocol, freezer, host, job_limits, sandbox_procs
from bastion_server.runtime.agent_build import BINARY_NAME, find_agent
from bastion_server.runtime.agent_client import AgentProcess, ping
from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    Process,
    Runtime,
    SandboxError,
    SandboxLimits,
    SandboxNotRunning,
    SandboxProcess,
    SandboxUsage,
)
from bastion_server.runtime.boundary import sandbox_errors_only
from bastion_server.runtime.cgroups import Cgroup
from bastion_server.runtime.files import SandboxFiles
from bastion_server.runtime.host_files import HostFiles
from bastion_server.runtime.idmap import IdRange, IdRangeRegistry, UserNamespace
from bastion_server.runtime.network import NetworkManager, NetworkPolicy
from bastion_server.runtime.oci import host_setup, sandbox_kill, storage
from bastion_server.runtime.oci import spec as oci_spec
from bastion_server.runtime.oci.binary import UP, OciBinary
from bastion_server.runtime.sandbox_fs import SandboxFS
from bastion_server.runtime.sandbox_image import SandboxImage
from bastion_server.runtime.snapshots import SnapshotLayer, SnapshotStore
from bastion_server.tasks import spawn

log = logging.getLogger("bastion.runtime")
_T = TypeVar("_T")

AGENT_START_TIMEOUT = 15.0


def _close_namespace(userns: UserNamespace | None) -> None:
    """Close what a start cut short had prepared (run_to_end_or_undo's undo)."""
    if userns is not None:
        userns.close()


@sandbox_errors_only
class OciRuntime(Runtime):
    """A :class:`Runtime` backed by an OCI runtime binary (crun by default)."""

    reattaches_jobs = True  # the sandbox's agent keeps persistent jobs (agent_c/)

    def __init__(
        self,
        data_dir: Path,
        image: SandboxImage,
        binary: str = "crun",
        *,
        global_args: Sequence[str] = (),
        id_ranges: IdRangeRegistry | None = None,
    ) -> None:
        self.name = binary
        self.data_dir = data_dir
        self.image = image
        self.home = image.home
        self.sessions_dir = data_dir / "sessions"
        self.state_root = self.state_root_for(data_dir)
        self.cgroup_parent = f"/bastion/{self._tag(data_dir)}"
        #: A small tmpfs of this server's: what every sandbox bind-mounts read-only (the
        #: agent, resolv.conf).  Being a filesystem's root, it shows no host path inside.
        self.share_dir = Path(self.state_root) / "share"
        self.resolv_conf = self.share_dir / "resolv.conf"
        self.id_ranges = id_ranges or IdRangeRegistry()
        self.binary = OciBinary(binary, self.state_root, global_args)
        self._prepared = False
        #: Sandboxes the server runs for itself (image builds): no session's, so never
        #: listed as one (a crash's leftovers are, and get reaped).
        self.private: set[str] = set()
        self._containers: dict[str, str] = {}
        self._images: dict[str, SandboxImage] = {}
        #: A restore's old writes being removed, by session (see :meth:`restore`).
        self._clearing: dict[str, asyncio.Task[None]] = {}
        self.network = NetworkManager(Path(self.state_root))
        self.snapshots = SnapshotStore(data_dir / "snapshots")

    # -- paths ----------------------------------------------------------------------

    @staticmethod
    def _tag(data_dir: Path) -> str:
        return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]

    @classmethod
    def state_root_for(cls, data_dir: Path) -> str:
        """The OCI runtime's state directory for a data dir: one per data dir, so two
        servers on one host never see (or reap) each other's containers."""
        return f"/run/bastion/{cls._tag(data_dir)}"

    def _dir(self, session_id: str) -> Path:
        return self.sessions_dir / session_id

    def _container(self, session_id: str) -> str:
        """The OCI container's name: the session id, or the name it was started with
        (a warm pool's sandbox handed over keeps it; the session dir records it)."""
        name = self._containers.get(session_id)
        if name is None:
            try:
                name = (self._dir(session_id) / "container").read_text().strip()
            except OSError:
                name = session_id
            self._containers[session_id] = name
        return name

    def sandbox_ref(self, session_id: str) -> str:
        """The OCI container's name: recorded on the session, it is the store's
        mapping of a session to its sandbox (a warm pool's keeps its ``pool_*`` name)."""
        return self._container(session_id)

    def _cgroup(self, session_id: str) -> str:
        return f"{self.cgroup_parent}/{self._container(session_id)}"

    def socket_path(self, session_id: str) -> str:
        return str(self._dir(session_id) / "run" / agent_protocol.SOCKET_NAME)

    # -- host -----------------------------------------------------------------------

    async def prepare_host(self) -> None:
        # `bastion serve` prepares before uvicorn starts (to fail with a plain message)
        # and the app's start-up asks again: the second time there is nothing to do.
        if self._prepared:
            return
        self.binary.resolve()
        # Built by set-up (agent_build.py), never here: missing or stale, start fails.
        agent = find_agent()
        if host.fix_hybrid_cgroups():
            log.info("moved stray cgroup-v2 controllers to v1 hierarchies for %s", self.name)
        if not os.path.isdir(self.image.rootfs):
            raise host.HostNotReady(
                f"image root filesystem {self.image.rootfs} is missing: run `bastion image build`"
            )
        os.makedirs(self.state_root, mode=0o700, exist_ok=True)
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        if swept := await asyncio.to_thread(self.snapshots.prepare):
            log.warning("removed %d snapshots a crash left unfinished", swept)
        # What a crash left in the host-wide id-range registry for this server's
        # sessions: a range registered to a directory that does not record it.
        if stale := await asyncio.to_thread(self.id_ranges.release_stale, self.sessions_dir):
            log.warning("released %d stale id ranges", stale)
        # The sandbox's root (a host uid in the mapped range) must be able to reach the
        # bind-mount sources: keep the path down to them traversable, nothing readable.
        for path in (self.data_dir, self.sessions_dir):
            os.chmod(path, 0o711)
        await self.network.prepare()
        if host.favor_cgroup_moves():
            log.info("remounted cgroup v2 with favordynmods: sandbox starts skip a grace period")
        host_setup.check_reachable(self.data_dir)
        host_setup.check_reachable(Path(self.image.rootfs))
        host_setup.fill_share(self.share_dir, agent)
        self._prepared = True

    async def warm_up(self) -> None:
        # Sandboxes adopted while running have their disk mounted since before a crash
        # (the others are swept as they start).
        for session_id in await asyncio.to_thread(self._on_disk):
            base = self._dir(session_id)
            if os.path.ismount(base / "rootfs"):
                await asyncio.to_thread(self._sweep_temp_names, session_id)
            if os.path.ismount(base / "layer"):  # a restore's old writes a crash left
                await asyncio.to_thread(storage.remove_set_aside, base)

    async def close(self) -> None:
        await self.network.close()

    # -- lifecycle ------------------------------------------------------------------

    async def create(
        self,
        session_id: str,
        limits: SandboxLimits,
        image: SandboxImage | None = None,
        layers: Sequence[str] = (),
    ) -> None:
        image = image or self.image
        base = self._dir(session_id)
        await asyncio.to_thread(storage.make_dir, base, limits.disk_mb, image, self.id_ranges)
        self._images[session_id] = image
        # The writable layer lives in a filesystem of its own (a sparse file): writing
        # past the session's disk limit fails with ENOSPC inside the sandbox and takes
        # nothing from anyone else.  Its root belongs to the sandbox's root.
        faults.point("create.before_mkfs")
        await storage.mkfs(base / storage.DISK, self.id_range(session_id))
        if layers:
            await asyncio.to_thread(self._set_layers, base, list(layers))

    def image_of(self, session_id: str) -> SandboxImage:
        """The image a session was created from (the default image for a session made
        before images could be chosen)."""
        image = self._images.get(session_id)
        if image is None:
            image = SandboxImage.recorded(self._dir(session_id)) or self.image
            self._images[session_id] = image
        return image

    def id_range(self, session_id: str) -> IdRange:
        """The session's host ids; a session made by an older server has none of its
        own and uses the image's (shared) range."""
        return IdRangeRegistry.recorded(self._dir(session_id)) or IdRange(self.image.uid_shift)

    async def hand_over(self, sandbox_id: str, session_id: str, image: SandboxImage) -> None:
        """Give a created (and maybe running) sandbox to ``session_id``: a rename, no
        process work.  Its container keeps its name, recorded in the directory; the id
        range is registered to both names across the rename, so a crash at any point
        leaves what a delete of either name removes whole."""
        await self._cleared(sandbox_id)
        old, new = self._dir(sandbox_id), self._dir(session_id)
        (old / "container").write_text(self._container(sandbox_id))
        if image != self.image_of(sandbox_id):  # same layers, another name or env
            image.save(old)
        storage.rename(old, new, self.id_ranges)
        self._containers[session_id] = self._containers.pop(sandbox_id)
        self._images.pop(sandbox_id, None)
        self._images[session_id] = image

    def _lowers(self, base: Path) -> list[tuple[Path, int]]:
        """The read-only layers a session's root stands on, top first, each with the
        host id its files' container id 0 is: the snapshots it started from, then the
        image's layers."""
        lowers = [(s.path, s.shift) for s in self._snapshot_layers(base)]
        image = self.image_of(base.name)
        lowers.extend((Path(path), image.uid_shift) for path in image.layers)
        return lowers

    def _prepare_start(self, base: Path, rng: IdRange) -> UserNamespace | None:
        """Mounts, and the user namespace the sandbox will join (blocking).

        The namespace is created by the session's own root (so the kernel's per-owner
        counters are the session's alone) and maps container ids onto its range.
        """
        storage.mount_layers(base, rng, self._lowers(base))
        self._sweep_temp_names(base.name)
        if not self.binary.joins_user_namespace:
            return None
        return UserNamespace(rng.base, f"0 {rng.base} {oci_spec.ID_RANGE}\n")

    def _spec(
        self, session_id: str, limits: SandboxLimits, userns: str | None
    ) -> oci_spec.SandboxSpec:
        base = self._dir(session_id)
        image = self.image_of(session_id)
        return oci_spec.SandboxSpec(
            rootfs=str(base / "rootfs"),
            share_dir=str(self.share_dir),
            resolv_conf=str(self.resolv_conf),
            run_dir=str(base / "run"),
            agent=BINARY_NAME,
            id_base=self.id_range(session_id).base,
            sandbox_uid=image.sandbox_uid,
            sandbox_gid=image.sandbox_gid,
            home=image.home,
            cgroup=self._cgroup(session_id),
            memory_mb=limits.memory_mb,
            pids=limits.pids,
            cpus=limits.cpus,
            nofile_hard=host.hard_limit(resource.RLIMIT_NOFILE),
            userns=userns,
        )

    async def start(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None = None
    ) -> None:
        base = self._dir(session_id)
        if not (base / storage.DISK).is_file():
            raise SandboxError(f"sandbox {session_id} has no storage (was it created?)")
        await self._launch(session_id, limits, network)

    async def _launch(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None
    ) -> None:
        """Mount what is not mounted, run the container, wait for its agent and give it
        its network; stopped again if any of it fails."""
        base = self._dir(session_id)
        rng = self.id_range(session_id)
        try:
            # Cancelled meanwhile (a shutdown while the pool fills): the mounts are made
            # whole before the caller's cleanup undoes them, and the namespace closed.
            userns = await run_to_end_or_undo(_close_namespace, self._prepare_start, base, rng)
        except OSError as exc:
            await self.stop(session_id)
            raise SandboxError(f"cannot prepare the sandbox's root: {exc}") from exc
        faults.point("start.after_mounts")
        container = self._container(session_id)
        try:
            config = oci_spec.sandbox_config(
                self._spec(session_id, limits, userns.path if userns else None)
            )
            (base / "bundle" / "config.json").write_text(json.dumps(config))
            log_path = base / "agent.log"
            code, reason = await self.binary.run_detached(base / "bundle", container, log_path)
            if code != 0 and "exist" in reason:
                # A leftover container of that name (a crash between start and record):
                # remove it and try once more, rather than paying a delete every start.
                await self.binary.delete(container)
                code, reason = await self.binary.run_detached(base / "bundle", container, log_path)
        finally:
            if userns is not None:
                await asyncio.to_thread(userns.close)
        if code != 0:
            await self.stop(session_id)
            raise SandboxError(f"{self.name} run failed: {reason or f'exit status {code}'}")
        try:
            await self._wait_for_agent(session_id)
            if network is not None and network.enabled:
                await self.network.attach(session_id, await self._pid(session_id), network)
        except BaseException:
            await self.stop(session_id)
            raise

    async def connect(self, session_id: str, network: NetworkPolicy | None) -> None:
        """Give a sandbox started ahead (a warm pool's, handed over) its session's
        network; SandboxNotRunning if it no longer runs."""
        if not self._still_runs(session_id):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        if network is not None and network.enabled:
            await self.network.attach(session_id, await self._pid(session_id), network)

    async def _pid(self, session_id: str) -> int:
        return await self.binary.pid(self._container(session_id))

    def _still_runs(self, session_id: str) -> bool:
        return os.path.exists(self.socket_path(session_id))

    async def _wait_for_agent(self, session_id: str) -> None:
        path = self.socket_path(session_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AGENT_START_TIMEOUT
        delay = 0.0005
        while loop.time() < deadline:
            if os.path.exists(path) and await ping(path):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.02)
        log_tail = ""
        try:
            log_tail = (self._dir(session_id) / "agent.log").read_text(errors="replace")[-2000:]
        except OSError:
            pass
        raise SandboxError(
            f"sandbox agent did not start within {AGENT_START_TIMEOUT}s: {log_tail.strip()}"
        )

    async def restore_network(self, session_id: str, network: NetworkPolicy) -> None:
        if network.enabled:
            await self.network.restore(session_id, await self._pid(session_id), network)

    async def pause(self, session_id: str) -> None:
        if not self._still_runs(session_id):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        await asyncio.to_thread(freezer.freeze, self._cgroup(session_id))

    async def resume(self, session_id: str) -> None:
        await asyncio.to_thread(freezer.thaw, self._cgroup(session_id))

    async def restore(
        self,
        session_id: str,
        layers: list[str],
        limits: SandboxLimits,
        network: NetworkPolicy | None = None,
    ) -> None:
        """A running sandbox started again over ``layers``, keeping its disk mounted:
        its processes killed through its first one (:mod:`.sandbox_kill`), its writes
        set aside (a rename; removed in the background) and its container run anew
        while the old one's records go.  Saves a stop's and a start's mounts, the
        old writes' removal and ``crun delete --force``'s polling wait."""
        base = self._dir(session_id)
        if not os.path.ismount(base / "layer"):  # not started: nothing to keep
            await super().restore(session_id, layers, limits, network)
            return
        try:
            found = await asyncio.to_thread(self._layers_found, layers)
            await self._end_processes(session_id)
            _, aside = await asyncio.gather(
                self.binary.delete(self._container(session_id)),
                asyncio.to_thread(self._reset_root, base, layers, found),
            )
            self._clearing[session_id] = spawn(
                asyncio.to_thread(shutil.rmtree, aside, True), name="old writes removal"
            )
            faults.point("restore.after_set_aside")
        except BaseException:
            with contextlib.suppress(SandboxError, OSError):
                await self.stop(session_id)
            raise
        await self._launch(session_id, limits, network)

    async def _end_processes(self, session_id: str) -> None:
        """Every process of a sandbox killed and gone, its network and job cgroups
        with them; its container's records and its mounts are left."""
        cgroup = Cgroup(self._cgroup(session_id))
        with contextlib.suppress(OSError):  # a frozen process dies of the kill once thawed
            await asyncio.to_thread(freezer.thaw, self._cgroup(session_id))
        await self.network.detach(session_id)
        try:
            await asyncio.to_thread(sandbox_kill.kill_sandbox, cgroup)
        except TimeoutError as exc:
            raise SandboxError(f"sandbox {session_id}: {exc}") from exc
        await asyncio.to_thread(job_limits.remove_leftovers, cgroup)

    def _reset_root(self, base: Path, layers: list[str], found: list[SnapshotLayer]) -> Path:
        """Unmount a killed sandbox's root and run directory, set its writes aside
        (returned: to remove) and record ``layers`` as what it stands on."""
        for name in ("rootfs", "run"):
            host.umount(str(base / name))
        aside = storage.set_writes_aside(base)
        self._record_layers(base, layers, found)
        return aside

    def _record_layers(self, base: Path, layers: list[str], found: list[SnapshotLayer]) -> None:
        """Record ``layers`` as what the sandbox's files stand on, and their image."""
        image = found[0].image if found else None
        if image is not None:  # the snapshot's files stand on its own image
            image.save(base)
            self._images[base.name] = image
        storage.record_layers(base, layers)

    async def _cleared(self, session_id: str) -> None:
        """Wait for the removal of a restore's old writes (before the disk is unmounted
        or the sandbox renamed)."""
        task = self._clearing.pop(session_id, None)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def stop(self, session_id: str) -> None:
        await self._cleared(session_id)
        try:
            await self._end_processes(session_id)
        except SandboxError as exc:  # (a process stuck in the kernel) the runtime's kill
            log.warning(
                "sandbox processes not ended", extra={"session_id": session_id, "error": str(exc)}
            )
        await self.binary.delete(self._container(session_id))
        await asyncio.to_thread(job_limits.remove_leftovers, Cgroup(self._cgroup(session_id)))
        await asyncio.to_thread(storage.unmount, self._dir(session_id))

    async def kill_all(self, session_id: str) -> None:
        await self._end_processes(session_id)

    async def delete(self, session_id: str) -> None:
        await self.stop(session_id)
        faults.point("delete.after_stop")
        await asyncio.to_thread(storage.remove_dir, self._dir(session_id), self.id_ranges)
        self._containers.pop(session_id, None)
        self._images.pop(session_id, None)

    # -- a stopped sandbox's files as a layer -------------------------------------------

    async def with_upper(self, session_id: str, use: Callable[[Path | None, int], _T]) -> _T:
        """``use(upper, shift)`` in a worker thread, on a stopped sandbox's writable
        layer: its overlay upper directory (None: it never wrote a file) and the first
        host id of the range its files are owned in.  How an image build's result (or
        any session's own files) becomes a layer: see image/store.py capture."""
        base = self._dir(session_id)
        if os.path.ismount(base / "rootfs"):
            raise SandboxError(f"sandbox {session_id} is running: stop it first")
        rng = self.id_range(session_id)

        def run() -> _T:
            with storage.disk_mounted(base) as layer:
                return use(storage.upper_of(layer), rng.base)

        return await asyncio.to_thread(run)

    # -- snapshots --------------------------------------------------------------------

    def _snapshot_layers(self, base: Path) -> list[SnapshotLayer]:
        """The snapshot layers a session's files stand on, top first (none: the image)."""
        return [self.snapshots.layer(name) for name in storage.recorded_layers(base)]

    async def set_layers(self, session_id: str, layers: list[str]) -> None:
        base = self._dir(session_id)
        if os.path.ismount(base / "rootfs"):
            raise SandboxError(f"sandbox {session_id} is running: stop it first")
        await asyncio.to_thread(self._set_layers, base, layers)

    def _layers_found(self, layers: list[str]) -> list[SnapshotLayer]:
        """The snapshot layers named, each there and whole (SandboxError if not)."""
        return [self.snapshots.layer(name) for name in layers]

    def _set_layers(self, base: Path, layers: list[str]) -> None:
        found = self._layers_found(layers)
        # A sandbox never started has written nothing: its disk need not be opened.
        started = (base / "agent.log").exists()
        with storage.disk_mounted(base, needed=started) as layer:
            # The session's own writes go: its files are the snapshot's alone.
            for sub in ("upper", "work") if started else ():
                shutil.rmtree(layer / sub, ignore_errors=True)
            self._record_layers(base, layers, found)

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        base = self._dir(session_id)
        if not (base / storage.DISK).is_file():
            raise SandboxError(f"sandbox {session_id} has no storage")
        rng = self.id_range(session_id)
        cgroup = self._cgroup(session_id)
        frozen_here = False
        if self._still_runs(session_id) and not freezer.is_frozen(cgroup):
            # Frozen for the copy: a write in flight is in it or not, never torn.
            await asyncio.to_thread(freezer.freeze, cgroup)
            frozen_here = True
        try:
            return await asyncio.to_thread(self._capture, base, snapshot_id, rng)
        finally:
            if frozen_here:
                await asyncio.to_thread(freezer.thaw, cgroup)

    def _capture(self, base: Path, snapshot_id: str, rng: IdRange) -> int:
        with storage.disk_mounted(base) as layer:  # a stopped session's: for the copy
            return self.snapshots.capture(
                storage.upper_of(layer), snapshot_id, rng.base, self.image_of(base.name)
            )

    async def remove_snapshot(self, snapshot_id: str) -> None:
        await asyncio.to_thread(self.snapshots.remove, snapshot_id)

    async def snapshot_ids(self) -> set[str]:
        return await asyncio.to_thread(self.snapshots.ids)

    # -- what runs --------------------------------------------------------------------

    async def usage(self, session_id: str) -> SandboxUsage:
        used = Cgroup(self._cgroup(session_id)).usage()
        disk: int | None = None
        layer = self._dir(session_id) / "layer"
        if os.path.ismount(layer):
            st = os.statvfs(layer)
            disk = (st.f_blocks - st.f_bfree) * st.f_frsize
        return SandboxUsage(
            cpu_seconds=used.cpu_seconds,
            memory_bytes=used.memory_bytes,
            processes=used.processes,
            disk_bytes=disk,
        )

    async def is_running(self, session_id: str) -> bool:
        return await self.binary.is_up(self._container(session_id))

    async def _container_states(self, on_disk: set[str]) -> dict[str, str]:
        """Every container the runtime knows, by session id: its status."""
        owners = {self._container(sid): sid for sid in on_disk}
        return {owners.get(name, name): st for name, st in (await self.binary.statuses()).items()}

    def _on_disk(self) -> set[str]:
        if not self.sessions_dir.is_dir():
            return set()
        return {p.name for p in self.sessions_dir.iterdir() if p.is_dir()}

    async def list_sandboxes(self) -> set[str]:
        """Every sandbox on disk or known to the runtime, by session id."""
        on_disk = self._on_disk()
        return (on_disk | set(await self._container_states(on_disk))) - self.private

    async def running_sandboxes(self) -> set[str]:
        states = await self._container_states(self._on_disk())
        return {sid for sid, st in states.items() if st in UP} - self.private

    async def started_sandboxes(self) -> set[str]:
        containers = await self._container_states(self._on_disk())
        mounted = await asyncio.to_thread(storage.mounted_sessions, self.sessions_dir)
        return (set(containers) | mounted) - self.private

    async def exec(self, session_id: str, spec: ExecSpec) -> Process:
        path = self.socket_path(session_id)
        if not os.path.exists(path):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        image = self.image_of(session_id)
        as_root = spec.user == "root"
        env = {
            "PATH": oci_spec.DEFAULT_PATH,
            "HOME": "/root" if as_root else image.home,
            "USER": "root" if as_root else "user",
            "LOGNAME": "root" if as_root else "user",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            **({"TERM": "xterm-256color"} if spec.pty else {}),
            **dict(image.env),
            **spec.env,
        }
        spec = dataclasses.replace(spec, env=env, cwd=spec.cwd or image.cwd)
        # A job cgroup for memory/pids limits (named after a persistent job's id, for
        # a restarted server to find); the OOM facts at exit (job_limits.py).
        fds, on_exit = await job_limits.prepare(
            Cgroup(self._cgroup(session_id)), job_limits.cgroup_name(spec.persist_as), spec.limits
        )
        try:
            return await AgentProcess.start(path, spec, fds, on_exit)
        except BaseException:
            await on_exit(ExitEvent(exit_code=None, error="start_failed"))
            raise
        finally:
            await job_limits.release_fds(fds)

    async def attach(
        self, session_id: str, job_id: str, stdout_offset: int, stderr_offset: int
    ) -> Process:
        path = self.socket_path(session_id)
        if not os.path.exists(path):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        # Its verdict as the server that started it would have given it.
        on_exit = job_limits.reattached(
            Cgroup(self._cgroup(session_id)), job_limits.cgroup_name(job_id)
        )
        return await AgentProcess.attach(path, job_id, stdout_offset, stderr_offset, on_exit)

    async def processes(self, session_id: str) -> list[SandboxProcess]:
        if not os.path.exists(self.socket_path(session_id)):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        return await asyncio.to_thread(
            sandbox_procs.list_processes,
            Cgroup(self._cgroup(session_id)),
            self.id_range(session_id),
            {0: "root", self.image_of(session_id).sandbox_uid: "user"},
        )

    # -- files ------------------------------------------------------------------------

    def files(self, session_id: str) -> SandboxFiles:
        return HostFiles(self._host_fs(session_id))

    def _host_fs(self, session_id: str) -> SandboxFS:
        rootfs = self._dir(session_id) / "rootfs"
        if not os.path.ismount(rootfs):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        rng = self.id_range(session_id)
        image = self.image_of(session_id)
        return SandboxFS(
            str(rootfs),
            user=(rng.host(image.sandbox_uid), rng.host(image.sandbox_gid)),
            superuser=(rng.base, rng.base),
            protected=self.protected_paths,
            # Outside the sandbox's view, on the host's disk: the temp names of uploads
            # being linked in, for a crash in the middle (see SandboxFS.write).
            journal=str(self._dir(session_id) / "uploads-linking"),
        )

    @functools.cached_property
    def protected_paths(self) -> tuple[str, ...]:
        """The sandbox's mount points: the files API must never remove or replace
        them (or what is above them), or the sandbox would lose them."""
        return oci_spec.mount_points()

    def _sweep_temp_names(self, session_id: str) -> None:
        """Remove upload temp names a crash left in a mounted sandbox (blocking)."""
        try:
            removed = self._host_fs(session_id).sweep_temp_names()
        except (OSError, SandboxNotRunning) as exc:
            log.warning(
                "upload temp names not swept", extra={"session_id": session_id, "error": str(exc)}
            )
            return
        if removed:
            log.warning(
                "removed upload temp names a crash left",
                extra={"session_id": session_id, "count": removed},
            )
