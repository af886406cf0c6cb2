"""Directory trees in and out of a sandbox as tar streams, under the rules of
:mod:`bastion_server.runtime.sandbox_fs`.

Both directions work on file descriptors and single names, acting as the session's
user (or its root when asked), and never touch the sandbox's mount points:

* :func:`extract_archive` reads a tar stream member after member and writes each
  into the destination directory.  Every member is resolved beneath that directory
  with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``, so neither a symlink from
  the archive nor one the sandbox planted can lead a later member anywhere else.
  **Refused** (the extraction stops there, with ``invalid_path`` naming the member;
  members before it stay written): absolute names, ``..`` components, symlinks
  whose target is absolute or leads out of the destination, hard links, devices,
  FIFOs and other special files, and a member that would write through a symlink.
  **Neutralised**: setuid, setgid and sticky bits are dropped (permission bits
  kept), and the archive's owners are ignored: everything belongs to whoever the
  operation acts as.  Directory modes are applied at the end, as ``tar`` does, so a
  read-only directory can still be filled first.
* :func:`open_tree` and :func:`iter_tree` make a tar stream of a directory as they
  walk it: directories, regular files and symlinks (as links, never followed); other
  special files, mount points and entries the acting user cannot read are left out.

Blocking: every function here blocks; :func:`iter_tree` is a generator to iterate in
worker threads (each step takes the acting identity afresh).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import posixpath
import stat
import struct
import tarfile
from collections.abc import Iterator

from bastion._tar_stream import (
    END_OF_ARCHIVE,
    NAME_ENCODING,
    QueueReader,
    member_header,
    open_stream,
    padding,
)
from bastion_server.runtime.files import BadArchive, ExtractResult
from bastion_server.runtime.sandbox_fs import (
    _SYS_OPENAT2,
    MAX_NAME_BYTES,
    READ_CHUNK,
    Identity,
    InvalidPath,
    NotADirectory,
    PermissionDenied,
    SandboxFS,
    _syscall,
    _translate,
    acting_as,
    encode_name,
    split_path,
)

log = logging.getLogger("bastion.files")

_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_BENEATH = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV
#: Directory fds kept open while extracting (the tree's most recent ones).
_MAX_OPEN_DIRS = 256
#: Output gathered before a piece of an archive is handed on.
_OUT_CHUNK = 1024 * 1024


def _beneath(dir_fd: int, name: str, flags: int, mode: int = 0) -> int:
    """Open ``name`` (one component) in ``dir_fd`` without following any symlink."""
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, _BENEATH)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _syscall(_SYS_OPENAT2, dir_fd, encode_name(name), buf, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return int(fd)


def _refuse(name: str, why: str) -> InvalidPath:
    return InvalidPath(f"archive member {name!r}: {why}; refused (members after it not extracted)")


def _member_parts(name: str) -> list[str]:
    if name.startswith("/"):
        raise _refuse(name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise _refuse(name, "'..' component")
        if "\x00" in part or len(encode_name(part)) > MAX_NAME_BYTES:
            raise _refuse(name, "bad name")
    return parts


class _Extraction:
    def __init__(self, fs: SandboxFS, dest: str, dest_fd: int, owner: Identity) -> None:
        self.fs, self.dest, self.owner = fs, dest, owner
        self.dirs: dict[tuple[str, ...], int] = {(): dest_fd}
        self.dir_modes: list[tuple[tuple[str, ...], int]] = []
        self.result = ExtractResult()

    def where(self, parts: list[str] | tuple[str, ...]) -> str:
        return posixpath.join(self.dest, *parts)

    def close(self) -> None:
        for fd in self.dirs.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.dirs.clear()

    def directory(self, parts: tuple[str, ...], create: bool = True) -> int:
        """An O_PATH fd of the directory ``parts`` below the destination."""
        if (found := self.dirs.get(parts)) is not None:
            return found
        parent = self.directory(parts[:-1], create)
        name = parts[-1]
        try:
            fd = _beneath(parent, name, os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            if not create:
                raise
            self.fs._check_not_protected(parent, name, self.where(parts))
            with contextlib.suppress(FileExistsError):  # raced with the sandbox
                os.mkdir(name, 0o755, dir_fd=parent)
                os.chown(name, *self.owner, dir_fd=parent, follow_symlinks=False)
                self.result.directories += 1
            fd = _beneath(parent, name, os.O_PATH | os.O_DIRECTORY)
        if len(self.dirs) >= _MAX_OPEN_DIRS:
            self._forget_dirs()
        self.dirs[parts] = fd
        return fd

    def _forget_dirs(self) -> None:
        for key in [k for k in self.dirs if k]:
            os.close(self.dirs.pop(key))

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = tuple(_member_parts(member.name))
        if member.isdir():
            if parts:
                parent = self.directory(parts[:-1])
                if _is_protected(self.fs, [*self.fs._where(parent), parts[-1]]):
                    raise _refuse(member.name, "a mount point of the sandbox")
                self.directory(parts)
                self.dir_modes.append((parts, member.mode & 0o777))
            return
        if not parts:
            raise _refuse(member.name, "not a directory, yet names the destination itself")
        if member.islnk():
            raise _refuse(member.name, "hard link")
        if not (member.isreg() or member.issym()):
            raise _refuse(member.name, "device, FIFO or other special file")
        parent = self.directory(parts[:-1])
        name = parts[-1]
        self.fs._check_not_protected(parent, name, self.where(parts))
        if member.issym():
            self._symlink(parent, parts, member)
        else:
            self._file(parent, name, tar, member)

    def _symlink(self, parent: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        target = member.linkname
        inside = posixpath.normpath(posixpath.join(*parts[:-1], target)) if target else ""
        if not target or target.startswith("/") or inside == ".." or inside.startswith("../"):
            raise _refuse(member.name, f"symlink to {target!r} leads out of the destination")
        name = parts[-1]
        try:
            os.symlink(target, name, dir_fd=parent)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise _refuse(member.name, "a directory is in the way") from None
            os.unlink(name, dir_fd=parent)
            os.symlink(target, name, dir_fd=parent)
        os.chown(name, *self.owner, dir_fd=parent, follow_symlinks=False)
        self.result.symlinks += 1

    def _file(self, parent: int, name: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        try:
            fd = _beneath(parent, name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refuse(member.name, "would write through a symlink") from None
            raise
        try:
            os.fchown(fd, *self.owner)
            os.fchmod(fd, member.mode & 0o777)  # setuid, setgid, sticky: dropped
            source = tar.extractfile(member)
            assert source is not None
            while chunk := source.read(READ_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                self.result.bytes += len(chunk)
        finally:
            os.close(fd)
        self.result.files += 1

    def apply_dir_modes(self) -> None:
        for parts, mode in reversed(self.dir_modes):
            parent = self.directory(parts[:-1], create=False)
            fd = _beneath(parent, parts[-1], os.O_RDONLY | os.O_DIRECTORY)
            try:
                # A directory that was there before and is not the acting user's keeps
                # its mode (as with tar run by that user, which could not change it).
                with contextlib.suppress(PermissionError):
                    os.fchmod(fd, mode)
            finally:
                os.close(fd)


def _open_destination(fs: SandboxFS, parts: list[str], owner: Identity, path: str) -> int:
    """An O_PATH fd of the destination directory, created (with parents) if missing."""
    if parts:
        parent = fs._parent_fd(parts, create=True, owner=owner)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[-1], 0o755, dir_fd=parent)
                os.chown(parts[-1], *owner, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
    fd = fs._open(parts, os.O_PATH | os.O_DIRECTORY)
    # The destination may hold a mount point (its members are checked one by one) but
    # must not be one or lie in one.
    where = fs._where(fd)
    for mount in fs.protected:
        if where[: len(mount)] == mount:
            os.close(fd)
            raise PermissionDenied(
                f"{path} is or lies in the sandbox's mount point /{'/'.join(mount)}, "
                "which the files API does not change"
            )
    return fd


def extract_archive(
    fs: SandboxFS, dest: str, reader: QueueReader, *, as_root: bool = False
) -> ExtractResult:
    """Extract the tar stream ``reader`` gives into directory ``dest`` (created if
    missing), acting as the session's user (or root).  Blocks: run it in a thread."""
    parts = split_path(dest)
    owner = fs._owner(as_root)
    with acting_as(fs._identity(as_root)):
        try:
            dest_fd = _open_destination(fs, parts, owner, dest)
        except OSError as exc:
            raise _translate(exc, dest) from exc
        extraction = _Extraction(fs, dest, dest_fd, owner)
        name = dest
        try:
            try:
                tar = open_stream(reader)
            except tarfile.TarError as exc:
                raise BadArchive(f"the body is not a tar archive: {exc}") from exc
            with tar:
                for member in tar:
                    name = member.name
                    extraction.member(tar, member)
                extraction.apply_dir_modes()
        except tarfile.TarError as exc:
            raise BadArchive(f"the tar archive is damaged after {name!r}: {exc}") from exc
        except OSError as exc:
            raise _translate(exc, extraction.where([name])) from exc
        finally:
            extraction.close()
    return extraction.result


