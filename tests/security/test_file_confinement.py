"""The file API never reaches outside the session's own filesystem.

The server performs file operations from the host side, as root, on the sandbox's
root directory.  The sandbox is hostile: a job can plant symlinks (absolute, relative
with ``..``, magic ``/proc`` links), FIFOs and odd names.  Each test plants such things
with a real job in a real sandbox, then drives the public SDK and checks that

* the operation stays inside the session (it sees the sandbox's files, not the host's);
* a host canary directory (a secret file under /tmp, world-readable) is byte-for-byte
  unchanged afterwards (checked after every test by the autouse fixture).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import ServerProcess

from bastion import (
    Bastion,
    FileDeleteError,
    FileDownloadError,
    FileError,
    FileListError,
    FileUploadError,
    JobFailedError,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Every file call must answer well within this (a hang is a failure, not a wait).
CLIENT_TIMEOUT = 10.0


# --------------------------------------------------------------------------- host canary


@dataclass
class Canary:
    dir: str
    secret: str

    @property
    def secret_path(self) -> str:
        return os.path.join(self.dir, "secret")


def snapshot(root: str) -> dict[str, tuple[object, ...]]:
    """Everything observable about a directory tree, without following symlinks."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                content: object = Path(path).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            result[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                content,
            )
    return result


@pytest.fixture(autouse=True)
def canary() -> Iterator[Canary]:
    """A host directory under /tmp with a secret; it must be untouched after the test."""
    secret = "host-secret-" + secrets.token_hex(16)
    path = tempfile.mkdtemp(prefix="bastion-canary-", dir="/tmp")
    os.chmod(path, 0o755)
    Path(path, "secret").write_text(secret + "\n")
    os.chmod(os.path.join(path, "secret"), 0o644)
    Path(path, "sub").mkdir(mode=0o755)
    Path(path, "sub", "nested.txt").write_text("nested " + secret + "\n")
    before = snapshot(path)
    try:
        yield Canary(path, secret)
        after = snapshot(path)
        assert after == before, f"the host canary directory {path} changed"
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- sandbox


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url, timeout=CLIENT_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def sid(client: Bastion) -> Iterator[str]:
    """One running session for the module; each test works in a directory of its own."""
    session_id = client.sessions.create()["session_id"]
    try:
        client.sessions.start(session_id)
        yield session_id
    finally:
        client.sessions.delete(session_id)


@pytest.fixture
def work(client: Bastion, sid: str) -> str:
    """A fresh directory of the sandbox user's, for this test's planted files."""
    path = f"/home/user/t-{secrets.token_hex(6)}"
    sh(client, sid, 'mkdir "$W"', W=path)
    return path


def sh(client: Bastion, sid: str, script: str, **env: str) -> str:
    """Run ``sh -c script`` in the sandbox as its user; stdout.  Failure fails the test."""
    try:
        result = client.jobs.run_and_wait(sid, ["sh", "-c", script], env=env, wait_timeout=60)
    except JobFailedError as exc:
        pytest.fail(f"job {script!r} failed: {exc.status_code} {exc.errout!r}")
    output = result["output"]
    assert output is not None
    return output["console_output"]


def host_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


OPS = ["upload", "download", "list", "delete"]
OP_ERRORS: dict[str, type[FileError]] = {
    "upload": FileUploadError,
    "download": FileDownloadError,
    "list": FileListError,
    "delete": FileDeleteError,
}


def call(client: Bastion, sid: str, op: str, path: str) -> object:
    if op == "upload":
        return client.files.upload(sid, b"should never be written", path)
    if op == "download":
        return client.files.download(sid, path)
    if op == "list":
        return client.files.list(sid, path)
    return client.files.delete(sid, path, recursive=True)


def names(client: Bastion, sid: str, path: str) -> list[str]:
    return sorted(f["name"] for f in client.files.list(sid, path)["files"])


# --------------------------------------------------------------------------- path syntax


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "path",
    [
        "/home/user/../../etc/passwd",
        "/..",
        "/../etc/passwd",
        "/home/user/..",
        "/home/user/../../../../../../tmp",
        "/home//user/./../../etc/shadow",
    ],
)
def test_dotdot_paths_are_rejected(client: Bastion, sid: str, op: str, path: str) -> None:
    with pytest.raises(OP_ERRORS[op]) as info:
        call(client, sid, op, path)
    assert info.value.code == "invalid_path", repr(info.value)
    assert info.value.status_code == 422


