"""Image recipes: every key checked, errors naming the key, the cache key's inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bastion_server.image.recipe import (
    Recipe,
    RecipeError,
    load_recipe_file,
    parse_recipe,
)

STOCK = Path(__file__).parents[2] / "src" / "bastion_server" / "image" / "recipes"


def _recipe(**over: Any) -> dict[str, Any]:
    return {"name": "judge", "from": "default", **over}


def test_the_issue_example_parses(tmp_path: Path) -> None:
    (tmp_path / "judge.conf").write_bytes(b"limit=1\n")
    (tmp_path / "judge.toml").write_text(
        """
name = "judge"
from = "default"
apt = ["gcc", "g++", "make"]
pip = ["numpy==2.*"]
npm = []
run = ["echo built > /etc/judge-release"]
env = { LANG = "C.UTF-8" }
workdir = "/home/user"
[files]
"/etc/judge.conf" = "judge.conf"
"""
    )
    recipe = load_recipe_file(tmp_path / "judge.toml")
    assert recipe == Recipe(
        name="judge",
        base="default",
        apt=("gcc", "g++", "make"),
        pip=("numpy==2.*",),
        run=("echo built > /etc/judge-release",),
        env=(("LANG", "C.UTF-8"),),
        workdir="/home/user",
        files=(("/etc/judge.conf", b"limit=1\n"),),
    )
    steps = recipe.shell_steps()
    assert "apt-get install" in steps[0] and "g++" in steps[0]
    assert "'numpy==2.*'" in steps[1]
    assert steps[-1] == "echo built > /etc/judge-release"


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"name": "Judge"}, "name"),
        ({"name": "a-b"}, "name"),
        ({"name": "import"}, "name"),  # the API's paths use it
        ({"from": None}, "from"),
        ({"from": "debian:Bookworm!"}, "from"),
        ({"from": "debian:jessie"}, "from"),  # not a suite this server builds
        ({"from": "debian:stable"}, "from"),  # an alias: what it names moves
        ({"from": "judge"}, "from"),
        ({"apt": ["-oAPT::Get=1"]}, "apt"),
        ({"apt": "gcc"}, "apt"),
        ({"pip": ["--index-url=http://evil"]}, "pip"),
        ({"npm": ["-g"]}, "npm"),
        ({"run": [""]}, "run"),
        ({"run": [1]}, "run"),
        ({"env": {"1X": "y"}}, "env"),
        ({"env": {"X": 1}}, "env.X"),
        ({"workdir": "relative"}, "workdir"),
        ({"workdir": "/a/../b"}, "workdir"),
        ({"files": {"etc/x": b""}}, "files.etc/x"),
        ({"files": {"/x": "not bytes"}}, "files./x"),
        ({"surprise": 1}, "surprise"),
        ({"run": ["echo \ud800"]}, "run"),
    ],
)
def test_a_bad_value_names_its_key(over: dict[str, Any], key: str) -> None:
    data = _recipe(**over)
    if over.get("from", "") is None:
        del data["from"]
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    assert caught.value.key == key
    assert repr(key) in str(caught.value)


def test_a_debian_suite_is_a_base() -> None:
    recipe = parse_recipe(_recipe(**{"from": "debian:trixie"}))
    assert recipe.base_suite == "trixie"
    assert parse_recipe(_recipe()).base_suite is None


def test_the_cache_key_follows_content_not_form() -> None:
    a = parse_recipe(_recipe(env={"A": "1", "B": "2"}, files={"/f": b"x"}))
    b = parse_recipe(_recipe(env={"B": "2", "A": "1"}, files={"/f": b"x"}))
    changed_file = parse_recipe(_recipe(env={"A": "1", "B": "2"}, files={"/f": b"y"}))
    assert a.cache_key("d1") == b.cache_key("d1")
    assert a.cache_key("d1") != a.cache_key("d2")  # a rebuilt base is a new image
    assert a.cache_key("d1") != changed_file.cache_key("d1")


def test_a_missing_local_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text('name = "x"\nfrom = "default"\n[files]\n"/a" = "gone"\n')
    with pytest.raises(RecipeError) as caught:
        load_recipe_file(tmp_path / "r.toml")
    assert caught.value.key == "files./a"


def test_invalid_toml_is_a_recipe_error(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text("name = \n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe_file(tmp_path / "r.toml")


@pytest.mark.parametrize("stock", ["python", "build"])
def test_stock_recipes_parse(stock: str) -> None:
    recipe = load_recipe_file(STOCK / f"{stock}.toml")
    assert recipe.name == stock
    assert recipe.base == "default"