# -- archives of a tree ------------------------------------------------------------


def open_tree(fs: SandboxFS, path: str, *, as_root: bool = False) -> int:
    """An fd of directory ``path`` to archive (errors here, before any byte is sent)."""
    parts = split_path(path)
    with acting_as(fs._identity(as_root)):
        try:
            fd = fs._open(parts, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                raise NotADirectory(f"not a directory: {path}") from exc
            raise _translate(exc, path) from exc
    return fd


def iter_tree(fs: SandboxFS, root_fd: int, *, as_root: bool = False) -> Iterator[bytes]:
    """The tar stream of the tree at ``root_fd`` (which it owns and closes), in pieces
    of about 1 MiB; names are relative to that directory."""
    identity = fs._identity(as_root)
    out = bytearray()
    stack: list[tuple[int, str, Iterator[str]]] = []
    try:
        where = fs._where(root_fd)
        with acting_as(identity):
            names = _names(root_fd)
        stack.append((root_fd, "", iter(names)))
        root_fd = -1
        while stack:
            dir_fd, prefix, names_left = stack[-1]
            name = next(names_left, None)
            if name is None:
                os.close(dir_fd)
                stack.pop()
                continue
            rel = prefix + name
            if _is_protected(fs, [*where, *rel.split("/")]):
                continue
            with acting_as(identity):
                entry = _open_entry(dir_fd, name)
            if entry is None:
                continue
            kind, fd_or_link, st = entry
            if kind == "directory":
                assert isinstance(fd_or_link, int)
                out += member_header(rel, "directory", mode=st.st_mode, mtime=st.st_mtime)
                with acting_as(identity):
                    children = _names(fd_or_link)
                stack.append((fd_or_link, rel + "/", iter(children)))
            elif kind == "symlink":
                assert isinstance(fd_or_link, str)
                out += member_header(rel, "symlink", mode=0o777, linkname=fd_or_link)
            else:
                assert isinstance(fd_or_link, int)
                out += member_header(
                    rel, "file", size=st.st_size, mode=st.st_mode, mtime=st.st_mtime
                )
                for piece in _file_data(fd_or_link, st.st_size):
                    out += piece
                    if len(out) >= _OUT_CHUNK:
                        yield bytes(out)
                        out.clear()
            if len(out) >= _OUT_CHUNK:
                yield bytes(out)
                out.clear()
        out += END_OF_ARCHIVE
        yield bytes(out)
    finally:
        if root_fd >= 0:
            os.close(root_fd)
        for dir_fd, _, _ in stack:
            with contextlib.suppress(OSError):
                os.close(dir_fd)


def _names(dir_fd: int) -> list[str]:
    try:
        with os.scandir(dir_fd) as it:
            names = [item.name for item in it]
    except OSError as exc:
        log.warning("archive: a directory could not be listed", extra={"error": str(exc)})
        return []
    return sorted(names, key=encode_name)


def _is_protected(fs: SandboxFS, parts: list[str]) -> bool:
    return any(parts[: len(mount)] == mount for mount in fs.protected)


def _open_entry(dir_fd: int, name: str) -> tuple[str, int | str, os.stat_result] | None:
    """What ``name`` is, opened for archiving; None for what is left out."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return "symlink", os.readlink(name, dir_fd=dir_fd), st
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            return "directory", fd, os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            # O_NONBLOCK: a FIFO swapped in meanwhile must not hang the server.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dir_fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return None
            os.set_blocking(fd, True)
            return "file", fd, st
    except OSError as exc:
        log.info("archive: an entry was left out", extra={"entry": name, "error": str(exc)})
    return None


def _file_data(fd: int, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes of the file (zeros if it shrank meanwhile) and the padding:
    the header already promised that size."""
    left = size
    try:
        while left > 0:
            chunk = os.read(fd, min(READ_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        os.close(fd)
    while left > 0:
        zeros = min(READ_CHUNK, left)
        left -= zeros
        yield bytes(zeros)
    yield padding(size)


__all__ = [
    "NAME_ENCODING",
    "BadArchive",
    "ExtractResult",
    "extract_archive",
    "iter_tree",
    "open_tree",
]
