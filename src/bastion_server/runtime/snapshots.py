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

A snapshot is made whole under a temporary name and renamed into place
(runtime/layer_capture.py, the capture step image builds use too), so a crash at any
point leaves the whole snapshot or none (the temporary directory is swept at start).
The copy is sparse and, where the data directory's file system can (btrfs, XFS),
reflinked.  The directory is root's alone (mode 0700): no sandbox can reach it,
whatever range later owns its ids.

Everything here blocks: call it in a worker thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bastion_server import faults
from bastion_server.runtime.base import SandboxError
from bastion_server.runtime.layer_capture import (
    TEMP_PREFIX,
    copy_upper,
    disk_bytes,
    remove_whole,
    staged,
    sweep_unfinished,
)
from bastion_server.runtime.sandbox_image import SandboxImage

_SHIFT_FILE = "id-shift"


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
        return sweep_unfinished(self.root)

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
        return {p.name for p in self.root.iterdir() if not p.name.startswith(TEMP_PREFIX)}

    def capture(self, upper: Path | None, snapshot_id: str, shift: int, image: SandboxImage) -> int:
        """Copy ``upper`` (None: an empty layer) over ``image`` as snapshot
        ``snapshot_id``, whole or not at all; returns the bytes it takes on disk."""
        with staged(self._dir(snapshot_id), mode=0o700) as temp:
            layer = temp / "layer"
            copy_upper(upper, layer)
            (temp / _SHIFT_FILE).write_text(f"{shift}\n")
            image.save(temp)
            size = disk_bytes(layer)
            faults.point("snapshot.before_rename")
        faults.point("snapshot.after_rename")
        return size

    def remove(self, snapshot_id: str) -> None:
        """Remove a snapshot's layer (nothing if it is not there)."""
        remove_whole(self._dir(snapshot_id))
