"""The image builder's caching, atomic install, locking and lookup, without debootstrap.

``_populate_rootfs`` (debootstrap + user set-up) is replaced by a function that makes a
tiny tree; everything after it (ownership shift, manifest, install, pruning) is real.
The real image is checked in test_image_default.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion_server.image import builder, cli
from bastion_server.image.builder import (
    DEFAULT_RECIPE,
    ImageBuildError,
    ImageError,
    ImageInfo,
    ImageNotBuiltError,
    ImageRecipe,
    build_image,
    resolve_image,
)


class FakePopulate:
    """Stands in for debootstrap: writes a few files, counts its calls."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def __call__(
        self,
        recipe: ImageRecipe,
        rootfs: Path,
        *,
        log_path: Path,
        progress: Callable[[str], None],
        mirror: str | None,
    ) -> None:
        self.calls += 1
        log_path.write_text("fake debootstrap log\n")
        time.sleep(self.delay)
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc/passwd").write_text(f"{recipe.user}:x:{recipe.uid}:{recipe.gid}::/:/\n")
        (rootfs / "usr/bin").mkdir(parents=True)
        (rootfs / "usr/bin/tool").write_text("#!/bin/sh\n")
        os.chmod(rootfs / "usr/bin/tool", 0o4755)
        if self.fail:
            raise ImageBuildError("debootstrap failed: fake")


def install_fake(monkeypatch: pytest.MonkeyPatch, fake: FakePopulate) -> FakePopulate:
    if os.geteuid() != 0:
        pytest.skip("building an image (chown to shifted ids) needs root")
    monkeypatch.setattr(builder, "_populate_rootfs", fake)
    monkeypatch.setattr(builder, "_check_can_build", lambda: None)
    return fake


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakePopulate:
    return install_fake(monkeypatch, FakePopulate())


@pytest.fixture
def lines() -> list[str]:
    return []


def test_cache_key_is_stable_and_short() -> None:
    key = DEFAULT_RECIPE.cache_key()
    assert key == ImageRecipe().cache_key()
    assert len(key) == 12 and int(key, 16) >= 0
    assert DEFAULT_RECIPE.dir_name() == f"default-{key}"


@pytest.mark.parametrize(
    "change",
    [
        {"packages": (*DEFAULT_RECIPE.packages, "curl")},
        {"suite": "trixie"},
        {"uid": 1001},
        {"uid_shift": 200000},
        {"name": "other"},
    ],
)
def test_cache_key_changes_with_the_recipe(change: dict[str, object]) -> None:
    changed = dataclasses.replace(DEFAULT_RECIPE, **change)  # type: ignore[arg-type]
    assert changed.cache_key() != DEFAULT_RECIPE.cache_key()


def test_cache_key_changes_with_the_builder_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = DEFAULT_RECIPE.cache_key()
    monkeypatch.setattr(builder, "BUILDER_VERSION", builder.BUILDER_VERSION + 1)
    assert DEFAULT_RECIPE.cache_key() != before


def test_recipe_rejects_a_name_with_a_dash() -> None:
    with pytest.raises(ValueError, match="invalid image name"):
        ImageRecipe(name="my-image")


def test_build_writes_manifest_and_shifted_rootfs(
    tmp_path: Path, fake: FakePopulate, lines: list[str]
) -> None:
    path = build_image(tmp_path, progress=lines.append)

    assert path == tmp_path / DEFAULT_RECIPE.dir_name()
    manifest = json.loads((path / "image.json").read_text())
    assert manifest["name"] == "default"
    assert manifest["recipe_hash"] == DEFAULT_RECIPE.cache_key()
    assert manifest["uid_shift"] == 100000
    assert (manifest["sandbox_uid"], manifest["sandbox_gid"]) == (1000, 1000)
    assert manifest["sandbox_user"] == "user"
    assert manifest["home"] == "/home/user"
    assert manifest["built_at"].endswith("+00:00")
    assert (path / "build.log").read_text() == "fake debootstrap log\n"
    rootfs = path / "rootfs"
    assert rootfs.stat().st_uid == 100000
    tool = (rootfs / "usr/bin/tool").stat()
    assert tool.st_uid == 100000 and not tool.st_mode & 0o6000
    assert any("shifting ownership to 100000" in line for line in lines)
    assert lines[-1].startswith("[image] done in ")
    assert [p.name for p in tmp_path.iterdir() if p.name != ".lock"] == [path.name]


