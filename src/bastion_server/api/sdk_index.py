"""The SDK's wheel, of this server's own version, as a PEP 503 simple index.

A client machine installs the SDK that matches the server from the server itself::

    pip install --index-url http://HOST:8080/simple/ bastion-py-sdk

(the public index has an unrelated ``bastion-py-sdk`` 1.0.0).  Routes, all without an
API key (the SDK is public software, and outside ``/v1`` the guard asks for none):

* ``GET /simple/`` -- the index: one project, ``bastion-py-sdk``;
* ``GET /simple/bastion-py-sdk/`` -- its page: one link, the wheel, with its sha256 and
  ``data-requires-python``;
* ``GET /simple/bastion-py-sdk/<wheel file name>`` -- the wheel itself (a direct URL
  for ``pip install URL``);
* ``GET /sdk/wheel`` -- a redirect to the current wheel, for scripts that do not know
  the version.

Where the wheel comes from, decided once per process at the first request that needs
it and cached under ``<data dir>/sdk/<key>/``:

* a source tree (a clean clone, or the editable install of ``make setup``: the
  ``pyproject.toml`` of ``bastion-py-sdk`` two levels above this package): built with
  ``pip wheel --no-deps`` (the hatchling backend, as ``python -m build`` does).  The
  key is the version and a fingerprint of the sources (names, sizes, mtimes), so a new
  version, or edited sources, is built again; older builds are removed.
* an installed wheel (``pip install bastion-py-sdk[server]``): the installed files and
  metadata packed again into the same wheel, without a build backend.

The build runs in a worker thread, once (concurrent requests wait for the same one),
so the event loop never blocks; it takes a few seconds, after which every request is
a file read.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from bastion.wire import ErrorCode
from bastion_server.api.errors import error_response

log = logging.getLogger("bastion.sdk_index")

PROJECT = "bastion-py-sdk"
#: The packages the distribution ships (pyproject.toml, [tool.hatch.build.targets.wheel]).
PACKAGES = ("bastion", "bastion_server")
BUILD_TIMEOUT = 600.0
#: The project root when this package runs from a source tree (src/bastion_server/api).
SOURCE_ROOT = Path(__file__).resolve().parents[3]

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str
    requires_python: str | None

    @property
    def filename(self) -> str:
        return self.path.name


class WheelUnavailable(Exception):
    """No wheel could be built or packed (the message says why)."""


def normalize(name: str) -> str:
    """A project name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _requires_python(wheel: Path) -> str | None:
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".dist-info/METADATA") and name.count("/") == 1:
                for line in zf.read(name).decode().splitlines():
                    if not line:
                        break
                    if line.startswith("Requires-Python:"):
                        return line.partition(":")[2].strip()
    return None


def source_root(root: Path = SOURCE_ROOT) -> Path | None:
    """The project's source tree, when this package runs from one."""
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != PROJECT or not all((root / "src" / p).is_dir() for p in PACKAGES):
        return None
    return root


def source_key(root: Path) -> str:
    """``<version>-<fingerprint>`` of a source tree: changes with any source edit."""
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    digest = hashlib.sha256()
    files = [root / "pyproject.toml", root / "README.md"]
    for package in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(root / "src" / package):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.endswith(".pyc")]
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{version}-{digest.hexdigest()[:16]}"


def _build_from_source(root: Path, out: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
            "--quiet", "--wheel-dir", str(out), str(root),
        ],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if result.returncode != 0:
        raise WheelUnavailable(
            f"`pip wheel {root}` failed ({result.returncode}): {result.stderr[-2000:]}"
        )


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _pack_installed(out: Path) -> None:
    """Pack the installed distribution's files and metadata into its wheel again."""
    dist = importlib.metadata.distribution(PROJECT)
    version = dist.version
    info = f"{PROJECT.replace('-', '_')}-{version}.dist-info"
    skip_info = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    entries: list[tuple[str, Path]] = []
    for file in dist.files or ():
        parts = file.parts
        if not parts or parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc":
            continue
        if parts[0] in PACKAGES:
            entries.append((file.as_posix(), Path(str(file.locate()))))
        elif parts[0].endswith(".dist-info") and parts[-1] not in skip_info:
            entries.append((f"{info}/{'/'.join(parts[1:])}", Path(str(file.locate()))))
    names = {name for name, _ in entries}
    if f"{info}/WHEEL" not in names or f"{info}/METADATA" not in names:
        raise WheelUnavailable(f"the installed {PROJECT} {version} has no wheel metadata")
    path = out / f"{PROJECT.replace('-', '_')}-{version}-py3-none-any.whl"
    record: list[str] = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, source in sorted(entries):
            data = source.read_bytes()
            zf.writestr(name, data)
            record.append(f"{name},{_record_hash(data)},{len(data)}")
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")


