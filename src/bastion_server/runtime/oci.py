"""Sandboxes as OCI containers run by crun (or runc, or any OCI runtime by name).

Each session owns a directory under ``<data_dir>/sessions/<id>/``::

    upper/  work/   the overlay's writable layer: the session's own files (kept on stop)
    rootfs/         the overlay mount point: image (read-only lower) + upper
    bundle/         the OCI bundle (config.json) handed to the runtime
    run/            bind-mounted at /run/bastion: the agent's socket (mode 0700)
    agent.log       the agent's stderr

Everything the sandbox is allowed (namespaces, id mappings, limits, capabilities,
masked paths, rlimits) is written into ``config.json``; the OCI runtime enforces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion_server.runtime import agent as agent_module
from bastion_server.runtime import host, seccomp
from bastion_server.runtime.agent_build import AgentBuildError, build_agent
from bastion_server.runtime.agent_client import AgentProcess, ping
from bastion_server.runtime.base import (
    ExecSpec,
    Process,
    Runtime,
    SandboxError,
    SandboxLimits,
    SandboxNotRunning,
    SandboxUsage,
)
from bastion_server.runtime.network import NetworkManager, NetworkPolicy
from bastion_server.runtime.sandbox_fs import SandboxFS

log = logging.getLogger("bastion.runtime")

#: Container uid/gid 0..ID_RANGE-1 map to host ids starting here (the image is built
#: with its ownership shifted by the same amount).
ID_RANGE = 65536
AGENT_DIR_IN_SANDBOX = "/run/bastion-agent"
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


@dataclass(frozen=True)
class SandboxImage:
    """What the runtime needs to know of the root filesystem image."""

    rootfs: str
    uid_shift: int
    sandbox_uid: int
    sandbox_gid: int
    home: str


class OciRuntime(Runtime):
    """A :class:`Runtime` backed by an OCI runtime binary (crun by default)."""

    def __init__(
        self,
        data_dir: Path,
        image: SandboxImage,
        binary: str = "crun",
        *,
        pool_size: int = 0,
        pool_limits: SandboxLimits | None = None,
    ) -> None:
        self.name = binary
        self.data_dir = data_dir
        self.image = image
        self.sessions_dir = data_dir / "sessions"
        self.state_root = self.state_root_for(data_dir)
        self.cgroup_parent = f"/bastion/{self._tag(data_dir)}"
        self.agent_source = data_dir / "agent" / "agent.py"
        self.resolv_conf = data_dir / "sandbox-etc" / "resolv.conf"
        self._agent_binary: Path | None = None
        self._prepared = False
        # Warm pool: sandboxes started ahead of need (default limits, no network), handed
        # to a session at create.  Their container keeps its pool name; the session dir
        # records it (see _container).
        self.pool_size = pool_size if pool_limits is not None else 0
        self.pool_limits = pool_limits
        self._pool: list[str] = []
        self._preparing: set[str] = set()
        self._pool_filler: asyncio.Task[None] | None = None
        self._prestarted: set[str] = set()
        self._containers: dict[str, str] = {}
        self.network = NetworkManager(Path(self.state_root))
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
        return str(self._dir(session_id) / "run" / agent_module.SOCKET_NAME)

    # -- host -----------------------------------------------------------------------

    async def prepare_host(self) -> None:
        # `bastion serve` prepares before uvicorn starts (to fail with a plain message)
        # and the app's start-up asks again: the second time there is nothing to do.
        if self._prepared:
            return
        self._binary_path = host.find_runtime_binary(self._binary)
        if host.fix_hybrid_cgroups():
            log.info("moved stray cgroup-v2 controllers to v1 hierarchies for %s", self._binary)
        if not os.path.isdir(self.image.rootfs):
            raise host.HostNotReady(
                f"image root filesystem {self.image.rootfs} is missing: run `bastion image build`"
            )
        os.makedirs(self.state_root, mode=0o700, exist_ok=True)
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        # The sandbox's root (a host uid in the mapped range) must be able to reach the
        # bind-mount sources: keep the path down to them traversable, nothing readable.
        for path in (self.data_dir, self.sessions_dir):
            os.chmod(path, 0o711)
        await self.network.prepare()
        self._check_reachable(self.data_dir)
        self._check_reachable(Path(self.image.rootfs))
        # A private copy of the agent: the sandbox never sees the server's install tree.
        self.agent_source.parent.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.agent_source.parent, 0o755)
        # The sandbox's resolver: slirp4netns answers DNS at 10.0.2.3 (with network on).
        self.resolv_conf.parent.mkdir(mode=0o755, exist_ok=True)
        self.resolv_conf.write_text("nameserver 10.0.2.3\n")
        os.chmod(self.resolv_conf, 0o644)
        source = Path(agent_module.__file__).read_bytes()
        if not self.agent_source.exists() or self.agent_source.read_bytes() != source:
            temp = self.agent_source.with_suffix(".tmp")
            temp.write_bytes(source)
            os.chmod(temp, 0o644)
            temp.replace(self.agent_source)
        # The C agent (static: it runs in any image) costs ~1.4 MB and ~0.3 ms a job;
        # the Python one ~24 MB and ~4 ms.  Without a compiler the Python one serves.
        try:
            self._agent_binary = build_agent(self.agent_source.parent)
        except AgentBuildError as exc:
            self._agent_binary = None
            log.warning("using the Python agent: %s", exc)
        self._prepared = True

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

    async def create(self, session_id: str, limits: SandboxLimits) -> None:
        if limits == self.pool_limits and self._pool:
            self._claim(session_id)
            return
        await self._allocate(session_id, limits)

    async def _allocate(self, session_id: str, limits: SandboxLimits) -> None:
        base = self._dir(session_id)
        for sub in ("layer", "rootfs", "bundle", "run"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o711)
        # Only the sandbox's root (the agent) may reach its socket, not the sandbox user.
        os.chown(base / "run", self.image.uid_shift, self.image.uid_shift)
        os.chmod(base / "run", 0o700)
        # The writable layer lives in a filesystem of its own (a sparse file): writing
        # past the session's disk limit fails with ENOSPC inside the sandbox and takes
        # nothing from anyone else.  Its root belongs to the sandbox's root.
        disk = base / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(limits.disk_mb * 1024 * 1024)
        await self._mkfs(disk)

    async def _mkfs(self, disk: Path) -> None:
        shift = self.image.uid_shift
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

    def _mount_layers(self, base: Path) -> None:
        layer, rootfs = base / "layer", base / "rootfs"
        if not os.path.ismount(layer):
            # Never mount the disk while an earlier mount of it is still going away:
            # two live mounts of one ext4 image would lose writes.
            for _ in range(500):
                if not host.loop_devices_backing(str(base / "disk.img")):
                    break
                time.sleep(0.01)
            else:
                raise SandboxError("the session's disk is still held by its previous run")
            host.mount_loop(
                str(base / "disk.img"), str(layer), "ext4", flags=host.MS_NOSUID | host.MS_NODEV
            )
        for sub in ("upper", "work"):
            path = layer / sub
            if not path.is_dir():
                path.mkdir()
                # The merged root takes the upper layer's owner: the sandbox's root.
                os.chown(path, self.image.uid_shift, self.image.uid_shift)
                os.chmod(path, 0o755)
        if not os.path.ismount(rootfs):
            host.mount(
                "overlay",
                str(rootfs),
                "overlay",
                f"lowerdir={self.image.rootfs},upperdir={layer / 'upper'},workdir={layer / 'work'}",
            )

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
        await asyncio.to_thread(self._mount_layers, base)
        config = self._config(session_id, limits)
        (base / "bundle" / "config.json").write_text(json.dumps(config))
        try:
            os.unlink(self.socket_path(session_id))
        except FileNotFoundError:
            pass
        code, reason = await self._run_container(session_id, base)
        if code != 0 and "exist" in reason:
            # A leftover container of the same name (a crash between start and record):
            # remove it and try once more, rather than paying a delete on every start.
            await self._run("delete", "--force", self._container(session_id), check=False)
            code, reason = await self._run_container(session_id, base)
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

    async def stop(self, session_id: str) -> None:
        await self.network.detach(session_id)
        self._prestarted.discard(session_id)
        await self._run("delete", "--force", self._container(session_id), check=False)
        base = self._dir(session_id)
        for mountpoint in (base / "rootfs", base / "layer"):
            if os.path.ismount(mountpoint):
                host.umount(str(mountpoint))

    async def delete(self, session_id: str) -> None:
        await self.stop(session_id)
        base = self._dir(session_id)
        if base.exists():
            await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)
        self._containers.pop(session_id, None)

    # -- warm pool ------------------------------------------------------------------

    def _claim(self, session_id: str) -> None:
        """Hand a pooled, running sandbox to a new session (a rename, no process work)."""
        name = self._pool.pop()
        os.rename(self._dir(name), self._dir(session_id))
        (self._dir(session_id) / "container").write_text(name)
        self._containers[session_id] = name
        self._prestarted.add(session_id)
        self._refill_pool()

    async def _still_runs(self, session_id: str) -> bool:
        return os.path.exists(self.socket_path(session_id))

    def _refill_pool(self) -> None:
        if self.pool_size and (self._pool_filler is None or self._pool_filler.done()):
            self._pool_filler = asyncio.create_task(self._fill_pool(), name="sandbox pool")

    async def _fill_pool(self) -> None:
        assert self.pool_limits is not None
        while len(self._pool) < self.pool_size:
            name = f"pool_{os.urandom(8).hex()}"
            self._preparing.add(name)
            try:
                await self._allocate(name, self.pool_limits)
                await self.start(name, self.pool_limits)
            except asyncio.CancelledError:
                await self.delete(name)  # shutting down mid-way: leave nothing behind
                raise
            except Exception as exc:  # the pool is an optimisation: never fatal
                log.warning("warm pool: could not prepare a sandbox: %s", exc)
                await self.delete(name)
                return
            finally:
                self._preparing.discard(name)
            self._pool.append(name)

    async def warm_up(self) -> None:
        self._refill_pool()

    async def close(self) -> None:
        """Remove the warm pool's sandboxes (they belong to no session)."""
        if self._pool_filler is not None:
            self._pool_filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_filler
        while self._pool:
            await self.delete(self._pool.pop())
        await self.network.close()

    async def usage(self, session_id: str) -> SandboxUsage:
        cgroup = f"{self.cgroup_parent}/{self._container(session_id)}"
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
            return bool(json.loads(out).get("status") == "running")
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
        return ids - set(self._pool) - self._preparing

    async def list_sandboxes(self) -> set[str]:
        """Every sandbox on disk or known to the runtime, by session id."""
        on_disk = self._on_disk()
        return self._not_the_pools(on_disk | set(await self._container_states(on_disk)))

    async def running_sandboxes(self) -> set[str]:
        states = await self._container_states(self._on_disk())
        return self._not_the_pools({sid for sid, st in states.items() if st == "running"})

    async def exec(self, session_id: str, spec: ExecSpec) -> Process:
        path = self.socket_path(session_id)
        if not os.path.exists(path):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        env = {
            "PATH": _DEFAULT_PATH,
            "HOME": self.image.home,
            "USER": "user",
            "LOGNAME": "user",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            **({"TERM": "xterm-256color"} if spec.pty else {}),
            **spec.env,
        }
        spec = ExecSpec(
            argv=spec.argv,
            env=env,
            cwd=spec.cwd or self.image.home,
            timeout=spec.timeout,
            pty=spec.pty,
            rows=spec.rows,
            cols=spec.cols,
        )
        return await AgentProcess.start(path, spec)

    def files(self, session_id: str) -> SandboxFS:
        rootfs = self._dir(session_id) / "rootfs"
        if not os.path.ismount(rootfs):
            raise SandboxNotRunning(f"sandbox {session_id} is not running")
        return SandboxFS(
            str(rootfs),
            self.image.uid_shift + self.image.sandbox_uid,
            self.image.uid_shift + self.image.sandbox_gid,
        )

    # -- the OCI config -------------------------------------------------------------

    def _agent_args(self) -> list[str]:
        if self._agent_binary is not None:
            return [f"{AGENT_DIR_IN_SANDBOX}/{self._agent_binary.name}"]
        return ["/usr/bin/python3", "-I", "-S", f"{AGENT_DIR_IN_SANDBOX}/agent.py"]

    def _config(self, session_id: str, limits: SandboxLimits) -> dict[str, Any]:
        base = self._dir(session_id)
        shift = self.image.uid_shift
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
                    f"BASTION_UID={self.image.sandbox_uid}",
                    f"BASTION_GID={self.image.sandbox_gid}",
                    f"BASTION_HOME={self.image.home}",
                    f"BASTION_SOCKET_DIR={agent_module.SOCKET_DIR}",
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
            "mounts": [
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
                    "source": str(self.agent_source.parent),
                    "options": ["rbind", "ro", "nosuid", "nodev"],
                },
                {
                    "destination": "/etc/resolv.conf",
                    "type": "bind",
                    "source": str(self.resolv_conf),
                    "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
                },
                {
                    "destination": agent_module.SOCKET_DIR,
                    "type": "bind",
                    "source": str(base / "run"),
                    "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
                },
            ],
            "linux": {
                "uidMappings": [{"containerID": 0, "hostID": shift, "size": ID_RANGE}],
                "gidMappings": [{"containerID": 0, "hostID": shift, "size": ID_RANGE}],
                "namespaces": [
                    {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user", "cgroup")
                ],
                "cgroupsPath": f"{self.cgroup_parent}/{self._container(session_id)}",
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