def test_existing_image_is_reused_without_building(
    tmp_path: Path, fake: FakePopulate, lines: list[str]
) -> None:
    first = build_image(tmp_path, progress=lines.append)
    built_at = json.loads((first / "image.json").read_text())["built_at"]
    lines.clear()

    second = build_image(tmp_path, progress=lines.append)

    assert second == first and fake.calls == 1
    assert json.loads((first / "image.json").read_text())["built_at"] == built_at
    assert lines == [f"[image] {first.name} is up to date ({first})"]


def test_force_rebuilds_in_place(tmp_path: Path, fake: FakePopulate) -> None:
    first = build_image(tmp_path, progress=lambda _: None)
    (first / "rootfs/marker").touch()

    second = build_image(tmp_path, progress=lambda _: None, force=True)

    assert second == first and fake.calls == 2
    assert not (second / "rootfs/marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", first.name]


def test_failed_build_installs_nothing_and_keeps_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake(monkeypatch, FakePopulate(fail=True))

    with pytest.raises(ImageBuildError, match="fake"):
        build_image(tmp_path, progress=lambda _: None)

    log = f"{DEFAULT_RECIPE.dir_name()}.build.log"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", log]
    with pytest.raises(ImageNotBuiltError):
        resolve_image(tmp_path)


def test_stale_temporaries_and_incomplete_images_are_removed(
    tmp_path: Path, fake: FakePopulate, lines: list[str]
) -> None:
    stale_build = tmp_path / ".build-default-0123456789ab-4242/rootfs/etc"
    stale_build.mkdir(parents=True)
    (tmp_path / ".trash-default-0123456789ab/rootfs").mkdir(parents=True)
    incomplete = tmp_path / "default-0123456789ab/rootfs"  # no manifest: not an image
    incomplete.mkdir(parents=True)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()

    path = build_image(tmp_path, progress=lines.append)

    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", path.name, "notes"]
    assert any("removing unfinished build .build-default" in line for line in lines)


def test_an_image_without_its_manifest_is_rebuilt(tmp_path: Path, fake: FakePopulate) -> None:
    path = build_image(tmp_path, progress=lambda _: None)
    (path / "image.json").unlink()

    assert build_image(tmp_path, progress=lambda _: None) == path
    assert fake.calls == 2 and (path / "image.json").is_file()


def test_older_builds_of_the_same_name_are_pruned(tmp_path: Path, fake: FakePopulate) -> None:
    old = build_image(tmp_path, ImageRecipe(name="py"), progress=lambda _: None)
    other = build_image(tmp_path, ImageRecipe(name="py.slim"), progress=lambda _: None)
    lines: list[str] = []

    new = build_image(tmp_path, ImageRecipe(name="py", suite="trixie"), progress=lines.append)

    assert not old.exists() and new.is_dir() and other.is_dir()
    assert f"[image] removing older build {old.name}" in lines