def obtain_wheel(data_dir: Path) -> Wheel:
    """The wheel, from the cache under ``data_dir/sdk`` or made now (blocking)."""
    root = source_root()
    if root is not None:
        key = source_key(root)
    else:
        try:
            key = f"{importlib.metadata.version(PROJECT)}-installed"
        except importlib.metadata.PackageNotFoundError as exc:
            raise WheelUnavailable(f"{PROJECT} is neither a source tree nor installed") from exc
    cache = data_dir / "sdk"
    target = cache / key
    wheels = sorted(target.glob("*.whl")) if target.is_dir() else []
    if len(wheels) != 1:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            log.info("building the SDK wheel", extra={"key": key})
            if root is not None:
                _build_from_source(root, out)
            else:
                _pack_installed(out)
            if len(list(out.glob("*.whl"))) != 1:
                raise WheelUnavailable(f"the build made no single wheel: {os.listdir(out)}")
            shutil.rmtree(target, ignore_errors=True)
            out.rename(target)  # whole or not at all
        wheels = sorted(target.glob("*.whl"))
        for old in cache.iterdir():
            if old != target and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    wheel = wheels[0]
    return Wheel(wheel, _sha256(wheel), _requires_python(wheel))


class WheelCache:
    """One wheel per process, made at most once at a time, off the event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.wheel: Wheel | None = None
        self.lock = asyncio.Lock()

    async def get(self) -> Wheel:
        if self.wheel is None:
            async with self.lock:
                if self.wheel is None:
                    self.wheel = await asyncio.to_thread(obtain_wheel, self.data_dir)
        return self.wheel


def _cache(request: Request) -> WheelCache:
    state = request.app.state
    cache: WheelCache | None = getattr(state, "sdk_wheels", None)
    if cache is None:
        cache = state.sdk_wheels = WheelCache(Path(state.config.data_dir))
    return cache


async def _wheel_or_error(request: Request) -> Wheel | Response:
    try:
        return await _cache(request).get()
    except (WheelUnavailable, OSError, subprocess.SubprocessError) as exc:
        log.error("no SDK wheel", extra={"error": str(exc)})
        return error_response(ErrorCode.INTERNAL_ERROR, f"the SDK wheel is unavailable: {exc}")


def _page(title: str, links: list[str]) -> HTMLResponse:
    body = "\n".join(f"    {link}<br/>" for link in links)
    return HTMLResponse(
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="1.0">\n'
        f"    <title>{html.escape(title)}</title>\n  </head>\n  <body>\n"
        f"    <h1>{html.escape(title)}</h1>\n{body}\n  </body>\n</html>\n"
    )


def _not_found(project: str) -> Response:
    return error_response(ErrorCode.NOT_FOUND, f"this index serves only {PROJECT}, not {project!r}")


@router.get("/simple/")
async def simple_index() -> HTMLResponse:
    return _page("Simple index", [f'<a href="{PROJECT}/">{PROJECT}</a>'])


@router.get("/simple/{project}/")
async def simple_project(project: str, request: Request) -> Response:
    if normalize(project) != PROJECT:
        return _not_found(project)
    wheel = await _wheel_or_error(request)
    if not isinstance(wheel, Wheel):
        return wheel
    attrs = f'href="{html.escape(wheel.filename)}#sha256={wheel.sha256}"'
    if wheel.requires_python:
        attrs += f' data-requires-python="{html.escape(wheel.requires_python)}"'
    return _page(f"Links for {PROJECT}", [f"<a {attrs}>{html.escape(wheel.filename)}</a>"])


@router.get("/simple/{project}/{filename}")
async def simple_file(project: str, filename: str, request: Request) -> Response:
    if normalize(project) != PROJECT:
        return _not_found(project)
    wheel = await _wheel_or_error(request)
    if not isinstance(wheel, Wheel):
        return wheel
    if filename != wheel.filename:
        return error_response(
            ErrorCode.NOT_FOUND, f"no file {filename!r}: this server has {wheel.filename}"
        )
    return FileResponse(wheel.path, media_type="application/zip", filename=wheel.filename)


@router.get("/sdk/wheel")
async def sdk_wheel(request: Request) -> Response:
    wheel = await _wheel_or_error(request)
    if not isinstance(wheel, Wheel):
        return wheel
    return RedirectResponse(f"/simple/{PROJECT}/{wheel.filename}", status_code=307)
