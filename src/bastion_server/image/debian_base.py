"""Debian suites as the base of a recipe: ``from = "debian:bookworm"``.

A suite's base is a minbase tree made the way the server's ``default`` image is
(:func:`bastion_server.image.builder.build_image`): ``debootstrap`` from the configured
Debian mirror (``$BASTION_DEBIAN_MIRROR``, else deb.debian.org), on the host, with the
Release file's signature checked against the host's Debian archive keyring, then the
sandbox user (uid 1000), the agent's mount point, a clean ``/dev`` and ids shifted,
exactly as ``default`` gets them.  What runs on the host is Debian's own packages, as
at ``make setup``; the recipe's steps are untrusted and still run only in the build's
sandbox, over this base.

A suite is bootstrapped once per images directory: its base is a stock image
``debian.<suite>-<key>/`` beside ``default-<key>/``, shared by every key's recipes
(the layer a recipe builds over it is its tenant's, as over any image).  Older builds
of a suite's base are kept: layer images stand on them.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request
from pathlib import Path

from bastion_server.image.builder import (
    DEFAULT_RECIPE,
    MIRROR_ENV,
    ImageError,
    ImageInfo,
    ImageRecipe,
    ProgressCallback,
    build_image,
)

#: The Debian releases a recipe may start from.  Aliases (``stable``, ``testing``) are
#: not: what they name moves, and a base bootstrapped once would not follow.
DEBIAN_SUITES = ("bullseye", "bookworm", "trixie", "forky", "sid")

#: debootstrap's own default mirror.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Where debootstrap keeps its per-suite scripts: a suite without one it cannot make.
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")

_PREFIX = "debian."


class SuiteError(ValueError):
    """A suite this server cannot bootstrap (the message says why)."""


def base_recipe(suite: str) -> ImageRecipe:
    """What a suite's base is: ``default``'s recipe (its sandbox user, its id shift)
    for ``suite``, minbase alone (no extra packages)."""
    return dataclasses.replace(DEFAULT_RECIPE, name=_PREFIX + suite, suite=suite, packages=())


def mirror() -> str:
    """The Debian mirror bases are bootstrapped from."""
    return os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR


def check_suite(suite: str, mirror_url: str | None = None, *, timeout: float = 15.0) -> None:
    """Whether ``suite`` (one of :data:`DEBIAN_SUITES`, as a parsed recipe's is) can
    be bootstrapped here: one the host's debootstrap knows, and one the mirror has
    (its ``Release`` file).  A mirror that cannot be reached at all is not the
    recipe's fault: the bootstrap then fails with debootstrap's own words in the
    build's log.

    Raises:
        SuiteError: The suite is not one of these.
    """
    if not (DEBOOTSTRAP_SCRIPTS / suite).exists():
        raise SuiteError(f"'debian:{suite}' is not a suite this server's debootstrap knows")
    url = f"{(mirror_url or mirror()).rstrip('/')}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404, 410):
            raise SuiteError(
                f"'debian:{suite}' is not on this server's Debian mirror ({url}: {exc.code})"
            ) from exc
    except (urllib.error.URLError, OSError, ValueError):
        pass


def stored_base(images_dir: Path, suite: str) -> ImageInfo | None:
    """The suite's base, if it is bootstrapped (for the current builder)."""
    path = images_dir / base_recipe(suite).dir_name()
    if not path.is_dir():
        return None
    try:
        return ImageInfo.load(path)
    except ImageError:
        return None  # not whole: build_image() sweeps it and builds again


def bootstrap(images_dir: Path, suite: str, progress: ProgressCallback) -> ImageInfo:
    """The suite's base, bootstrapped first if it is not stored (blocking: minutes;
    a second caller waits for the first one's build, then finds it).

    Raises:
        ImageBuildError: debootstrap (or a set-up step) failed; nothing was stored.
    """
    path = build_image(images_dir, base_recipe(suite), progress=progress, prune=False)
    return ImageInfo.load(path)