def test_older_build_in_use_by_a_mount_is_kept(
    tmp_path: Path, fake: FakePopulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = build_image(tmp_path, ImageRecipe(name="py"), progress=lambda _: None)
    monkeypatch.setattr(builder, "_in_use", lambda image_dir: image_dir == old)
    lines: list[str] = []

    build_image(tmp_path, ImageRecipe(name="py", suite="trixie"), progress=lines.append)

    assert old.is_dir()
    assert any("keeping older build" in line for line in lines)


def test_concurrent_builds_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake(monkeypatch, FakePopulate(delay=0.3))
    results: list[Path] = []
    lines: list[str] = []

    def build() -> None:
        results.append(build_image(tmp_path, progress=lines.append))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert fake.calls == 1
    assert len(results) == 2 and results[0] == results[1]
    assert any("waiting for another build" in line for line in lines)
    assert any("was built meanwhile" in line for line in lines)


def test_resolve_image_when_nothing_is_built(tmp_path: Path) -> None:
    with pytest.raises(ImageNotBuiltError, match=r"bastion image build.*make setup"):
        resolve_image(tmp_path / "missing")


def test_resolve_image_names_out_of_date_builds(
    tmp_path: Path, fake: FakePopulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = build_image(tmp_path, progress=lambda _: None)
    monkeypatch.setattr(builder, "BUILDER_VERSION", builder.BUILDER_VERSION + 1)

    with pytest.raises(ImageNotBuiltError, match=f"out-of-date builds: {old.name}"):
        resolve_image(tmp_path)


def test_resolve_image_returns_the_manifest(tmp_path: Path, fake: FakePopulate) -> None:
    path = build_image(tmp_path, progress=lambda _: None)

    info = resolve_image(tmp_path)

    assert info == ImageInfo.load(path)
    assert info.rootfs == path / "rootfs"
    assert info.recipe_hash == DEFAULT_RECIPE.cache_key()
    assert (info.uid_shift, info.id_map_size) == (100000, 65536)
    assert (info.sandbox_user, info.sandbox_uid, info.sandbox_gid) == ("user", 1000, 1000)
    assert (info.home, info.shell) == ("/home/user", "/bin/bash")


def test_resolve_image_of_an_unknown_recipe_takes_the_newest(
    tmp_path: Path, fake: FakePopulate
) -> None:
    build_image(tmp_path, ImageRecipe(name="custom"), progress=lambda _: None)

    assert resolve_image(tmp_path, "custom").name == "custom"
    with pytest.raises(ImageNotBuiltError, match="no sandbox image 'nope'"):
        resolve_image(tmp_path, "nope")


def test_malformed_manifest_is_a_clear_error(tmp_path: Path, fake: FakePopulate) -> None:
    path = build_image(tmp_path, progress=lambda _: None)
    (path / "image.json").write_text(json.dumps({"name": "default", "uid_shift": "x"}))

    with pytest.raises(ImageError, match="is invalid"):
        resolve_image(tmp_path)


# --------------------------------------------------------------------------- CLI


def test_cli_build_then_show(
    tmp_path: Path, fake: FakePopulate, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["build", "--images-dir", str(tmp_path)]) == 0
    assert "[image] done in" in capsys.readouterr().err

    assert cli.main(["show", "--images-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "user (1000:1000), home /home/user" in out
    assert "0..65535 -> 100000..165535" in out

    assert cli.main(["show", "--json", "--images-dir", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rootfs"] == str(tmp_path / DEFAULT_RECIPE.dir_name() / "rootfs")
    assert shown["sandbox_uid"] == 1000


def test_cli_images_dir_defaults_to_the_environment(
    tmp_path: Path, fake: FakePopulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_IMAGES_DIR", str(tmp_path / "imgs"))
    assert cli.main(["build"]) == 0
    assert (tmp_path / "imgs" / DEFAULT_RECIPE.dir_name() / "image.json").is_file()


def test_cli_show_without_image_fails_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["show", "--images-dir", str(tmp_path)]) == 1
    assert "make setup" in capsys.readouterr().err


def test_register_adds_the_image_commands() -> None:
    parser = argparse.ArgumentParser(prog="bastion")
    cli.register(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["image", "build", "--force", "--images-dir", "/x"])

    assert callable(args.func) and args.force and args.images_dir == Path("/x")
    assert callable(parser.parse_args(["image", "show"]).func)
