"""File access to a sandbox's root filesystem from the host, confined to that root.

A sandbox is hostile: it can plant ``ln -s / /x``, swap a directory for a symlink
between two of our calls, or leave a FIFO where we expect a file.  Every path is
therefore resolved by the kernel with ``openat2(RESOLVE_IN_ROOT)``: absolute symlinks
and ``..`` are resolved as if the sandbox's root were ``/``, atomically, so no race
can walk out of it.  Everything after that first resolution works on file
descriptors and single names (``mkdir``/``rename``/``unlink`` relative to a directory
fd), which never follow a symlink in the final component.

Operations act as someone inside the sandbox: the sandbox user by default (what a job
could do: the kernel refuses what that user may not), or the sandbox's root when asked.
The worker thread doing an operation takes that identity with ``setfsuid``/``setfsgid``
(per thread, and they drop the thread's file capabilities), so the kernel's own
permission checks decide.  The sandbox's mount points (``/proc``, ``/dev``, ``/sys``,
the agent's directories, ``/etc/resolv.conf``) and what lies above or below them are
never removed, replaced or written through this API: the host's view of them is an
empty directory the sandbox does not see, and removing it would unmount it inside.

Names are bytes on Linux; a name that is not UTF-8 is carried as Python carries it
(each undecodable byte as a lone surrogate, PEP 383), so it lists and round-trips.

Blocking: every method but :meth:`write` blocks; call them off the event loop (with
:func:`bastion_server.blocking.run_to_end` where a cancellation must not cut them short).
The service layer never uses this class directly: :class:`~bastion_server.runtime.
host_files.HostFiles` offers it as the runtime's async files contract
(:mod:`bastion_server.runtime.files`, whose types and errors it uses).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import platform
import secrets
import shutil
import stat
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from bastion_server import faults
from bastion_server.blocking import run_to_end, run_to_end_or_undo
from bastion_server.runtime.files import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    READ_CHUNK,
    DiskFull,
    Entry,
    FsError,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    PermissionDenied,
    TooLarge,
    encode_name,
    split_path,
)

__all__ = [  # the contract's names, which this module's callers have used from here
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "READ_CHUNK",
    "DiskFull",
    "Entry",
    "FsError",
    "InvalidPath",
    "IsADirectory",
    "NotADirectory",
    "NotEmpty",
    "NotFound",
    "PermissionDenied",
    "SandboxFS",
    "TooLarge",
    "acting_as",
    "encode_name",
    "split_path",
]

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64 (generic syscall table)
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_RESOLVE = _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
for _setfs in (_libc.setfsuid, _libc.setfsgid):
    _setfs.argtypes = [ctypes.c_uint32]
    _setfs.restype = ctypes.c_uint32

#: Upload bytes gathered before one write in a worker thread.
WRITE_BATCH = 1024 * 1024
#: What temp names of uploads start with (only ever there for the instant between
#: linking a finished upload in and renaming it over the file it replaces; one a crash
#: left there is removed by :meth:`SandboxFS.sweep_temp_names`).
TEMP_PREFIX = ".bastion-upload-"
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
_AT_SYMLINK_FOLLOW = 0x400

if platform.system() != "Linux":  # pragma: no cover
    raise ImportError("SandboxFS needs Linux (openat2)")


Identity = tuple[int, int]


@contextlib.contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    """Make this thread's file operations those of host ``(uid, gid)``, or (None) of
    the host's root again; the thread's earlier identity comes back afterwards."""
    uid, gid = identity or (0, 0)
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        # Each call answers the identity before it: asking again tells it took.
        if _libc.setfsuid(uid) != uid or _libc.setfsgid(gid) != gid:
            raise PermissionDenied("cannot act as the sandbox's user")
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)


def _openat2(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, _RESOLVE)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _syscall(_SYS_OPENAT2, dir_fd, encode_name(path), buf, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _translate(exc: OSError, path: str) -> FsError:
    if exc.errno == errno.ENOENT:
        return NotFound(f"no such file or directory: {path}")
    if exc.errno == errno.ENOTDIR:
        return NotADirectory(f"a component of the path is not a directory: {path}")
    if exc.errno == errno.EISDIR:
        return IsADirectory(f"is a directory: {path}")
    if exc.errno == errno.ENOTEMPTY:
        return NotEmpty(f"directory not empty (delete it with recursive=true): {path}")
    if exc.errno in (errno.EXDEV, errno.ELOOP):
        return InvalidPath(f"path leaves the sandbox or loops: {path}")
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"no space left on the session's disk for {path} (raise limits.disk_mb)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(
            f"permission denied: {path} (file operations act as the sandbox user; "
            "pass user='root' to act as the session's root)"
        )
    return FsError(f"{exc.strerror or 'error'}: {path}")


class SandboxFS:
    """Confined file operations on one sandbox's root (a host directory).

    Args:
        root: the sandbox's root filesystem as the host sees it.
        user: host ``(uid, gid)`` of the sandbox user: who operations act as.
        superuser: host ``(uid, gid)`` of the sandbox's root, for ``as_root``.
        protected: the sandbox's mount points (absolute sandbox paths).
    """

    def __init__(
        self,
        root: str,
        user: Identity,
        superuser: Identity,
        protected: tuple[str, ...] = (),
        journal: str | None = None,
    ) -> None:
        self.root, self.user, self.superuser = root, user, superuser
        self.protected = tuple(split_path(p) for p in protected)
        self._real_root = os.path.realpath(root)
        self.journal = journal

    def _identity(self, as_root: bool) -> Identity | None:
        """Who to act as: the sandbox user, or (as root) the host's root itself, whose
        new files are then given to the sandbox's root."""
        return None if as_root else self.user

    def _owner(self, as_root: bool) -> Identity:
        return self.superuser if as_root else self.user

    # -- resolution -----------------------------------------------------------------

    def _open(self, parts: list[str], flags: int, mode: int = 0) -> int:
        # The root itself is opened as the host's root: the directories above it are
        # the session's private ones (see the runtime), not the sandbox user's.
        with acting_as(None):
            root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _openat2(root_fd, "/".join(parts) or ".", flags, mode)
        finally:
            os.close(root_fd)

    def _where(self, dir_fd: int) -> list[str]:
        """Where an opened directory is, inside the sandbox (after every symlink)."""
        real = os.readlink(f"/proc/self/fd/{dir_fd}")
        if real != self._real_root and not real.startswith(self._real_root + "/"):
            raise InvalidPath("path leaves the sandbox")
        return [p for p in real[len(self._real_root) :].split("/") if p]

    def _check_not_protected(self, dir_fd: int, name: str, path: str) -> None:
        """Refuse ``name`` in the opened directory if it is a mount point of the
        sandbox, above one or inside one (wherever symlinks led to the directory)."""
        parts = [*self._where(dir_fd), name]
        for mount in self.protected:
            if mount[: len(parts)] == parts or parts[: len(mount)] == mount:
                where = "/" + "/".join(mount)
                raise PermissionDenied(
                    f"{path} is, holds or lies in the sandbox's mount point {where}, "
                    "which the files API does not change"
                )

    def _parent_fd(
        self,
        parts: list[str],
        *,
        create: bool,
        owner: Identity,
        made: list[tuple[int, str]] | None = None,
    ) -> int:
        """An fd of the directory holding the last component, creating it if asked.

        Each directory made is added to ``made`` as (an fd of the directory it is in,
        its name), that fd left open: :func:`_remove_made` takes them back.
        """
        try:
            return self._open(parts[:-1], os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            if not create or exc.errno != errno.ENOENT:
                raise
        for depth in range(1, len(parts)):
            try:
                fd = self._open(parts[:depth], os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                up = self._open(parts[: depth - 1], os.O_PATH | os.O_DIRECTORY)
                try:
                    self._check_not_protected(up, parts[depth - 1], "/" + "/".join(parts))
                    try:
                        os.mkdir(parts[depth - 1], 0o755, dir_fd=up)
                    except FileExistsError:
                        pass  # raced with the sandbox; the next open checks what it is
                    else:
                        os.chown(parts[depth - 1], *owner, dir_fd=up, follow_symlinks=False)
                        if made is not None:
                            made.append((up, parts[depth - 1]))
                            up = -1
                finally:
                    if up >= 0:
                        os.close(up)
                fd = self._open(parts[:depth], os.O_PATH | os.O_DIRECTORY)
            os.close(fd)
        return self._open(parts[:-1], os.O_PATH | os.O_DIRECTORY)

    # -- operations -------------------------------------------------------------------

    async def write(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
        *,
        mode: int | None = None,
        as_root: bool = False,
    ) -> int:
        """Stream ``chunks`` into ``path``; all or nothing.

        The bytes go to an unnamed file (``O_TMPFILE``) in the target's directory, which
        no listing and no process in the sandbox can see, and which the kernel frees if
        the server dies mid-way; only a finished upload is linked in and renamed over
        the target.  Returns the number of bytes written.  Raises TooLarge past
        ``max_bytes``.  Blocking work runs in worker threads.
        """
        parts = split_path(path)
        if not parts:
            raise IsADirectory("cannot write to '/'")
        upload = await run_to_end_or_undo(
            _Upload.abandon, self._begin_write, parts, path, mode, as_root
        )
        size = 0
        batch: list[bytes] = []
        batched = 0
        written = False
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    await run_to_end(_write_all, upload.fd, batch, path)
                    batch, batched = [], 0
                    faults.point("upload.mid_write")
            if batch:
                await run_to_end(_write_all, upload.fd, batch, path)
            await run_to_end(self._finish_write, upload, parts, path, as_root)
            written = True
            return size
        finally:
            # All or nothing: an upload that did not finish leaves none of the
            # directories it made either.
            await run_to_end(upload.close if written else upload.abandon)

    def _begin_write(self, parts: list[str], path: str, mode: int | None, as_root: bool) -> _Upload:
        owner, identity = self._owner(as_root), self._identity(as_root)
        made: list[tuple[int, str]] = []
        with acting_as(identity):
            parent = -1
            try:
                parent = self._parent_fd(parts, create=True, owner=owner, made=made)
                self._refuse_directory(parent, parts[-1], path)
                self._check_not_protected(parent, parts[-1], path)
                fd = _openat2(parent, ".", _O_TMPFILE | os.O_WRONLY, 0o600)
                try:
                    os.fchown(fd, *owner)
                    os.fchmod(fd, 0o644 if mode is None else mode)
                except BaseException:
                    os.close(fd)
                    raise
            except BaseException as exc:
                if parent >= 0:
                    os.close(parent)
                _remove_made(made)
                if isinstance(exc, OSError):
                    raise _translate(exc, path) from exc
                raise
            return _Upload(fd, parent, made, identity)

    def _finish_write(self, upload: _Upload, parts: list[str], path: str, as_root: bool) -> None:
        with acting_as(self._identity(as_root)):
            try:
                self._refuse_directory(upload.parent, parts[-1], path)
                source = f"/proc/self/fd/{upload.fd}"
                try:
                    # A new file is linked in under its name: atomic, nothing to undo.
                    os.link(source, parts[-1], dst_dir_fd=upload.parent, follow_symlinks=True)
                    return
                except FileExistsError:
                    pass
                # One that replaces a file is linked in under a temp name, then renamed
                # over it: readers see the old file or the new one, never a part.  The
                # temp name is in the journal meanwhile, for a crash between the two.
                temp = TEMP_PREFIX + secrets.token_hex(8)
                entry = self._journal_add([*self._where(upload.parent), temp])
                try:
                    os.link(source, temp, dst_dir_fd=upload.parent, follow_symlinks=True)
                    faults.point("upload.after_link")
                    try:
                        os.rename(
                            temp, parts[-1], src_dir_fd=upload.parent, dst_dir_fd=upload.parent
                        )
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(temp, dir_fd=upload.parent)
                        raise
                finally:
                    self._journal_drop(entry)
            except OSError as exc:
                raise _translate(exc, path) from exc

    # -- the journal of temp names --------------------------------------------------------

    def _journal_add(self, parts: list[str]) -> str | None:
        """Note a temp name about to be linked in (sandbox path components); returns
        the note's path, for :meth:`_journal_drop`."""
        if self.journal is None:
            return None
        with acting_as(None):  # the journal is the server's, outside the sandbox
            os.makedirs(self.journal, mode=0o700, exist_ok=True)
            entry = os.path.join(self.journal, parts[-1])
            with open(entry, "wb") as f:
                f.write(encode_name("/".join(parts)))
        return entry

    @staticmethod
    def _journal_drop(entry: str | None) -> None:
        if entry is not None:
            with acting_as(None), contextlib.suppress(FileNotFoundError):
                os.unlink(entry)

    def sweep_temp_names(self) -> int:
        """Remove the temp names a crash left linked in (see :meth:`write`), as the
        journal lists them; returns how many were there.  Blocking."""
        if self.journal is None:
            return 0
        removed = 0
        with acting_as(None):
            try:
                entries = os.listdir(self.journal)
            except FileNotFoundError:
                return 0
            for name in entries:
                entry = os.path.join(self.journal, name)
                try:
                    with open(entry, "rb") as f:
                        parts = split_path("/" + os.fsdecode(f.read()))
                except (OSError, FsError):
                    parts = []
                if parts and parts[-1] == name and name.startswith(TEMP_PREFIX):
                    try:
                        parent = self._open(parts[:-1], os.O_PATH | os.O_DIRECTORY)
                    except OSError:
                        parent = -1
                    if parent >= 0:
                        try:
                            os.unlink(name, dir_fd=parent)
                            removed += 1
                        except OSError:
                            pass
                        finally:
                            os.close(parent)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
        return removed

    @staticmethod
    def _refuse_directory(parent: int, name: str, path: str) -> None:
        try:
            target = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(target.st_mode):
            raise IsADirectory(f"is a directory: {path}")

    def list(
        self,
        path: str,
        *,
        after: bytes | None = None,
        count: int | None = None,
        as_root: bool = False,
    ) -> list[Entry]:
        """The directory's entries in the order of their names' bytes: the first
        ``count`` (or all) whose names come after ``after``.

        Only the names are read whole (and sorted); the entries returned are the only
        ones looked at, so a page of a huge directory costs its names, not its stats."""
        parts = split_path(path)
        with acting_as(self._identity(as_root)):
            try:
                fd = self._open(parts, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                raise _translate(exc, path) from exc
            base = "/" + "/".join(parts)
            entries: list[Entry] = []
            try:
                with os.scandir(fd) as it:
                    names = sorted(encode_name(item.name) for item in it)
                for raw in names[bisect.bisect_right(names, after) if after is not None else 0 :]:
                    if count is not None and len(entries) >= count:
                        break
                    name = raw.decode("utf-8", "surrogateescape")
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue  # removed by the sandbox while we listed
                    entries.append(
                        Entry(
                            name=name,
                            path=base.rstrip("/") + "/" + name,
                            size=st.st_size,
                            type=_file_type(st.st_mode),
                            modified_at=_iso(st.st_mtime),
                            mode=stat.filemode(st.st_mode),
                        )
                    )
            except OSError as exc:
                raise _translate(exc, path) from exc
            finally:
                os.close(fd)
        return entries

    def open_read(self, path: str, *, as_root: bool = False) -> tuple[int, int]:
        """Open a regular file for reading; returns (fd, size). The caller closes fd."""
        parts = split_path(path)
        with acting_as(self._identity(as_root)):
            try:
                # O_NONBLOCK: a FIFO planted by the sandbox must not hang the server.
                fd = self._open(parts, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as exc:
                raise _translate(exc, path) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectory(f"is a directory: {path}")
            raise InvalidPath(f"not a regular file: {path}")
        os.set_blocking(fd, True)
        return fd, st.st_size

    def delete(self, path: str, *, recursive: bool = False, as_root: bool = False) -> None:
        parts = split_path(path)
        if not parts:
            raise InvalidPath("refusing to delete '/'")
        with acting_as(self._identity(as_root)):
            try:
                parent = self._parent_fd(parts, create=False, owner=self._owner(as_root))
            except OSError as exc:
                raise _translate(exc, path) from exc
            try:
                self._check_not_protected(parent, parts[-1], path)
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if recursive:
                        # rmtree with dir_fd works on fds and never follows symlinks.
                        shutil.rmtree(parts[-1], dir_fd=parent)
                    else:
                        os.rmdir(parts[-1], dir_fd=parent)
                else:
                    os.unlink(parts[-1], dir_fd=parent)
            except OSError as exc:
                raise _translate(exc, path) from exc
            finally:
                os.close(parent)


@dataclass
class _Upload:
    """An upload in progress: its unnamed file, the directory it will be linked in, the
    directories made for it (see :meth:`SandboxFS._parent_fd`) and whom it acts as."""

    fd: int
    parent: int
    made: list[tuple[int, str]]
    identity: Identity | None

    def close(self) -> None:
        """Done with it (the file linked in, or never to be): close what it holds."""
        for fd in (self.fd, self.parent, *(up for up, _ in self.made)):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.made = []

    def abandon(self) -> None:
        """The upload did not finish: close it and remove the directories it made."""
        for fd in (self.fd, self.parent):
            with contextlib.suppress(OSError):
                os.close(fd)
        with acting_as(self.identity):
            _remove_made(self.made)
        self.made = []


def _remove_made(made: list[tuple[int, str]]) -> None:
    """Remove directories an upload made, deepest first, and close their parents' fds.

    Only empty ones go: one the sandbox has put something in meanwhile stays (and so
    do those above it)."""
    for up, name in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=up)
        with contextlib.suppress(OSError):
            os.close(up)


def _write_all(fd: int, chunks: list[bytes], path: str) -> None:
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    except OSError as exc:
        raise _translate(exc, path) from exc
