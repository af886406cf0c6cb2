"""Build and find the sandbox root filesystem image.

A sandbox's root filesystem is an overlay whose read-only lower layer is an *image*: a
minimal Debian tree made once per machine by ``debootstrap``, then prepared for the
sandbox's user namespace.  The namespace maps container ids ``0..65535`` to host ids
``uid_shift..uid_shift+65535``, so every file of the image is owned by the shifted id
(container root's files belong to host uid 100000, the sandbox user's to 101000).

Layout of an images directory (default ``/var/lib/bastion/images``)::

    images_dir/
        .lock                       flock(2) held by whoever builds
        default-3f2a9c0d1e4b/       <name>-<cache key>: a complete image, never modified
            image.json              the manifest (see ImageInfo)
            build.log               debootstrap's full log
            rootfs/                 the tree, owned by shifted ids, no setuid bits
        debian.trixie-0a1b2c3d4e5f/ the same for a Debian suite a recipe starts from
                                    (image/debian_base.py: made on first use, kept)
        .build-default-...          a build in progress (a stale one is removed)

An image is only ever installed by renaming a finished build directory into place, so a
directory named ``<name>-<key>`` is always complete.  The cache key hashes the recipe and
:data:`BUILDER_VERSION`: changing either gives a new directory, and the builds it
replaces are removed once the new one is installed.

Exceptions::

    ImageError
     +-- ImageNotBuiltError     resolve_image() found no usable image
     +-- ImageBuildError        a build failed (debootstrap, chroot, a bad tree)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

#: Bump when the build steps change in a way that changes the resulting tree: every
#: machine then rebuilds its images, as it would for a recipe change.
BUILDER_VERSION = 2

#: Where images live unless ``BASTION_IMAGES_DIR`` says otherwise.
DEFAULT_IMAGES_DIR = Path("/var/lib/bastion/images")

IMAGES_DIR_ENV = "BASTION_IMAGES_DIR"

#: Overrides debootstrap's default mirror (http://deb.debian.org/debian); not part of
#: the recipe, because the same packages from another mirror make the same image.
MIRROR_ENV = "BASTION_DEBIAN_MIRROR"

MANIFEST_NAME = "image.json"
ROOTFS_NAME = "rootfs"
BUILD_LOG_NAME = "build.log"
LOCK_NAME = ".lock"
_BUILD_PREFIX = ".build-"
_TRASH_PREFIX = ".trash-"
_KEY_LEN = 12
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.]*")

ProgressCallback = Callable[[str], None]


class ImageError(Exception):
    """Base class of the image errors."""


class ImageNotBuiltError(ImageError):
    """No usable image of the requested name exists in the images directory."""


class ImageBuildError(ImageError):
    """Building an image failed; nothing was installed."""


@dataclass(frozen=True)
class ImageRecipe:
    """What goes into an image.  Every field is part of the cache key.

    Attributes:
        name: The image's name (``[a-z0-9][a-z0-9_.]*``; no ``-``, which separates the
            name from the cache key in directory names).
        suite: Debian suite given to debootstrap.
        variant: debootstrap ``--variant``.
        packages: Extra packages (``--include``); essential ones are listed anyway so
            the recipe says what the sandbox can rely on.
        user: Name of the unprivileged sandbox user.
        uid: Its uid inside the sandbox.
        gid: Its primary gid inside the sandbox (a group named like the user).
        shell: Its login shell.
        uid_shift: Host id that container id 0 maps to (for uids and gids alike).
        id_map_size: How many ids the sandbox's user namespace maps.
    """

    name: str = "default"
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = (
        "bash",
        "ca-certificates",
        "coreutils",
        "iproute2",
        "procps",
        "python3",
    )
    user: str = "user"
    uid: int = 1000
    gid: int = 1000
    shell: str = "/bin/bash"
    uid_shift: int = 100000
    id_map_size: int = 65536

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid image name {self.name!r}")
        if not 0 < self.uid < self.id_map_size or not 0 < self.gid < self.id_map_size:
            raise ValueError("the sandbox uid and gid must be mapped and not root")
        if self.uid_shift <= 0:
            raise ValueError("uid_shift must be positive")

    @property
    def home(self) -> str:
        return f"/home/{self.user}"

    def cache_key(self) -> str:
        """The 12 hex digits naming this recipe's build (recipe + builder version)."""
        content = json.dumps(
            {"builder_version": BUILDER_VERSION, "recipe": dataclasses.asdict(self)},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(content.encode()).hexdigest()[:_KEY_LEN]

    def dir_name(self) -> str:
        return f"{self.name}-{self.cache_key()}"

    def digest(self) -> str:
        """The digest its build will have (known before it is built: see
        :func:`base_digest`)."""
        return base_digest(self.name, self.cache_key())


DEFAULT_RECIPE = ImageRecipe()

#: The recipes this builder knows, by name.
RECIPES: dict[str, ImageRecipe] = {DEFAULT_RECIPE.name: DEFAULT_RECIPE}


@dataclass(frozen=True)
class ImageInfo:
    """A built image, as its manifest (``image.json``) describes it.

    Attributes:
        path: The image directory (``images_dir/<name>-<recipe_hash>``).
        rootfs: The root filesystem, to use read-only (an overlay's lower layer).
        name: Image name.
        recipe_hash: The cache key the image was built for.
        built_at: ISO 8601 UTC time the build finished.
        uid_shift: Host uid/gid that container uid/gid 0 maps to.
        id_map_size: Number of ids the user namespace must map (0..id_map_size-1).
        sandbox_uid: The unprivileged user's uid inside the sandbox.
        sandbox_gid: Its gid inside the sandbox.
        sandbox_user: Its name.
        home: Its home directory inside the sandbox.
        shell: Its login shell inside the sandbox.
        parent: For a layer image (one built over another, see image/store.py): the
            directory of the image it is a delta over, relative to the images
            directory; None for a base image (a whole root filesystem).
        digest: What names its content (``sha256:<hex>``).
        env: Environment its sessions' jobs start with.
        workdir: Where its sessions' jobs start (None: ``home``).
        size_bytes: What a layer image's own ``rootfs/`` takes on disk, counted when
            it was stored (None: a base image, or a layer stored before sizes were
            kept).
    """

    path: Path
    rootfs: Path
    name: str
    recipe_hash: str
    built_at: str
    uid_shift: int
    id_map_size: int
    sandbox_uid: int
    sandbox_gid: int
    sandbox_user: str
    home: str
    shell: str
    parent: str | None = None
    digest: str = ""
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    size_bytes: int | None = None

    @classmethod
    def load(cls, image_dir: Path) -> ImageInfo:
        """Read ``image_dir/image.json``.

        Raises:
            ImageError: The manifest is missing or malformed, or ``rootfs/`` is missing.
        """
        manifest_path = image_dir / MANIFEST_NAME
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot read image manifest {manifest_path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ImageError(f"image manifest {manifest_path} is not a JSON object")
        rootfs = image_dir / ROOTFS_NAME
        if not rootfs.is_dir():
            raise ImageError(f"image {image_dir} has no {ROOTFS_NAME}/ directory")
        try:
            return cls(
                path=image_dir,
                rootfs=rootfs,
                name=_field(data, "name", str),
                recipe_hash=_field(data, "recipe_hash", str),
                built_at=_field(data, "built_at", str),
                uid_shift=_field(data, "uid_shift", int),
                id_map_size=_field(data, "id_map_size", int),
                sandbox_uid=_field(data, "sandbox_uid", int),
                sandbox_gid=_field(data, "sandbox_gid", int),
                sandbox_user=_field(data, "sandbox_user", str),
                home=_field(data, "home", str),
                shell=_field(data, "shell", str),
                parent=_optional(data, "parent", str),
                digest=_optional(data, "digest", str)
                or base_digest(str(data.get("name")), str(data.get("recipe_hash"))),
                env=tuple((str(k), str(v)) for k, v in (data.get("env") or {}).items()),
                workdir=_optional(data, "workdir", str),
                size_bytes=_optional(data, "size_bytes", int),
            )
        except (KeyError, TypeError) as exc:
            raise ImageError(f"image manifest {manifest_path} is invalid: {exc}") from exc


_T = TypeVar("_T")


def _field(data: dict[str, Any], key: str, kind: type[_T]) -> _T:
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} should be {kind.__name__}, got {value!r}")
    return value


def _optional(data: dict[str, Any], key: str, kind: type[_T]) -> _T | None:
    return None if data.get(key) is None else _field(data, key, kind)


def base_digest(name: str, recipe_hash: str) -> str:
    """A base image's digest: its name and cache key hashed (the key covers the
    recipe and the builder's version, so the same key means the same tree)."""
    return "sha256:" + hashlib.sha256(f"{name}-{recipe_hash}".encode()).hexdigest()


def default_images_dir() -> Path:
    """``$BASTION_IMAGES_DIR`` if set, else :data:`DEFAULT_IMAGES_DIR`."""
    env = os.environ.get(IMAGES_DIR_ENV)
    return Path(env) if env else DEFAULT_IMAGES_DIR


def resolve_image(images_dir: Path, name: str = "default") -> ImageInfo:
    """Find the image to run sandboxes from.

    For a name this builder has a recipe for, only the build of the *current* recipe
    counts (an image left over from an older recipe is out of date).  For any other
    name, the most recently built image of that name is used.

    Args:
        images_dir: The images directory.
        name: Image name.

    Returns:
        The image's manifest, with the path of its root filesystem.

    Raises:
        ImageNotBuiltError: No such image is built; the message says how to build it.
        ImageError: The image directory exists but is unreadable or malformed.
    """
    hint = "run `bastion image build` or `make setup`"
    recipe = RECIPES.get(name)
    if recipe is not None:
        image_dir = images_dir / recipe.dir_name()
        if not image_dir.is_dir():
            stale = [p.name for p in _builds_of(images_dir, name)]
            detail = f" (only out-of-date builds: {', '.join(stale)})" if stale else ""
            raise ImageNotBuiltError(
                f"sandbox image {name!r} is not built in {images_dir}{detail}: {hint}"
            )
        return ImageInfo.load(image_dir)
    candidates: list[ImageInfo] = []
    for image_dir in _builds_of(images_dir, name):
        with contextlib.suppress(ImageError):
            candidates.append(ImageInfo.load(image_dir))
    if not candidates:
        raise ImageNotBuiltError(f"no sandbox image {name!r} in {images_dir}: {hint}")
    return max(candidates, key=lambda info: info.built_at)


def build_image(
    images_dir: Path,
    recipe: ImageRecipe = DEFAULT_RECIPE,
    *,
    progress: ProgressCallback,
    force: bool = False,
    mirror: str | None = None,
    prune: bool = True,
) -> Path:
    """Make sure the image for ``recipe`` is built, building it if needed.

    An existing build of the same recipe is reused at once.  Otherwise the image is
    built in a temporary directory beside its final place and renamed into place when
    complete; older builds of the same name are then removed (except those a mounted
    overlay still uses).  A lock file serialises concurrent builders: the second one
    waits, then finds the first one's image.

    Args:
        images_dir: The images directory (created if missing).
        recipe: What to build.
        progress: Called with one short human-readable line per step.
        force: Rebuild even if the image exists.
        mirror: Debian mirror URL for debootstrap (default: ``$BASTION_DEBIAN_MIRROR``,
            else debootstrap's own default).
        prune: Remove the older builds of the same name once this one is installed
            (False: keep them, for bases that layer images may stand on).

    Returns:
        The image directory (``images_dir/<name>-<cache key>``).

    Raises:
        ImageBuildError: The build failed; no image was installed.
    """
    final = images_dir / recipe.dir_name()
    if not force and _is_complete(final):
        progress(f"[image] {final.name} is up to date ({final})")
        return final

    _check_can_build()
    images_dir.mkdir(parents=True, exist_ok=True)
    with _locked(images_dir, progress):
        _remove_stale(images_dir, progress)
        if _is_complete(final):
            if not force:
                progress(f"[image] {final.name} was built meanwhile ({final})")
                return final
            if _in_use(final):
                raise ImageBuildError(
                    f"cannot rebuild {final}: a mounted overlay uses it (stop the sessions)"
                )
        started = time.monotonic()
        progress(f"[image] building {final.name} ({recipe.suite}, {recipe.variant}) in {final}")
        # The log lives outside the build directory so that it outlives a failed build.
        log_path = images_dir / f"{final.name}.{BUILD_LOG_NAME}"
        tmp = images_dir / f"{_BUILD_PREFIX}{final.name}-{os.getpid()}"
        tmp.mkdir(mode=0o755)
        try:
            rootfs = tmp / ROOTFS_NAME
            _populate_rootfs(
                recipe,
                rootfs,
                log_path=log_path,
                progress=progress,
                mirror=mirror or os.environ.get(MIRROR_ENV) or None,
            )
            progress(f"[image] shifting ownership to {recipe.uid_shift}")
            shift_ownership(rootfs, recipe.uid_shift, recipe.id_map_size)
            _write_manifest(tmp, recipe, build_seconds=time.monotonic() - started)
            log_path.rename(tmp / BUILD_LOG_NAME)
            _install(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
        if prune:
            _prune_older(images_dir, final, progress)
    progress(f"[image] done in {time.monotonic() - started:.1f}s: {final}")
    return final


def shift_ownership(root: Path, shift: int, id_map_size: int = 65536) -> None:
    """Shift every uid and gid under ``root`` by ``shift`` and drop privilege bits.

    Walks without following symlinks (symlinks, including symlinks to directories, are
    ``lchown``-ed themselves), handles hard links once, and strips what would let a
    process gain privilege inside the sandbox: setuid/setgid bits (on directories too)
    and file capabilities.

    Raises:
        ImageBuildError: A file's owner is outside ``0..id_map_size-1`` (unmappable; also
            what an already shifted tree looks like).
    """

    def fix(path: str, st: os.stat_result) -> None:
        if st.st_uid >= id_map_size or st.st_gid >= id_map_size:
            raise ImageBuildError(
                f"{path} is owned by {st.st_uid}:{st.st_gid}, outside the sandbox's "
                f"0..{id_map_size - 1} id range"
            )
        os.lchown(path, st.st_uid + shift, st.st_gid + shift)
        if stat.S_ISLNK(st.st_mode):
            return
        drop_privilege_bits(path, st)
        if stat.S_ISREG(st.st_mode):
            with contextlib.suppress(OSError):
                os.removexattr(path, "security.capability", follow_symlinks=False)

    each_inode(root, fix)


def drop_privilege_bits(path: str, st: os.stat_result) -> None:
    """Clear setuid and setgid.  chown(2) already clears setuid (and setgid on
    group-executable files), but not setgid directories or setgid without group-exec."""
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def each_inode(root: Path, visit: Callable[[str, os.stat_result], None]) -> None:
    """``visit(path, lstat)`` for ``root`` and everything below it, never following a
    symlink, each hard-linked inode once; an error reading the tree raises."""
    seen: set[tuple[int, int]] = set()

    def one(path: str) -> None:
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
        visit(path, st)

    def raise_error(exc: OSError) -> None:
        raise exc

    one(str(root))
    for dirpath, dirnames, filenames in os.walk(root, onerror=raise_error):
        # os.walk lists symlinks to directories in dirnames and does not descend into
        # them, so both lists together are every entry of dirpath.
        for entry in (*dirnames, *filenames):
            one(os.path.join(dirpath, entry))


# --------------------------------------------------------------------------- building


def _populate_rootfs(
    recipe: ImageRecipe,
    rootfs: Path,
    *,
    log_path: Path,
    progress: ProgressCallback,
    mirror: str | None,
) -> None:
    """Make the unshifted tree: debootstrap, clean up, add the user and the mount points."""
    _run_debootstrap(recipe, rootfs, log_path=log_path, progress=progress, mirror=mirror)
    progress("[image] cleaning package caches")
    # The sandbox has no route to a mirror and no root: downloaded .debs and package
    # lists (~90 MB) would only take space.
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file() and not entry.is_symlink() and entry.name != "lock":
                entry.unlink()
    for pkgcache in (rootfs / "var/cache/apt").glob("*.bin"):
        pkgcache.unlink()

    progress(f"[image] configuring user {recipe.user} ({recipe.uid}:{recipe.gid})")
    chroot = _find_tool("chroot")
    with log_path.open("a") as log:
        for argv in (
            [chroot, str(rootfs), "groupadd", "-g", str(recipe.gid), recipe.user],
            [chroot, str(rootfs), "useradd", "--create-home", "--uid", str(recipe.uid),
             "--gid", str(recipe.gid), "--shell", recipe.shell, "--home-dir", recipe.home,
             recipe.user],
        ):  # fmt: skip
            log.write(f"+ {' '.join(argv)}\n")
            log.flush()
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_tool_env(),
                check=False,
            )
            if result.returncode != 0:
                raise ImageBuildError(
                    f"`{' '.join(argv[2:])}` failed in the image (exit {result.returncode});"
                    f" see {log_path}"
                )

    (rootfs / "tmp").mkdir(exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    # debootstrap copies the build host's name; a sandbox must not learn it.
    (rootfs / "etc/hostname").write_text("sandbox\n")
    (rootfs / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # The runtime bind-mounts its in-sandbox agent here.
    (rootfs / "run/bastion").mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "run/bastion", 0o755)
    # The runtime mounts a fresh /dev; nodes in the image would only be a way around it.
    for entry in (rootfs / "dev").rglob("*"):
        mode = entry.lstat().st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            entry.unlink()


def _run_debootstrap(
    recipe: ImageRecipe,
    rootfs: Path,
    *,
    log_path: Path,
    progress: ProgressCallback,
    mirror: str | None,
) -> None:
    """Run debootstrap, turning its progress protocol into a few progress lines.

    debootstrap's ``--debian-installer`` mode writes machine-readable progress
    (``P: now end PHASE``) and messages to fd 3; its full log goes to stdout, which
    is kept in ``log_path``.
    """
    debootstrap = _find_tool("debootstrap")
    argv = [
        debootstrap,
        "--debian-installer",
        f"--variant={recipe.variant}",
        *([f"--include={','.join(recipe.packages)}"] if recipe.packages else []),
        recipe.suite,
        str(rootfs),
        *([mirror] if mirror else []),
    ]
    parser = DebootstrapProgress(progress)
    read_fd, write_fd = os.pipe()
    with log_path.open("w") as log, os.fdopen(read_fd, encoding="utf-8", errors="replace") as fd3:
        try:
            # Python cannot place a descriptor at a given number in the child without
            # preexec_fn (unsafe with threads), so a shell moves it to fd 3.
            proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3>&{write_fd} {write_fd}>&-', "bash", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=_tool_env(),
            )
        finally:
            os.close(write_fd)
        try:
            for line in fd3:
                parser.feed(line.rstrip("\n"))
        except BaseException:
            # SIGTERM (not SIGKILL) lets debootstrap unmount what it mounted in the target.
            proc.terminate()
            proc.wait()
            raise
        returncode = proc.wait()
    if returncode != 0:
        reason = "; ".join(parser.errors) or f"exit status {returncode}"
        raise ImageBuildError(
            f"debootstrap failed: {reason}\n--- last lines of {log_path} ---\n"
            + _tail(log_path, 15)
        )


class DebootstrapProgress:
    """Turns debootstrap's ``--debian-installer`` messages into short progress lines.

    One line when a phase starts, then at most one per ``interval`` seconds while it
    moves.  Downloads are counted in packages: debootstrap's byte counts go backwards
    between files.  Errors (``E:``) are collected in :attr:`errors`; warnings reported.
    """

    _PHASES: ClassVar[dict[str, str]] = {
        "DOWNREL": "fetching release index",
        "DOWNRELSIG": "fetching release index",
        "DOWNPKGS": "fetching package lists",
        "DOWNMAINPKGS": "fetching package lists",
        "SIZEDEBS": "resolving packages",
        "DOWNDEBS": "downloading packages",
        "EXTRACTPKGS": "extracting packages",
        "INSTCORE": "installing core packages",
        "UNPACKREQ": "unpacking required packages",
        "CONFREQ": "configuring required packages",
        "UNPACKBASE": "unpacking base packages",
        "CONFBASE": "configuring base packages",
    }
    _BYTE_PHASES: ClassVar[frozenset[str]] = frozenset({"DOWNPKGS", "DOWNMAINPKGS", "DOWNDEBS"})

    def __init__(
        self,
        progress: ProgressCallback,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress = progress
        self._interval = interval
        self._clock = clock
        self._phase = ""
        self._label = ""
        self._done = 0  # highest "now" seen in the phase (or packages retrieved)
        self._last_emit = 0.0
        self._debs = 0  # how many packages debootstrap will download
        self._message: tuple[str, list[str]] | None = None  # kind (E/W), its arguments
        self.errors: list[str] = []

    def feed(self, line: str) -> None:
        tag, _, rest = line.partition(": ")
        if tag == "P":
            fields = rest.split()
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                self._on_progress(int(fields[0]), int(fields[1]), fields[2:3])
        elif tag == "I" and rest == "RETRIEVING" and self._phase == "DOWNDEBS":
            self._done += 1
            self._update(f"{self._done}/{self._debs}" if self._debs else f"{self._done}")
        elif tag in ("E", "W"):
            self._message = (tag, [])
        elif tag in ("EA", "WA") and self._message is not None:
            self._message[1].append(rest)
        elif tag in ("EF", "WF") and self._message is not None:
            text = _printf(rest, self._message[1])
            self._message = None
            if tag == "EF":
                self.errors.append(text)
            self._progress(f"[image] debootstrap {'error' if tag == 'EF' else 'warning'}: {text}")

    def _on_progress(self, now: int, end: int, name: list[str]) -> None:
        if name:
            self._phase = name[0]
        if self._phase == "SIZEDEBS":
            self._debs = end
        label = self._PHASES.get(self._phase, self._phase.lower())
        if label != self._label:
            self._label = label
            self._done = 0
            self._last_emit = self._clock()
            if self._phase == "DOWNDEBS":
                total = f"{self._debs} packages, " if self._debs else ""
                self._progress(f"[image] debootstrap: {label} ({total}{end / 1e6:.1f} MB)")
            elif self._phase in self._BYTE_PHASES:
                self._progress(f"[image] debootstrap: {label} ({end / 1e6:.1f} MB)")
            elif end > 1 and end != 100:  # 100: a percentage, nothing to count
                self._done = now
                self._progress(f"[image] debootstrap: {label} {now}/{end}")
            else:
                self._progress(f"[image] debootstrap: {label}")
        elif self._phase not in self._BYTE_PHASES and now > self._done and end != 100:
            self._done = now
            self._update(f"{now}/{end}")

    def _update(self, amount: str) -> None:
        t = self._clock()
        if t - self._last_emit >= self._interval:
            self._last_emit = t
            self._progress(f"[image] debootstrap: {self._label} {amount}")


def _printf(fmt: str, args: list[str]) -> str:
    """Expand the ``%s``-style format of a debootstrap message."""
    values = iter(args)
    return re.sub(r"%[sd]", lambda _: next(values, "?"), fmt)


# --------------------------------------------------------------------------- helpers


def _check_can_build() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building an image needs root (debootstrap, chroot, chown): run `make setup` as root"
        )
    _find_tool("debootstrap")


def _tool_env() -> dict[str, str]:
    # debootstrap and chroot live in sbin, which a non-login PATH may lack.
    env = dict(os.environ)
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    missing = [d for d in ("/usr/sbin", "/sbin") if d not in path.split(":")]
    env["PATH"] = ":".join([path, *missing])
    env["LC_ALL"] = "C"
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def _find_tool(name: str) -> str:
    found = shutil.which(name, path=_tool_env()["PATH"])
    if found is None:
        raise ImageBuildError(f"{name} is not installed: apt-get install {name} (or `make setup`)")
    return found


@contextlib.contextmanager
def _locked(images_dir: Path, progress: ProgressCallback) -> Iterator[None]:
    with (images_dir / LOCK_NAME).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"[image] waiting for another build in {images_dir} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_complete(image_dir: Path) -> bool:
    try:
        ImageInfo.load(image_dir)
    except ImageError:
        return False
    return True


def _builds_of(images_dir: Path, name: str | None = None) -> list[Path]:
    """Image directories of ``name`` (of any name if None), complete or not."""
    name_re = _NAME_RE.pattern if name is None else re.escape(name)
    pattern = re.compile(name_re + rf"-[0-9a-f]{{{_KEY_LEN}}}")
    try:
        entries = list(images_dir.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if pattern.fullmatch(p.name) and p.is_dir())


def _remove_stale(images_dir: Path, progress: ProgressCallback) -> None:
    """Remove what builds that died left behind (the lock is held: none is running)."""
    for entry in images_dir.iterdir():
        if entry.name.startswith((_BUILD_PREFIX, _TRASH_PREFIX)) and entry.is_dir():
            progress(f"[image] removing unfinished build {entry.name}")
            _remove_tree(entry)
    for image_dir in _builds_of(images_dir):
        if not _is_complete(image_dir):
            # Installed only by rename, so this is damage (or a hand edit), not a build.
            progress(f"[image] removing incomplete image {image_dir.name}")
            _remove_tree(image_dir)


def _write_manifest(image_dir: Path, recipe: ImageRecipe, *, build_seconds: float) -> None:
    manifest = {
        "name": recipe.name,
        "recipe_hash": recipe.cache_key(),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "uid_shift": recipe.uid_shift,
        "id_map_size": recipe.id_map_size,
        "sandbox_uid": recipe.uid,
        "sandbox_gid": recipe.gid,
        "sandbox_user": recipe.user,
        "home": recipe.home,
        "shell": recipe.shell,
        "builder_version": BUILDER_VERSION,
        "build_seconds": round(build_seconds, 1),
        "recipe": dataclasses.asdict(recipe),
    }
    path = image_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(path, 0o644)


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished build into place (replacing an old build of the same key)."""
    if final.exists():
        trash = final.with_name(f"{_TRASH_PREFIX}{final.name}-{os.getpid()}")
        final.rename(trash)
        tmp.rename(final)
        _remove_tree(trash)
    else:
        tmp.rename(final)


def _prune_older(images_dir: Path, keep: Path, progress: ProgressCallback) -> None:
    name = keep.name[: -(_KEY_LEN + 1)]
    for old in _builds_of(images_dir, name):
        if old == keep:
            continue
        if _in_use(old):
            progress(f"[image] keeping older build {old.name}: a mounted overlay uses it")
            continue
        progress(f"[image] removing older build {old.name}")
        trash = old.with_name(f"{_TRASH_PREFIX}{old.name}")
        old.rename(trash)
        _remove_tree(trash)


def _in_use(image_dir: Path) -> bool:
    """Whether a mount (an overlay's lowerdir, typically) names this image's rootfs."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    return str(image_dir / ROOTFS_NAME) in mountinfo


def _remove_tree(path: Path) -> None:
    """``rm -rf path``, unmounting first whatever is mounted below it.

    An interrupted debootstrap can leave /proc, /sys or bind mounts of the host's /dev
    entries in its target; deleting through those would reach the host.
    """
    mounts = _mounts_below(path)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run([_find_tool("umount"), "--lazy", point], capture_output=True, check=False)
    if mounts and _mounts_below(path):
        raise ImageError(f"cannot remove {path}: mounts below it would not unmount")
    shutil.rmtree(path, ignore_errors=not path.exists())


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            # Field 5 is the mount point, with space, tab, newline and \ octal-escaped.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""