@pytest.mark.parametrize("op", OPS)
def test_dotdot_into_the_host_canary_is_rejected(
    client: Bastion, sid: str, op: str, canary: Canary
) -> None:
    with pytest.raises(OP_ERRORS[op]) as info:
        call(client, sid, op, "/home/user/../../.." + canary.secret_path)
    assert info.value.code == "invalid_path"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("path", ["etc/passwd", "home/user/x.txt", "./x", "x", "~/x", ""])
def test_relative_paths_are_rejected(client: Bastion, sid: str, op: str, path: str) -> None:
    with pytest.raises(OP_ERRORS[op]) as info:
        call(client, sid, op, path)
    assert info.value.code == "invalid_path", repr(info.value)


@pytest.mark.parametrize("op", OPS)
def test_over_long_path_is_rejected(client: Bastion, sid: str, op: str) -> None:
    path = "/home/user/" + "/".join(["d" * 200] * 21)  # > 4096 bytes, each part short
    assert len(path.encode()) > 4096
    with pytest.raises(OP_ERRORS[op]) as info:
        call(client, sid, op, path)
    assert info.value.code == "invalid_path", repr(info.value)


@pytest.mark.parametrize("op", OPS)
def test_over_long_component_is_rejected(client: Bastion, sid: str, op: str) -> None:
    with pytest.raises(OP_ERRORS[op]) as info:
        call(client, sid, op, "/home/user/" + "n" * 256)
    assert info.value.code == "invalid_path", repr(info.value)
    # a multi-byte name over 255 *bytes* (128 characters) is just as long
    with pytest.raises(OP_ERRORS[op]) as info:
        call(client, sid, op, "/home/user/" + "é" * 128)
    assert info.value.code == "invalid_path", repr(info.value)


def test_longest_allowed_component_works(client: Bastion, sid: str, work: str) -> None:
    path = f"{work}/" + "n" * 255
    client.files.upload(sid, b"ok", path)
    assert client.files.download(sid, path) == b"ok"
    client.files.delete(sid, path)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("path", ["/home/user/a\x00b", "/etc/passwd\x00.txt", "\x00"])
def test_nul_byte_is_rejected(client: Bastion, sid: str, op: str, path: str) -> None:
    with pytest.raises(OP_ERRORS[op]) as info:
        call(client, sid, op, path)
    assert info.value.code == "invalid_path", repr(info.value)


# --------------------------------------------------------------------------- symlinks


