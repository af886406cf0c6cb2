"""shift_ownership on a small tree: every entry shifted once, nothing followed out."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from bastion_server.image.builder import ImageBuildError, shift_ownership

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lchown to other ids needs root")

SHIFT = 100000


def owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with dirs, files, setuid/setgid entries, hard links and symlinks."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "home/user").mkdir(parents=True)
    (root / "home/user/.profile").touch()
    os.chown(root / "home/user", 1000, 1000)
    os.chown(root / "home/user/.profile", 1000, 1000)
    (root / "var/mail").mkdir(parents=True)
    os.chown(root / "var/mail", 0, 8)
    os.chmod(root / "var/mail", 0o2775)  # a setgid directory
    (root / "usr/bin").mkdir(parents=True)
    for name, mode in (("su", 0o4755), ("chage", 0o2755), ("odd", 0o2644), ("ls", 0o755)):
        (root / "usr/bin" / name).write_bytes(b"\x7fELF")
        os.chmod(root / "usr/bin" / name, mode)
    os.link(root / "usr/bin/ls", root / "usr/bin/dir")  # hard link: shift once
    os.chown(root / "usr/bin/ls", 5, 5)
    (root / "lib").symlink_to("usr/bin", target_is_directory=True)  # symlinked dir
    (root / "dangling").symlink_to("/nonexistent")
    outside = tmp_path / "outside"
    outside.write_text("host file")
    (root / "escape").symlink_to(outside)
    (root / "escape-dir").symlink_to(tmp_path, target_is_directory=True)
    return root


def test_every_entry_is_shifted_once(tree: Path) -> None:
    before = {p: owner(p) for p in [tree, *tree.rglob("*")]}

    shift_ownership(tree, SHIFT)

    for path, (uid, gid) in before.items():
        assert owner(path) == (uid + SHIFT, gid + SHIFT), path
    assert owner(tree / "usr/bin/ls") == (SHIFT + 5, SHIFT + 5)  # not twice via "dir"
    assert owner(tree / "lib") == (SHIFT, SHIFT)  # the symlink itself


def test_symlinks_are_not_followed_out_of_the_tree(tree: Path, tmp_path: Path) -> None:
    outside_before = owner(tmp_path / "outside")
    parent_before = owner(tmp_path)

    shift_ownership(tree, SHIFT)

    assert owner(tmp_path / "outside") == outside_before
    assert owner(tmp_path) == parent_before


def test_setuid_and_setgid_bits_are_all_removed(tree: Path) -> None:
    shift_ownership(tree, SHIFT)

    for path in [tree, *tree.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode):
            assert not mode & (stat.S_ISUID | stat.S_ISGID), path
    assert stat.S_IMODE((tree / "usr/bin/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "var/mail").stat().st_mode) == 0o775
    assert stat.S_IMODE((tree / "usr/bin/odd").stat().st_mode) == 0o644


def test_file_capabilities_are_removed(tree: Path) -> None:
    ping = tree / "usr/bin/ping"
    ping.write_bytes(b"\x7fELF")
    # struct vfs_cap_data, revision 2, effective: CAP_NET_RAW (13) permitted.
    caps = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    try:
        os.setxattr(ping, "security.capability", caps)
    except OSError as exc:
        pytest.skip(f"cannot set file capabilities here: {exc}")

    shift_ownership(tree, SHIFT)

    assert "security.capability" not in os.listxattr(ping)


def test_ids_outside_the_mapped_range_are_refused(tree: Path) -> None:
    os.chown(tree / "etc/passwd", 70000, 0)

    with pytest.raises(ImageBuildError, match=r"outside the sandbox's 0\.\.65535 id range"):
        shift_ownership(tree, SHIFT)


def test_shifting_twice_is_refused(tree: Path) -> None:
    shift_ownership(tree, SHIFT)

    with pytest.raises(ImageBuildError):
        shift_ownership(tree, SHIFT)
