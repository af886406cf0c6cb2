"""The distribution: `python -m build` makes an sdist and a wheel that install and work.

The wheel must hold both packages (the SDK `bastion`, typed, and the server
`bastion_server`) and its metadata must keep the server's dependencies in the `server`
extra.  Installed alone, without the extra, into a fresh venv (no system site
packages, not this checkout), `import bastion` and `bastion --help` work, the client
commands run, and `bastion serve` explains how to get the server.

The artifacts are built into a temporary directory; with `BASTION_DIST_DIR` set
(scripts/check-dist.sh does), the ones already there are checked instead.  pip may
fetch the dependencies (httpx, websockets, typing_extensions) from the package index.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import bastion

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
DIST_NAME = "bastion_py_sdk"


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("BASTION_DIST_DIR")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    if _run([sys.executable, "-m", "build", "--version"]).returncode != 0:
        pytest.fail("`python -m build` is missing: pip install -e '.[dev]'")
    # Without --sdist/--wheel, build makes the sdist and then the wheel *from the sdist*,
    # so a file the sdist forgot breaks the wheel too.
    result = _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    wheels = list(dist.glob(f"{DIST_NAME}-{VERSION}-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    return wheels[0]


@pytest.fixture(scope="module")
def sdist(dist: Path) -> Path:
    sdists = list(dist.glob(f"{DIST_NAME}-{VERSION}.tar.gz"))
    assert len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    return sdists[0]


def test_version_is_single_sourced() -> None:
    assert bastion.__version__ == VERSION


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"{DIST_NAME}-{VERSION}.dist-info"
        metadata = email.message_from_string(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    for required in (
        "bastion/__init__.py",
        "bastion/py.typed",
        "bastion/cli.py",
        "bastion/wire.py",
        "bastion/_resources/jobs.py",
        "bastion_server/__init__.py",
        "bastion_server/cli.py",
        "bastion_server/api/app.py",
        "bastion_server/runtime/agent.py",
        "bastion_server/runtime/agent_c/bastion-agent.c",
        "bastion_server/image/builder.py",
    ):
        assert required in names, required
    assert not [n for n in names if n.startswith(("tests/", "docs/", "scripts/", "bench/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    assert metadata["Name"] == "bastion-py-sdk"
    assert metadata["Version"] == VERSION
    assert metadata["Requires-Python"] == ">=3.11"
    assert "server" in metadata.get_all("Provides-Extra", [])
    requires = metadata.get_all("Requires-Dist", [])
    plain = {_project(r) for r in requires if ";" not in r}
    assert plain == {"httpx", "websockets", "typing-extensions"}
    server = {_project(r) for r in requires if re.search(r"extra == ['\"]server['\"]", r)}
    assert server == {"fastapi", "uvicorn"}
    assert "Typing :: Typed" in metadata.get_all("Classifier", [])
    assert "bastion = bastion.cli:main" in entry_points
    assert "serve = bastion_server.cli:register_serve" in entry_points


def _project(requirement: str) -> str:
    """The normalised project name of a ``Requires-Dist`` value."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_sdist_contents(sdist: Path) -> None:
    prefix = f"{DIST_NAME}-{VERSION}/"
    with tarfile.open(sdist) as tf:
        names = {n.removeprefix(prefix) for n in tf.getnames()}
    for required in (
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "PKG-INFO",
        "src/bastion/py.typed",
        "src/bastion_server/runtime/agent_c/bastion-agent.c",
        "docs/API.md",
        "docs/CLI.md",
        "tests/conftest.py",
        "scripts/gen-api-docs.py",
    ):
        assert required in names, required
    assert not [n for n in names if n.startswith((".venv", ".git/", "bench/", "dist/"))]


def test_wheel_alone_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert made.returncode == 0, made.stderr
    bin_dir = venv / "bin"
    # Nothing from this checkout or this test run may leak in.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BASTION_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["BASTION_URL"] = "http://127.0.0.1:9"  # the discard port: nothing listens

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _run(list(args), cwd=tmp_path, env=env, timeout=600)

    installed = run(str(bin_dir / "pip"), "install", "--disable-pip-version-check", str(wheel))
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    imported = run(
        str(bin_dir / "python"),
        "-c",
        "import importlib.util, bastion, bastion.cli; "
        "print(bastion.__version__, bastion.__file__); "
        "print(importlib.util.find_spec('fastapi') is None, "
        "importlib.util.find_spec('uvicorn') is None)",
    )
    assert imported.returncode == 0, imported.stderr
    version, path, *_ = imported.stdout.split()
    assert version == VERSION
    assert path.startswith(str(venv)), path  # the installed copy, not the checkout
    assert imported.stdout.splitlines()[1] == "True True"  # the server extra is not there

    helped = run(str(bin_dir / "bastion"), "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("sessions", "files", "jobs", "exec", "shell", "serve"):
        assert command in helped.stdout

    served = run(str(bin_dir / "bastion"), "serve")
    assert served.returncode == 2
    assert "install bastion-py-sdk[server]" in served.stderr
    assert "Traceback" not in served.stderr

    # The client commands need nothing more: no server here, so a connection error.
    listed = run(str(bin_dir / "bastion"), "sessions", "list")
    assert listed.returncode == 6, listed.stderr
    assert listed.stderr.endswith("(connection_error)\n")

    typed = run(
        str(bin_dir / "python"),
        "-c",
        "import pathlib, bastion; "
        "print((pathlib.Path(bastion.__file__).parent / 'py.typed').is_file())",
    )
    assert typed.stdout.strip() == "True"
