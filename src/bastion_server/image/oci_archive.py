"""OCI images from elsewhere: an archive (``docker save``, ``podman save``, an OCI
layout tarball) unpacked into a root filesystem, its layers applied in order.

The archive is untrusted data handled by the host (as root), so nothing in it is
extracted as written: every member's path is checked (no absolute path, no ``..``,
never written through a symlink an earlier member made), device nodes are skipped,
hard links must stay inside the tree, owners must be mappable (``0..65535``), and the
caller shifts the finished tree's ids and drops its setuid bits (``shift_ownership``).
Whiteouts (``.wh.NAME``) remove what earlier layers put there; ``.wh..wh..opq`` empties
a directory.

Everything here blocks: call it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from bastion_server.image.builder import ImageError

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_MAX_ID = 65536
#: The most an archive may unpack to (a bound on what a hostile one can take).
MAX_UNPACKED_BYTES = 16 * 1024**3


class ArchiveError(ImageError):
    """The archive is not an image this server can import; the message says why."""


@dataclass(frozen=True)
class ImageConfig:
    """What an OCI image's config says of how to run it (what Bastion uses of it)."""

    digest: str
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None


def archive_digest(archive: Path) -> str:
    """The digest of the image's manifest in ``archive`` (what names its content)."""
    try:
        with tarfile.open(archive) as outer:
            return _Blobs(outer).manifest()[1]
    except (tarfile.TarError, OSError, KeyError, TypeError, ValueError, EOFError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"not an image archive this server can read: {exc}") from exc


def unpack_archive(
    archive: Path, rootfs: Path, progress: Callable[[str], None] | None = None
) -> ImageConfig:
    """Apply the layers of the image in ``archive`` onto the empty directory ``rootfs``;
    ``progress`` is told of each layer as it starts.

    Raises:
        ArchiveError: Not an image archive, or a member that may not be extracted.
    """
    try:
        with tarfile.open(archive) as outer:
            blobs = _Blobs(outer)
            manifest, digest = blobs.manifest()
            config = blobs.json(manifest["config"]) if "config" in manifest else {}
            budget = [MAX_UNPACKED_BYTES]
            layers = manifest["layers"]
            for number, layer in enumerate(layers, 1):
                if progress is not None:
                    progress(f"[image] unpacking layer {number}/{len(layers)}")
                with blobs.open(layer) as stream:
                    _apply_layer(stream, rootfs, budget)
    except (tarfile.TarError, OSError, KeyError, TypeError, ValueError, EOFError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"not an image archive this server can read: {exc}") from exc
    run = config.get("config") or {}
    env = []
    for item in run.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep and key != "PATH":  # the sandbox's PATH covers the usual directories
            env.append((key, value))
    workdir = run.get("WorkingDir") or None
    return ImageConfig(digest=digest, env=tuple(env), workdir=workdir)


class _Blobs:
    """The blobs of an OCI layout or of a ``docker save`` archive, by reference."""

    def __init__(self, outer: tarfile.TarFile) -> None:
        self.outer = outer
        self.names = {_clean(m.name): m for m in outer.getmembers() if m.isfile()}

    def _read(self, name: str) -> bytes:
        member = self.names.get(name)
        if member is None:
            raise ArchiveError(f"the archive has no {name}")
        f = self.outer.extractfile(member)
        assert f is not None
        return f.read()

    def json(self, ref: Any) -> dict[str, Any]:
        data = json.loads(self._read(self._name(ref)))
        if not isinstance(data, dict):
            raise ArchiveError("a manifest or config is not a JSON object")
        return data

    def _name(self, ref: Any) -> str:
        """A descriptor (``{"digest": "sha256:..."}``) or a docker-save path."""
        if isinstance(ref, dict):
            algorithm, _, hexdigest = str(ref["digest"]).partition(":")
            return f"blobs/{algorithm}/{hexdigest}"
        return _clean(str(ref))

    def manifest(self) -> tuple[dict[str, Any], str]:
        """The image's manifest (layers in order, its config) and its digest."""
        if "index.json" in self.names:
            index = json.loads(self._read("index.json"))
            descriptor = index["manifests"][0]
            while descriptor.get("mediaType", "").endswith(("index.v1+json", "list.v2+json")):
                descriptor = self.json(descriptor)["manifests"][0]
            manifest = self.json(descriptor)
            return manifest, str(descriptor["digest"])
        if "manifest.json" in self.names:  # docker save (older than OCI layout)
            raw = self._read("manifest.json")
            entry = json.loads(raw)[0]
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            return {"config": entry["Config"], "layers": entry["Layers"]}, digest
        raise ArchiveError("no index.json (OCI layout) or manifest.json (docker save) in it")

    @contextlib.contextmanager
    def open(self, ref: Any) -> Any:
        member = self.names.get(self._name(ref))
        if member is None:
            raise ArchiveError(f"the archive lacks the layer {ref}")
        raw = self.outer.extractfile(member)
        assert raw is not None
        yield raw  # plain or gzip: tarfile's "r|*" tells


def _clean(name: str) -> str:
    return str(PurePosixPath("/", name).relative_to("/"))


def _member_path(rootfs: Path, name: str) -> Path:
    """Where a member goes: inside ``rootfs``, never through a symlink."""
    parts = PurePosixPath(name).parts
    parts = tuple(p for p in parts if p not in ("", ".", "/"))
    if not parts:
        return rootfs
    if ".." in parts:
        raise ArchiveError(f"a layer member leaves the tree: {name!r}")
    current = rootfs
    for part in parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            current.mkdir(mode=0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"a layer member is written through a non-directory: {name!r}")
    return current / parts[-1]


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _apply_layer(stream: IO[bytes], rootfs: Path, budget: list[int]) -> None:
    with tarfile.open(fileobj=stream, mode="r|*") as layer:
        dirs: list[tuple[Path, tarfile.TarInfo]] = []
        for member in layer:
            path = _member_path(rootfs, member.name)
            base = path.name
            if base == _OPAQUE:
                for child in list(path.parent.iterdir()):
                    _remove(child)
                continue
            if base.startswith(_WHITEOUT):
                _remove(path.with_name(base[len(_WHITEOUT) :]))
                continue
            if member.uid >= _MAX_ID or member.gid >= _MAX_ID:
                raise ArchiveError(f"{member.name} is owned by {member.uid}:{member.gid}")
            if path == rootfs:
                continue
            if member.isdir():
                if not path.is_dir() or path.is_symlink():
                    _remove(path)
                    path.mkdir(mode=0o755)
                dirs.append((path, member))
                continue
            _remove(path)
            if member.isreg():
                budget[0] -= member.size
                if budget[0] < 0:
                    raise ArchiveError(f"the image unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                source = layer.extractfile(member)
                assert source is not None
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with io.FileIO(os.open(path, flags, 0o600), "w") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                target = _member_path(rootfs, member.linkname)
                if not os.path.lexists(target):
                    raise ArchiveError(f"a hard link to nothing in the tree: {member.name!r}")
                os.link(target, path, follow_symlinks=False)
                continue  # the link shares its target's owner and mode
            elif member.isfifo():
                os.mkfifo(path, 0o600)
            else:
                continue  # device nodes: the sandbox has a /dev of its own
            _set_attrs(path, member)
        for path, member in reversed(dirs):
            _set_attrs(path, member)


def _set_attrs(path: Path, member: tarfile.TarInfo) -> None:
    os.lchown(path, member.uid, member.gid)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
    with contextlib.suppress(OSError):
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
