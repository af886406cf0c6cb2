"""The layered image store: base root filesystems and the deltas built over them.

Beside the base images :mod:`bastion_server.image.builder` makes (``<name>-<key>/``),
the images directory holds *layer images*::

    images_dir/
        default-3f2a9c0d1e4b/       a base image: rootfs/ is a whole root filesystem
        layers/
            <key>/                  a layer image, named by its content key
                image.json          its manifest (ImageInfo), "parent" naming the image
                                    it is a delta over ("default-3f2a9c0d1e4b",
                                    "layers/<key>")
                rootfs/             the delta: an overlay upper directory, ids shifted
                                    like the base's (container id n = uid_shift + n)
            .tmp-<key>-<pid>/       one being captured (a crash leaves only these,
                                    swept by prepare())

A layer image's root filesystem is its own ``rootfs/`` over its parent's, and so on
down to a base: :meth:`ImageStore.sandbox_image` gives the chain, top first, as the
runtime mounts it.  A delta keeps the overlay's whiteouts (character devices 0/0) and
opaque directories (``trusted.overlay.opaque``), so what a build removed from its base
stays removed.

:meth:`ImageStore.capture` turns any session's upper directory into a layer image over
the image the session ran, by the capture step snapshots use too
(runtime/layer_capture.py): copied under a temporary name, renamed into place whole,
never modified after, and removed only when no image record and no session uses them
(the service layer's bookkeeping).  What a layer takes on disk is counted once, when
it is stored, and kept in its manifest (``size_bytes``): a cache hit reads it.

Everything here blocks: call it in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bastion_server.image.builder import (
    MANIFEST_NAME,
    ROOTFS_NAME,
    ImageError,
    ImageInfo,
    drop_privilege_bits,
    each_inode,
    resolve_image,
    shift_ownership,
)
from bastion_server.runtime.layer_capture import (
    copy_upper,
    disk_bytes,
    remove_whole,
    staged,
    sweep_unfinished,
)
from bastion_server.runtime.sandbox_image import SandboxImage

LAYERS_DIR = "layers"
_KEY_RE = re.compile(r"[0-9a-f]{64}")
#: How an image names its parent: a base's directory, or a layer image's.
_REF_RE = re.compile(rf"[a-z0-9][a-z0-9_.]*-[0-9a-f]{{12}}|{LAYERS_DIR}/[0-9a-f]{{64}}")
#: Extended attributes a layer may keep: the overlay's own (whiteouts, opaque
#: directories) and ordinary user data; anything else (file capabilities, ACLs naming
#: host ids, security labels) is dropped.
_KEPT_XATTR_PREFIXES = ("trusted.overlay.", "user.")


class ImageStore:
    """The images of one images directory."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir
        self.layers_dir = images_dir / LAYERS_DIR

    def prepare(self) -> int:
        """Make the layers directory and remove what a crash left mid-capture; returns
        how many such leftovers it removed."""
        self.layers_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        return sweep_unfinished(self.layers_dir)

    # -- reading ----------------------------------------------------------------------

    def base(self, name: str) -> ImageInfo:
        """A base image by name (see :func:`resolve_image`)."""
        return resolve_image(self.images_dir, name)

    def ref(self, info: ImageInfo) -> str:
        """How a manifest names ``info`` as a parent: its path below the images dir."""
        return str(info.path.relative_to(self.images_dir))

    def load(self, ref: str) -> ImageInfo:
        """The image at ``ref`` (a base's directory name or ``layers/<key>``)."""
        if not _REF_RE.fullmatch(ref):
            raise ImageError(f"bad image reference {ref!r}")
        return ImageInfo.load(self.images_dir / ref)

    def layer(self, key: str) -> ImageInfo | None:
        """The layer image of content key ``key``, if it is stored (a cache hit)."""
        path = self._layer_dir(key)
        if not (path / MANIFEST_NAME).is_file():
            return None
        return ImageInfo.load(path)

    def chain(self, info: ImageInfo) -> list[ImageInfo]:
        """``info`` and the images under it, top first, down to its base."""
        chain = [info]
        while chain[-1].parent is not None:
            if len(chain) > 128:
                raise ImageError(f"image {info.path} stands on more than 128 layers")
            chain.append(self.load(chain[-1].parent))
        return chain

    def sandbox_image(self, info: ImageInfo, name: str | None = None) -> SandboxImage:
        """What the runtime mounts for ``info``: its layers top first, and the facts of
        its sandbox user.  ``name`` is what users call it (default: its manifest's)."""
        return SandboxImage(
            layers=tuple(str(image.rootfs) for image in self.chain(info)),
            uid_shift=info.uid_shift,
            sandbox_uid=info.sandbox_uid,
            sandbox_gid=info.sandbox_gid,
            home=info.home,
            name=name or info.name,
            digest=info.digest,
            env=info.env,
            workdir=info.workdir,
        )

    def layer_bytes(self, info: ImageInfo) -> int:
        """Bytes ``info``'s own layer takes on disk (each inode once): as counted when
        it was stored, or counted now for a layer stored before sizes were kept."""
        return info.size_bytes if info.size_bytes is not None else disk_bytes(info.rootfs)

    def keys(self) -> set[str]:
        """Every whole layer image on disk."""
        if not self.layers_dir.is_dir():
            return set()
        return {p.name for p in self.layers_dir.iterdir() if _KEY_RE.fullmatch(p.name)}

    # -- writing ----------------------------------------------------------------------

    def capture(
        self,
        upper: Path | None,
        parent: ImageInfo,
        key: str,
        *,
        from_shift: int,
        name: str,
        env: tuple[tuple[str, str], ...] = (),
        workdir: str | None = None,
        extra: dict[str, object] | None = None,
    ) -> ImageInfo:
        """Store a session's upper directory as the layer image ``key`` over ``parent``.

        ``upper`` (None: an empty delta) is copied with its owners, modes, times,
        device nodes (whiteouts) and overlay xattrs, then its ids are shifted from the
        session's range (``from_shift``) to the image's (``parent.uid_shift``); setuid
        and setgid bits and file capabilities are dropped, as in a base image.  The
        layer is complete under its name or not there at all.  A key already stored
        is returned as it is (the same content).

        Raises:
            SandboxError: The copy failed.
            ImageError: A file is owned outside the session's range.
        """
        if not _KEY_RE.fullmatch(key):
            raise ImageError(f"bad layer key {key!r}")
        existing = self.layer(key)
        if existing is not None:
            return existing
        self.layers_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        with staged(self._layer_dir(key), mode=0o755) as temp:
            rootfs = temp / ROOTFS_NAME
            copy_upper(upper, rootfs)
            if upper is None:
                os.chown(rootfs, parent.uid_shift, parent.uid_shift)
            else:
                reshift(rootfs, from_shift, parent.uid_shift)
            os.chmod(rootfs, 0o755)
            _write_manifest(
                temp,
                key,
                name=name,
                parent=self.ref(parent),
                like=parent,
                shell=parent.shell,
                env=dict(parent.env) | dict(env),
                workdir=workdir or parent.workdir,
                extra=extra,
            )
        return ImageInfo.load(self._layer_dir(key))

    def add_base(
        self,
        key: str,
        *,
        name: str,
        like: ImageInfo,
        populate: Callable[[Path], tuple[tuple[tuple[str, str], ...], str | None]],
        extra: dict[str, object] | None = None,
    ) -> ImageInfo:
        """Store a whole root filesystem (an imported image) as the layer image ``key``
        with no parent.  ``populate(rootfs)`` fills the empty tree with container ids
        and returns its env and workdir; the sandbox user's facts (ids, home) are
        ``like``'s, its home and the runtime's mount points are made if missing, and
        the ids are then shifted (setuid bits and file capabilities dropped)."""
        existing = self.layer(key)
        if existing is not None:
            return existing
        self.layers_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        with staged(self._layer_dir(key), mode=0o755) as temp:
            rootfs = temp / ROOTFS_NAME
            rootfs.mkdir(mode=0o755)
            env, workdir = populate(rootfs)
            for path, mode, owner in (
                ("tmp", 0o1777, 0),
                ("run/bastion", 0o755, 0),
                (like.home.lstrip("/"), 0o755, like.sandbox_uid),
            ):
                target = rootfs / path
                if not target.is_dir():
                    target.mkdir(mode=0o755, parents=True)
                    os.chown(target, owner, like.sandbox_gid if owner else 0)
                os.chmod(target, mode)
            shift_ownership(rootfs, like.uid_shift, like.id_map_size)
            _write_manifest(
                temp,
                key,
                name=name,
                parent=None,
                like=like,
                shell="/bin/sh",
                env=dict(env),
                workdir=workdir,
                extra=extra,
            )
        return ImageInfo.load(self._layer_dir(key))

    def remove(self, key: str) -> None:
        """Remove layer image ``key`` (nothing if absent).  The caller has checked that
        nothing stands on it: no image record, no session, no layer over it."""
        remove_whole(self._layer_dir(key))

    def _layer_dir(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ImageError(f"bad layer key {key!r}")
        return self.layers_dir / key


def reshift(root: Path, from_shift: int, to_shift: int, size: int = 65536) -> None:
    """Move every uid and gid under ``root`` from ``from_shift + n`` to ``to_shift + n``
    and drop privilege bits and foreign xattrs (blocking; never follows symlinks).

    Raises:
        ImageError: A file is owned outside ``from_shift .. from_shift + size - 1``.
    """

    def fix(path: str, st: os.stat_result) -> None:
        uid, gid = st.st_uid - from_shift, st.st_gid - from_shift
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            uid = gid = 0  # a whiteout: the overlay makes it as its mounter (host root)
        if not (0 <= uid < size and 0 <= gid < size):
            raise ImageError(f"{path} is owned by {st.st_uid}:{st.st_gid}, outside the range")
        for attr in os.listxattr(path, follow_symlinks=False):
            if not attr.startswith(_KEPT_XATTR_PREFIXES):
                with contextlib.suppress(OSError):
                    os.removexattr(path, attr, follow_symlinks=False)
        os.lchown(path, uid + to_shift, gid + to_shift)
        if not stat.S_ISLNK(st.st_mode):
            drop_privilege_bits(path, st)

    each_inode(root, fix)


def _write_manifest(
    image_dir: Path,
    key: str,
    *,
    name: str,
    parent: str | None,
    like: ImageInfo,
    shell: str,
    env: dict[str, str],
    workdir: str | None,
    extra: dict[str, object] | None,
) -> None:
    """A layer image's manifest: its sandbox user's facts are ``like``'s, its size
    what its ``rootfs/`` takes now (counted once: a layer is never modified after)."""
    manifest = {
        "name": name,
        "recipe_hash": key[:12],
        "digest": f"sha256:{key}",
        "parent": parent,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "uid_shift": like.uid_shift,
        "id_map_size": like.id_map_size,
        "sandbox_uid": like.sandbox_uid,
        "sandbox_gid": like.sandbox_gid,
        "sandbox_user": like.sandbox_user,
        "home": like.home,
        "shell": shell,
        "env": env,
        "workdir": workdir,
        "size_bytes": disk_bytes(image_dir / ROOTFS_NAME),
        **(extra or {}),
    }
    (image_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(image_dir / MANIFEST_NAME, 0o644)
