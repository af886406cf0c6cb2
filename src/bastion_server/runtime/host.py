"""Host preparation: what must be true of the machine before a sandbox can start."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import resource
import shutil
import struct
import time

from bastion_server.blocking import refuse_event_loop

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REMOUNT = 32
#: The cgroup v2 mount option that keeps moving a process into a cgroup cheap.
FAVOR_DYNMODS = "favordynmods"

_V2_CONTROLLER_FILES = (
    "/sys/fs/cgroup/unified/cgroup.controllers",
    "/sys/fs/cgroup/cgroup.controllers",
)


class HostNotReady(Exception):
    """The host lacks something a sandbox needs; the message says what to do."""


def mount(source: str, target: str, fstype: str, options: str, flags: int = 0) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def umount(target: str, *, wait: float = 2.0) -> None:
    """Unmount ``target`` for real, waiting up to ``wait`` seconds while it is busy.

    A lazy (detached) unmount is the last resort only: a filesystem that lingers
    detached still holds its data, and mounting the same image again meanwhile would
    show the old contents (the data written last would seem lost).  Blocks (sleeps
    between tries): never call it on the event loop's thread (it refuses).
    """
    refuse_event_loop("host.umount")
    deadline = time.monotonic() + wait
    while _libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # not (or no longer) a mount point
            return
        if err != errno.EBUSY or time.monotonic() > deadline:
            if err == errno.EBUSY and _libc.umount2(target.encode(), MNT_DETACH) == 0:
                return
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
        time.sleep(0.01)


def loop_devices_backing(image: str) -> list[str]:
    """Loop devices bound to ``image`` (a filesystem image) right now."""
    found = []
    real = os.path.realpath(image)
    for entry in os.listdir("/sys/block"):
        if not entry.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{entry}/loop/backing_file") as f:
                if os.path.realpath(f.read().strip()) == real:
                    found.append(f"/dev/{entry}")
        except OSError:
            continue
    return found


def mount_image(image: str, target: str, fstype: str, flags: int = 0, wait: float = 5.0) -> None:
    """Mount a filesystem image, never as two filesystems at once.

    An image still bound to a loop device (its previous mount is going away, or a
    copy of the mount namespace some host process made still holds it) is mounted
    through that same device: the kernel hands back the same superblock, so there is
    one filesystem with two mounts, never two that would overwrite each other.  Only
    when no device holds it is a fresh one bound.  Blocks (up to ``wait``) only
    while a device is between "unmounted" and "released": call it off the event loop
    (it refuses to run on the event loop's thread).
    """
    refuse_event_loop("host.mount_image")
    deadline = time.monotonic() + wait
    while True:
        devices = loop_devices_backing(image)
        if not devices:
            mount_loop(image, target, fstype, flags=flags)
            return
        for device in devices:
            try:
                fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # released meanwhile
            try:
                # Holding it open, it cannot be rebound: is it still this image's?
                if device not in loop_devices_backing(image):
                    continue
                mount(f"/proc/self/fd/{fd}", target, fstype, "", flags)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENODEV, errno.EBUSY, errno.EINVAL):
                    raise
            finally:
                os.close(fd)
        if time.monotonic() > deadline:
            raise OSError(errno.EBUSY, f"{image} is held by a loop device that does not let go")
        time.sleep(0.005)


def fix_hybrid_cgroups() -> bool:
    """Bind stray cgroup-v2 controllers to a v1 hierarchy so crun accepts the host.

    On a hybrid host (v1 hierarchies plus a v2 mount) crun refuses to start when the v2
    hierarchy carries any controller ("cgroups in hybrid mode not supported, drop all
    controllers from cgroupv2").  Mounting a v1 hierarchy for a controller moves it
    off v2.  Returns True when something was changed.
    """
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        return False  # a pure cgroup-v2 host: crun works as it is
    changed = False
    for path in _V2_CONTROLLER_FILES:
        try:
            with open(path) as f:
                controllers = f.read().split()
        except OSError:
            continue
        for controller in controllers:
            target = f"/sys/fs/cgroup/{controller}"
            os.makedirs(target, exist_ok=True)
            if not os.path.ismount(target):
                mount("cgroup", target, "cgroup", controller)
                changed = True
    return changed


def cgroup_remount_for_moves(mountinfo: str) -> tuple[str, str] | None:
    """The cgroup v2 mount to remount with ``favordynmods`` and the options to give it
    (its own, plus that one), from the text of a ``/proc/<pid>/mountinfo``; None if the
    hierarchy has it already or none is mounted.  (cgroup v1 cannot change it by a
    remount; every v2 mount is the one hierarchy, so one remount is enough.)"""
    for line in mountinfo.splitlines():
        mine, sep, theirs = line.partition(" - ")
        fields, fs = mine.split(), theirs.split()
        if not sep or len(fields) < 5 or len(fs) < 3 or fs[0] != "cgroup2":
            continue
        options = [o for o in fs[2].split(",") if o not in ("rw", "ro")]
        if FAVOR_DYNMODS in options:
            return None
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        return target, ",".join([*options, FAVOR_DYNMODS])
    return None


def favor_cgroup_moves() -> bool:
    """Make moving a process into a cgroup cheap: remount the cgroup v2 hierarchy with
    ``favordynmods`` (Linux 6.0+).  Without it the first move after a quiet spell waits
    for an RCU grace period (13-17 ms on a 2-core VM), and every sandbox start (the
    OCI runtime moves its first process into the sandbox's cgroups) pays it: a third of
    ``crun run``.  The cost is on the other side: fork and exit take a per-thread-group
    lock (on 6.18, a per-thread-group semaphore; before, a shared one).  Returns True
    when it was turned on now; False if already on, or not possible here (no v2
    hierarchy, an older kernel): the host then works as it is, only slower to start."""
    with open("/proc/self/mountinfo") as f:
        found = cgroup_remount_for_moves(f.read())
    if found is None:
        return False
    target, options = found
    if _libc.mount(b"cgroup2", target.encode(), b"cgroup2", MS_REMOUNT, options.encode()) != 0:
        return False  # unknown to this kernel (before 6.0), or not ours to change
    return True


def find_runtime_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostNotReady(
            f"OCI runtime {name!r} not found on PATH; install it (apt-get install {name}) "
            "or run `make setup`"
        )
    return path


def hard_limit(kind: int) -> int:
    """The host's hard rlimit; OCI rlimits above it make the sandbox start fail."""
    hard = resource.getrlimit(kind)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


if __name__ == "__main__":  # `python -m bastion_server.runtime.host`: used by `make setup`
    if fix_hybrid_cgroups():
        print("prepare-host: moved stray cgroup-v2 controllers to v1 hierarchies")
    if favor_cgroup_moves():
        print("prepare-host: cgroup v2 remounted with favordynmods (cheap cgroup moves)")


# -- loop devices ---------------------------------------------------------------------
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
_LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s QQ 8Q")


def mount_loop(
    image: str, target: str, fstype: str = "ext4", options: str = "", flags: int = 0
) -> None:
    """Mount a filesystem image through a fresh loop device that frees itself on umount.

    Done with the loop ioctls directly: `mount -o loop` would cost a process and a
    few milliseconds per session start.
    """
    image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(32):  # another process may take the free device first
            with open("/dev/loop-control", "rb", buffering=0) as control:
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            try:
                loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                config = _LOOP_CONFIG.pack(
                    image_fd,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    _LO_FLAGS_AUTOCLEAR,
                    os.fsencode(image)[-63:],
                    b"",
                    b"",
                    0,
                    0,
                    *([0] * 8),
                )
                try:
                    fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, config)
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        continue
                    raise
                # The loop device stays bound while mounted; AUTOCLEAR releases it at
                # the last close after umount.
                mount(device, target, fstype, options, flags)
                return
            finally:
                os.close(loop_fd)
        raise OSError(errno.EBUSY, f"no free loop device for {image}")
    finally:
        os.close(image_fd)
