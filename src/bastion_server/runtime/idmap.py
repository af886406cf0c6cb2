"""Host id ranges of sandboxes: one range per session, and the user namespaces it needs.

The kernel keeps many limits per host user: pipe buffer pages and file descriptors in
flight on unix sockets are counted per host uid; inotify instances and watches, POSIX
message queue bytes and other "ucounts" are counted per (user namespace, uid), up to the
*owner* of each user namespace in its parent.  If every sandbox user were the same host
uid, and every sandbox's user namespace were owned by host root, one session could use
up what every other session (and host root) shares.  So, as Kubernetes does for pods
with user namespaces, every session gets a range of 65536 host ids of its own:

* its container ids ``0..65535`` map to host ``base..base+65535``;
* its user namespace is created by a process whose euid is ``base`` (the session's own
  root), so the per-owner counters of the parent namespace are the session's alone;
* the shared read-only image (stored owned by the image's ``uid_shift`` range) is seen
  through an idmapped mount that maps that range onto the session's.

A range is taken in a registry that is host-wide (every Bastion server on this host
shares it, whatever its data directory) and given back only when the session's files
are gone: a range is never reused while anything of its owner is still on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RANGE_SIZE = 65536
#: Session ranges start above every id a host gives its own users and the classic
#: subordinate ranges (100000+); 2**24 + k * 2**16 for k < RANGE_COUNT stays below 2**31
#: (ids past that trip up software that keeps them in a signed int).
FIRST_BASE = 1 << 24
RANGE_COUNT = 32000
DEFAULT_REGISTRY = Path(os.environ.get("BASTION_ID_RANGES_DIR", "/var/lib/bastion/id-ranges"))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPEN_TREE, _SYS_MOUNT_SETATTR = 428, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC = 1, 0o2000000
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_NS_WAIT = 5.0


class IdRangeError(OSError):
    """No id range could be taken or a user namespace could not be made."""


@dataclass(frozen=True)
class IdRange:
    """Host ids ``base .. base+RANGE_SIZE-1``, container ids ``0 ..`` mapped onto them."""

    base: int

    def host(self, container_id: int) -> int:
        return self.base + container_id


class IdRangeRegistry:
    """Host-wide record of which ranges are taken, and by which session directory.

    One file per taken range (``<index>``, holding the owner's directory, or both of
    its names, one a line, while it is being renamed); taking a range is an
    ``O_EXCL`` create under a lock.  An entry none of whose owner directories records
    that range (its files were removed without giving it back, say by hand) is stale
    and may be taken again.
    """

    RECORD = "id-range"

    def __init__(self, directory: Path = DEFAULT_REGISTRY) -> None:
        self.directory = directory

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _entry(self, base: int) -> Path:
        return self.directory / str((base - FIRST_BASE) // RANGE_SIZE)

    @classmethod
    def recorded(cls, owner_dir: Path) -> IdRange | None:
        """The range an owner directory records, if any."""
        try:
            return IdRange(int((owner_dir / cls.RECORD).read_text().strip()))
        except (OSError, ValueError):
            return None

    @staticmethod
    def _owners(entry: Path) -> list[str]:
        return [line for line in entry.read_text().splitlines() if line.strip()]

    def _holds(self, owner: str, base: int) -> bool:
        """Whether the directory ``owner`` records the range at ``base``."""
        found = self.recorded(Path(owner))
        return found is not None and found.base == base

    def _stale(self, entry: Path, base: int) -> bool:
        try:
            owners = self._owners(entry)
        except OSError:
            return False
        return not any(self._holds(owner, base) for owner in owners)

    def take(self, owner_dir: Path) -> IdRange:
        """A range of ids nobody else has; recorded in the registry and in ``owner_dir``."""
        with self._locked():
            start = secrets.randbelow(RANGE_COUNT)
            for step in range(RANGE_COUNT):
                index = (start + step) % RANGE_COUNT
                base = FIRST_BASE + index * RANGE_SIZE
                entry = self._entry(base)
                try:
                    fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    if not self._stale(entry, base):
                        continue
                    fd = os.open(entry, os.O_WRONLY | os.O_TRUNC)
                with os.fdopen(fd, "w") as f:
                    f.write(str(owner_dir))
                (owner_dir / self.RECORD).write_text(str(base))
                return IdRange(base)
        raise IdRangeError(errno.ENOSPC, "every sandbox id range on this host is taken")

    @contextlib.contextmanager
    def moving(self, rng: IdRange, old_dir: Path, new_dir: Path) -> Iterator[None]:
        """Around the rename of an owner directory (a pooled sandbox handed to a
        session): the range is registered to both names until the rename is done, so a
        crash in between leaves it neither stale nor registered to a name that is gone."""
        with self._locked():
            self._write(self._entry(rng.base), f"{old_dir}\n{new_dir}\n")
        yield
        with self._locked():
            self._write(self._entry(rng.base), f"{new_dir}\n")

    @staticmethod
    def _write(entry: Path, text: str) -> None:
        """Replace an entry's text in one step (a crash leaves the old or the new)."""
        temp = entry.with_name(f".{entry.name}.tmp")
        temp.write_text(text)
        temp.replace(entry)

    def release_stale(self, under: Path) -> int:
        """Remove stale entries of owners under ``under`` (one server's sessions), and
        entries a crash left empty, and drop the name that is gone from an entry a
        crash left with both names of a rename; returns how many entries went."""
        prefix = f"{under}/"
        removed = 0
        with self._locked():
            for entry in self.directory.iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    owners = self._owners(entry)
                except OSError:
                    continue
                base = FIRST_BASE + int(entry.name) * RANGE_SIZE
                if owners and not all(owner.startswith(prefix) for owner in owners):
                    continue  # another server's
                holders = [owner for owner in owners if self._holds(owner, base)]
                if not holders:
                    entry.unlink(missing_ok=True)
                    removed += 1
                elif len(holders) < len(owners):
                    self._write(entry, "".join(f"{o}\n" for o in holders))
        return removed

    def release(self, rng: IdRange, owner_dir: Path) -> None:
        """Give a range back once its owner's files are gone (only if still its own)."""
        if rng.base < FIRST_BASE:
            return  # a session of an older server: its range was never registered
        entry = self._entry(rng.base)
        with self._locked():
            try:
                if str(owner_dir) in self._owners(entry):
                    entry.unlink()
            except FileNotFoundError:
                pass


