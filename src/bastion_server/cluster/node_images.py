"""The images a node holds: what its agent reports for placement, and how it finds a
session's image among its own.

An image is told by its digest (two images of one digest have the same layers).  A
node holds an image when its own images directory has it whole: a base image
(``<name>-<key>/``) or a layer image (``layers/<key>/``) whose manifest names that
digest, with every layer under it.  The gateway names a session's image by what its
own images directory holds; the node mounts its own copy of the same digest, so the
paths of the two directories need not agree.

Everything here blocks: call it in a worker thread.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from bastion_server.image.builder import MANIFEST_NAME, ImageError
from bastion_server.image.store import LAYERS_DIR, ImageStore
from bastion_server.runtime.base import SandboxError
from bastion_server.runtime.sandbox_image import SandboxImage

#: A base image's directory (see image/store.py).
_BASE_RE = re.compile(r"[a-z0-9][a-z0-9_.]*-[0-9a-f]{12}")


class ImageNotHere(SandboxError):
    """The node does not hold the image a session asked for."""


class HeldImages:
    """The images of one node's images directory, by digest (read again only when the
    directory or its layers directory changed)."""

    def __init__(self, images_dir: Path) -> None:
        self.store = ImageStore(images_dir)
        self._seen: tuple[int, int] | None = None
        self._refs: dict[str, str] = {}
        self._names: dict[str, str] = {}

    def _stamp(self) -> tuple[int, int]:
        def mtime(path: Path) -> int:
            try:
                return path.stat().st_mtime_ns
            except FileNotFoundError:
                return 0

        return mtime(self.store.images_dir), mtime(self.store.layers_dir)

    def _refresh(self) -> None:
        stamp = self._stamp()
        if stamp == self._seen:
            return
        refs: dict[str, str] = {}
        names: dict[str, str] = {}
        candidates: list[str] = []
        if self.store.images_dir.is_dir():
            candidates += [
                p.name
                for p in self.store.images_dir.iterdir()
                if _BASE_RE.fullmatch(p.name) and (p / MANIFEST_NAME).is_file()
            ]
        candidates += [f"{LAYERS_DIR}/{key}" for key in sorted(self.store.keys())]
        for ref in candidates:
            try:
                info = self.store.load(ref)
                self.store.chain(info)  # every layer under it is here too
            except (ImageError, OSError, ValueError):
                continue
            if info.digest:
                refs.setdefault(info.digest, ref)
                names.setdefault(info.digest, info.name)
        self._refs, self._names, self._seen = refs, names, stamp

    def digests(self) -> dict[str, str]:
        """Every image held whole: {digest: its name}."""
        self._refresh()
        return dict(self._names)

    def local(self, image: SandboxImage) -> SandboxImage:
        """``image`` as this node mounts it: its own layers of the same digest, under the
        name the session knows it by.  :class:`ImageNotHere` if the node lacks it."""
        if not image.digest:  # an image of before digests: its paths are all there is
            return image
        self._refresh()
        ref = self._refs.get(image.digest)
        if ref is None:
            raise ImageNotHere(f"this node does not hold image {image.name!r} ({image.digest})")
        own = self.store.sandbox_image(self.store.load(ref), image.name)
        # What the session's record says of its environment wins (same digest: same files).
        return dataclasses.replace(own, env=image.env, workdir=image.workdir)
