"""The real default image, as `make setup` built it on this machine."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from bastion_server.image.builder import default_images_dir, resolve_image

IMAGES_DIR = default_images_dir()

pytestmark = pytest.mark.skipif(
    not IMAGES_DIR.is_dir(),
    reason=f"no images directory {IMAGES_DIR}: `make setup` builds the default image",
)


def test_default_image_is_built_and_prepared_for_the_sandbox() -> None:
    info = resolve_image(IMAGES_DIR)
    rootfs = info.rootfs
    shift, size = info.uid_shift, info.id_map_size

    assert (info.name, info.sandbox_user, info.sandbox_uid, info.sandbox_gid) == (
        "default",
        "user",
        1000,
        1000,
    )
    passwd = (rootfs / "etc/passwd").read_text().splitlines()
    assert "user:x:1000:1000::/home/user:/bin/bash" in passwd
    assert "user:x:1000:" in (rootfs / "etc/group").read_text()
    assert (rootfs / "usr/bin/python3").exists()
    assert (rootfs / "bin/bash").exists()
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777
    run_bastion = (rootfs / "run/bastion").lstat()
    assert stat.S_ISDIR(run_bastion.st_mode) and stat.S_IMODE(run_bastion.st_mode) == 0o755
    assert list((rootfs / "run/bastion").iterdir()) == []

    # Ownership: container root -> shift, the sandbox user -> shift + 1000.
    assert (rootfs.lstat().st_uid, rootfs.lstat().st_gid) == (shift, shift)
    home = (rootfs / "home/user").lstat()
    assert (home.st_uid, home.st_gid) == (shift + 1000, shift + 1000)

    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            where = os.path.join(dirpath, name)
            assert shift <= st.st_uid < shift + size, where
            assert shift <= st.st_gid < shift + size, where
            if not stat.S_ISLNK(st.st_mode):
                assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), where
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), where


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_default_image_runs_python() -> None:
    rootfs = resolve_image(IMAGES_DIR).rootfs
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    code = "import os, ssl; print(os.getuid(), ssl.OPENSSL_VERSION_NUMBER > 0)"

    result = subprocess.run(
        [chroot, "--userspec=1000:1000", str(rootfs), "/usr/bin/python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "1000 True\n"