class UserNamespace:
    """A user namespace held open by a small process until :meth:`close`.

    ``owner`` is the host uid (and gid) that creates it: the namespace's owner, whom
    the kernel charges the namespace's per-user counters to in the parent namespace.
    ``maps`` is written as both uid_map and gid_map (``inside outside count`` lines).
    """

    def __init__(self, owner: int, maps: str) -> None:
        mine = os.readlink("/proc/self/ns/user")
        self._proc = subprocess.Popen(
            ["unshare", "--user", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=owner,
            group=owner,
            extra_groups=[],
            close_fds=True,
        )
        try:
            deadline = time.monotonic() + _NS_WAIT
            while True:
                try:
                    if os.readlink(f"/proc/{self._proc.pid}/ns/user") != mine:
                        break
                except OSError:
                    pass
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise IdRangeError(errno.EIO, "could not create a user namespace")
                time.sleep(0.0002)
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{self._proc.pid}/{name}", "w") as f:
                    f.write(maps)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        """``/proc/PID/ns/user``: valid until :meth:`close`."""
        return f"/proc/{self._proc.pid}/ns/user"

    def open(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        # Closed whether or not the holder had exited by itself (then the pipe's file
        # object would be left to the garbage collector: a ResourceWarning).
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):
            self._proc.stdin.close()


def idmapped_tree(path: str, userns_fd: int) -> int:
    """A detached, read-only, idmapped copy of the mount at ``path`` (an O_PATH fd).

    On-disk id ``x`` is seen as what ``userns_fd``'s namespace maps ``x`` to.  The fd
    can serve as an overlay layer through ``/proc/self/fd/N``; the copy goes away with
    the last reference (the fd and whatever mounted it).
    """
    fd = int(
        _libc.syscall(
            _SYS_OPEN_TREE, -100, os.fsencode(path), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    flags = _MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
    attr = struct.pack("QQQQ", flags, 0, 0, userns_fd)
    buf = ctypes.create_string_buffer(attr, len(attr))
    if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, buf, len(attr)) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"idmapped mount of {path}: {os.strerror(err)}")
    return fd
