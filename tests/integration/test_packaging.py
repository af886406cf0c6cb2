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
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

import bastion
from bastion_server.testing import IMAGES_DIR, free_port

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
        "bastion/cli/__init__.py",
        "bastion/wire.py",
        "bastion/_resources/jobs.py",
        "bastion_server/__init__.py",
        "bastion_server/cli.py",
        "bastion_server/api/app.py",
        "bastion_server/runtime/agent_protocol.py",
        "bastion_server/runtime/agent_build.py",
        "bastion_server/runtime/agent_c/bastion-agent.c",
        "bastion_server/image/builder.py",
    ):
        assert required in names, required
    assert not [n for n in names if n.startswith(("tests/", "docs/", "scripts/", "bench/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # A py3-none-any wheel holds the agent's source, never a binary built here.
    assert not [n for n in names if n.startswith("bastion_server/runtime/agent_c/bastion-agent-")]

    assert metadata["Name"] == "bastion-py-sdk"
    assert metadata["Version"] == VERSION
    assert metadata["Requires-Python"] == ">=3.11"
    assert "server" in metadata.get_all("Provides-Extra", [])
    requires = metadata.get_all("Requires-Dist", [])
    plain = {_project(r) for r in requires if ";" not in r}
    assert plain == {"httpx", "websockets", "typing-extensions"}
    server = {_project(r) for r in requires if re.search(r"extra == ['\"]server['\"]", r)}
    assert server == {"fastapi", "uvicorn", "fastapi-offline"}  # the docs page's assets
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
    assert not [
        n for n in names if n.startswith("src/bastion_server/runtime/agent_c/bastion-agent-")
    ]


def _fresh_venv(venv: Path) -> tuple[Path, dict[str, str]]:
    """A new venv (no system site packages, not this checkout) and an environment in
    which its commands come first and nothing of this checkout or test run leaks in."""
    made = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert made.returncode == 0, made.stderr
    bin_dir = venv / "bin"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BASTION_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return bin_dir, env


def test_wheel_alone_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    bin_dir, env = _fresh_venv(venv)
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


def test_installed_server_gets_its_agent_from_image_build(wheel: Path, tmp_path: Path) -> None:
    """The install path of a server: ``pip install 'bastion-py-sdk[server]'`` into a
    fresh venv, then ``bastion serve`` refuses to start (no agent yet: it never compiles
    one) and says what to run; ``bastion image build`` builds the agent (the image itself
    is reused from this host), and then the installed server runs a job in a sandbox
    whose PID 1 is that agent."""
    if os.geteuid() != 0:
        pytest.skip("bastion serve needs root")
    if not IMAGES_DIR.is_dir():
        pytest.fail(f"no sandbox image under {IMAGES_DIR}: run `make setup` first")
    venv = tmp_path / "venv"
    bin_dir, env = _fresh_venv(venv)

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _run(list(args), cwd=tmp_path, env=env, timeout=timeout)

    installed = run(
        str(bin_dir / "pip"), "install", "--disable-pip-version-check", f"{wheel}[server]"
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    found = run(
        str(bin_dir / "python"),
        "-c",
        "from bastion_server.runtime import agent_build; print(agent_build.AGENT_DIR)",
    )
    agent_dir = Path(found.stdout.strip())
    assert agent_dir.is_relative_to(venv), agent_dir  # the installed copy, not the checkout

    parent = Path(tempfile.mkdtemp(prefix="bastion-test-pkg-", dir="/var/tmp"))
    parent.chmod(0o711)
    port = free_port()
    serve = [
        str(bin_dir / "bastion"), "serve", "--port", str(port), "--pool-size", "0",
        "--data-dir", str(parent / "data"), "--images-dir", str(IMAGES_DIR),
    ]  # fmt: skip
    proc: subprocess.Popen[bytes] | None = None
    try:
        refused = run(*serve, timeout=120)
        assert refused.returncode == 2, refused.stderr
        assert "sandbox agent is not built" in refused.stderr, refused.stderr
        assert "bastion image build" in refused.stderr and "Traceback" not in refused.stderr

        built = run(str(bin_dir / "bastion"), "image", "build", "--images-dir", str(IMAGES_DIR))
        assert built.returncode == 0, built.stderr
        assert f"built the sandbox agent {agent_dir}" in built.stderr, built.stderr
        again = run(str(bin_dir / "bastion"), "image", "build", "--images-dir", str(IMAGES_DIR))
        assert again.returncode == 0 and "built the sandbox agent" not in again.stderr

        with open(tmp_path / "server.log", "wb") as log:
            proc = subprocess.Popen(serve, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the installed server did not answer"
            time.sleep(0.1)
        sid = httpx.post(f"{url}/v1/sessions", json={}, timeout=60).json()["session_id"]
        try:
            httpx.post(f"{url}/v1/sessions/{sid}/start", timeout=60).raise_for_status()
            job = httpx.post(
                f"{url}/v1/sessions/{sid}/jobs?wait=30",
                json={"command": ["cat", "/proc/1/cmdline"]},
                timeout=60,
            ).json()
            assert job["status"] == "completed", job
            assert job["output"]["console_output"] == "/run/bastion-agent/bastion-agent\0", job
        finally:
            httpx.delete(f"{url}/v1/sessions/{sid}", timeout=60)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        shutil.rmtree(parent, ignore_errors=True)