def test_absolute_symlink_to_host_dir_resolves_inside_the_sandbox(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    sh(client, sid, 'ln -s "$C" "$W/hostlink"', C=canary.dir, W=work)
    with pytest.raises(FileDownloadError) as info:
        client.files.download(sid, f"{work}/hostlink/secret")
    assert info.value.code == "file_not_found", repr(info.value)
    with pytest.raises(FileDownloadError) as info:
        client.files.download(sid, f"{work}/hostlink/sub/nested.txt")
    assert info.value.code == "file_not_found", repr(info.value)
    # Give the sandbox its own directory of that name: the link now leads there.
    sh(client, sid, 'mkdir -p "$C" && echo sandbox-version > "$C/secret"', C=canary.dir)
    try:
        assert client.files.download(sid, f"{work}/hostlink/secret") == b"sandbox-version\n"
        assert client.files.download(sid, canary.secret_path) == b"sandbox-version\n"
        assert names(client, sid, f"{work}/hostlink") == ["secret"]
    finally:
        client.files.delete(sid, canary.dir, recursive=True)
    assert Path(canary.secret_path).read_text() == canary.secret + "\n"


def test_root_symlink_leads_to_the_sandbox_root(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    sh(client, sid, 'ln -s / "$W/rootlink"', W=work)
    # Mark the sandbox's /etc/hostname (the image copies the build host's name).
    marker = f"sandbox-{secrets.token_hex(6)}\n".encode()
    host_hostname = Path("/etc/hostname").read_bytes()
    client.files.upload(sid, marker, "/etc/hostname", user="root")
    assert sh(client, sid, "cat /etc/hostname").encode() == marker
    assert client.files.download(sid, f"{work}/rootlink/etc/hostname") == marker
    assert Path("/etc/hostname").read_bytes() == host_hostname
    with pytest.raises(FileDownloadError) as info:
        client.files.download(sid, f"{work}/rootlink{canary.secret_path}")
    assert info.value.code == "file_not_found"
    with pytest.raises(FileListError):
        client.files.list(sid, f"{work}/rootlink{canary.dir}")
    # Listing through the link lists the sandbox's root, not the host's.
    through_link = names(client, sid, f"{work}/rootlink")
    assert through_link == names(client, sid, "/")
    assert set(through_link) != set(os.listdir("/"))
    assert sorted(sh(client, sid, "ls -A /").split()) == through_link


def test_relative_dotdot_symlink_is_clamped_at_the_sandbox_root(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    up = "../" * 30
    sh(
        client,
        sid,
        'ln -s "${U}etc" "$W/uplink" && ln -s "${U}${C#/}" "$W/uphost"',
        U=up,
        C=canary.dir,
        W=work,
    )
    marker = f"sandbox-{secrets.token_hex(6)}\n".encode()
    client.files.upload(sid, marker, "/etc/hostname", user="root")
    assert client.files.download(sid, f"{work}/uplink/hostname") == marker
    with pytest.raises(FileDownloadError) as info:
        client.files.download(sid, f"{work}/uphost/secret")
    assert info.value.code == "file_not_found"


def test_magic_proc_links_do_not_lead_to_the_host(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    sh(
        client,
        sid,
        'ln -s /proc/1/root "$W/m1" && ln -s /proc/self/root "$W/m2" && '
        'ln -s /proc/self/cwd "$W/m3"',
        W=work,
    )
    marker = f"sandbox-{secrets.token_hex(6)}\n".encode()
    client.files.upload(sid, marker, "/etc/hostname", user="root")
    for link in ("m1", "m2", "m3"):
        with pytest.raises(FileDownloadError):
            client.files.download(sid, f"{work}/{link}{canary.secret_path}")
        with pytest.raises(FileListError):
            client.files.list(sid, f"{work}/{link}{canary.dir}")
        # Through /proc the server (a host process) would reach its own root: that must
        # fail, or at most stay inside the sandbox.
        try:
            content = client.files.download(sid, f"{work}/{link}/etc/hostname")
        except FileDownloadError:
            continue
        assert content == marker, f"{link} led out of the sandbox: {content!r}"


def test_upload_through_symlinked_parent_stays_in_the_sandbox(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    sh(client, sid, 'ln -s "$C" "$W/hostlink"', C=canary.dir, W=work)
    for target in ("new.txt", "secret", "sub/nested.txt", "deeper/dir/x.txt"):
        try:
            client.files.upload(sid, b"planted", f"{work}/hostlink/{target}")
        except FileUploadError as exc:
            assert exc.code in ("file_not_found", "invalid_path", "not_a_directory"), repr(exc)
            continue
        # If it was written, it was written inside the sandbox.
        assert sh(client, sid, 'cat "$P"', P=f"{canary.dir}/{target}") == "planted"
    assert not Path(canary.dir, "new.txt").exists()
    assert not Path(canary.dir, "deeper").exists()
    sh(client, sid, 'rm -rf "$C"', C=canary.dir)


def test_upload_over_a_symlink_to_a_host_file_stays_in_the_sandbox(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    sh(client, sid, 'ln -s "$S" "$W/filelink"', S=canary.secret_path, W=work)
    client.files.upload(sid, b"overwritten", f"{work}/filelink")
    assert client.files.download(sid, f"{work}/filelink") == b"overwritten"
    assert Path(canary.secret_path).read_text() == canary.secret + "\n"


def test_symlink_to_etc_shadow_gives_the_sandbox_shadow(
    client: Bastion, sid: str, work: str
) -> None:
    before = host_sha256("/etc/shadow")
    sh(client, sid, 'ln -s /etc/shadow "$W/shadowlink"', W=work)
    via_link = client.files.download(sid, f"{work}/shadowlink", user="root")
    assert via_link == client.files.download(sid, "/etc/shadow", user="root")
    assert via_link != Path("/etc/shadow").read_bytes()
    # overwriting through the link replaces the link or the sandbox's shadow, never the host's
    client.files.upload(sid, b"x", f"{work}/shadowlink")
    assert host_sha256("/etc/shadow") == before


def test_delete_through_symlinks_never_touches_the_host(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    sh(
        client,
        sid,
        'ln -s "$C" "$W/hostlink" && ln -s "$C/secret" "$W/filelink" && ln -s / "$W/rootlink"',
        C=canary.dir,
        W=work,
    )
    with pytest.raises(FileDeleteError) as info:
        client.files.delete(sid, f"{work}/hostlink/secret")
    assert info.value.code == "file_not_found"
    with pytest.raises(FileDeleteError):
        client.files.delete(sid, f"{work}/hostlink/sub", recursive=True)
    with pytest.raises(FileDeleteError):
        client.files.delete(sid, f"{work}/rootlink{canary.dir}", recursive=True)
    # Deleting a link (even recursively) removes the link, not what it points to.
    client.files.delete(sid, f"{work}/hostlink", recursive=True)
    client.files.delete(sid, f"{work}/filelink")
    client.files.delete(sid, f"{work}/rootlink", recursive=True)
    assert names(client, sid, work) == []
    assert "passwd" in names(client, sid, "/etc")  # the sandbox's root is intact too
    assert Path(canary.secret_path).read_text() == canary.secret + "\n"


def test_delete_through_an_in_sandbox_symlink_deletes_the_sandbox_file(
    client: Bastion, sid: str, work: str
) -> None:
    sh(
        client,
        sid,
        'mkdir "$W/d" && echo y > "$W/d/y" && echo z > "$W/d/z" && ln -s "$W/d" "$W/dlink"',
        W=work,
    )
    client.files.delete(sid, f"{work}/dlink/y")
    assert names(client, sid, f"{work}/d") == ["z"]
    client.files.delete(sid, f"{work}/dlink", recursive=True)
    assert names(client, sid, work) == ["d"]
    assert names(client, sid, f"{work}/d") == ["z"]


def test_listing_a_directory_symlink_lists_the_sandbox_dir(
    client: Bastion, sid: str, work: str, canary: Canary
) -> None:
    sh(client, sid, 'ln -s /etc "$W/etclink" && ln -s "$C" "$W/hostlink"', C=canary.dir, W=work)
    assert names(client, sid, f"{work}/etclink") == sorted(sh(client, sid, "ls -A /etc").split())
    with pytest.raises(FileListError) as info:
        client.files.list(sid, f"{work}/hostlink")
    assert info.value.code == "file_not_found"
    entries = {f["name"]: f["type"] for f in client.files.list(sid, work)["files"]}
    assert entries == {"etclink": "symlink", "hostlink": "symlink"}


# --------------------------------------------------------------------------- odd files


def test_hard_link_inside_the_sandbox_is_fine(client: Bastion, sid: str, work: str) -> None:
    sh(client, sid, 'echo orig > "$W/orig" && ln "$W/orig" "$W/hard"', W=work)
    assert client.files.download(sid, f"{work}/hard") == b"orig\n"
    client.files.delete(sid, f"{work}/hard")
    assert client.files.download(sid, f"{work}/orig") == b"orig\n"


def test_fifo_download_fails_fast(client: Bastion, sid: str, work: str) -> None:
    sh(client, sid, 'mkfifo "$W/f"', W=work)
    started = time.monotonic()
    with pytest.raises(FileDownloadError) as info:
        client.files.download(sid, f"{work}/f")
    assert time.monotonic() - started < 5
    assert info.value.code in ("invalid_path", "file_operation_failed"), repr(info.value)
    assert [(f["name"], f["type"]) for f in client.files.list(sid, work)["files"]] == [
        ("f", "other")
    ]
    # the server is not stuck on it
    client.files.upload(sid, b"after", f"{work}/after.txt")
    assert client.files.download(sid, f"{work}/after.txt") == b"after"
    # replacing or deleting a FIFO does not block either
    client.files.upload(sid, b"replaced", f"{work}/f")
    assert client.files.download(sid, f"{work}/f") == b"replaced"
    client.files.delete(sid, f"{work}/f")


@pytest.mark.parametrize(
    "name",
    [
        "with space.txt",
        "line\nbreak.txt",
        " leading and trailing ",
        "tab\there",
        "quote'\"back\\slash",
        "ünïcødé 文件.txt",
        "-starts-with-dash",
        "\nstarts-with-newline",
    ],
)
def test_odd_names_round_trip(client: Bastion, sid: str, work: str, name: str) -> None:
    path = f"{work}/{name}"
    result = client.files.upload(sid, name.encode(), path)
    assert result["path"] == path
    listing = client.files.list(sid, work)["files"]
    assert [(f["name"], f["path"]) for f in listing] == [(name, path)]
    # the sandbox sees the same name
    inside = sh(
        client, sid, 'python3 -c "import os,sys; print(repr(os.listdir(sys.argv[1])))" "$W"', W=work
    )
    assert inside.strip() == repr([name])
    assert client.files.download(sid, path) == name.encode()
    client.files.delete(sid, path)
    assert names(client, sid, work) == []


def test_upload_to_root_or_a_directory_fails(client: Bastion, sid: str, work: str) -> None:
    with pytest.raises(FileUploadError) as info:
        client.files.upload(sid, b"x", "/")
    assert info.value.code == "is_a_directory", repr(info.value)
    sh(client, sid, 'mkdir "$W/dir" && echo keep > "$W/dir/keep"', W=work)
    for path in (f"{work}/dir", f"{work}/dir/", "/home/user", "/etc"):
        with pytest.raises(FileUploadError) as info:
            client.files.upload(sid, b"x", path)
        assert info.value.code == "is_a_directory", (path, repr(info.value))
    assert client.files.download(sid, f"{work}/dir/keep") == b"keep\n"
    assert "passwd" in names(client, sid, "/etc")


def test_delete_root_is_refused(client: Bastion, sid: str) -> None:
    for recursive in (False, True):
        with pytest.raises(FileDeleteError) as info:
            client.files.delete(sid, "/", recursive=recursive)
        assert info.value.code == "invalid_path", repr(info.value)
    assert "home" in names(client, sid, "/")


def test_delete_non_empty_directory_needs_recursive(client: Bastion, sid: str, work: str) -> None:
    sh(
        client,
        sid,
        'mkdir -p "$W/tree/a/b" && echo 1 > "$W/tree/a/b/f" && ln -s / "$W/tree/a/rootlink"',
        W=work,
    )
    with pytest.raises(FileDeleteError) as info:
        client.files.delete(sid, f"{work}/tree")
    assert info.value.code == "directory_not_empty", repr(info.value)
    assert client.files.download(sid, f"{work}/tree/a/b/f") == b"1\n"
    client.files.delete(sid, f"{work}/tree", recursive=True)
    assert names(client, sid, work) == []
    with pytest.raises(FileDownloadError) as dl:
        client.files.download(sid, f"{work}/tree/a/b/f")
    assert dl.value.code == "file_not_found"
    # the recursive delete did not follow the planted root link
    assert "passwd" in names(client, sid, "/etc")
    assert sh(client, sid, "ls /home/user").split().count(work.rsplit("/", 1)[1]) == 1


# --------------------------------------------------------------------------- mount points


@pytest.mark.parametrize(
    "path",
    ["/proc", "/run/bastion", "/run", "/etc/resolv.conf", "/etc", "/sys", "/dev", "/dev/null"],
)
@pytest.mark.parametrize("user", ["user", "root"])
def test_mount_points_cannot_be_deleted(client: Bastion, sid: str, path: str, user: str) -> None:
    with pytest.raises(FileDeleteError) as err:
        client.files.delete(sid, path, recursive=True, user=user)  # type: ignore[arg-type]
    assert err.value.code == "permission_denied"
    # The sandbox still has them all, and the agent still answers.
    out = sh(
        client,
        sid,
        "test -r /proc/self/status && test -c /dev/null && test -s /etc/resolv.conf && echo ok",
    )
    assert out.strip() == "ok"


@pytest.mark.parametrize(
    "path",
    ["/proc/x", "/sys/x", "/dev/x", "/run/bastion/agent.sock", "/etc/resolv.conf", "/proc/a/b"],
)
def test_mount_points_cannot_be_written(client: Bastion, sid: str, path: str) -> None:
    with pytest.raises(FileUploadError) as err:
        client.files.upload(sid, b"x", path, user="root")
    assert err.value.code == "permission_denied"


def test_mount_points_cannot_be_reached_through_a_symlink(
    client: Bastion, sid: str, work: str
) -> None:
    sh(client, sid, 'ln -s / "$W/top"', W=work)
    for path in ("top/proc", "top/run/bastion", "top/etc/resolv.conf"):
        with pytest.raises(FileDeleteError) as err:
            client.files.delete(sid, f"{work}/{path}", recursive=True, user="root")
        assert err.value.code == "permission_denied", path
    with pytest.raises(FileUploadError):
        client.files.upload(sid, b"x", f"{work}/top/proc/planted", user="root")


def test_a_timeout_still_kills_the_tree_after_attacks_on_mounts(client: Bastion, sid: str) -> None:
    for path in ("/proc", "/run/bastion", "/etc/resolv.conf"):
        with pytest.raises(FileDeleteError):
            client.files.delete(sid, path, recursive=True, user="root")
    with pytest.raises(JobFailedError) as err:
        client.jobs.run_and_wait(
            sid, ["sh", "-c", "sleep 300 & sleep 300"], timeout=2, wait_timeout=30
        )
    assert err.value.failure_reason == "timeout"
    time.sleep(0.5)
    assert sh(client, sid, "ps -eo comm= | grep -c '^sleep' || true").strip() == "0"


def test_file_operations_act_as_the_sandbox_user(client: Bastion, sid: str, work: str) -> None:
    before = client.files.download(sid, "/etc/passwd")
    with pytest.raises(FileUploadError) as err:
        client.files.upload(sid, b"root::0:0::/root:/bin/sh\n", "/etc/passwd")
    assert err.value.code == "permission_denied"
    assert client.files.download(sid, "/etc/passwd") == before
    with pytest.raises(FileDownloadError) as denied:
        client.files.download(sid, "/etc/shadow")
    assert denied.value.code == "permission_denied"
    with pytest.raises(FileDeleteError):
        client.files.delete(sid, "/etc/hostname")
    # What the user makes is the user's, as a job's files would be.
    client.files.upload(sid, b"#!/bin/sh\necho run\n", f"{work}/tool", mode=0o755)
    assert sh(client, sid, f'stat -c "%U %a" "{work}/tool" && "{work}/tool"').split() == [
        "user", "755", "run",
    ]  # fmt: skip
    # Root, when asked for, may.
    client.files.upload(sid, b"marker\n", "/etc/bastion-test", user="root")
    assert sh(client, sid, "stat -c %U /etc/bastion-test").strip() == "root"
    client.files.delete(sid, "/etc/bastion-test", user="root")


def test_uploads_in_progress_are_invisible(client: Bastion, sid: str, work: str) -> None:
    """An upload's bytes sit in an unnamed file until it is whole: a listing or a job
    in the sandbox never sees a temp file."""
    import threading

    gate = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"x" * 65536
        gate.wait(10)
        yield b"y"

    class Stream:
        def __init__(self) -> None:
            self.chunks = body()

        def read(self, n: int = -1) -> bytes:
            return next(self.chunks, b"")

    done: list[object] = []
    thread = threading.Thread(
        target=lambda: done.append(client.files.upload(sid, Stream(), f"{work}/big"))  # type: ignore[arg-type]
    )
    thread.start()
    try:
        time.sleep(0.5)
        names = [f["name"] for f in client.files.list(sid, work)["files"]]
        assert names == [], names
        assert sh(client, sid, f'ls -A "{work}"').strip() == ""
    finally:
        gate.set()
        thread.join(20)
    assert done and client.files.download(sid, f"{work}/big") == b"x" * 65536 + b"y"


def test_names_that_are_not_utf8_list_and_round_trip(client: Bastion, sid: str, work: str) -> None:
    plant = "import os, sys; open(os.path.join(sys.argv[1].encode(), b'\\xff\\xfe-bad.txt'), 'wb')"
    client.jobs.run_and_wait(sid, ["python3", "-c", plant + ".write(b'raw')", work])
    listed = client.files.list(sid, work)["files"]
    assert [f["name"] for f in listed] == ["\udcff\udcfe-bad.txt"]
    assert client.files.download(sid, listed[0]["path"]) == b"raw"
    client.files.upload(sid, b"new", listed[0]["path"])
    assert sh(client, sid, f"cat {work}/*").strip() == "new"
    client.files.delete(sid, listed[0]["path"])
    assert client.files.list(sid, work)["files"] == []


def test_recursive_delete_does_not_stall_other_requests(
    client: Bastion, sid: str, work: str
) -> None:
    sh(client, sid, f'cd "{work}" && mkdir t && cd t && seq 1 60000 | xargs touch')
    import threading

    worst = 0.0
    stop = threading.Event()

    def probe() -> None:
        nonlocal worst
        while not stop.is_set():
            t0 = time.perf_counter()
            client.health()
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.01)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        client.files.delete(sid, f"{work}/t", recursive=True)
    finally:
        stop.set()
        thread.join()
    assert worst < 0.5, f"a health check waited {worst:.2f}s during a recursive delete"
