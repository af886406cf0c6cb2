"""A directory upload (``POST .../files/archive``) cannot reach outside its destination.

Each test sends a hand-made tar stream, as a hostile client would, to a real sandbox
and checks what the extraction did: members with absolute names, ``..``, symlinks
leading out, hard links, devices and FIFOs are refused with ``invalid_path`` (the
extraction stops there); a symlink from the archive or one the sandbox planted is
never written through; setuid/setgid/sticky bits are dropped and the archive's
owners ignored; the sandbox's mount points stay untouched even as root.  A download
sends a symlink as a link, never what it points to.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import ServerProcess
from tests.security.helpers import Sessions, sh

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOME = "/home/user"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url) as c:
        yield c


@pytest.fixture
def sid(sessions: Sessions) -> str:
    return sessions.new()


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def post(
    server: ServerProcess, sid: str, dest: str, body: bytes, user: str = "user"
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/sessions/{sid}/files/archive",
        params={"path": dest, "user": user},
        content=body,
        timeout=60,
    )


def refused(response: httpx.Response, what: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_path"
    assert what in error["message"]


def exists(client: Bastion, sid: str, path: str) -> bool:
    return sh(client, sid, f"test -e '{path}' -o -L '{path}' && echo yes || echo no") == "yes\n"


def test_absolute_member_is_refused(server: ServerProcess, client: Bastion, sid: str) -> None:
    body = tar_of((member(f"{HOME}/abs-canary"), b"x"), (member("after"), b"y"))
    refused(post(server, sid, f"{HOME}/d", body), "absolute path")
    assert not exists(client, sid, f"{HOME}/abs-canary")
    assert not exists(client, sid, f"{HOME}/d/after")  # the extraction stopped there


def test_dotdot_member_is_refused(server: ServerProcess, client: Bastion, sid: str) -> None:
    body = tar_of((member("ok"), b"1"), (member("sub/../../escaped"), b"x"))
    refused(post(server, sid, f"{HOME}/d", body), "'..'")
    assert exists(client, sid, f"{HOME}/d/ok")  # members before it stay
    assert not exists(client, sid, f"{HOME}/escaped")


@pytest.mark.parametrize("target", ["/etc", "../outside", "a/../../x", "/"])
def test_symlink_pointing_out_is_refused(
    server: ServerProcess, client: Bastion, sid: str, target: str
) -> None:
    body = tar_of((member("link", tarfile.SYMTYPE, linkname=target), None))
    refused(post(server, sid, f"{HOME}/d", body), "leads out")
    assert not exists(client, sid, f"{HOME}/d/link")


def test_symlink_inside_is_kept_but_never_written_through(
    server: ServerProcess, client: Bastion, sid: str
) -> None:
    body = tar_of(
        (member("real", tarfile.DIRTYPE, mode=0o755), None),
        (member("alias", tarfile.SYMTYPE, linkname="real"), None),
    )
    assert post(server, sid, f"{HOME}/d", body).status_code == 200
    assert sh(client, sid, f"readlink {HOME}/d/alias") == "real\n"
    # A later archive writing through that (inside) symlink is refused all the same:
    # a member's path never follows a symlink.
    through = tar_of((member("alias/x"), b"x"))
    refused(post(server, sid, f"{HOME}/d", through), "")
    assert not exists(client, sid, f"{HOME}/d/real/x")


def test_symlink_planted_by_the_sandbox_is_not_followed(
    server: ServerProcess, client: Bastion, sid: str
) -> None:
    sh(client, sid, f"mkdir -p {HOME}/d && ln -s /etc {HOME}/d/planted && ln -s /tmp/f {HOME}/d/f")
    before = sh(client, sid, "md5sum /etc/passwd")
    refused(post(server, sid, f"{HOME}/d", tar_of((member("planted/passwd"), b"owned"))), "")
    # A file member landing on a planted symlink does not write where it points.
    refused(post(server, sid, f"{HOME}/d", tar_of((member("f"), b"owned"))), "symlink")
    assert sh(client, sid, "md5sum /etc/passwd") == before
    assert not exists(client, sid, "/tmp/f")
    # As root too: the rule is the path's, not the permissions'.
    body = tar_of((member("planted/passwd"), b"owned"))
    assert post(server, sid, f"{HOME}/d", body, user="root").status_code == 422
    assert sh(client, sid, "md5sum /etc/passwd") == before


def test_hard_link_is_refused(server: ServerProcess, client: Bastion, sid: str) -> None:
    body = tar_of((member("hl", tarfile.LNKTYPE, linkname="/etc/passwd"), None))
    refused(post(server, sid, f"{HOME}/d", body), "hard link")
    assert not exists(client, sid, f"{HOME}/d/hl")


@pytest.mark.parametrize(
    "kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE], ids=["chr", "blk", "fifo"]
)
def test_devices_and_fifos_are_refused(
    server: ServerProcess, client: Bastion, sid: str, kind: bytes
) -> None:
    body = tar_of((member("dev", kind, devmajor=1, devminor=3), None))
    refused(post(server, sid, f"{HOME}/d", body), "special file")
    assert not exists(client, sid, f"{HOME}/d/dev")
    # As root as well (root in the sandbox could make a device node otherwise).
    refused(post(server, sid, f"{HOME}/d", body, user="root"), "special file")


@pytest.mark.parametrize("user", ["user", "root"])
def test_setuid_bits_are_dropped_and_owners_ignored(
    server: ServerProcess, client: Bastion, sid: str, user: str
) -> None:
    body = tar_of(
        (member("dir", tarfile.DIRTYPE, mode=0o3775, uid=4242, gid=4242), None),
        (member("dir/tool", mode=0o6755, uid=4242, gid=4242, uname="x"), b"#!/bin/sh\n"),
        (member("dir/empty", mode=0o4700, uid=4242), b""),
    )
    assert post(server, sid, f"{HOME}/d", body, user=user).status_code == 200
    owner = "user" if user == "user" else "root"
    modes = sh(client, sid, f"cd {HOME}/d && stat -c '%a %U' dir dir/tool dir/empty")
    assert modes == f"775 {owner}\n755 {owner}\n700 {owner}\n"


def test_mount_points_stay_untouched_even_as_root(
    server: ServerProcess, client: Bastion, sid: str
) -> None:
    body = tar_of((member("proc/evil"), b"x"), (member("etc/resolv.conf"), b"nameserver 6.6.6.6"))
    response = post(server, sid, "/", body, user="root")
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "permission_denied"
    response = post(server, sid, "/proc/x", tar_of((member("y"), b"x")), user="root")
    assert response.status_code == 403, response.text
    assert "6.6.6.6" not in sh(client, sid, "cat /etc/resolv.conf")


def test_not_a_tar_is_invalid_request(server: ServerProcess, sid: str) -> None:
    response = post(server, sid, f"{HOME}/d", b"\x01" * 5000)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_download_sends_symlinks_as_links(server: ServerProcess, client: Bastion, sid: str) -> None:
    sh(client, sid, f"mkdir -p {HOME}/t && ln -s /etc/passwd {HOME}/t/pw && echo hi > {HOME}/t/f")
    response = httpx.get(
        f"{server.url}/v1/sessions/{sid}/files/archive", params={"path": f"{HOME}/t"}, timeout=60
    )
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        found = {m.name: (m.type, m.linkname, m.size) for m in tar}
    assert found == {"f": (tarfile.REGTYPE, "", 3), "pw": (tarfile.SYMTYPE, "/etc/passwd", 0)}
    assert b"root:" not in response.content
