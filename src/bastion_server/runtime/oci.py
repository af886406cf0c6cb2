"""Sandboxes as OCI containers run by crun (or runc, or any OCI runtime by name).

Each session owns a directory under ``<data_dir>/sessions/<id>/``::

    disk.img        the writable layer: an ext4 image of the session's disk size
    layer/          its mount point; upper/ and work/ in it are the overlay's
    rootfs/         the overlay mount point: image (read-only, idmapped lower) + upper
    bundle/         the OCI bundle (config.json) handed to the runtime
    run/            a small tmpfs bind-mounted at /run/bastion: the agent's socket
    id-range        the session's own host id range (see idmap.py)
    agent.log       the agent's stderr

The session directory belongs to the session's own root (its range's first id) with
mode 0700: no other host user, and no other session, can look into it.  Nothing the
sandbox sees names a host path: the overlay's layers are given as ``/proc/self/fd``
paths and every bind-mount source is the root of a filesystem of its own.

Everything the sandbox is allowed (namespaces, id mappings, limits, capabilities,
masked paths, rlimits) is written into ``config.json``; the OCI runtime enforces it.
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
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bastion_server import faults
from bastion_server.runtime import (
    agent_protocol,
    freezer,
    host,
    idmap,
    job_limits,
    sandbox_procs,
    seccomp,
)
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
from bastion_server.runtime.cgroups import Cgroup
from bastion_server.runtime.files import SandboxFiles
from bastion_server.runtime.host_files import HostFiles
from bastion_server.runtime.idmap import IdRange, IdRangeRegistry, UserNamespace
from bastion_server.runtime.network import NetworkManager, NetworkPolicy
from bastion_server.runtime.sandbox_fs import SandboxFS
from bastion_server.runtime.sandbox_image import SandboxImage
from bastion_server.runtime.snapshots import SnapshotLayer, SnapshotStore
from bastion_server.tasks import spawn

log = logging.getLogger("bastion.runtime")
_T = TypeVar("_T")

#: Container uid/gid 0..ID_RANGE-1 map to the session's own host id range.
ID_RANGE = idmap.RANGE_SIZE
AGENT_DIR_IN_SANDBOX = "/run/bastion-agent"
#: Runtimes known to join a user namespace made ahead (one the session's own root
#: owns).  runc 1.1 then fails to set rlimits, so it makes its own, owned by host root:
#: its sessions still have their own id ranges, but share the per-owner counters.
JOINS_USER_NAMESPACE = frozenset({"crun"})
AGENT_START_TIMEOUT = 15.0
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Root of the user namespace (the agent) keeps only what it needs to start jobs as the
# sandbox user, signal them and hand them a pty.  Jobs keep none (they run as a
# non-zero uid without ambient capabilities).
_AGENT_CAPABILITIES = [
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
]


#: In a session's directory: the snapshots its files stand on, top first, one a line.
_LAYERS_FILE = "snapshot-layers"
#: The OCI runtime's statuses of a container that is up: a paused one is frozen, alive.
_UP = frozenset({"running", "paused"})


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_stat(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


class OciRuntime(Runtime):
    """A :class:`Runtime` backed by an OCI runtime binary (crun by default)."""

    reattaches_jobs = True  # the sandbox's agent keeps persistent jobs (agent_c/)

    def __init__(
        self,
        data_dir: Path,
        image: SandboxImage,
        binary: str = "crun",
        *,
        pool_size: int = 0,
        pool_limits: SandboxLimits | None = None,
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
        self._prepared = False
        # Warm pool: sandboxes started ahead of need (default limits, no network), handed
        # to a session at create.  Their container keeps its pool name; the session dir
        # records it (see _container).
        self.pool_size = pool_size if pool_limits is not None else 0
        self.pool_limits = pool_limits
        self._pool: list[str] = []
        # One pool per image (add_pool); the default image's is _pool.
        self._pools: dict[SandboxImage, list[str]] = {image: self._pool}
        self._pool_sizes: dict[SandboxImage, int] = {image: self.pool_size}
        self._preparing: set[str] = set()
        #: Sandboxes the server runs for itself (image builds): no session's, so never
        #: listed as one (a crash's leftovers are, and get reaped).
        self.private: set[str] = set()
        self._pool_filler: asyncio.Task[None] | None = None
        self._prestarted: set[str] = set()
        self._containers: dict[str, str] = {}
        self._images: dict[str, SandboxImage] = {}
        self.network = NetworkManager(Path(self.state_root))
        self.snapshots = SnapshotStore(data_dir / "snapshots")
        self._binary = binary
        self._binary_path = ""

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
        """The OCI container's name: the session id, or the pool name it was born with."""
        name = self._containers.get(session_id)
        if name is None:
            try:
                name = (self._dir(session_id) / "container").read_text().strip()
            except OSError:
                name = session_id
            self._containers[session_id] = name
        return name

    def socket_path(self, session_id: str) -> str:
        return str(self._dir(session_id) / "run" / agent_protocol.SOCKET_NAME)

    # -- host -----------------------------------------------------------------------

    async def prepare_host(self) -> None:
        # `bastion serve` prepares before uvicorn starts (to fail with a plain message)
        # and the app's start-up asks again: the second time there is nothing to do.
        if self._prepared:
            return
        self._binary_path = host.find_runtime_binary(self._binary)
        # Built by set-up (agent_build.py), never here: missing or stale, start fails.
        agent = find_agent()
        if host.fix_hybrid_cgroups():
            log.info("moved stray cgroup-v2 controllers to v1 hierarchies for %s", self._binary)
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
        self._check_reachable(self.data_dir)
        self._check_reachable(Path(self.image.rootfs))
        self._fill_share(agent)
        self._prepared = True

    def _fill_share(self, agent: Path) -> None:
        """Mount (once per boot) and fill the tmpfs every sandbox bind-mounts: the
        agent (a private copy: the sandbox never sees the server's install tree) and
        the resolver's configuration (slirp4netns answers DNS at 10.0.2.3)."""
        self.share_dir.mkdir(mode=0o755, exist_ok=True)
        if not os.path.ismount(self.share_dir):
            host.mount(
                "bastion", str(self.share_dir), "tmpfs", "mode=0755,size=16m",
                host.MS_NOSUID | host.MS_NODEV,
            )  # fmt: skip
        os.chmod(self.share_dir, 0o755)
        files = {"resolv.conf": b"nameserver 10.0.2.3\n", BINARY_NAME: agent.read_bytes()}
        for stale in self.share_dir.iterdir():  # what an earlier version put there
            if stale.name not in files:
                stale.unlink()
        for name, data in files.items():
            target = self.share_dir / name
            if target.exists() and target.read_bytes() == data:
                continue
            temp = self.share_dir / f".{name}.tmp"
            temp.write_bytes(data)
            os.chmod(temp, 0o755 if name == BINARY_NAME else 0o644)
            temp.replace(target)

    @staticmethod
    def _check_reachable(path: Path) -> None:
        """The sandbox's root is an unprivileged host uid: it must be able to walk down
        to its root filesystem and bind-mount sources (search permission, nothing more)."""
        for parent in [path.absolute(), *path.absolute().parents]:
            if parent.exists() and not os.stat(parent).st_mode & 0o001:
                raise host.HostNotReady(
                    f"{parent} is not searchable by other users (mode "
                    f"{oct(os.stat(parent).st_mode & 0o777)}), so sandboxes cannot reach "
                    f"{path}; run `chmod o+x {parent}` or choose another directory"
                )

    async def _run(
        self,
        *args: str,
        check: bool = True,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
    ) -> tuple[int, str]:
        """Run the OCI runtime binary in a worker thread.

        Forking from the event loop's thread would stall every other request for the
        fork and exec (milliseconds in a large process); a thread keeps them flowing.
        """
        proc = await asyncio.to_thread(
            subprocess.run,
            [self._binary_path or self._binary, "--root", self.state_root, *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            check=False,
        )
        text = (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(
            errors="replace"
        )
        if check and proc.returncode != 0:
            raise SandboxError(f"{self._binary} {args[0]} failed: {text.strip()}")
        return proc.returncode, text

    # -- lifecycle ------------------------------------------------------------------

    async def create(
        self, session_id: str, limits: SandboxLimits, image: SandboxImage | None = None
    ) -> None:
        image = image or self.image
        pool = self._pools.get(image)
        if limits == self.pool_limits and pool:
            self._claim(session_id, pool)
            return
        await self._allocate(session_id, limits, image)

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

    async def _allocate(self, session_id: str, limits: SandboxLimits, image: SandboxImage) -> None:
        await asyncio.to_thread(self._make_dir, self._dir(session_id), limits.disk_mb, image)
        self._images[session_id] = image
        # The writable layer lives in a filesystem of its own (a sparse file): writing
        # past the session's disk limit fails with ENOSPC inside the sandbox and takes
        # nothing from anyone else.  Its root belongs to the sandbox's root.
        disk = self._dir(session_id) / "disk.img"
        faults.point("create.before_mkfs")
        await self._mkfs(disk, self.id_range(session_id))

    def _make_dir(self, base: Path, disk_mb: int, image: SandboxImage) -> None:
        base.mkdir(mode=0o700)
        rng = self.id_ranges.take(base)
        image.save(base)
        for sub in ("layer", "rootfs", "bundle", "run"):
            (base / sub).mkdir(mode=0o700)
        fd = os.open(base / "disk.img", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, disk_mb * 1024 * 1024)
        finally:
            os.close(fd)
        # The session's own root may walk into its directory (to its root filesystem
        # and bind-mount sources); no other host user and no other session may.
        os.chown(base, rng.base, rng.base)

    async def _mkfs(self, disk: Path, rng: IdRange) -> None:
        shift = rng.base
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                f"nodiscard,root_owner={shift}:{shift}",
                str(disk),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise SandboxError(f"mkfs.ext4 failed: {proc.stdout.decode(errors='replace').strip()}")

    def _prepare_start(self, base: Path, rng: IdRange) -> UserNamespace | None:
        """Mounts, and the user namespace the sandbox will join (blocking).

        The namespace is created by the session's own root (so the kernel's per-owner
        counters are the session's alone) and maps container ids onto its range.
        """
        self._mount_layers(base, rng)
        self._sweep_temp_names(base.name)
        if os.path.basename(self._binary) not in JOINS_USER_NAMESPACE:
            return None
        return UserNamespace(rng.base, f"0 {rng.base} {ID_RANGE}\n")

    def _mount_layers(self, base: Path, rng: IdRange) -> None:
        """Mount the session's disk, its overlay root and its run directory (blocking)."""
        layer, rootfs, run = base / "layer", base / "rootfs", base / "run"
        if not os.path.ismount(layer):
            self._mount_disk(base)
        for sub in ("upper", "work"):
            path = layer / sub
            if not path.is_dir():
                path.mkdir()
                # The merged root takes the upper layer's owner: the sandbox's root.
                os.chown(path, rng.base, rng.base)
                os.chmod(path, 0o755)
        # ... and its mode: "/" is like /tmp (sticky, open to all), so the sandbox user
        # (and the files API, acting as that user) may put files at the top, as the
        # product page does with "/main.py", yet not move or remove root's /etc, /proc...
        os.chmod(layer / "upper", 0o1777)
        if not os.path.ismount(rootfs):
            self._mount_overlay(rootfs, layer, rng)
        if not os.path.ismount(run):
            # Only the sandbox's root (the agent) may reach its socket.
            host.mount(
                "bastion", str(run), "tmpfs",
                f"mode=0700,uid={rng.base},gid={rng.base},size=64k,nr_inodes=64",
                host.MS_NOSUID | host.MS_NODEV | host.MS_NOEXEC,
            )  # fmt: skip

    @staticmethod
    def _mount_disk(base: Path) -> None:
        """Mount the session's disk (its writable layer) on ``layer/`` (blocking)."""
        flags = host.MS_NOSUID | host.MS_NODEV
        host.mount_image(str(base / "disk.img"), str(base / "layer"), "ext4", flags=flags)

    def _mount_overlay(self, rootfs: Path, layer: Path, rng: IdRange) -> None:
        """The image (seen through the session's ids) under the session's own layer.

        Layers are named by ``/proc/self/fd`` paths, so the mount's options (which the
        sandbox can read in its mountinfo) show no host path.
        """
        fds: list[int] = []
        try:
            # Top first: the snapshots the session started from, then the image.
            lowers = [(s.path, s.shift) for s in self._snapshot_layers(rootfs.parent)]
            image = self.image_of(rootfs.parent.name)
            lowers.extend((Path(path), image.uid_shift) for path in image.layers)
            for path, shift in lowers:
                fds.append(self._lower_fd(path, shift, rng))
            for sub in ("upper", "work"):
                fds.append(os.open(layer / sub, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in fds[:-2])
            options = f"lowerdir={lowerdir},upperdir=/proc/self/fd/{{}},workdir=/proc/self/fd/{{}}"
            host.mount("overlay", str(rootfs), "overlay", options.format(*fds[-2:]))
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _lower_fd(path: Path, shift: int, rng: IdRange) -> int:
        """A read-only layer whose files are owned from host id ``shift`` on, seen
        through the session's ids: an idmapped mount unless the two ranges are one."""
        if rng.base == shift:
            return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        userns = UserNamespace(0, f"{shift} {rng.base} {ID_RANGE}\n")
        try:
            ns_fd = userns.open()
            try:
                return idmap.idmapped_tree(str(path), ns_fd)
            finally:
                os.close(ns_fd)
        finally:
            userns.close()

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
            layer = base / "layer"
            mounted_here = not os.path.ismount(layer)
            if mounted_here:
                host.mount_image(
                    str(base / "disk.img"), str(layer), "ext4", flags=host.MS_NOSUID | host.MS_NODEV
                )
            try:
                upper = layer / "upper"
                return use(upper if upper.is_dir() else None, rng.base)
            finally:
                if mounted_here:
                    host.umount(str(layer))

        return await asyncio.to_thread(run)

    # -- snapshots --------------------------------------------------------------------

    def _snapshot_layers(self, base: Path) -> list[SnapshotLayer]:
        """The snapshot layers a session's files stand on, top first (none: the image)."""
        try:
            names = (base / _LAYERS_FILE).read_text().split()
        except FileNotFoundError:
            return []
        return [self.snapshots.layer(name) for name in names]

    async def set_layers(self, session_id: str, layers: list[str]) -> None:
        base = self._dir(session_id)
        if session_id in self._prestarted:  # a warm pool's sandbox: over the image alone
            await self.stop(session_id)
        if os.path.ismount(base / "rootfs"):
            raise SandboxError(f"sandbox {session_id} is running: stop it first")
        await asyncio.to_thread(self._set_layers, base, layers)

    def _set_layers(self, base: Path, layers: list[str]) -> None:
        found = [self.snapshots.layer(name) for name in layers]  # each there, whole
        image = found[0].image if found else None
        layer = base / "layer"
        # A sandbox never started has written nothing: its disk need not be opened.
        started = (base / "agent.log").exists()
        mounted_here = started and not os.path.ismount(layer)
        if mounted_here:
            self._mount_disk(base)
        try:
            # The session's own writes go: its files are the snapshot's alone.
            for sub in ("upper", "work") if started else ():
                shutil.rmtree(layer / sub, ignore_errors=True)
            if image is not None:  # the snapshot's files stand on its own image
                image.save(base)
                self._images[base.name] = image
            temp = base / f"{_LAYERS_FILE}.tmp"
            temp.write_text("".join(f"{name}\n" for name in layers))
            temp.replace(base / _LAYERS_FILE)
        finally:
            if mounted_here:
                host.umount(str(layer))

    async def capture(self, session_id: str, snapshot_id: str) -> int:
        base = self._dir(session_id)
        if not (base / "disk.img").is_file():
            raise SandboxError(f"sandbox {session_id} has no storage")
        rng = self.id_range(session_id)
        cgroup = self._cgroup(session_id)
        frozen_here = False
        if await self._still_runs(session_id) and not freezer.is_frozen(cgroup):
            # Frozen for the copy: a write in flight is in it or not, never torn.
            await asyncio.to_thread(freezer.freeze, cgroup)
            frozen_here = True
        try:
            return await asyncio.to_thread(self._capture, base, snapshot_id, rng)
        except OSError as exc:
            raise SandboxError(f"cannot snapshot {session_id}: {exc}") from exc
        finally:
            if frozen_here:
                await asyncio.to_thread(freezer.thaw, cgroup)

    def _capture(self, base: Path, snapshot_id: str, rng: IdRange) -> int:
        layer = base / "layer"
        mounted_here = not os.path.ismount(layer)
        if mounted_here:  # a stopped session: its disk, for the copy
            self._mount_disk(base)
        try:
            upper = layer / "upper"
            return self.snapshots.capture(
                upper if upper.is_dir() else None, snapshot_id, rng.base, self.image_of(base.name)
            )
        finally:
            if mounted_here:
                host.umount(str(layer))

    async def remove_snapshot(self, snapshot_id: str) -> None:
        await asyncio.to_thread(self.snapshots.remove, snapshot_id)

    async def snapshot_ids(self) -> set[str]:
        return await asyncio.to_thread(self.snapshots.ids)

    async def start(
        self, session_id: str, limits: SandboxLimits, network: NetworkPolicy | None = None
    ) -> None:
        if session_id in self._prestarted and await self._still_runs(session_id):
            self._prestarted.discard(session_id)
            if network is not None and network.enabled:
                try:
                    await self.network.attach(session_id, await self._pid(session_id), network)
                except BaseException:
                    await self.stop(session_id)
                    raise
            return
        base = self._dir(session_id)
        if not (base / "disk.img").is_file():
            raise SandboxError(f"sandbox {session_id} has no storage (was it created?)")
        rng = self.id_range(session_id)
        try:
            userns = await asyncio.to_thread(self._prepare_start, base, rng)
        except OSError as exc:
            await self.stop(session_id)
            raise SandboxError(f"cannot prepare the sandbox's root: {exc}") from exc
        faults.point("start.after_mounts")
        try:
            config = self._config(session_id, limits, rng, userns.path if userns else None)
            (base / "bundle" / "config.json").write_text(json.dumps(config))
            code, reason = await self._run_container(session_id, base)
            if code != 0 and "exist" in reason:
                # A leftover container of that name (a crash between start and record):
                # remove it and try once more, rather than paying a delete every start.
                await self._run("delete", "--force", self._container(session_id), check=False)
                code, reason = await self._run_container(session_id, base)
        finally:
            if userns is not None:
                await asyncio.to_thread(userns.close)
        if code != 0:
            await self.stop(session_id)
            raise SandboxError(f"{self._binary} run failed: {reason or f'exit status {code}'}")
        try:
            await self._wait_for_agent(session_id)
            if network is not None and network.enabled:
                await self.network.attach(session_id, await self._pid(session_id), network)
        except BaseException:
            await self.stop(session_id)
            raise

    async def _run_container(self, session_id: str, base: Path) -> tuple[int, str]:
        """``crun run --detach``; returns its exit status and what it said."""
        # The container inherits crun's stdio, so crun writes to the agent's log file
        # (a pipe would stay open as long as the sandbox runs).
        log_path = base / "agent.log"
        with open(log_path, "ab") as agent_log:
            offset = agent_log.tell()
            code, _ = await self._run(
                "run",
                "--detach",
                "--bundle",
                str(base / "bundle"),
                self._container(session_id),
                check=False,
                stdout=agent_log,
                stderr=agent_log,
            )
        if code == 0:
            return 0, ""
        with open(log_path, "rb") as f:
            f.seek(offset)
            return code, f.read(4000).decode(errors="replace").strip()

    async def _pid(self, session_id: str) -> int:
        _, out = await self._run("state", self._container(session_id))
        try:
            return int(json.loads(out)["pid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SandboxError(f"cannot read the sandbox's pid: {out[:200]}") from exc

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

    def _cgroup(self, session_id: str) -> str:
        return f"{self.cgroup_parent}/{self._container(session_id)}"

    async def pause(self, session_id: str) -> None:
        if not await self._still_runs(session_id):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        try:
            await asyncio.to_thread(freezer.freeze, self._cgroup(session_id))
        except OSError as exc:
            raise SandboxError(f"cannot pause sandbox {session_id}: {exc}") from exc

    async def resume(self, session_id: str) -> None:
        try:
            await asyncio.to_thread(freezer.thaw, self._cgroup(session_id))
        except OSError as exc:
            raise SandboxError(f"cannot resume sandbox {session_id}: {exc}") from exc

    async def stop(self, session_id: str) -> None:
        # A frozen sandbox is thawed first: its processes then die at once of the kill.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(freezer.thaw, self._cgroup(session_id))
        await self.network.detach(session_id)
        self._prestarted.discard(session_id)
        await self._run("delete", "--force", self._container(session_id), check=False)
        await asyncio.to_thread(job_limits.remove_leftovers, Cgroup(self._cgroup(session_id)))
        await asyncio.to_thread(self._unmount, self._dir(session_id))

    @staticmethod
    def _unmount(base: Path) -> None:
        for mountpoint in (base / "rootfs", base / "layer", base / "run"):
            if os.path.ismount(mountpoint):
                host.umount(str(mountpoint))

    async def delete(self, session_id: str) -> None:
        await self.stop(session_id)
        faults.point("delete.after_stop")
        await asyncio.to_thread(self._remove_dir, self._dir(session_id))
        self._containers.pop(session_id, None)
        self._images.pop(session_id, None)

    def _remove_dir(self, base: Path) -> None:
        """Remove a stopped session's directory (blocking) so that a crash at any
        point leaves what a second call finishes: its id range is given back once
        nothing its ids own is left, and the directory's record of it goes after that."""
        if not base.exists():
            return
        mounted = [m for m in ("rootfs", "layer", "run") if os.path.ismount(base / m)]
        if mounted:  # never remove through a mount: it would empty what is mounted
            raise SandboxError(f"{base.name}: {', '.join(mounted)} still mounted")
        rng = IdRangeRegistry.recorded(base)
        try:
            for child in base.iterdir():
                if child.name == IdRangeRegistry.RECORD:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
                faults.point("delete.mid_remove")
            if rng is not None:
                self.id_ranges.release(rng, base)
            (base / IdRangeRegistry.RECORD).unlink(missing_ok=True)
            base.rmdir()
        except OSError as exc:
            raise SandboxError(f"cannot remove the files of {base.name}: {exc}") from exc

    # -- warm pool ------------------------------------------------------------------

    def add_pool(self, image: SandboxImage, size: int) -> None:
        """Keep ``size`` sandboxes of ``image`` started ahead of need (default limits),
        as for the default image's pool: a session of that image then starts as fast."""
        if self.pool_limits is None or image == self.image:
            return
        self._pools.setdefault(image, [])
        self._pool_sizes[image] = size
        self._refill_pool()

    def _claim(self, session_id: str, pool: list[str]) -> None:
        """Hand a pooled, running sandbox to a new session (a rename, no process work)."""
        name = pool.pop()
        # The container's name goes with the directory, and the id range is registered
        # to both names across the rename: a crash at any point leaves what a delete of
        # either name removes whole.
        (self._dir(name) / "container").write_text(name)
        rng = IdRangeRegistry.recorded(self._dir(name))
        if rng is None:
            os.rename(self._dir(name), self._dir(session_id))
        else:
            with self.id_ranges.moving(rng, self._dir(name), self._dir(session_id)):
                os.rename(self._dir(name), self._dir(session_id))
                faults.point("create.mid_claim")
        self._containers[session_id] = name
        self._images[session_id] = self._images.pop(name, self.image)
        self._prestarted.add(session_id)
        self._refill_pool()

    async def _still_runs(self, session_id: str) -> bool:
        return os.path.exists(self.socket_path(session_id))

    def _refill_pool(self) -> None:
        wanted = any(self._pool_sizes.values())
        if wanted and (self._pool_filler is None or self._pool_filler.done()):
            self._pool_filler = spawn(self._fill_pool(), name="sandbox pool")

    async def _fill_pool(self) -> None:
        assert self.pool_limits is not None
        for image, size in list(self._pool_sizes.items()):
            pool = self._pools[image]
            while len(pool) < size:
                name = f"pool_{os.urandom(8).hex()}"
                self._preparing.add(name)
                try:
                    await self._allocate(name, self.pool_limits, image)
                    await self.start(name, self.pool_limits)
                except asyncio.CancelledError:
                    await self.delete(name)  # shutting down mid-way: leave nothing behind
                    raise
                except Exception as exc:  # the pool is an optimisation: never fatal
                    log.warning("warm pool: could not prepare a sandbox: %s", exc)
                    await self.delete(name)
                    break
                finally:
                    self._preparing.discard(name)
                pool.append(name)

    async def warm_up(self) -> None:
        # Sandboxes adopted while running have their disk mounted since before a crash
        # (the others are swept as they start).
        for session_id in await asyncio.to_thread(self._on_disk):
            if os.path.ismount(self._dir(session_id) / "rootfs"):
                await asyncio.to_thread(self._sweep_temp_names, session_id)
        self._refill_pool()

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

    async def close(self) -> None:
        """Remove the warm pool's sandboxes (they belong to no session)."""
        if self._pool_filler is not None:
            self._pool_filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_filler
        for pool in self._pools.values():
            while pool:
                await self.delete(pool.pop())
        await self.network.close()

    async def usage(self, session_id: str) -> SandboxUsage:
        cgroup = self._cgroup(session_id)
        v1, v2 = "/sys/fs/cgroup/{}" + cgroup + "/{}", "/sys/fs/cgroup" + cgroup + "/{}"
        cpu_ns = _read_int(v1.format("cpuacct", "cpuacct.usage"))
        if cpu_ns is None:
            usec = _read_stat(v2.format("cpu.stat"), "usage_usec")
            cpu_ns = usec * 1000 if usec is not None else None
        memory = _read_int(v1.format("memory", "memory.usage_in_bytes"))
        if memory is None:
            memory = _read_int(v2.format("memory.current"))
        pids = _read_int(v1.format("pids", "pids.current"))
        if pids is None:
            pids = _read_int(v2.format("pids.current"))
        disk: int | None = None
        layer = self._dir(session_id) / "layer"
        if os.path.ismount(layer):
            st = os.statvfs(layer)
            disk = (st.f_blocks - st.f_bfree) * st.f_frsize
        return SandboxUsage(
            cpu_seconds=cpu_ns / 1e9 if cpu_ns is not None else None,
            memory_bytes=memory,
            processes=pids,
            disk_bytes=disk,
        )

    async def is_running(self, session_id: str) -> bool:
        code, out = await self._run(
            "state", self._container(session_id), check=False, stderr=subprocess.DEVNULL
        )
        if code != 0:
            return False
        try:
            return json.loads(out).get("status") in _UP
        except ValueError:
            return False

    async def _container_states(self, on_disk: set[str]) -> dict[str, str]:
        """Every container the runtime knows, by session id: its status."""
        owners = {self._container(sid): sid for sid in on_disk}
        code, out = await self._run("list", "--format", "json", check=False)
        try:
            entries = json.loads(out) if code == 0 else None
        except ValueError:
            entries = None
        states: dict[str, str] = {}
        for entry in entries or ():
            name = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(name, str):
                states[owners.get(name, name)] = str(entry.get("status"))
        return states

    def _on_disk(self) -> set[str]:
        if not self.sessions_dir.is_dir():
            return set()
        return {p.name for p in self.sessions_dir.iterdir() if p.is_dir()}

    def _not_the_pools(self, ids: set[str]) -> set[str]:
        """The warm pool's own sandboxes belong to no session yet; leftovers of an
        earlier run's pool are not in it, so they stay listed (and get reaped)."""
        pooled = {name for pool in self._pools.values() for name in pool}
        return ids - pooled - self._preparing - self.private

    async def list_sandboxes(self) -> set[str]:
        """Every sandbox on disk or known to the runtime, by session id."""
        on_disk = self._on_disk()
        return self._not_the_pools(on_disk | set(await self._container_states(on_disk)))

    async def running_sandboxes(self) -> set[str]:
        states = await self._container_states(self._on_disk())
        return self._not_the_pools({sid for sid, st in states.items() if st in _UP})

    async def started_sandboxes(self) -> set[str]:
        containers = await self._container_states(self._on_disk())
        mounted = await asyncio.to_thread(self._mounted_sessions)
        return self._not_the_pools(set(containers) | mounted)

    def _mounted_sessions(self) -> set[str]:
        """Session ids with anything mounted in their directory (one read of the
        mount table)."""
        prefix = f"{self.sessions_dir}/"
        found = set()
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" ", 5)
                if len(fields) > 4 and fields[4].startswith(prefix):
                    found.add(fields[4][len(prefix) :].split("/", 1)[0])
        return found

    async def exec(self, session_id: str, spec: ExecSpec) -> Process:
        path = self.socket_path(session_id)
        if not os.path.exists(path):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        image = self.image_of(session_id)
        as_root = spec.user == "root"
        env = {
            "PATH": _DEFAULT_PATH,
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
        # A job cgroup for memory/pids limits; the OOM facts at exit (job_limits.py).
        fds, on_exit = await job_limits.prepare(
            Cgroup(self._cgroup(session_id)), f"job_{secrets.token_hex(6)}", spec.limits
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
        return await AgentProcess.attach(path, job_id, stdout_offset, stderr_offset)

    async def processes(self, session_id: str) -> list[SandboxProcess]:
        if not os.path.exists(self.socket_path(session_id)):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        return await asyncio.to_thread(
            sandbox_procs.list_processes,
            Cgroup(self._cgroup(session_id)),
            self.id_range(session_id),
            {0: "root", self.image_of(session_id).sandbox_uid: "user"},
        )

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

    # -- the OCI config -------------------------------------------------------------

    def _agent_args(self) -> list[str]:
        return [f"{AGENT_DIR_IN_SANDBOX}/{BINARY_NAME}"]

    def _mounts(self, base: Path) -> list[dict[str, Any]]:
        """What the sandbox has mounted over its root filesystem."""
        return [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": AGENT_DIR_IN_SANDBOX,
                "type": "bind",
                "source": str(self.share_dir),
                "options": ["rbind", "ro", "nosuid", "nodev"],
            },
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": str(self.resolv_conf),
                "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
            },
            {
                "destination": agent_protocol.SOCKET_DIR,
                "type": "bind",
                "source": str(base / "run"),
                "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
            },
        ]

    @functools.cached_property
    def protected_paths(self) -> tuple[str, ...]:
        """The sandbox's mount points: the files API must never remove or replace
        them (or what is above them), or the sandbox would lose them."""
        return tuple(m["destination"] for m in self._mounts(Path("/")))

    def _config(
        self, session_id: str, limits: SandboxLimits, rng: IdRange, userns: str | None
    ) -> dict[str, Any]:
        base = self._dir(session_id)
        image = self.image_of(session_id)
        shift = rng.base
        nofile = min(8192, host.hard_limit(resource.RLIMIT_NOFILE))
        memory = limits.memory_mb * 1024 * 1024
        period = 100_000
        caps = list(_AGENT_CAPABILITIES)
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": self._agent_args(),
                "env": [
                    f"PATH={_DEFAULT_PATH}",
                    f"BASTION_UID={image.sandbox_uid}",
                    f"BASTION_GID={image.sandbox_gid}",
                    f"BASTION_HOME={image.home}",
                    f"BASTION_SOCKET_DIR={agent_protocol.SOCKET_DIR}",
                ],
                "cwd": "/",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile},
                    {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                ],
                "noNewPrivileges": True,
            },
            "root": {"path": str(base / "rootfs"), "readonly": False},
            "hostname": "sandbox",
            "mounts": self._mounts(base),
            "linux": {
                "uidMappings": [{"containerID": 0, "hostID": shift, "size": ID_RANGE}],
                "gidMappings": [{"containerID": 0, "hostID": shift, "size": ID_RANGE}],
                "namespaces": [
                    {"type": "user", **({"path": userns} if userns else {})},
                    *({"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")),
                ],
                "cgroupsPath": self._cgroup(session_id),
                "resources": {
                    "devices": [{"allow": False, "access": "rwm"}],
                    "memory": {"limit": memory, "swap": memory},
                    "pids": {"limit": limits.pids},
                    "cpu": {"quota": int(limits.cpus * period), "period": period},
                },
                "seccomp": seccomp.profile(),
                "maskedPaths": [
                    "/proc/acpi",
                    "/proc/asound",
                    "/proc/kcore",
                    "/proc/keys",
                    "/proc/latency_stats",
                    "/proc/timer_list",
                    "/proc/timer_stats",
                    "/proc/sched_debug",
                    "/proc/scsi",
                    "/sys/firmware",
                    "/sys/devices/virtual/powercap",
                    # Loop devices name their backing files: other sessions' disks.
                    "/sys/block",
                    "/sys/class/block",
                    "/sys/dev/block",
                    "/sys/devices/virtual/block",
                ],
                "readonlyPaths": [
                    "/proc/bus",
                    "/proc/fs",
                    "/proc/irq",
                    "/proc/sys",
                    "/proc/sysrq-trigger",
                ],
            },
        }
