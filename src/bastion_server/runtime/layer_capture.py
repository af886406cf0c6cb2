"""Capturing a sandbox's writable layer as a read-only layer on the host: the one
mechanism snapshots (runtime/snapshots.py) and built images (image/store.py) share.

A layer is a directory made whole under a temporary name (``.tmp-<name>``) beside its
final place and renamed into place at the end, so a crash at any point leaves the
whole layer or only a temporary directory, which :func:`sweep_unfinished` removes at
start.  Its files are a copy of an overlay upper directory (:func:`copy_upper`): owners,
modes, times, xattrs (``trusted.overlay.opaque``) and device nodes (the whiteouts),
sparse, and reflinked where the file system can (btrfs, XFS).  What it takes on disk
is counted once, at capture (:func:`disk_bytes`), and kept beside it: a layer is never
modified after.

Everything here blocks: call it in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bastion_server.runtime.base import SandboxError

#: The prefix of a layer directory not yet (or no longer) whole.
TEMP_PREFIX = ".tmp-"


def sweep_unfinished(root: Path) -> int:
    """Remove the temporary directories a crash left in ``root`` mid-capture or
    mid-removal; returns how many it removed."""
    swept = 0
    for entry in root.iterdir():
        if entry.name.startswith(TEMP_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)
            swept += 1
    return swept


@contextlib.contextmanager
def staged(final: Path, *, mode: int) -> Iterator[Path]:
    """A fresh directory (``mode``) beside ``final`` to fill in the ``with`` block;
    renamed to ``final`` when the block ends, removed if it raises."""
    temp = final.with_name(f"{TEMP_PREFIX}{final.name}-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(mode=mode)
    try:
        yield temp
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def remove_whole(final: Path) -> None:
    """Remove a layer directory (nothing if absent): renamed away first, so a crash
    mid-removal leaves a temporary name the sweep removes, never a half layer."""
    if not final.exists():
        return
    doomed = final.with_name(f"{TEMP_PREFIX}{final.name}-rm")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(final, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def copy_upper(upper: Path | None, target: Path) -> None:
    """Copy the overlay upper directory ``upper`` (None: nothing was written, an empty
    layer) to the new directory ``target``, whiteouts, xattrs and owners included.

    Raises:
        SandboxError: The copy failed (the message has cp's last words).
    """
    target.mkdir()
    if upper is None:
        return
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--sparse=always", "--", f"{upper}/.", str(target)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if proc.returncode != 0:
        message = proc.stdout.decode(errors="replace").strip()[-2000:]
        raise SandboxError(f"copying the sandbox's files failed: {message}")


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
