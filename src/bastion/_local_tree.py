"""Local directory trees for ``files.upload_dir`` / ``download_dir``, as tar streams.

:class:`LocalTreeArchive` is a binary file object whose bytes are the tar of a local
tree, made while the tree is walked (directories, regular files, symlinks as links;
other special files are left out): the upload streams it, nothing is staged.
:func:`extract_tree` writes a tar stream into a local directory with
:mod:`tarfile`'s ``"data"`` filter: absolute names, ``..``, links leading out and
special files are refused, setuid/setgid/sticky and group/other write bits dropped.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Iterator

from ._exceptions import FileDownloadError, LocalFileError
from ._tar_stream import (
    END_OF_ARCHIVE,
    ChunkReader,
    QueueReader,
    member_header,
    open_stream,
    padding,
)

_READ = 1024 * 1024

#: Told the bytes of file content read so far (for a progress bar).
ProgressCallback = Callable[[int], None]


def tree_size(root: str | os.PathLike[str]) -> int:
    """The bytes of regular files under ``root`` (what an upload of it moves)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class LocalTreeArchive(ChunkReader):
    """The tar stream of local directory ``root`` (names relative to it).

    Raises :class:`LocalFileError` from ``read`` when the tree cannot be read.
    """

    def __init__(self, root: str | os.PathLike[str], progress: ProgressCallback | None = None):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise LocalFileError(
                f"not a directory: {self.root!r}", filename=self.root, strerror="Not a directory"
            )
        self._progress = progress
        self._moved = 0
        super().__init__(self._members())

    def _members(self) -> Iterator[bytes]:
        try:
            yield from self._walk(self.root, "")
        except OSError as exc:
            raise LocalFileError.wrap(exc, "reading the directory to upload") from exc
        yield END_OF_ARCHIVE

    def _walk(self, directory: str, prefix: str) -> Iterator[bytes]:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for entry in entries:
            name = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                yield member_header(name, "directory", mode=st.st_mode, mtime=st.st_mtime)
                yield from self._walk(entry.path, name + "/")
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.path)
                yield member_header(name, "symlink", mode=0o777, linkname=target)
            elif stat.S_ISREG(st.st_mode):
                yield from self._file(entry.path, name)

    def _file(self, path: str, name: str) -> Iterator[bytes]:
        with open(path, "rb") as fileobj:
            st = os.fstat(fileobj.fileno())
            yield member_header(name, "file", size=st.st_size, mode=st.st_mode, mtime=st.st_mtime)
            left = st.st_size
            while left > 0:
                chunk = fileobj.read(min(_READ, left))
                if not chunk:
                    break
                left -= len(chunk)
                self._moved_more(len(chunk))
                yield chunk
        if left:
            yield bytes(left)  # it shrank meanwhile: the header promised its size
        yield padding(st.st_size)

    def _moved_more(self, size: int) -> None:
        self._moved += size
        if self._progress is not None:
            self._progress(self._moved)


def extract_tree(reader: ChunkReader | QueueReader, dest: str | os.PathLike[str]) -> int:
    """Extract the tar stream ``reader`` into ``dest`` (made if missing); returns the
    number of members written.  Raises :class:`FileDownloadError` for a member the
    ``"data"`` filter refuses, :class:`LocalFileError` when writing fails."""
    dest = os.fspath(dest)
    count = 0
    try:
        os.makedirs(dest, exist_ok=True)
        with open_stream(reader) as tar:
            for member in tar:
                tar.extract(member, dest, filter="data")
                count += 1
    except tarfile.FilterError as exc:
        raise FileDownloadError(f"refused a member of the archive: {exc}") from exc
    except tarfile.TarError as exc:
        raise FileDownloadError(f"the archive could not be read: {exc}") from exc
    except OSError as exc:
        raise LocalFileError.wrap(exc, "writing the downloaded directory") from exc
    return count
