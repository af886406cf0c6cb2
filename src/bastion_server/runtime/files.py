"""The files contract: what the service layer may do with a running sandbox's files.

:class:`SandboxFiles` is what :meth:`Runtime.files` returns.  Every operation is a
coroutine and is confined to the sandbox's root, acting as its user (or, with
``as_root``, its root).  The OCI backend implements it host-side, off the event loop
(:class:`bastion_server.runtime.host_files.HostFiles`); a backend with no host-visible
root filesystem (a VM, a sandbox on another machine) implements it through the agent
inside the sandbox or a stream to it.  Nothing here hands out a host file descriptor.

Errors are :class:`FsError` subclasses (themselves :class:`SandboxError`), each with a
``kind`` the service layer maps to an error code.  Paths are absolute sandbox paths;
a name that is not UTF-8 travels as Python carries it (PEP 383 surrogates).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from bastion_server.runtime.base import SandboxError

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
READ_CHUNK = 1024 * 1024


class FsError(SandboxError):
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


class PermissionDenied(FsError):
    kind = "permission_denied"


class BadArchive(FsError):
    """The stream is not a tar archive (or is cut short)."""

    kind = "invalid_request"


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    size: int
    type: str
    modified_at: str
    mode: str


@dataclass
class ExtractResult:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def split_path(path: str) -> list[str]:
    """Validate an absolute sandbox path and return its components ('/' -> [])."""
    if not isinstance(path, str) or not path:
        raise InvalidPath("path must be a non-empty string")
    if "\x00" in path:
        raise InvalidPath("path must not contain NUL bytes")
    if not path.startswith("/"):
        raise InvalidPath(f"path must be absolute (start with '/'): {path!r}")
    try:
        raw = encode_name(path)
    except UnicodeEncodeError:
        raise InvalidPath("path is not valid text") from None
    if len(raw) > MAX_PATH_BYTES:
        raise InvalidPath(f"path is longer than {MAX_PATH_BYTES} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise InvalidPath("path must not contain '..' components")
        if len(encode_name(part)) > MAX_NAME_BYTES:
            raise InvalidPath(f"path component is longer than {MAX_NAME_BYTES} bytes")
    return parts


class FileReader(abc.ABC):
    """A regular file opened for reading: its size, then its bytes; always close it."""

    size: int

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The next chunk (at most READ_CHUNK bytes); ``b""`` at the end."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class SandboxFiles(abc.ABC):
    """A running sandbox's files (see the module docstring)."""

    @abc.abstractmethod
    async def list(
        self,
        path: str,
        *,
        after: bytes | None = None,
        count: int | None = None,
        as_root: bool = False,
    ) -> list[Entry]:
        """The directory's entries in the order of their names' bytes: the first
        ``count`` (or all) whose names come after ``after``."""

    @abc.abstractmethod
    async def write(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
        *,
        mode: int | None = None,
        as_root: bool = False,
    ) -> int:
        """Stream ``chunks`` into ``path``, all or nothing (the directories it makes
        included); returns the bytes written.  TooLarge past ``max_bytes``."""

    @abc.abstractmethod
    async def open_read(self, path: str, *, as_root: bool = False) -> FileReader:
        """A regular file, opened (errors here, before any byte is sent)."""

    @abc.abstractmethod
    async def delete(self, path: str, *, recursive: bool = False, as_root: bool = False) -> None:
        """Remove a file or an empty directory (with ``recursive``: a whole tree)."""

    @abc.abstractmethod
    async def extract_archive(
        self, path: str, chunks: AsyncIterator[bytes], *, as_root: bool = False
    ) -> ExtractResult:
        """Extract the tar stream ``chunks`` into directory ``path`` (made if missing),
        refusing members that would leave it; the members before a refused one stay."""

    @abc.abstractmethod
    def read_archive(self, path: str, *, as_root: bool = False) -> AsyncIterator[bytes]:
        """The tar stream of directory ``path``, made as it is read.  Errors about
        ``path`` itself come at the first ``anext``; close the iterator when done."""

    async def find_openable(self, paths: Sequence[str]) -> str | None:
        """The first of ``paths`` the sandbox user can open (a terminal's shell, say)."""
        for path in paths:
            try:
                reader = await self.open_read(path)
            except FsError:
                continue
            await reader.close()
            return path
        return None
