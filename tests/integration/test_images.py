"""Images on real sandboxes: recipes built in a sandbox of their own, stored as layers
over their base, chosen by sessions; cache hits, failures, tenancy, deletes in use,
and root inside a session.

The servers here use an images directory of their own (the machine's base image
linked into it), so the layers these tests build never reach the shared one.  Builds
that fetch packages (apt, pip) reach the package indexes through this machine's
TLS-intercepting proxy: the build is handed the host's trust store and allowed its
network (``--build-ca-file``, ``--build-network-allow``).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import KEY_A, KEY_B, ServerProcess

from bastion import (
    AsyncBastion,
    Bastion,
    ImageBuildError,
    ImageNotFoundError,
    ImageStateError,
    InvalidRecipeError,
    InvalidRequestError,
    JobFailedError,
)
from bastion_server.testing import IMAGES_DIR, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
#: Where this machine's package indexes are (behind its intercepting proxy).
PROXY_NET = "203.0.113.0/24"


def _images_dir(parent: Path) -> Path:
    images = parent / "images"
    images.mkdir(mode=0o755)
    for base in IMAGES_DIR.iterdir():
        if base.name.startswith("default-") and base.is_dir():
            (images / base.name).symlink_to(base)
    return images


def _server(data_root: Path, **kwargs: object) -> ServerProcess:
    parent = Path(tempfile.mkdtemp(dir=data_root))
    parent.chmod(0o711)
    images = _images_dir(parent)
    args = ["--images-dir", str(images), "--pool-size", "0"]
    args += ["--build-network-allow", PROXY_NET]
    if HOST_CA.is_file():
        args += ["--build-ca-file", str(HOST_CA)]
    return ServerProcess(parent / "data", extra_args=tuple(args), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def image_server(data_root: Path) -> Iterator[ServerProcess]:
    srv = _server(data_root)
    srv.start()
    yield srv
    srv.delete_all_sessions()
    srv.stop()


@pytest.fixture(scope="module")
def client(image_server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=image_server.url) as c:
        yield c


def _layers(server: ServerProcess) -> Path:
    return server.data_dir.parent / "images" / "layers"


def _run(client: Bastion, sid: str, command: str, **kwargs: object) -> str:
    result = client.jobs.run_and_wait(sid, command, **kwargs)  # type: ignore[arg-type]
    assert result["output"] is not None and result["output"]["status_code"] == 0, result
    return result["output"]["console_output"]


def _session(client: Bastion, image: str) -> str:
    sid = client.sessions.create(image=image)["session_id"]
    client.sessions.start(sid)
    return sid


def test_recipe_steps_files_env_and_removals_reach_a_session(
    client: Bastion, image_server: ServerProcess
) -> None:
    info = client.images.build(
        {
            "name": "steps",
            "from": "default",
            "run": [
                "echo built > /etc/steps-release",
                "rm /etc/hostname",  # a whiteout in the layer: gone in the session too
                "rm -r /usr/share/doc",  # a whole directory
                "id -u > /etc/built-as",
            ],
            "env": {"STEPS": "yes"},
            "workdir": "/opt",
            "files": {"/etc/steps.conf": b"strict = true\n"},
        }
    )
    assert info["status"] == "ready" and info["digest"].startswith("sha256:")
    assert info["parent"] == "default" and info["shared"] is True
    sid = _session(client, "steps")
    try:
        out = _run(
            client,
            sid,
            "cat /etc/steps-release /etc/steps.conf /etc/built-as; echo $STEPS; pwd; "
            "test -e /etc/hostname && echo hostname-there; "
            "test -e /usr/share/doc && echo doc-there; id -u",
        )
        assert out.split("\n")[:7] == ["built", "strict = true", "0", "yes", "/opt", "1000", ""]
        shown = client.sessions.get(sid)["image"]
        assert shown == {"name": "steps", "digest": info["digest"]}
        # A restart mounts the same image again (recorded in the session's directory).
        client.sessions.stop(sid)
        client.sessions.start(sid)
        assert _run(client, sid, "cat /etc/steps-release") == "built\n"
        # In use: the delete is refused and nothing is removed.
        with pytest.raises(ImageStateError, match="used by 1 session"):
            client.images.delete("steps")
    finally:
        client.sessions.delete(sid)
    key = info["digest"].removeprefix("sha256:")
    assert (_layers(image_server) / key).is_dir()
    client.images.delete("steps")
    assert not (_layers(image_server) / key).exists()
    with pytest.raises(ImageNotFoundError):
        client.images.get("steps")


def test_a_rebuild_is_a_cache_hit_and_an_extension_stores_only_its_delta(
    client: Bastion, image_server: ServerProcess
) -> None:
    recipe = {"name": "base1", "from": "default", "run": ["head -c 3000000 /dev/urandom > /big"]}
    first = client.images.build(recipe)
    started = time.monotonic()
    again = client.images.build({**recipe, "name": "base1copy"})
    assert again["digest"] == first["digest"]
    assert time.monotonic() - started < 2.0  # no sandbox was started
    assert "cache hit" in client.images.log("base1copy")
    child = client.images.build({"name": "child1", "from": "base1", "run": ["echo small > /small"]})
    assert child["parent"] == "base1"
    assert first["size_bytes"] >= 3_000_000
    assert child["size_bytes"] < 100_000  # only its own file, not its base's
    child_layer = _layers(image_server) / child["digest"].removeprefix("sha256:") / "rootfs"
    assert (child_layer / "small").is_file() and not (child_layer / "big").exists()
    sid = _session(client, "child1")
    try:
        assert _run(client, sid, "cat /small; wc -c < /big") == "small\n3000000\n"
        with pytest.raises(ImageStateError, match="base of child1"):
            client.images.delete("base1")
    finally:
        client.sessions.delete(sid)
    for name in ("child1", "base1copy", "base1"):
        client.images.delete(name)


def test_a_failing_step_is_reported_with_its_log_and_leaves_nothing(
    client: Bastion, image_server: ServerProcess
) -> None:
    before = set(_layers(image_server).iterdir()) if _layers(image_server).is_dir() else set()
    logged: list[str] = []
    with pytest.raises(ImageBuildError) as caught:
        client.images.build(
            {"name": "broken", "from": "default", "run": ["echo about to fail >&2", "exit 3"]},
            on_log=logged.append,
        )
    assert caught.value.image["status"] == "failed"
    assert "exit status 3" in str(caught.value.image["status_reason"])
    log = "".join(logged)
    assert "about to fail" in log and "step 2: exit 3" in log
    assert client.images.get("broken")["status"] == "failed"
    with pytest.raises(ImageStateError, match="failed"):
        client.sessions.create(image="broken")
    after = set(_layers(image_server).iterdir()) if _layers(image_server).is_dir() else set()
    assert after == before  # no layer, no half-copied temp
    sessions_dir = image_server.data_dir / "sessions"
    assert not [p for p in sessions_dir.iterdir() if p.name.startswith("build_")]
    client.images.delete("broken")


def test_a_bad_recipe_names_its_key_before_anything_runs(client: Bastion) -> None:
    with pytest.raises(InvalidRecipeError, match="no stock recipe named 'nosuch'"):
        client.images.build("nosuch")  # a stock recipe, by name
    with pytest.raises(InvalidRecipeError, match="'apt'"):
        client.images.build({"name": "bad", "from": "default", "apt": ["--force-yes"]})
    with pytest.raises(ImageNotFoundError):
        client.images.build({"name": "orphan", "from": "no_such_image"})
    with pytest.raises(ImageNotFoundError):
        client.images.get("bad")


def test_a_recipe_from_a_debian_suite_bootstraps_it_once(
    client: Bastion, image_server: ServerProcess
) -> None:
    logged: list[str] = []
    info = client.images.build(
        {"name": "plainbook", "from": "debian:bookworm", "run": ["echo plain > /etc/plain"]},
        on_log=logged.append,
    )
    log = "".join(logged)
    # Bootstrapped on the host as `make setup` makes default, its progress in the log.
    assert "bootstrapping debian:bookworm" in log and "[image] debootstrap: " in log
    assert info["status"] == "ready" and info["parent"] == "debian:bookworm"
    sid = _session(client, "plainbook")
    try:
        out = _run(
            client,
            sid,
            ". /etc/os-release; echo $VERSION_CODENAME; cat /etc/plain; id -un; pwd;"
            " command -v python3 || echo minbase",
        )
        assert out == "bookworm\nplain\nuser\n/home/user\nminbase\n"
    finally:
        client.sessions.delete(sid)
    # A second recipe from the suite stands on the same base: no bootstrap again.
    second = client.images.build({"name": "plainbook2", "from": "debian:bookworm", "run": ["true"]})
    assert second["status"] == "ready"
    assert "debootstrap" not in client.images.log("plainbook2")
    images = image_server.data_dir.parent / "images"
    assert len([p for p in images.iterdir() if p.name.startswith("debian.bookworm-")]) == 1
    with pytest.raises(InvalidRecipeError, match=r"'from'.*'debian:jessie'"):
        client.images.build({"name": "ancient", "from": "debian:jessie"})
    for name in ("plainbook2", "plainbook"):
        client.images.delete(name)


def test_a_shutdown_mid_bootstrap_stops_it_and_leaves_nothing(data_root: Path) -> None:
    srv = _server(data_root)
    srv.start()
    images = srv.data_dir.parent / "images"
    try:
        with Bastion(srv.url) as c:
            building = c.images.build(
                {"name": "cut", "from": "debian:trixie", "run": ["true"]}, wait=False
            )
            assert building["status"] == "building"
            deadline = time.monotonic() + 120
            while "[image] debootstrap: " not in c.images.log("cut"):
                assert c.images.get("cut")["status"] == "building", c.images.log("cut")
                assert time.monotonic() < deadline, "the bootstrap never started"
                time.sleep(0.2)
        started = time.monotonic()
        assert srv.stop() == 0  # graceful: the bootstrap stops, it is not waited for
        assert time.monotonic() - started < 20
        # No base, whole or half (debootstrap's own log is kept, as a failed setup's is).
        assert not list(images.glob(".build-*"))
        assert [p.suffix for p in images.glob("debian.trixie-*")] in ([], [".log"])
        assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if str(images) in line]  # fmt: skip
        srv.start()
        with Bastion(srv.url) as c:
            cut = c.images.get("cut")
            assert cut["status"] == "failed" and "shut down" in str(cut["status_reason"])
            c.images.delete("cut")
    finally:
        srv.stop()


def test_root_in_a_session_is_opt_in(client: Bastion) -> None:
    sid = _session(client, "default")
    try:
        assert _run(client, sid, "id -u") == "1000\n"
        assert _run(client, sid, "id -u; echo x > /etc/by-root", user="root") == "0\n"
        with pytest.raises(JobFailedError):
            client.jobs.run_and_wait(sid, "echo y > /etc/by-user")
    finally:
        client.sessions.delete(sid)


def test_a_terminal_as_root_is_opt_in(client: Bastion) -> None:
    sid = _session(client, "default")
    try:
        for user, expected in ((None, "uid=1000"), ("root", "uid=0")):
            seen: list[str] = []

            def keep(message: Any, seen: list[str] = seen) -> None:
                if message["type"] == "term_output":
                    seen.append(message["payload"]["data"])

            with client.terminal.connect(sid, keep, user=user) as term:  # type: ignore[arg-type]
                term.send_input("id; exit\n")
                term.wait(timeout=30)
            assert expected in "".join(seen)
    finally:
        client.sessions.delete(sid)


def test_images_of_one_key_are_its_own(data_root: Path) -> None:
    srv = _server(data_root, api_keys=(KEY_A, KEY_B))
    srv.start()
    try:
        with Bastion(srv.url, api_key=KEY_A) as admin:
            # Configured keys are admins: what they build is shared.  A made agent key
            # builds its own.
            key_a = admin.keys.create("agent", name="a")["api_key"]
            key_b = admin.keys.create("agent", name="b")["api_key"]
        with Bastion(srv.url, api_key=key_a) as a, Bastion(srv.url, api_key=key_b) as b:
            mine = a.images.build({"name": "mine", "from": "default", "run": ["touch /a"]})
            assert mine["shared"] is False
            assert "mine" in [i["name"] for i in a.images.list()]
            assert "mine" not in [i["name"] for i in b.images.list()]
            with pytest.raises(ImageNotFoundError):
                b.images.get("mine")
            with pytest.raises(ImageNotFoundError):
                b.sessions.create(image="mine")
            with pytest.raises(ImageNotFoundError):
                b.images.delete("mine")
            # The same recipe built by B is B's own build (no cache hit across keys).
            theirs = b.images.build({"name": "mine", "from": "default", "run": ["touch /a"]})
            assert theirs["digest"] != mine["digest"]
            a.images.delete("mine")
            assert b.images.get("mine")["digest"] == theirs["digest"]
    finally:
        srv.delete_all_sessions()
        srv.stop()


def test_a_compiler_and_a_pip_package_in_a_built_image(client: Bastion) -> None:
    info = client.images.build(
        {
            "name": "judge",
            "from": "default",
            "apt": ["g++", "python3-pip"],
            "pip": ["six"],
        }
    )
    assert info["status"] == "ready"
    sid = _session(client, "judge")
    try:
        client.files.upload(
            sid,
            b'#include <iostream>\nint main() { std::cout << 6 * 7 << "\\n"; }\n',
            "/home/user/main.cpp",
        )
        assert _run(client, sid, "g++ -O2 -o main main.cpp && ./main") == "42\n"
        assert _run(client, sid, "python3 -c 'import six; print(six.__name__)'") == "six\n"
    finally:
        client.sessions.delete(sid)


def _cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        env={**os.environ, "BASTION_URL": server.url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_cli_builds_a_recipe_file_with_its_files_and_live_log(
    image_server: ServerProcess, client: Bastion, tmp_path: Path
) -> None:
    (tmp_path / "judge.conf").write_text("strict = 1\n")
    recipe = tmp_path / "judge.toml"
    recipe.write_text(
        'name = "clijudge"\nfrom = "default"\n'
        'run = ["cp /etc/judge.conf /etc/judge.copy"]\n'
        '[files]\n"/etc/judge.conf" = "judge.conf"\n'
    )
    built = _cli(image_server, "images", "build", "-f", str(recipe))
    assert built.returncode == 0, built.stderr
    assert "step 1: cp /etc/judge.conf /etc/judge.copy" in built.stderr  # the live log
    assert built.stdout.startswith("clijudge  ready  sha256:")
    listed = _cli(image_server, "images", "list")
    assert "clijudge" in listed.stdout and "default" in listed.stdout
    assert "from" in _cli(image_server, "images", "show", "clijudge").stdout
    made = _cli(image_server, "sessions", "create", "--image", "clijudge", "--start", "-q")
    assert made.returncode == 0, made.stderr
    sid = made.stdout.strip()
    try:
        ran = _cli(image_server, "jobs", "run", sid, "--", "cat", "/etc/judge.copy")
        assert ran.stdout == "strict = 1\n", ran.stderr
        as_root = _cli(image_server, "jobs", "run", sid, "--root", "--", "id", "-u")
        assert as_root.stdout == "0\n", as_root.stderr
        refused = _cli(image_server, "images", "delete", "clijudge")
        assert refused.returncode == 4 and "image_state" in refused.stderr  # conflict
    finally:
        client.sessions.delete(sid)
    failing = tmp_path / "bad.toml"
    failing.write_text('name = "clibad"\nfrom = "default"\nrun = ["echo oops; exit 9"]\n')
    failed = _cli(image_server, "images", "build", "-f", str(failing))
    assert failed.returncode == 1 and "oops" in failed.stderr and "exit status 9" in failed.stderr
    assert _cli(image_server, "images", "delete", "clijudge").returncode == 0


# --------------------------------------------------------------------------- OCI images

BUSYBOX = Path("/bin/busybox")


def _layer(files: dict[str, bytes | str | None]) -> bytes:
    """A layer tarball: bytes are files, str symlinks, None a whiteout of that path."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        parents = {str(q) for p in files for q in Path(p).parents} - {"."}
        for directory in sorted(parents):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, content in files.items():
            if content is None:
                p = Path(path)
                info = tarfile.TarInfo(str(p.parent / f".wh.{p.name}"))
                tar.addfile(info, io.BytesIO(b""))
            elif isinstance(content, str):
                info = tarfile.TarInfo(path)
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info = tarfile.TarInfo(path)
                info.size, info.mode = len(content), 0o755
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _oci_archive(layers: list[bytes], env: list[str]) -> bytes:
    """An OCI image layout, as a tarball (what ``skopeo copy ... oci-archive:`` makes)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer_descriptors = [blob(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "WorkingDir": "/srv"},
        "rootfs": {
            "type": "layers",
            "diff_ids": [f"sha256:{hashlib.sha256(x).hexdigest()}" for x in layers],
        },
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": layer_descriptors,
    }
    manifest_descriptor = blob(
        json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
    )
    index = {"schemaVersion": 2, "manifests": [manifest_descriptor]}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest}", data)
    return out.getvalue()


def _busybox_archive(greeting: bytes) -> bytes:
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    applets = {f"bin/{name}": "busybox" for name in ("sh", "cat", "id", "ls", "test")}
    base = _layer({"bin/busybox": BUSYBOX.read_bytes(), **applets, "etc/doomed": b"x"})
    # The top layer gzipped, as registries usually hold them.
    top = gzip.compress(
        _layer({"etc/greeting": greeting, "etc/doomed": None, "srv/.keep": b""}), mtime=0
    )
    return _oci_archive([base, top], env=["PATH=/bin", "GREETING=oci"])


def test_an_oci_archive_imported_runs_in_a_session(client: Bastion) -> None:
    logged: list[str] = []
    info = client.images.import_archive(
        "boxed", _busybox_archive(b"hello from a layer\n"), on_log=logged.append
    )
    assert info["status"] == "ready" and info["source"] == "import"
    # Unpacked after the upload, as a build runs: its progress in the image's log.
    assert "unpacking layer 1/2" in "".join(logged) and "unpacking layer 2/2" in "".join(logged)
    sid = _session(client, "boxed")
    try:
        out = _run(
            client, sid, "cat /etc/greeting; echo $GREETING; pwd; test -e /etc/doomed || echo gone"
        )
        assert out == "hello from a layer\noci\n/srv\ngone\n"
        assert _run(client, sid, "id -u") == "1000\n"
    finally:
        client.sessions.delete(sid)
    # The same archive again is the same image (no second unpack); the answer comes
    # before the import is done, as a build's does.
    again = client.images.import_archive(
        "boxed2", _busybox_archive(b"hello from a layer\n"), wait=False
    )
    assert again["status"] == "building"
    deadline = time.monotonic() + 60
    while (again := client.images.get("boxed2"))["status"] == "building":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert again["status"] == "ready" and again["digest"] == info["digest"]
    assert "already stored" in client.images.log("boxed2")
    for name in ("boxed", "boxed2"):
        client.images.delete(name)


def test_the_async_client_waits_for_an_import_as_for_a_build(
    image_server: ServerProcess,
) -> None:
    async def main() -> tuple[str, str, str]:
        logged: list[str] = []
        async with AsyncBastion(base_url=image_server.url) as c:
            info = await c.images.import_archive(
                "aboxed", _busybox_archive(b"async\n"), on_log=logged.append
            )
            started = await c.images.import_archive(
                "aboxed2", _busybox_archive(b"async 2\n"), wait=False
            )
            waited = await c.images.build(
                {"name": "aover", "from": "aboxed", "run": ["echo over > /etc/over"]}
            )
            for name in ("aover", "aboxed"):
                await c.images.delete(name)
            while (await c.images.get("aboxed2"))["status"] == "building":
                await asyncio.sleep(0.1)
            await c.images.delete("aboxed2")
        return info["status"] + "".join(logged), started["status"], waited["status"]

    log, started, over = asyncio.run(main())
    assert log.startswith("ready") and "unpacking layer 2/2" in log
    assert started == "building" and over == "ready"


def test_a_hostile_archive_is_refused(client: Bastion, image_server: ServerProcess) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/tmp"
        tar.addfile(link)
        payload = b"owned\n"
        info = tarfile.TarInfo("escape/bastion-escape-test")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    before = set(_layers(image_server).iterdir())
    with pytest.raises(ImageBuildError, match="non-directory"):
        client.images.import_archive("hostile", _oci_archive([out.getvalue()], env=[]))
    assert not Path("/tmp/bastion-escape-test").exists()
    assert set(_layers(image_server).iterdir()) == before  # nothing half-unpacked is left
    assert client.images.get("hostile")["status"] == "failed"
    client.images.delete("hostile")
    # Not an image at all: refused before the answer, nothing started.
    with pytest.raises(InvalidRequestError, match="not an image archive"):
        client.images.import_archive("junk", b"not a tarball at all")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry (Debian's docker-registry) on a free loopback port."""
    binary = shutil.which("docker-registry")
    if binary is None or shutil.which("skopeo") is None:
        pytest.skip("docker-registry and skopeo are not installed (apt-get install them)")
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    (root / "config.yml").write_text(
        "version: 0.1\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        [binary, "serve", str(root / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield f"localhost:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_image_pulled_from_a_registry_runs_in_a_session(
    client: Bastion, image_server: ServerProcess, registry: str, tmp_path: Path
) -> None:
    archive = tmp_path / "boxed.tar"
    archive.write_bytes(_busybox_archive(b"pulled\n"))
    pushed = subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci-archive:{archive}", f"docker://{registry}/boxed:1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    logged: list[str] = []
    info = client.images.pull("fromreg", f"{registry}/boxed:1", on_log=logged.append)
    assert info["source"] == "pull" and info["status"] == "ready"
    assert "[image] skopeo: " in "".join(logged)  # the fetch's progress, live
    assert "unpacking layer 2/2" in "".join(logged)
    sid = _session(client, "fromreg")
    try:
        assert _run(client, sid, "cat /etc/greeting") == "pulled\n"
    finally:
        client.sessions.delete(sid)
    with pytest.raises(ImageBuildError, match="cannot pull"):
        client.images.pull("nothere", f"{registry}/nothere:1")
    client.images.delete("nothere")
    client.images.delete("fromreg")
    # The CLI shows the server's progress as it goes, and the end.
    pulled = _cli(image_server, "images", "pull", "clipull", f"{registry}/boxed:1")
    assert pulled.returncode == 0, pulled.stderr
    assert "[image] skopeo: " in pulled.stderr and "unpacking layer 2/2" in pulled.stderr
    assert pulled.stdout.startswith("clipull  ready  sha256:")
    missing = _cli(image_server, "images", "pull", "-q", "clinothere", f"{registry}/nothere:1")
    assert missing.returncode == 1 and "cannot pull" in missing.stderr
    assert "[image]" not in missing.stderr  # -q: no progress, only the reason
    for name in ("clipull", "clinothere"):
        client.images.delete(name)


def test_a_warm_pool_of_a_built_image(data_root: Path) -> None:
    srv = _server(data_root)
    srv.start()
    try:
        with Bastion(srv.url) as c:
            c.images.build({"name": "pooled", "from": "default", "run": ["echo p > /p"]})
        srv.stop()
        srv.extra_args = (*srv.extra_args, "--pool", "pooled=1")
        srv.start()
        with Bastion(srv.url) as c:
            pool_dir = srv.data_dir / "sessions"
            deadline = time.monotonic() + 60
            while not any(p.name.startswith("pool_") for p in pool_dir.iterdir()):
                assert time.monotonic() < deadline, "the pool was never filled"
                time.sleep(0.2)
            time.sleep(1.0)  # started, not only allocated
            sid = c.sessions.create(image="pooled")["session_id"]
            c.sessions.start(sid)
            # Handed a pooled sandbox: its container keeps the pool's name.
            assert (pool_dir / sid / "container").read_text().startswith("pool_")
            assert _run(c, sid, "cat /p") == "p\n"
            c.sessions.delete(sid)
    finally:
        srv.delete_all_sessions()
        srv.stop()


def test_a_snapshot_of_a_session_keeps_its_image(client: Bastion) -> None:
    client.images.build({"name": "snapbase", "from": "default", "run": ["echo img > /img"]})
    sid = _session(client, "snapbase")
    _run(client, sid, "echo mine > /tmp/mine")
    snap = client.sessions.snapshot(sid)
    assert snap["status"] == "ready"
    client.sessions.delete(sid)
    # The snapshot stands on the image's layers: the image may not go meanwhile.
    with pytest.raises(ImageStateError, match="used by"):
        client.images.delete("snapbase")
    copy = client.sessions.create(snapshot=snap["snapshot_id"])["session_id"]
    client.sessions.start(copy)
    try:
        assert _run(client, copy, "cat /img /tmp/mine") == "img\nmine\n"
        assert client.sessions.get(copy)["image"]["name"] == "snapbase"
    finally:
        client.sessions.delete(copy)
    client.snapshots.delete(snap["snapshot_id"])
    client.images.delete("snapbase")
