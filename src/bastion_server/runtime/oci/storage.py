"""A sandbox's storage on the host: its directory, disk, overlay root and mounts.

Each sandbox owns a directory under ``<data_dir>/sessions/<id>/``::

    disk.img        the writable layer: an ext4 image of the session's disk size
    layer/          its mount point; upper/ and work/ in it are the overlay's
    rootfs/         the overlay mount point: image (read-only, idmapped lower) + upper
    bundle/         the OCI bundle (config.json) handed to the runtime
    run/            a small tmpfs bind-mounted at /run/bastion: the agent's socket
    image.json      the image it was created from (sandbox_image.py)
    snapshot-layers the snapshots its files stand on, top first (if any)
    container       the OCI container's name, if not the directory's (a warm pool's)
    id-range        the session's own host id range (see idmap.py)
    agent.log       the agent's stderr

The directory belongs to the session's own root (its range's first id) with mode
0700: no other host user, and no other session, can look into it.  Nothing the
sandbox sees names a host path: the overlay's layers are given as ``/proc/self/fd``
paths and every bind-mount source is the root of a filesystem of its own.

Every function here blocks (mounts, file system work): callers run them in a worker
thread, except :func:`mkfs`, which does so itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from bastion_server import faults
from bastion_server.runtime import host, idmap
from bastion_server.runtime.base import SandboxError
from bastion_server.runtime.idmap import IdRange, IdRangeRegistry, UserNamespace
from bastion_server.runtime.sandbox_image import SandboxImage

#: What a started sandbox has mounted in its directory.
MOUNT_POINTS = ("rootfs", "layer", "run")
#: In a session's directory: the snapshots its files stand on, top first, one a line.
LAYERS_FILE = "snapshot-layers"
#: The disk image: the sandbox's writable layer.
DISK = "disk.img"
#: In a mounted disk: a restore's old writes, set aside until removed.
ASIDE_PREFIX = ".restored-"


def make_dir(base: Path, disk_mb: int, image: SandboxImage, id_ranges: IdRangeRegistry) -> None:
    """A new sandbox's directory: its own id range, its image recorded, a sparse disk
    of ``disk_mb`` (not yet formatted: :func:`mkfs`)."""
    base.mkdir(mode=0o700)
    rng = id_ranges.take(base)
    image.save(base)
    for sub in ("layer", "rootfs", "bundle", "run"):
        (base / sub).mkdir(mode=0o700)
    fd = os.open(base / DISK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, disk_mb * 1024 * 1024)
    finally:
        os.close(fd)
    # The session's own root may walk into its directory (to its root filesystem and
    # bind-mount sources); no other host user and no other session may.
    os.chown(base, rng.base, rng.base)


async def mkfs(disk: Path, rng: IdRange) -> None:
    """Format the disk as ext4 whose root belongs to the sandbox's root."""
    shift = rng.base
    proc = await asyncio.to_thread(
        subprocess.run,
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"nodiscard,root_owner={shift}:{shift}",
         str(disk)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SandboxError(f"mkfs.ext4 failed: {proc.stdout.decode(errors='replace').strip()}")


def mount_disk(base: Path) -> None:
    """Mount the session's disk (its writable layer) on ``layer/``."""
    flags = host.MS_NOSUID | host.MS_NODEV
    host.mount_image(str(base / DISK), str(base / "layer"), "ext4", flags=flags)


@contextlib.contextmanager
def disk_mounted(base: Path, needed: bool = True) -> Iterator[Path]:
    """The session's writable layer (``layer/``) mounted for the block's work: mounted
    here (and unmounted after) unless it already is, or unless not ``needed``."""
    layer = base / "layer"
    mounted_here = needed and not os.path.ismount(layer)
    if mounted_here:
        mount_disk(base)
    try:
        yield layer
    finally:
        if mounted_here:
            host.umount(str(layer))


def upper_of(layer: Path) -> Path | None:
    """The overlay's upper directory in a mounted layer (None: never written)."""
    upper = layer / "upper"
    return upper if upper.is_dir() else None


def set_writes_aside(base: Path) -> Path:
    """Move the session's own writes (the overlay's upper and work directories of its
    mounted disk, its root not mounted) aside, for :func:`remove_set_aside`: a rename,
    however much was written.  The next :func:`mount_layers` makes them anew, empty."""
    layer = base / "layer"
    aside = layer / f"{ASIDE_PREFIX}{os.urandom(6).hex()}"
    aside.mkdir(mode=0o700)
    for sub in ("upper", "work"):
        with contextlib.suppress(FileNotFoundError):  # never written: nothing there
            os.rename(layer / sub, aside / sub)
    return aside


def remove_set_aside(base: Path) -> None:
    """Remove every restore's old writes left on the session's mounted disk."""
    layer = base / "layer"
    for entry in os.scandir(layer):
        if entry.name.startswith(ASIDE_PREFIX):
            shutil.rmtree(entry.path, ignore_errors=True)


def mount_layers(base: Path, rng: IdRange, lowers: Sequence[tuple[Path, int]]) -> None:
    """Mount the session's disk, its overlay root over ``lowers`` (each a layer
    directory and the host id its files' container id 0 is, top first) and its run
    directory; what is mounted already is left as it is."""
    layer, rootfs, run = base / "layer", base / "rootfs", base / "run"
    if not os.path.ismount(layer):
        mount_disk(base)
        remove_set_aside(base)  # what a crash left of a restore
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
        _mount_overlay(rootfs, layer, lowers, rng)
    if not os.path.ismount(run):
        # Only the sandbox's root (the agent) may reach its socket.
        host.mount(
            "bastion", str(run), "tmpfs",
            f"mode=0700,uid={rng.base},gid={rng.base},size=64k,nr_inodes=64",
            host.MS_NOSUID | host.MS_NODEV | host.MS_NOEXEC,
        )  # fmt: skip


def _mount_overlay(
    rootfs: Path, layer: Path, lowers: Sequence[tuple[Path, int]], rng: IdRange
) -> None:
    """The lower layers (seen through the session's ids) under the session's own.

    Layers are named by ``/proc/self/fd`` paths, so the mount's options (which the
    sandbox can read in its mountinfo) show no host path.
    """
    fds: list[int] = []
    try:
        for path, shift in lowers:
            fds.append(_lower_fd(path, shift, rng))
        for sub in ("upper", "work"):
            fds.append(os.open(layer / sub, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in fds[:-2])
        options = f"lowerdir={lowerdir},upperdir=/proc/self/fd/{{}},workdir=/proc/self/fd/{{}}"
        host.mount("overlay", str(rootfs), "overlay", options.format(*fds[-2:]))
    finally:
        for fd in fds:
            os.close(fd)


def _lower_fd(path: Path, shift: int, rng: IdRange) -> int:
    """A read-only layer whose files are owned from host id ``shift`` on, seen through
    the session's ids: an idmapped mount unless the two ranges are one."""
    if rng.base == shift:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    userns = UserNamespace(0, f"{shift} {rng.base} {idmap.RANGE_SIZE}\n")
    try:
        ns_fd = userns.open()
        try:
            return idmap.idmapped_tree(str(path), ns_fd)
        finally:
            os.close(ns_fd)
    finally:
        userns.close()


def unmount(base: Path) -> None:
    """Unmount whatever of a sandbox's is mounted (its root first)."""
    for name in MOUNT_POINTS:
        if os.path.ismount(base / name):
            host.umount(str(base / name))


def mounted_sessions(sessions_dir: Path) -> set[str]:
    """Session ids with anything mounted in their directory (one read of the mount
    table)."""
    prefix = f"{sessions_dir}/"
    found = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ", 5)
            if len(fields) > 4 and fields[4].startswith(prefix):
                found.add(fields[4][len(prefix) :].split("/", 1)[0])
    return found


def remove_dir(base: Path, id_ranges: IdRangeRegistry) -> None:
    """Remove a stopped session's directory so that a crash at any point leaves what a
    second call finishes: its id range is given back once nothing its ids own is left,
    and the directory's record of it goes after that."""
    if not base.exists():
        return
    mounted = [m for m in MOUNT_POINTS if os.path.ismount(base / m)]
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
            id_ranges.release(rng, base)
        (base / IdRangeRegistry.RECORD).unlink(missing_ok=True)
        base.rmdir()
    except OSError as exc:
        raise SandboxError(f"cannot remove the files of {base.name}: {exc}") from exc


def recorded_layers(base: Path) -> list[str]:
    """The snapshots a session's files stand on, top first (none: the image alone)."""
    try:
        return (base / LAYERS_FILE).read_text().split()
    except FileNotFoundError:
        return []


def record_layers(base: Path, names: Sequence[str]) -> None:
    """Record the snapshots a session's files stand on (atomically)."""
    temp = base / f"{LAYERS_FILE}.tmp"
    temp.write_text("".join(f"{name}\n" for name in names))
    temp.replace(base / LAYERS_FILE)


def rename(old: Path, new: Path, id_ranges: IdRangeRegistry) -> None:
    """Give a sandbox's directory another name, its id range registered to both names
    across the rename: a crash at any point leaves what a delete of either removes."""
    rng = IdRangeRegistry.recorded(old)
    if rng is None:
        os.rename(old, new)
        return
    with id_ranges.moving(rng, old, new):
        os.rename(old, new)
        faults.point("create.mid_claim")
