"""File access to a sandbox's root filesystem from the host, confined to that root.

A sandbox is hostile: it can plant ``ln -s / /x``, swap a directory for a symlink
between two of our calls, or leave a FIFO where we expect a file.  Every path is
therefore resolved by the kernel with ``openat2(RESOLVE_IN_ROOT)``: absolute symlinks
and ``..`` are resolved as if the sandbox's root were ``/``, atomically, so no race
can walk out of it.  Everything after that first resolution works on file
descriptors and single names (``mkdir``/``rename``/``unlink`` relative to a directory
fd), which never follow a symlink in the final component.
"""

from __future__ import annotations

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

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64 (generic syscall table)
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_RESOLVE = _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_LIST_ENTRIES = 10_000
READ_CHUNK = 1024 * 1024

if platform.system() != "Linux":  # pragma: no cover
    raise ImportError("SandboxFS needs Linux (openat2)")


class FsError(Exception):
    """A file operation failed; ``kind`` says why in words the service layer maps."""

    kind = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidPath(FsError):
    kind = "invalid_path"


class NotFound(FsError):
    kind = "not_found"


class NotADirectory(FsError):
    kind = "not_a_directory"


class IsADirectory(FsError):
    kind = "is_a_directory"


class NotEmpty(FsError):
    kind = "not_empty"


class DiskFull(FsError):
    kind = "disk_full"


class TooLarge(FsError):
    kind = "too_large"


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    size: int
    type: str
    modified_at: str
    mode: str


def split_path(path: str) -> list[str]:
    """Validate an absolute sandbox path and return its components ('/' -> [])."""
    if not isinstance(path, str) or not path:
        raise InvalidPath("path must be a non-empty string")
    if "\x00" in path:
        raise InvalidPath("path must not contain NUL bytes")
    if not path.startswith("/"):
        raise InvalidPath(f"path must be absolute (start with '/'): {path!r}")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise InvalidPath(f"path is longer than {MAX_PATH_BYTES} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise InvalidPath("path must not contain '..' components")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InvalidPath(f"path component is longer than {MAX_NAME_BYTES} bytes")
    return parts


def _openat2(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, _RESOLVE)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), buf, len(how))
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
    return FsError(f"{exc.strerror or 'error'}: {path}")


class SandboxFS:
    """Confined file operations on one sandbox's root (a host directory).

    Args:
        root: the sandbox's root filesystem as the host sees it.
        uid, gid: host ids that new files and directories are given (the sandbox
            user's ids as mapped to the host).
    """

    def __init__(self, root: str, uid: int, gid: int) -> None:
        self.root, self.uid, self.gid = root, uid, gid

    # -- resolution -----------------------------------------------------------------

    def _open(self, parts: list[str], flags: int, mode: int = 0) -> int:
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _openat2(root_fd, "/".join(parts) or ".", flags, mode)
        finally:
            os.close(root_fd)

    def _parent_fd(self, parts: list[str], *, create: bool) -> int:
        """An fd of the directory holding the last component, creating it if asked."""
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
                    try:
                        os.mkdir(parts[depth - 1], 0o755, dir_fd=up)
                    except FileExistsError:
                        pass  # raced with the sandbox; the next open checks what it is
                    else:
                        os.chown(
                            parts[depth - 1], self.uid, self.gid, dir_fd=up, follow_symlinks=False
                        )
                finally:
                    os.close(up)
                fd = self._open(parts[:depth], os.O_PATH | os.O_DIRECTORY)
            os.close(fd)
        return self._open(parts[:-1], os.O_PATH | os.O_DIRECTORY)

    # -- operations -------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterator[bytes], max_bytes: int) -> int:
        """Stream ``chunks`` into ``path``; all or nothing (temp file, then rename).

        Returns the number of bytes written.  Raises TooLarge past ``max_bytes``.
        """
        parts = split_path(path)
        if not parts:
            raise IsADirectory("cannot write to '/'")
        try:
            parent = self._parent_fd(parts, create=True)
        except OSError as exc:
            raise _translate(exc, path) from exc
        temp = f".bastion-upload-{secrets.token_hex(8)}"
        try:
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=parent,
            )
        except OSError as exc:
            os.close(parent)
            raise _translate(exc, path) from exc
        size = 0
        try:
            os.fchown(fd, self.uid, self.gid)
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.close(fd)
            fd = -1
            try:
                target = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(target.st_mode):
                    raise IsADirectory(f"is a directory: {path}")
            os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            temp = ""
            return size
        except OSError as exc:
            raise _translate(exc, path) from exc
        finally:
            if fd >= 0:
                os.close(fd)
            if temp:
                try:
                    os.unlink(temp, dir_fd=parent)
                except OSError:
                    pass
            os.close(parent)

    def list(self, path: str) -> list[Entry]:
        parts = split_path(path)
        try:
            fd = self._open(parts, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise _translate(exc, path) from exc
        base = "/" + "/".join(parts)
        entries: list[Entry] = []
        try:
            with os.scandir(fd) as it:
                for item in it:
                    try:
                        st = os.stat(item.name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue  # removed by the sandbox while we listed
                    entries.append(
                        Entry(
                            name=item.name,
                            path=base.rstrip("/") + "/" + item.name,
                            size=st.st_size,
                            type=_file_type(st.st_mode),
                            modified_at=_iso(st.st_mtime),
                            mode=stat.filemode(st.st_mode),
                        )
                    )
                    if len(entries) >= MAX_LIST_ENTRIES:
                        break
        finally:
            os.close(fd)
        entries.sort(key=lambda e: e.name)
        return entries

    def open_read(self, path: str) -> tuple[int, int]:
        """Open a regular file for reading; returns (fd, size). The caller closes fd."""
        parts = split_path(path)
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

    @staticmethod
    def iter_fd(fd: int, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Read ``fd`` to its end in chunks, closing it afterwards."""
        try:
            while chunk := os.read(fd, chunk_size):
                yield chunk
        finally:
            os.close(fd)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        parts = split_path(path)
        if not parts:
            raise InvalidPath("refusing to delete '/'")
        try:
            parent = self._parent_fd(parts, create=False)
        except OSError as exc:
            raise _translate(exc, path) from exc
        try:
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
