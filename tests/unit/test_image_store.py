"""The layered image store and the OCI archive reader, on real directories (root)."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from bastion_server.image.builder import ImageError, ImageInfo
from bastion_server.image.oci_archive import ArchiveError, unpack_archive
from bastion_server.image.store import ImageStore, reshift

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")

SHIFT, SESSION = 100000, 300000
KEY = "ab" * 32


def _base(images: Path) -> ImageInfo:
    base = images / "default-0123456789ab"
    (base / "rootfs" / "etc").mkdir(parents=True)
    (base / "rootfs" / "etc" / "hostname").write_text("sandbox\n")
    manifest = {
        "name": "default", "recipe_hash": "0123456789ab", "built_at": "2026-01-01T00:00:00",
        "uid_shift": SHIFT, "id_map_size": 65536, "sandbox_uid": 1000, "sandbox_gid": 1000,
        "sandbox_user": "user", "home": "/home/user", "shell": "/bin/bash",
    }  # fmt: skip
    (base / "image.json").write_text(json.dumps(manifest))
    return ImageInfo.load(base)


def test_an_upper_dir_becomes_a_layer_with_its_whiteouts_and_ids_shifted(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base = _base(tmp_path / "images")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "opaque").mkdir()
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "etc" / "hostname", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # whiteout
    tool = upper / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chmod(tool, 0o4755)  # setuid: dropped
    for path in (upper, upper / "etc", upper / "opaque", tool):
        os.lchown(path, SESSION + 1000, SESSION + 1000)
    info = store.capture(upper, base, KEY, from_shift=SESSION, name="mine", env=(("A", "1"),))
    layer = info.rootfs
    assert os.stat(layer / "tool").st_uid == SHIFT + 1000
    assert not os.stat(layer / "tool").st_mode & stat.S_ISUID
    whiteout = os.lstat(layer / "etc" / "hostname")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert whiteout.st_uid == SHIFT  # made by host root: container root's now
    assert os.getxattr(layer / "opaque", "trusted.overlay.opaque") == b"y"
    image = store.sandbox_image(info)
    assert image.layers == (str(layer), str(base.rootfs))
    assert image.env == (("A", "1"),) and image.digest == f"sha256:{KEY}"
    # Captured again: the same layer (a cache hit), nothing copied.
    assert store.capture(None, base, KEY, from_shift=SESSION, name="other").path == info.path
    store.remove(KEY)
    assert store.layer(KEY) is None and store.keys() == set()


def test_a_layer_is_sized_once_when_stored_and_a_cache_hit_reads_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base = _base(tmp_path / "images")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "data").write_bytes(os.urandom(256 * 1024))
    os.lchown(upper, SESSION, SESSION)
    os.lchown(upper / "data", SESSION + 1000, SESSION + 1000)
    info = store.capture(upper, base, KEY, from_shift=SESSION, name="sized")
    assert info.size_bytes is not None and info.size_bytes >= 256 * 1024
    assert json.loads((info.path / "image.json").read_text())["size_bytes"] == info.size_bytes
    # The hit reads the manifest: a file that grew since is not counted (a layer is
    # never modified after it is stored, so walking it again would only cost time).
    (info.rootfs / "data").write_bytes(os.urandom(1024 * 1024))
    hit = store.layer(KEY)
    assert hit is not None and store.layer_bytes(hit) == info.size_bytes


def test_a_failed_capture_leaves_nothing_and_a_crash_leftover_is_swept(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base = _base(tmp_path / "images")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_text("x")  # owned by host root: outside the session's range
    os.lchown(upper, SESSION, SESSION)
    with pytest.raises(ImageError, match="outside the range"):
        store.capture(upper, base, KEY, from_shift=SESSION, name="bad")
    assert list(store.layers_dir.iterdir()) == []
    (store.layers_dir / f".tmp-{KEY}-1").mkdir()  # what a kill -9 mid-capture leaves
    assert store.prepare() == 1 and list(store.layers_dir.iterdir()) == []


def test_ids_outside_the_session_range_are_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    os.chown(tree / "f", 0, 0)  # a host root file: not the session's
    os.chown(tree, SESSION, SESSION)
    with pytest.raises(ImageError, match="outside the range"):
        reshift(tree, SESSION, SHIFT)


def test_a_reference_cannot_leave_the_images_dir(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for ref in ("../etc", "layers/../../x", "/etc", "layers/xyz"):
        with pytest.raises(ImageError, match="bad image reference"):
            store.load(ref)


Member = tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]


def _archive(tmp_path: Path, members: list[Member]) -> Path:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for member in members:
            if isinstance(member, tuple):
                tar.addfile(member[0], io.BytesIO(member[1]))
            else:
                tar.addfile(member)
    data = layer.getvalue()
    manifest = {"Config": "config.json", "Layers": ["layer.tar"]}
    path = tmp_path / "image.tar"
    with tarfile.open(path, "w") as outer:
        for name, blob in (
            ("manifest.json", json.dumps([manifest]).encode()),
            ("config.json", b'{"config": {"Env": ["A=b"], "WorkingDir": "/w"}}'),
            ("layer.tar", data),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            outer.addfile(info, io.BytesIO(blob))
    return path


def _file(name: str, data: bytes = b"x", uid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.uid, info.gid = len(data), uid, uid
    return info, data


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_a_docker_save_archive_is_unpacked_with_its_config(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    archive = _archive(tmp_path, [_file("etc/a", b"1"), _file("etc/b"), _file("etc/.wh.b")])
    config = unpack_archive(archive, rootfs)
    assert (rootfs / "etc" / "a").read_bytes() == b"1"
    assert not (rootfs / "etc" / "b").exists()
    assert config.env == (("A", "b"),) and config.workdir == "/w"


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([_file("../escape")], "leaves the tree"),
        ([_symlink("up", "/tmp"), _file("up/escape")], "non-directory"),
        ([_file("big-id", uid=70000)], "owned by 70000"),
    ],
)
def test_hostile_members_are_refused(tmp_path: Path, members: list[Member], problem: str) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    with pytest.raises(ArchiveError, match=problem):
        unpack_archive(_archive(tmp_path, members), rootfs)
    assert not Path("/tmp/escape").exists() and not (tmp_path / "escape").exists()


def test_a_hard_link_must_stay_in_the_tree(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    link = tarfile.TarInfo("passwd")
    link.type, link.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    with pytest.raises(ArchiveError, match="leaves the tree"):
        unpack_archive(_archive(tmp_path, [link]), rootfs)
