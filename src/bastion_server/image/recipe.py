"""Image recipes: what a user asks to have in an image, checked before anything runs.

A recipe is TOML (``bastion images build -f recipe.toml``) or the same as a dict (the
SDK's ``images.build(recipe)``)::

    name = "judge"
    from = "default"                 # a built image, or a Debian suite: "debian:bookworm"
    apt = ["gcc", "g++", "make"]
    pip = ["numpy==2.*"]
    npm = []
    run = ["echo built > /etc/judge-release"]   # shell commands, in order
    env = { LANG = "C.UTF-8" }
    workdir = "/home/user"
    [files]                          # path in the image = local file (CLI) or bytes (SDK)
    "/etc/judge.conf" = "judge.conf"

:func:`parse_recipe` turns such a mapping into a :class:`Recipe` or raises
:class:`RecipeError` naming the key and the problem.  The caller resolves ``files``
first (the CLI reads local files, the API decodes what the SDK sent), so a recipe
holds the files' bytes and its :meth:`Recipe.cache_key` covers them.

Recipe steps are untrusted code: nothing here runs them.  The values are checked so
that each one means what it looks like (a package name cannot be an option of the
package manager, a path cannot leave the image), not for safety: the build runs in a
sandbox of its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from bastion_server.image.debian_base import DEBIAN_SUITES

#: Image names: lower case, digits, ``_`` and ``.``; never ``-`` (it separates a name
#: from its cache key in directory names).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.]{0,63}")
#: Names the API's paths use for actions (``POST /v1/images/import``): never an image's.
RESERVED_NAMES = frozenset({"import", "pull"})
_DEBIAN_PREFIX = "debian:"
_SUITE_RE = re.compile(r"[a-z]{2,20}")
#: A Debian package, optionally ``=version`` (``gcc``, ``g++``, ``libc6-dev=2.36-9``).
_APT_RE = re.compile(r"[a-z0-9][a-z0-9+.\-]*(?::[a-z0-9]+)?(?:=[A-Za-z0-9.+~:\-]+)?")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

MAX_ITEMS = 256
MAX_TEXT = 4096
MAX_FILES = 256
MAX_FILE_BYTES = 64 * 1024**2

_KEYS = ("name", "from", "apt", "pip", "npm", "run", "env", "workdir", "files")


class RecipeError(ValueError):
    """A recipe that cannot be built as written; ``key`` names the culprit."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"recipe key {key!r}: {problem}")
        self.key, self.problem = key, problem


@dataclass(frozen=True)
class Recipe:
    name: str
    #: The image it extends: a built image's name, or ``debian:<suite>``.
    base: str
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    npm: tuple[str, ...] = ()
    run: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    #: ``(absolute path in the image, content)``, sorted by path.
    files: tuple[tuple[str, bytes], ...] = ()

    @property
    def base_suite(self) -> str | None:
        """The Debian suite when the recipe starts from one, else None."""
        if self.base.startswith(_DEBIAN_PREFIX):
            return self.base[len(_DEBIAN_PREFIX) :]
        return None

    def cache_key(self, base_digest: str) -> str:
        """Same recipe over the same base, same key: a rebuild is a cache hit."""
        canonical = {
            "base": self.base,
            "base_digest": base_digest,
            "apt": self.apt,
            "pip": self.pip,
            "npm": self.npm,
            "run": self.run,
            "env": self.env,
            "workdir": self.workdir,
            "files": [(path, hashlib.sha256(data).hexdigest()) for path, data in self.files],
        }
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def shell_steps(self) -> list[str]:
        """The build as shell commands, in order (files are placed before any of them,
        so a ``run`` step can use them)."""
        steps = []
        if self.apt:
            steps.append(
                "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                "--no-install-recommends "
                + " ".join(shlex.quote(p) for p in self.apt)
                + " && rm -rf /var/lib/apt/lists/*"
            )
        if self.pip:
            steps.append(
                "python3 -m pip install --no-cache-dir --break-system-packages "
                + " ".join(shlex.quote(p) for p in self.pip)
            )
        if self.npm:
            steps.append(
                "npm install --global --no-fund --no-audit "
                + " ".join(shlex.quote(p) for p in self.npm)
            )
        steps.extend(self.run)
        return steps


