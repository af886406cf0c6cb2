"""Images by name: building recipes in sandboxes, choosing one for a session, tenancy.

Names: an image a key builds (or imports) is that key's tenant's alone; one a stock
recipe or an admin key makes is *shared* (``owner`` '' in the store) and every key may
use it.  A key's own image hides a shared one of the same name.  The server's base
image (``default``, or the configured ``image``) is always there, shared, as ``stock``.

A build (:meth:`ImageService.build`) answers at once with the image ``building`` and
runs on in a task:

1. the ``from`` image is resolved (the key's, a shared one, or a base); a Debian suite
   (``debian:bookworm``) is bootstrapped on the host the first time a recipe names it,
   as ``make setup`` makes ``default`` (image/debian_base.py), its progress in the log;
2. its content key is the recipe's over the base's digest (and the tenant, for a key's
   own build, so no tenant learns from a cache hit what another built): a layer image
   of that key on disk is a cache hit, ready at once;
3. otherwise a sandbox of its own is made over the ``from`` image (network on, the
   build limits, never a session's), the recipe's files are written and each step runs
   as the sandbox's root (root of its user namespace only) under the build timeout,
   their output going to the build log;
4. once every step passed the sandbox is stopped and its upper directory captured as a
   layer image over the ``from`` image (image/store.py), ids shifted back to the
   image's; the sandbox is deleted whatever happened.

An import (:meth:`ImageService.import_archive`) or a pull (:meth:`ImageService.pull`)
takes the same path: checked at once, then ``building`` while a task unpacks the
archive (fetched by skopeo first, for a pull) with its progress in the image's log,
then ``ready`` or ``failed``.

A failed build leaves nothing but its record (``failed``, with the reason) and its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shlex
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bastion.wire import ErrorCode, ImageInfo, ImageStatus
from bastion_server.config import ServerConfig
from bastion_server.image import debian_base
from bastion_server.image.builder import ImageBuildError, ImageError
from bastion_server.image.builder import ImageInfo as StoredImage
from bastion_server.image.oci_archive import ArchiveError, archive_digest, unpack_archive
from bastion_server.image.recipe import NAME_RE, RESERVED_NAMES, Recipe, load_recipe_file
from bastion_server.image.store import ImageStore
from bastion_server.runtime.base import (
    ExecSpec,
    ExitEvent,
    OutputEvent,
    Runtime,
    SandboxError,
    SandboxLimits,
)
from bastion_server.runtime.network import NetworkPolicy
from bastion_server.runtime.sandbox_image import SandboxImage
from bastion_server.service.errors import ServiceError
from bastion_server.service.sessions import new_id, now_iso
from bastion_server.store.sqlite import ImageRecord, Store
from bastion_server.tasks import spawn

log = logging.getLogger("bastion.images")
_T = TypeVar("_T")

#: The owner of shared images in the store.
SHARED = ""
#: The stock recipes shipped with the server: ``bastion images build python``.
STOCK_RECIPES_DIR = Path(__file__).resolve().parents[1] / "image" / "recipes"
#: Where the CA bundle handed to a build is put in its sandbox (removed before the
#: layer is captured).
_BUILD_CA_PATH = "/etc/ssl/certs/bastion-build-ca.pem"
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def image_not_found(name: str) -> ServiceError:
    return ServiceError(ErrorCode.IMAGE_NOT_FOUND, f"image {name!r} not found")


@dataclass(frozen=True)
class ChosenImage:
    """An image a session will run: what the runtime mounts, and what the session's
    record keeps of it."""

    sandbox: SandboxImage
    ref: str

    @property
    def record(self) -> dict[str, str]:
        return {"name": self.sandbox.name, "digest": self.sandbox.digest, "ref": self.ref}


async def recorded_image(images_dir: Path, image: dict[str, str]) -> ChosenImage:
    """The image a session's record names (``{"name", "digest", "ref"}``), for a session
    that must stand on the same layers (one started from a snapshot of it)."""
    store = ImageStore(images_dir)
    try:
        info = await asyncio.to_thread(store.load, image["ref"])
        sandbox = await asyncio.to_thread(store.sandbox_image, info, image["name"])
    except (ImageError, KeyError) as exc:
        raise ServiceError(
            ErrorCode.IMAGE_STATE, f"the image {image.get('name')!r} it stood on is gone"
        ) from exc
    return ChosenImage(sandbox, image["ref"])


class ImageService:
    def __init__(
        self, store: Store, runtime: Runtime, config: ServerConfig, images: ImageStore
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.config = config
        self.images = images
        self.logs_dir = config.data_dir / "image-builds"
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._log_updates = asyncio.Condition()

    async def prepare(self) -> None:
        """Sweep what a crash left: half-captured layers, and builds that were under
        way (their record says ``building`` but no task runs them now)."""
        self.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        await asyncio.to_thread(self.images.prepare)
        for record in self.store.all_images():
            if record.status == ImageStatus.BUILDING:
                record.status, record.status_reason = ImageStatus.FAILED, "the server restarted"
                record.updated_at = now_iso()
                self.store.upsert_image(record)

    async def start_pools(self) -> None:
        """Give the runtime the warm pools of ``--pool IMAGE=N`` (shared images)."""
        add_pool = getattr(self.runtime, "add_pool", None)
        for entry in self.config.pool_images:
            name, _, count = entry.partition("=")
            try:
                size = int(count)
                chosen = await self.choose(SHARED, name)
            except (ValueError, ServiceError) as exc:
                log.error("warm pool %r not started: %s", entry, exc)
                continue
            if add_pool is not None:
                add_pool(chosen.sandbox, size)

    # -- names ------------------------------------------------------------------------

    def _base_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("default", self.config.image)))

    def _find(self, owner: str, name: str) -> ImageRecord | None:
        """The key's own image of that name, else the shared one."""
        return self.store.get_image(owner, name) or self.store.get_image(SHARED, name)

    async def _base_record(self, name: str) -> ImageRecord | None:
        if name not in self._base_names():
            return None
        try:
            info = await asyncio.to_thread(self.images.base, name)
        except ImageError:
            return None
        return ImageRecord(
            owner=SHARED,
            name=name,
            status=ImageStatus.READY,
            source="stock",
            build_id="",
            created_at=info.built_at,
            updated_at=info.built_at,
            ref=self.images.ref(info),
            digest=info.digest,
        )

    async def get(self, owner: str, name: str) -> ImageRecord:
        record = self._find(owner, name) or await self._base_record(name)
        if record is None:
            raise image_not_found(name)
        return record

    async def list(self, owner: str) -> list[ImageRecord]:
        """The images the key may use: its own, the shared ones, the base images; a
        name the key has hides the shared one."""
        found: dict[str, ImageRecord] = {}
        for name in self._base_names():
            base = await self._base_record(name)
            if base is not None:
                found[name] = base
        # Shared first (owner ''), then the key's own: a name of its own hides one.
        for record in self.store.list_images(sorted({SHARED, owner})):
            found[record.name] = record
        return [found[name] for name in sorted(found)]

    async def choose(self, owner: str, name: str) -> ChosenImage:
        """The image a new session of ``owner`` runs (``image_state`` if not ready)."""
        record = await self.get(owner, name)
        if record.status != ImageStatus.READY or record.ref is None:
            raise ServiceError(
                ErrorCode.IMAGE_STATE,
                f"image {name!r} is {record.status}"
                + (f" ({record.status_reason})" if record.status_reason else "")
                + "; a session needs a ready image",
            )
        info = await asyncio.to_thread(self.images.load, record.ref)
        sandbox = await asyncio.to_thread(self.images.sandbox_image, info, name)
        return ChosenImage(sandbox, record.ref)

    # -- builds -----------------------------------------------------------------------

    def stock_recipe(self, name: str) -> Recipe | None:
        path = STOCK_RECIPES_DIR / f"{name}.toml"
        return load_recipe_file(path) if path.is_file() else None

    async def build(
        self, owner: str, recipe: Recipe, *, shared: bool, no_cache: bool = False
    ) -> ImageRecord:
        """Start building ``recipe``; returns its record, ``building`` (or ``ready`` at
        once on a cache hit)."""
        if recipe.name in self._base_names():
            raise ServiceError(
                ErrorCode.INVALID_RECIPE,
                f"recipe key 'name': {recipe.name!r} is the server's base image "
                "(`bastion image build` makes it)",
            )
        scope = SHARED if shared else owner
        existing = self.store.get_image(scope, recipe.name)
        if existing is not None and existing.status == ImageStatus.BUILDING:
            raise ServiceError(
                ErrorCode.IMAGE_STATE, f"image {recipe.name!r} is being built; wait for it"
            )
        parent: ChosenImage | None = None
        suite = recipe.base_suite
        if suite is None:
            parent = await self.choose(owner, recipe.base)
            parent_digest = (await asyncio.to_thread(self.images.load, parent.ref)).digest
        else:
            try:
                await asyncio.to_thread(debian_base.check_suite, suite)
            except debian_base.SuiteError as exc:
                raise ServiceError(ErrorCode.INVALID_RECIPE, f"recipe key 'from': {exc}") from exc
            # Known before the suite is bootstrapped: a hit needs no bootstrap.
            parent_digest = debian_base.base_recipe(suite).digest()
        key = hashlib.sha256(f"{scope}\0{recipe.cache_key(parent_digest)}".encode()).hexdigest()
        stamp = now_iso()
        record = ImageRecord(
            owner=scope,
            name=recipe.name,
            status=ImageStatus.BUILDING,
            source="build",
            build_id=new_id("bld"),
            created_at=stamp,
            updated_at=stamp,
            parent=recipe.base,
        )
        cached = None if no_cache else await asyncio.to_thread(self.images.layer, key)
        if cached is not None:
            self._write_log(record.build_id, f"[image] cache hit: {cached.digest}\n")
            await self._ready(record, cached)
            return record
        self.store.upsert_image(record)
        self._write_log(record.build_id, f"[image] building {recipe.name} over {recipe.base}\n")
        self._builds[record.build_id] = spawn(
            self._run_build(record, recipe, parent, key), name=f"image build {record.build_id}"
        )
        return record

    async def _ready(self, record: ImageRecord, info: StoredImage) -> None:
        record.status, record.status_reason = ImageStatus.READY, None
        record.ref, record.digest = self.images.ref(info), info.digest
        record.size_bytes = await asyncio.to_thread(self.images.layer_bytes, info)
        record.updated_at = now_iso()
        self.store.upsert_image(record)
        await self._notify()

    async def _fail(self, record: ImageRecord, reason: str) -> None:
        record.status, record.status_reason, record.updated_at = "failed", reason, now_iso()
        self.store.upsert_image(record)
        self._write_log(record.build_id, f"[image] failed: {reason}\n")
        await self._notify()

    def _build_limits(self) -> SandboxLimits:
        m = self.config.max_limits
        return SandboxLimits(
            memory_mb=min(m.memory_mb, 2048),
            pids=min(m.pids, 1024),
            cpus=m.cpus,
            disk_mb=min(m.disk_mb, self.config.build_disk_mb),
        )

    async def _run_build(
        self,
        record: ImageRecord,
        recipe: Recipe,
        parent: ChosenImage | None,
        key: str,
    ) -> None:
        """The build's task; ``parent`` None: the recipe's Debian suite, bootstrapped
        first if it is not stored yet."""
        sandbox_id = f"build_{record.build_id.removeprefix('bld_')}"
        private = getattr(self.runtime, "private", None)
        if isinstance(private, set):
            private.add(sandbox_id)
        started = time.monotonic()
        limits = self._build_limits()
        async with self._task(record, "build"):
            try:
                with_upper = getattr(self.runtime, "with_upper", None)
                if with_upper is None:
                    raise SandboxError(f"the {self.runtime.name} runtime cannot build images")
                if parent is None:
                    parent = await self._debian_base(record, recipe)
                parent_info = await asyncio.to_thread(self.images.load, parent.ref)
                await self.runtime.create(sandbox_id, limits, parent.sandbox)
                network = NetworkPolicy(enabled=True, allow=self.config.build_network_allow)
                await self.runtime.start(sandbox_id, limits, network)
                await self._run_steps(record, recipe, sandbox_id, started)
                await self.runtime.stop(sandbox_id)
                self._write_log(record.build_id, "[image] storing the layer\n")
                info: StoredImage = await with_upper(
                    sandbox_id,
                    lambda upper, shift: self.images.capture(
                        upper,
                        parent_info,
                        key,
                        from_shift=shift,
                        name=recipe.name,
                        env=recipe.env,
                        workdir=recipe.workdir,
                    ),
                )
                await self._ready(record, info)
                self._write_log(
                    record.build_id,
                    f"[image] ready in {time.monotonic() - started:.1f}s: {info.digest}\n",
                )
            finally:
                with contextlib.suppress(Exception):
                    await self.runtime.delete(sandbox_id)
                if isinstance(private, set):
                    private.discard(sandbox_id)

    @contextlib.asynccontextmanager
    async def _task(self, record: ImageRecord, what: str) -> AsyncIterator[None]:
        """The body of a build's, import's or pull's task: whatever ends it other than
        success fails the record with the reason (a shutdown too, then goes on), and
        its end is told to those following its log."""
        try:
            yield
        except (_Failed, ArchiveError) as exc:
            await self._fail(record, str(exc))
        except (SandboxError, ImageError, OSError) as exc:
            await self._fail(record, f"the {what} could not run: {exc}")
        except asyncio.CancelledError:
            await self._fail(record, "the server shut down")
            raise
        except Exception as exc:
            log.exception("image %s failed", what)
            await self._fail(record, f"internal error: {exc}")
        finally:
            self._builds.pop(record.build_id, None)
            await self._notify()

    async def _debian_base(self, record: ImageRecord, recipe: Recipe) -> ChosenImage:
        """The recipe's Debian suite as an image, bootstrapped on the host if it is not
        stored (once: a second build of the suite finds it, or waits for the first)."""
        suite = recipe.base_suite
        assert suite is not None
        images_dir = self.images.images_dir
        info = await asyncio.to_thread(debian_base.stored_base, images_dir, suite)
        if info is None:
            self._write_log(
                record.build_id,
                f"[image] bootstrapping {recipe.base} from {debian_base.mirror()} "
                "(once: later builds over it reuse it)\n",
            )
            try:
                info = await self._in_thread_with_log(
                    record, lambda progress: debian_base.bootstrap(images_dir, suite, progress)
                )
            except ImageBuildError as exc:
                raise _Failed(f"bootstrapping {recipe.base} failed: {exc}") from exc
        sandbox = await asyncio.to_thread(self.images.sandbox_image, info, recipe.base)
        return ChosenImage(sandbox, self.images.ref(info))

    async def _in_thread_with_log(
        self, record: ImageRecord, work: Callable[[Callable[[str], None]], _T]
    ) -> _T:
        """``work(progress)`` in a worker thread, each progress line going to the
        record's log as it comes.  Cancelled (the server shuts down), the work stops at
        its next progress line: the line raises ``ImageBuildError`` in the thread."""
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()

        def progress(line: str) -> None:
            if cancelled.is_set():
                raise ImageBuildError("cancelled: the server shut down")
            self._write_log(record.build_id, line + "\n")
            asyncio.run_coroutine_threadsafe(self._notify(), loop)

        try:
            return await asyncio.to_thread(work, progress)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _build_env(self) -> dict[str, str]:
        env = {"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
        if self.config.build_proxy_env:
            env |= {k: v for k in _PROXY_VARS if (v := os.environ.get(k))}
        if self.config.build_ca_file is not None:
            env |= {
                "SSL_CERT_FILE": _BUILD_CA_PATH,
                "PIP_CERT": _BUILD_CA_PATH,
                "REQUESTS_CA_BUNDLE": _BUILD_CA_PATH,
                "NODE_EXTRA_CA_CERTS": _BUILD_CA_PATH,
                "CURL_CA_BUNDLE": _BUILD_CA_PATH,
            }
        return env

    async def _run_steps(
        self, record: ImageRecord, recipe: Recipe, sandbox_id: str, started: float
    ) -> None:
        deadline = started + self.config.build_timeout
        env = self._build_env()
        ca = self.config.build_ca_file
        if ca is not None:
            bundle = await asyncio.to_thread(ca.read_bytes)
            await self._put_file(record, sandbox_id, _BUILD_CA_PATH, bundle, env, deadline)
            # apt reads its own CA setting: point it at the bundle too.
            await self._step(
                record, sandbox_id, env, deadline,
                "mkdir -p /etc/apt/apt.conf.d && echo 'Acquire::https::CAInfo "
                f'"{_BUILD_CA_PATH}";\' > /etc/apt/apt.conf.d/00bastion-build-ca',
                quiet=True,
            )  # fmt: skip
        for path, data in recipe.files:
            self._write_log(record.build_id, f"[image] file {path} ({len(data)} bytes)\n")
            await self._put_file(record, sandbox_id, path, data, env, deadline)
        for number, step in enumerate(recipe.shell_steps(), 1):
            self._write_log(record.build_id, f"[image] step {number}: {step}\n")
            await self._step(record, sandbox_id, env, deadline, step)
        if ca is not None:
            await self._step(
                record, sandbox_id, env, deadline,
                f"rm -f {_BUILD_CA_PATH} /etc/apt/apt.conf.d/00bastion-build-ca",
                quiet=True,
            )  # fmt: skip

    async def _put_file(
        self,
        record: ImageRecord,
        sandbox_id: str,
        path: str,
        data: bytes,
        env: dict[str, str],
        deadline: float,
    ) -> None:
        script = f'mkdir -p "$(dirname {shlex.quote(path)})" && cat > {shlex.quote(path)}'
        await self._step(record, sandbox_id, env, deadline, script, stdin=data, quiet=True)

    async def _step(
        self,
        record: ImageRecord,
        sandbox_id: str,
        env: dict[str, str],
        deadline: float,
        script: str,
        *,
        stdin: bytes | None = None,
        quiet: bool = False,
    ) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Failed(f"the build took longer than {self.config.build_timeout:g}s")
        spec = ExecSpec(
            argv=["/bin/sh", "-c", script],
            env=env,
            cwd="/",
            timeout=left,
            user="root",
            stdin=stdin is not None,
        )
        process = await self.runtime.exec(sandbox_id, spec)
        try:
            if stdin is not None:
                await process.send_input(stdin)
                await process.close_input()
            exit_event: ExitEvent | None = None
            async for event in process.events():
                if isinstance(event, OutputEvent):
                    if not quiet:
                        self._write_log(record.build_id, event.data.decode(errors="replace"))
                        await self._notify()
                else:
                    exit_event = event
        finally:
            await process.close()
        if exit_event is None or exit_event.exit_code != 0:
            what = script if not quiet else script.split("&&")[0].strip()
            if exit_event is not None and exit_event.timed_out:
                raise _Failed(f"the build took longer than {self.config.build_timeout:g}s")
            code = exit_event.exit_code if exit_event is not None else None
            raise _Failed(f"step `{what}` failed (exit status {code})")

    # -- imports and pulls -------------------------------------------------------------

    async def import_archive(
        self, owner: str, name: str, archive: Path, *, shared: bool
    ) -> ImageRecord:
        """Start importing the OCI image in ``archive`` as ``name``: checked at once
        (its name, that it is an image archive), then unpacked in a task (``building``,
        ``ready`` at once if the same image is stored).  The archive is the service's
        from here: removed once imported, failed or refused."""
        try:
            record = self._new_import(owner, name, shared=shared, source="import")
            try:
                digest = await asyncio.to_thread(archive_digest, archive)
            except ArchiveError as exc:
                raise ServiceError(ErrorCode.INVALID_REQUEST, str(exc)) from exc
        except BaseException:
            await asyncio.to_thread(archive.unlink, missing_ok=True)
            raise
        self.store.upsert_image(record)
        self._write_log(record.build_id, f"[image] importing {name} ({digest})\n")
        self._builds[record.build_id] = spawn(
            self._run_import(record, archive, digest=digest),
            name=f"image import {record.build_id}",
        )
        return record

    async def pull(self, owner: str, name: str, ref: str, *, shared: bool) -> ImageRecord:
        """Start pulling ``ref`` (``registry/repo:tag``): checked at once (its name, the
        reference, the registry allowed), then fetched with skopeo and imported in a
        task, skopeo's progress in the image's log."""
        if not _REF_RE.fullmatch(ref):
            raise ServiceError(ErrorCode.INVALID_REQUEST, f"not an image reference: {ref!r}")
        registry = ref.split("/", 1)[0] if "/" in ref else "docker.io"
        allowed = self.config.pull_registries
        if allowed and registry not in allowed:
            raise ServiceError(
                ErrorCode.INVALID_REQUEST,
                f"this server pulls only from {', '.join(allowed)}, not {registry}",
            )
        record = self._new_import(owner, name, shared=shared, source="pull")
        self.store.upsert_image(record)
        self._write_log(record.build_id, f"[image] pulling {ref} as {name}\n")
        local = registry.split(":")[0] in ("localhost", "127.0.0.1", "[::1]")
        self._builds[record.build_id] = spawn(
            self._run_pull(record, ref, tls_verify=not local), name=f"image pull {record.build_id}"
        )
        return record

    def _new_import(self, owner: str, name: str, *, shared: bool, source: str) -> ImageRecord:
        """The record of an import or a pull, ``building`` (not stored yet)."""
        _check_name(name, self._base_names())
        scope = SHARED if shared else owner
        existing = self.store.get_image(scope, name)
        if existing is not None and existing.status == ImageStatus.BUILDING:
            raise ServiceError(ErrorCode.IMAGE_STATE, f"image {name!r} is being built; wait for it")
        stamp = now_iso()
        return ImageRecord(
            owner=scope,
            name=name,
            status=ImageStatus.BUILDING,
            source=source,
            build_id=new_id("imp"),
            created_at=stamp,
            updated_at=stamp,
        )

    async def _run_pull(self, record: ImageRecord, ref: str, *, tls_verify: bool) -> None:
        """The pull's task: skopeo fetches ``ref`` into an archive (its output in the
        log), which is then imported as :meth:`_run_import` does."""
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        archive = self.tmp_dir / f"pull-{secrets.token_hex(8)}.tar"
        argv = [
            "skopeo", "copy",
            *([] if tls_verify else ["--src-tls-verify=false"]),
            f"docker://{ref}", f"oci-archive:{archive}",
        ]  # fmt: skip
        try:
            async with self._task(record, "pull"):
                await self._fetch(record, argv, ref)
                digest = await asyncio.to_thread(archive_digest, archive)
                await self._unpack(record, archive, digest=digest)
        finally:
            await asyncio.to_thread(archive.unlink, missing_ok=True)

    async def _fetch(self, record: ImageRecord, argv: Sequence[str], ref: str) -> None:
        """Run skopeo (``argv``), its output going to the record's log line by line."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except FileNotFoundError as exc:
            raise _Failed("skopeo is not installed on the server") from exc
        tail: deque[str] = deque(maxlen=5)
        try:
            async with asyncio.timeout(_PULL_TIMEOUT):
                assert proc.stdout is not None
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip()
                    tail.append(line)
                    self._write_log(record.build_id, f"[image] skopeo: {line}\n")
                    await self._notify()
                code = await proc.wait()
        except TimeoutError as exc:
            raise _Failed(f"the pull took longer than {_PULL_TIMEOUT}s") from exc
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if code != 0:
            raise _Failed(f"cannot pull {ref}: {' '.join(tail)[-500:] or code}")

    async def _run_import(self, record: ImageRecord, archive: Path, *, digest: str) -> None:
        """The import's task: :meth:`_unpack`, then the archive removed."""
        try:
            async with self._task(record, "import"):
                await self._unpack(record, archive, digest=digest)
        finally:
            await asyncio.to_thread(archive.unlink, missing_ok=True)

    async def _unpack(self, record: ImageRecord, archive: Path, *, digest: str) -> None:
        """Unpack ``archive`` as the record's image, its layers' progress in the log;
        the same image already stored is ready at once."""
        key = hashlib.sha256(f"{record.owner}\0{digest}".encode()).hexdigest()
        cached = await asyncio.to_thread(self.images.layer, key)
        if cached is not None:
            self._write_log(record.build_id, f"[image] already stored: {cached.digest}\n")
            await self._ready(record, cached)
            return
        like = await asyncio.to_thread(self.images.base, self.config.image)

        def unpack(progress: Callable[[str], None]) -> StoredImage:
            def populate(rootfs: Path) -> tuple[tuple[tuple[str, str], ...], str | None]:
                config = unpack_archive(archive, rootfs, progress)
                progress("[image] shifting ownership")
                return config.env, config.workdir

            return self.images.add_base(
                key, name=record.name, like=like, populate=populate,
                extra={"source_digest": digest},
            )  # fmt: skip

        info = await self._in_thread_with_log(record, unpack)
        await self._ready(record, info)
        self._write_log(record.build_id, f"[image] ready: {info.digest}\n")

    @property
    def tmp_dir(self) -> Path:
        """Archives being received or pulled (root's alone)."""
        return self.logs_dir.parent / "image-tmp"

    # -- logs -------------------------------------------------------------------------

    def log_path(self, build_id: str) -> Path:
        return self.logs_dir / f"{build_id}.log"

    def _write_log(self, build_id: str, text: str) -> None:
        with self.log_path(build_id).open("a", encoding="utf-8") as f:
            f.write(text)

    async def _notify(self) -> None:
        async with self._log_updates:
            self._log_updates.notify_all()

    async def follow_log(self, owner: str, name: str, *, follow: bool) -> AsyncIterator[bytes]:
        """The image's build log from its start; with ``follow`` it goes on until the
        build ends."""
        record = await self.get(owner, name)
        path = self.log_path(record.build_id) if record.build_id else None
        offset = 0
        while True:
            # Looked at before the read: a build that ended wrote all its log before.
            ended = not follow or record.build_id not in self._builds
            chunk = b""
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    chunk = await asyncio.to_thread(_read_from, path, offset)
            if chunk:
                offset += len(chunk)
                yield chunk
                continue
            if ended:
                return
            async with self._log_updates:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._log_updates.wait(), 1.0)

    # -- delete -----------------------------------------------------------------------

    async def delete(self, owner: str, name: str, *, admin: bool) -> ImageRecord:
        record = self._find(owner, name)
        if record is None:
            if await self._base_record(name) is not None:
                raise ServiceError(
                    ErrorCode.IMAGE_STATE, f"image {name!r} is the server's base image"
                )
            raise image_not_found(name)
        if record.owner == SHARED and not admin and owner != SHARED:
            raise ServiceError(
                ErrorCode.INSUFFICIENT_SCOPE,
                f"image {name!r} is shared: only an admin key deletes it",
            )
        if record.status == ImageStatus.BUILDING:
            raise ServiceError(ErrorCode.IMAGE_STATE, f"image {name!r} is being built")
        if record.ref is not None:
            users = self.store.image_refs_of_sessions().get(record.ref, 0)
            if users:
                raise ServiceError(
                    ErrorCode.IMAGE_STATE,
                    f"image {name!r} is used by {users} session(s); delete them first",
                )
            over = await asyncio.to_thread(self._images_over, record.ref)
            if over:
                raise ServiceError(
                    ErrorCode.IMAGE_STATE,
                    f"image {name!r} is the base of {', '.join(sorted(over))}; delete those first",
                )
        self.store.delete_image(record.owner, record.name)
        if record.ref is not None:
            await asyncio.to_thread(self._remove_unused, record.ref)
        return record

    def _images_over(self, ref: str) -> set[str]:
        """Names of the image records whose layer stands directly on ``ref``."""
        names = set()
        for other in self.store.all_images():
            if other.ref is None or other.ref == ref:
                continue
            with contextlib.suppress(ImageError):
                if self.images.load(other.ref).parent == ref:
                    names.add(other.name)
        return names

    def _remove_unused(self, ref: str) -> None:
        """Remove a layer image no record names any more (the same content may be
        another name's, or another tenant's: then it stays)."""
        if any(r.ref == ref for r in self.store.all_images()):
            return
        if not ref.startswith(f"{self.images.layers_dir.name}/"):
            return  # a base image: `bastion image build` manages those
        self.images.remove(ref.split("/", 1)[1])

    async def shutdown(self) -> None:
        for task in list(self._builds.values()):
            task.cancel()
        for task in list(self._builds.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


#: How long a pull's fetch may take (seconds).
_PULL_TIMEOUT = 1800
#: ``[registry[:port]/]repository[:tag][@sha256:...]``, as skopeo takes it.
_REF_RE = re.compile(
    r"[a-z0-9][a-z0-9.\-]*(?::[0-9]+)?(?:/[a-z0-9._\-]+)*(?::[A-Za-z0-9_.\-]{1,128})?"
    r"(?:@sha256:[0-9a-f]{64})?"
)


def _check_name(name: str, bases: tuple[str, ...]) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ServiceError(
            ErrorCode.INVALID_REQUEST,
            "an image's name is lower-case letters, digits, '_' and '.' (at most 64)",
        )
    if name in bases:
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"{name!r} is the server's base image")
    if name in RESERVED_NAMES:
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"{name!r} is reserved (by the API's paths)")


class _Failed(Exception):
    """A build, import or pull failed for a reason its message says (a step's exit
    status, a timeout, a bootstrap, an archive, a registry)."""


def _read_from(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(64 * 1024)


def image_view(record: ImageRecord) -> ImageInfo:
    return {
        "name": record.name,
        "status": record.status,  # type: ignore[typeddict-item]
        "status_reason": record.status_reason,
        "source": record.source,  # type: ignore[typeddict-item]
        "shared": record.owner == SHARED,
        "digest": record.digest,
        "parent": record.parent,
        "size_bytes": record.size_bytes,
        "build_id": record.build_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }
