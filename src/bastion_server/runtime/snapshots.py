"""Snapshot layers on the host: a session's writable layer, copied whole, kept under
``<data_dir>/snapshots/<id>/``::

    layer/      the copy of the session's upper directory (overlay whiteouts and
                opaque-directory xattrs included): a layer like an image's, mounted
                read-only (and idmapped) in the overlay's lowerdir of every session
                that starts from it, above its parent snapshot's layers and the image
    id-shift    the first host id of the range its files are owned in (the source
                session's): a session of another range sees them idmapped onto its own
    image.json  the image the layer stands on (the source session's): a session of
                the snapshot runs that image, whatever it was created with

A snapshot is made in ``.tmp-<id>/`` and renamed into place once whole, so a crash at
any point leaves the whole snapshot or none (the temp directory is swept at start).
The copy is sparse and, where the data directory's file system can (btrfs, XFS),
reflinked: ``cp --reflink=auto --sparse=always``.  The directory is root's alone
(mode 0700): no sandbox can reach it, whatever range later owns its ids.

Everything here blocks: call it in a worker thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bastion_server import faults
from bastion_server.runtime.base import SandboxError
from bastion_server.runtime.sandbox_image import SandboxImage

_SHIFT_FILE = "id-shift"
_TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class SnapshotLayer:
    """One snapshot's layer, as the overlay mounts it."""

    path: Path
    #: The host id its on-disk id 0 is (the source session's range's first id).
    shift: int
    #: The image under it (None: a snapshot of a server without images' records).
    image: SandboxImage | None


class SnapshotStore:
    """The snapshot layers of one data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> int:
        """Make the directory (root's alone) and sweep what a crash left mid-copy;
        returns how many such leftovers it removed."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        swept = 0
        for entry in self.root.iterdir():
            if entry.name.startswith(_TEMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                swept += 1
        return swept

    def _dir(self, snapshot_id: str) -> Path:
        if not snapshot_id or "/" in snapshot_id or snapshot_id.startswith("."):
            raise SandboxError(f"bad snapshot id {snapshot_id!r}")
        return self.root / snapshot_id

    def layer(self, snapshot_id: str) -> SnapshotLayer:
        base = self._dir(snapshot_id)
        try:
            shift = int((base / _SHIFT_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SandboxError(f"snapshot {snapshot_id} is missing or incomplete") from exc
        return SnapshotLayer(base / "layer", shift, SandboxImage.recorded(base))

    def ids(self) -> set[str]:
        """Every whole snapshot on disk."""
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.iterdir() if not p.name.startswith(_TEMP_PREFIX)}

    def capture(self, upper: Path | None, snapshot_id: str, shift: int, image: SandboxImage) -> int:
        """Copy ``upper`` (None: an empty layer) over ``image`` as snapshot
        ``snapshot_id``, whole or not at all; returns the bytes it takes on disk."""
        final = self._dir(snapshot_id)
        temp = self.root / f"{_TEMP_PREFIX}{snapshot_id}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(mode=0o700)
        try:
            layer = temp / "layer"
            if upper is None:
                layer.mkdir()
            else:
                _copy_tree(upper, layer)
            (temp / _SHIFT_FILE).write_text(f"{shift}\n")
            image.save(temp)
            size = disk_bytes(layer)
            faults.point("snapshot.before_rename")
            os.rename(temp, final)
            faults.point("snapshot.after_rename")
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return size

    def remove(self, snapshot_id: str) -> None:
        """Remove a snapshot's layer (nothing if it is not there)."""
        base = self._dir(snapshot_id)
        if not base.exists():
            return
        # Renamed away first: a crash mid-removal leaves a temp name the sweep removes,
        # never a half snapshot under its own name.
        doomed = self.root / f"{_TEMP_PREFIX}{snapshot_id}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(base, doomed)
        shutil.rmtree(doomed)


def _copy_tree(source: Path, target: Path) -> None:
    """``cp -a`` (owners, modes, times, xattrs, device nodes: the overlay's whiteouts),
    sparse, reflinked where the file system can."""
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--sparse=always", "--", f"{source}/.", str(target)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if proc.returncode != 0:
        message = proc.stdout.decode(errors="replace").strip()[-2000:]
        raise SandboxError(f"copying the session's files failed: {message}")


def disk_bytes(path: Path) -> int:
    """Bytes a tree takes on disk (allocated blocks, each inode once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total