def parse_recipe(data: Mapping[str, Any]) -> Recipe:
    """Check a recipe mapping whose ``files`` values are already bytes."""
    if not isinstance(data, Mapping):
        raise RecipeError("(recipe)", "must be a table of keys")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise RecipeError(unknown[0], f"unknown key (known: {', '.join(_KEYS)})")
    name = _text(data, "name")
    if not NAME_RE.fullmatch(name):
        raise RecipeError("name", "must be 1-64 of a-z, 0-9, '_' and '.', starting with a-z0-9")
    if name in RESERVED_NAMES:
        raise RecipeError("name", f"{name!r} is reserved (the API's paths use it)")
    base = _text(data, "from")
    suite = base[len(_DEBIAN_PREFIX) :] if base.startswith(_DEBIAN_PREFIX) else None
    if suite is not None and not _SUITE_RE.fullmatch(suite):
        raise RecipeError("from", f"{base!r} is not a Debian suite such as 'debian:bookworm'")
    if suite is not None and suite not in DEBIAN_SUITES:
        known = ", ".join(f"'debian:{s}'" for s in DEBIAN_SUITES)
        raise RecipeError("from", f"{base!r} is not a Debian suite this server builds ({known})")
    if suite is None and not NAME_RE.fullmatch(base):
        raise RecipeError("from", f"{base!r} is neither an image name nor 'debian:<suite>'")
    if base == name:
        raise RecipeError("from", "an image cannot extend itself")
    apt = _list(data, "apt")
    for package in apt:
        if not _APT_RE.fullmatch(package):
            raise RecipeError("apt", f"{package!r} is not a Debian package name")
    pip, npm = _list(data, "pip"), _list(data, "npm")
    for key, specs in (("pip", pip), ("npm", npm)):
        for spec in specs:
            if spec.startswith("-") or not spec.strip() or any(c in spec for c in "\n\r\0"):
                raise RecipeError(key, f"{spec!r} is not a package (options are not allowed)")
    run = _list(data, "run")
    if any(not step.strip() for step in run):
        raise RecipeError("run", "a step is empty")
    env = _env(data.get("env"))
    workdir = data.get("workdir")
    if workdir is not None:
        workdir = _image_path("workdir", workdir)
    return Recipe(
        name=name,
        base=base,
        apt=apt,
        pip=pip,
        npm=npm,
        run=run,
        env=env,
        workdir=workdir,
        files=_files(data.get("files")),
    )


def load_recipe_file(path: Path) -> Recipe:
    """A TOML recipe; its ``files`` name local files relative to the recipe's folder."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError("(recipe)", f"{path} is not valid TOML: {exc}") from exc
    return parse_recipe(resolve_local_files(data, path.parent.joinpath))


def resolve_local_files(data: Mapping[str, Any], locate: Callable[[str], Path]) -> dict[str, Any]:
    """The recipe with each ``files`` value (a local path) replaced by that file's bytes."""
    files = data.get("files")
    if files is None:
        return dict(data)
    if not isinstance(files, Mapping):
        raise RecipeError("files", "must be a table of 'path in the image' = 'local file'")
    resolved: dict[str, bytes] = {}
    for target, source in files.items():
        if isinstance(source, bytes):
            resolved[target] = source
            continue
        if not isinstance(source, str):
            raise RecipeError(f"files.{target}", "must name a local file")
        local = locate(source)
        try:
            if local.stat().st_size > MAX_FILE_BYTES:
                raise RecipeError(f"files.{target}", f"{local} is over {MAX_FILE_BYTES} bytes")
            resolved[target] = local.read_bytes()
        except OSError as exc:
            raise RecipeError(f"files.{target}", f"cannot read {local}: {exc.strerror}") from exc
    return {**data, "files": resolved}


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        raise RecipeError(key, "is required")
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise RecipeError(key, f"must be a non-empty string of at most {MAX_TEXT} characters")
    _encodable(key, value)
    return value


def _list(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list | tuple) or len(value) > MAX_ITEMS:
        raise RecipeError(key, f"must be a list of at most {MAX_ITEMS} strings")
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_TEXT:
            raise RecipeError(key, f"every item must be a string of at most {MAX_TEXT} characters")
        _encodable(key, item)
    return tuple(value)


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_ITEMS:
        raise RecipeError("env", f"must be a table of at most {MAX_ITEMS} names and strings")
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_KEY_RE.fullmatch(k):
            raise RecipeError("env", f"{k!r} is not a variable name")
        if not isinstance(v, str) or len(v) > MAX_TEXT or "\0" in v:
            raise RecipeError(f"env.{k}", "must be a string without NUL bytes")
        _encodable(f"env.{k}", v)
    return tuple(sorted(value.items()))


def _image_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_TEXT:
        raise RecipeError(key, "must be an absolute path in the image")
    _encodable(key, value)
    parts = PurePosixPath(value).parts
    if ".." in parts or "\0" in value:
        raise RecipeError(key, f"{value!r} must not contain '..' or NUL")
    return str(PurePosixPath(value))


def _files(value: Any) -> tuple[tuple[str, bytes], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_FILES:
        raise RecipeError("files", f"must be a table of at most {MAX_FILES} files")
    files: dict[str, bytes] = {}
    for target, content in value.items():
        path = _image_path(f"files.{target}", target)
        if path == "/":
            raise RecipeError(f"files.{target}", "must name a file, not the root")
        if not isinstance(content, bytes):
            raise RecipeError(f"files.{target}", "must be the file's bytes")
        if len(content) > MAX_FILE_BYTES:
            raise RecipeError(f"files.{target}", f"is over {MAX_FILE_BYTES} bytes")
        files[path] = content
    return tuple(sorted(files.items()))


def _encodable(key: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecipeError(key, "is not valid text (a lone surrogate?)") from exc
