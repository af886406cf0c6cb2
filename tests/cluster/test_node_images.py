"""What a node reports of its images, and how it finds a session's image among its
own (by digest, over its own layer paths), on real images directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion_server.cluster.node_images import HeldImages, ImageNotHere
from bastion_server.image.store import ImageStore

BASE_KEY = "0123456789ab"
LAYER_KEY = "c" * 64


def manifest(name: str, digest: str, parent: str | None = None) -> dict[str, object]:
    return {
        "name": name,
        "recipe_hash": digest[-12:],
        "digest": digest,
        "parent": parent,
        "built_at": "2026-12-02T00:00:00+00:00",
        "uid_shift": 100000,
        "id_map_size": 65536,
        "sandbox_uid": 1000,
        "sandbox_gid": 1000,
        "sandbox_user": "user",
        "home": "/home/user",
        "shell": "/bin/bash",
        "env": {},
        "workdir": None,
    }


def put(images_dir: Path, ref: str, data: dict[str, object]) -> None:
    (images_dir / ref / "rootfs").mkdir(parents=True)
    (images_dir / ref / "image.json").write_text(json.dumps(data))


def images_dir(root: Path, *, with_layer: bool) -> Path:
    put(root, f"default-{BASE_KEY}", manifest("default", "sha256:" + "a" * 64))
    if with_layer:
        parent = f"default-{BASE_KEY}"
        put(root, f"layers/{LAYER_KEY}", manifest("tools", f"sha256:{LAYER_KEY}", parent))
    return root


def test_a_node_reports_its_bases_and_layer_images_by_digest(tmp_path: Path) -> None:
    held = HeldImages(images_dir(tmp_path, with_layer=True))
    assert held.digests() == {"sha256:" + "a" * 64: "default", f"sha256:{LAYER_KEY}": "tools"}


def test_a_layer_whose_parent_is_missing_is_not_held(tmp_path: Path) -> None:
    root = tmp_path / "images"
    parent = "default-ffffffffffff"  # not on this node
    put(root, f"layers/{LAYER_KEY}", manifest("tools", f"sha256:{LAYER_KEY}", parent))
    assert HeldImages(root).digests() == {}


def test_an_image_built_since_the_last_look_is_seen(tmp_path: Path) -> None:
    root = images_dir(tmp_path, with_layer=False)
    held = HeldImages(root)
    assert f"sha256:{LAYER_KEY}" not in held.digests()
    put(
        root, f"layers/{LAYER_KEY}", manifest("tools", f"sha256:{LAYER_KEY}", f"default-{BASE_KEY}")
    )
    assert f"sha256:{LAYER_KEY}" in held.digests()


def test_a_session_image_is_mounted_from_the_nodes_own_layers(tmp_path: Path) -> None:
    gateway = images_dir(tmp_path / "gateway", with_layer=True)
    node = images_dir(tmp_path / "node", with_layer=True)
    store = ImageStore(gateway)
    asked = store.sandbox_image(store.load(f"layers/{LAYER_KEY}"), "my-tools")
    own = HeldImages(node).local(asked)
    assert own.layers == (
        str(node / "layers" / LAYER_KEY / "rootfs"),
        str(node / f"default-{BASE_KEY}" / "rootfs"),
    )
    assert (own.name, own.digest) == ("my-tools", asked.digest)


def test_an_image_the_node_lacks_is_refused(tmp_path: Path) -> None:
    gateway = images_dir(tmp_path / "gateway", with_layer=True)
    node = images_dir(tmp_path / "node", with_layer=False)
    store = ImageStore(gateway)
    asked = store.sandbox_image(store.load(f"layers/{LAYER_KEY}"), "tools")
    with pytest.raises(ImageNotHere, match="'tools'"):
        HeldImages(node).local(asked)
