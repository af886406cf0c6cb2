"""The OCI runtime spec (``config.json``) of a sandbox, built from plain data.

Everything the sandbox is allowed (namespaces, id mappings, limits, capabilities,
masked and read-only paths, rlimits, the seccomp filter) is written here; the OCI
runtime enforces it.  Nothing in this module touches the host: :func:`sandbox_config`
takes a :class:`SandboxSpec` and returns the dict, so every rule is unit-tested
(tests/unit/test_oci_spec.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion_server.runtime import agent_protocol, idmap, seccomp

#: Container uid/gid 0..ID_RANGE-1 map to the session's own host id range.
ID_RANGE = idmap.RANGE_SIZE
#: Where the agent's directory (a read-only bind of the server's share) is mounted.
AGENT_DIR_IN_SANDBOX = "/run/bastion-agent"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Root of the user namespace (the agent) keeps only what it needs to start jobs as
#: the sandbox user, signal them and hand them a pty.  Jobs keep none (they run as a
#: non-zero uid without ambient capabilities).
AGENT_CAPABILITIES = (
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
)
#: Namespaces of the sandbox's own besides its user namespace.
NAMESPACES = ("pid", "network", "ipc", "uts", "mount", "cgroup")
MASKED_PATHS = (
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
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
#: The most open files a sandbox's process may have (less if the server's hard limit is).
MAX_NOFILE = 8192
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class SandboxSpec:
    """What one sandbox's ``config.json`` is made of.

    Attributes:
        rootfs: Host path of its root filesystem (the overlay mount point).
        share_dir: Host path of the server's share (agent binary), bound read-only.
        resolv_conf: Host path of the resolver's configuration, bound read-only.
        run_dir: Host path of its run directory (the agent's socket), bound read-write.
        agent: The agent's file name in the share.
        id_base: First host id of the session's range (container id 0).
        sandbox_uid: The ordinary sandbox user's uid (the agent runs jobs as it).
        sandbox_gid: Its gid.
        home: Its home directory.
        cgroup: The sandbox's cgroup path (``cgroupsPath``).
        memory_mb: Memory (and memory + swap) limit.
        pids: Process limit.
        cpus: CPU cores (a CFS quota).
        nofile_hard: The server's own hard limit of open files.
        userns: A user namespace to join (a path), None: the runtime makes one.
    """

    rootfs: str
    share_dir: str
    resolv_conf: str
    run_dir: str
    agent: str
    id_base: int
    sandbox_uid: int
    sandbox_gid: int
    home: str
    cgroup: str
    memory_mb: int
    pids: int
    cpus: float
    nofile_hard: int
    userns: str | None = None


def sandbox_mounts(share_dir: str, resolv_conf: str, run_dir: str) -> list[dict[str, Any]]:
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
            "source": share_dir,
            "options": ["rbind", "ro", "nosuid", "nodev"],
        },
        {
            "destination": "/etc/resolv.conf",
            "type": "bind",
            "source": resolv_conf,
            "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
        },
        {
            "destination": agent_protocol.SOCKET_DIR,
            "type": "bind",
            "source": run_dir,
            "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
        },
    ]


def mount_points() -> tuple[str, ...]:
    """The sandbox's mount points: the files API must never remove or replace them (or
    what is above them), or the sandbox would lose them."""
    return tuple(m["destination"] for m in sandbox_mounts("/", "/", "/"))


def sandbox_config(spec: SandboxSpec) -> dict[str, Any]:
    """The ``config.json`` of one sandbox: its agent as pid 1 (as the user namespace's
    root), in namespaces of its own, over its own host id range, within its limits."""
    nofile = min(MAX_NOFILE, spec.nofile_hard)
    memory = spec.memory_mb * 1024 * 1024
    caps = list(AGENT_CAPABILITIES)
    id_map = [{"containerID": 0, "hostID": spec.id_base, "size": ID_RANGE}]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [f"{AGENT_DIR_IN_SANDBOX}/{spec.agent}"],
            "env": [
                f"PATH={DEFAULT_PATH}",
                f"BASTION_UID={spec.sandbox_uid}",
                f"BASTION_GID={spec.sandbox_gid}",
                f"BASTION_HOME={spec.home}",
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
        "root": {"path": spec.rootfs, "readonly": False},
        "hostname": "sandbox",
        "mounts": sandbox_mounts(spec.share_dir, spec.resolv_conf, spec.run_dir),
        "linux": {
            "uidMappings": id_map,
            "gidMappings": [dict(m) for m in id_map],
            "namespaces": [
                {"type": "user", **({"path": spec.userns} if spec.userns else {})},
                *({"type": t} for t in NAMESPACES),
            ],
            "cgroupsPath": spec.cgroup,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": memory, "swap": memory},
                "pids": {"limit": spec.pids},
                "cpu": {"quota": int(spec.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US},
            },
            "seccomp": seccomp.profile(),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
