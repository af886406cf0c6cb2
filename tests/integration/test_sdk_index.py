"""A client machine installs the SDK from the server: a PEP 503 simple index at /simple/.

Against a real `bastion serve`: the index and the project page answer without an API
key (also on a server with keys, whose /v1 still wants one), the page links the wheel
of the server's own version with its sha256, the wheel is downloadable by its direct
URL and through /sdk/wheel, and ``pip install --index-url <server>/simple/
bastion-py-sdk`` into a fresh venv installs an SDK that imports, has that version and
talks to the server.  The same venv, given the server's dependencies, then packs the
installed distribution into a wheel again (the path a server installed from a wheel
takes) and gets the same files.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess

import bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

PROJECT = "bastion-py-sdk"
VERSION = bastion.__version__
WHEEL_NAME = f"bastion_py_sdk-{VERSION}-py3-none-any.whl"
LINK = re.compile(r'<a href="([^"#]+)#sha256=([0-9a-f]{64})"( data-requires-python="[^"]+")?>')


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, env=env, cwd=cwd, timeout=600,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _clean_env(bin_dir: Path) -> dict[str, str]:
    """Nothing from this checkout or this test run leaks into the venv's processes."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BASTION_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_version_is_above_the_unrelated_public_one() -> None:
    assert tuple(int(p) for p in VERSION.split(".")[:2]) > (1, 0)


def test_index_pages_need_no_key(auth_server: ServerProcess) -> None:
    with httpx.Client(base_url=auth_server.url, timeout=600) as http:
        assert http.get("/v1/sessions").status_code == 401
        index = http.get("/simple/")
        assert index.status_code == 200, index.text
        assert index.headers["content-type"].startswith("text/html")
        assert f'<a href="{PROJECT}/">{PROJECT}</a>' in index.text
        page = http.get(f"/simple/{PROJECT}/")
        assert page.status_code == 200, page.text
        assert WHEEL_NAME in page.text


def test_project_page_and_wheel(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=600) as http:
        page = http.get(f"/simple/{PROJECT}/")
        assert page.status_code == 200, page.text
        assert '<meta name="pypi:repository-version" content="1.0">' in page.text
        links = LINK.findall(page.text)
        assert len(links) == 1, page.text
        href, sha256, requires = links[0]
        assert href == WHEEL_NAME
        assert requires == ' data-requires-python="&gt;=3.11"'

        # PEP 503 names: any spelling that normalises to the project's is the project.
        assert http.get("/simple/Bastion_Py.SDK/").text == page.text
        assert http.get("/simple/requests/").status_code == 404

        wheel = http.get(f"/simple/{PROJECT}/{href}")
        assert wheel.status_code == 200
        assert hashlib.sha256(wheel.content).hexdigest() == sha256
        assert http.get(f"/simple/{PROJECT}/other-1.0-py3-none-any.whl").status_code == 404

        redirect = http.get("/sdk/wheel")
        assert redirect.status_code == 307
        assert redirect.headers["location"] == f"/simple/{PROJECT}/{WHEEL_NAME}"

    # Built once, cached in the data directory under one key.
    cached = list((server.data_dir / "sdk").glob("*/*.whl"))
    assert [p.name for p in cached] == [WHEEL_NAME]
    with zipfile.ZipFile(cached[0]) as zf:
        names = set(zf.namelist())
    assert {"bastion/__init__.py", "bastion/py.typed", "bastion_server/api/app.py"} <= names


def test_pip_install_from_the_server(server: ServerProcess, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True)
    assert made.returncode == 0, made.stderr
    bin_dir = venv / "bin"
    env = _clean_env(bin_dir)
    pip = [str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check"]

    # Only the server's index: no pip configuration, no other index or wheel directory.
    only_server = {k: v for k, v in env.items() if not k.startswith("PIP_")}
    only_server["PIP_CONFIG_FILE"] = os.devnull
    installed = _run(
        [*pip, "install", "--no-cache-dir", "--no-deps",
         "--index-url", f"{server.url}/simple/", PROJECT],
        only_server, tmp_path,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert f"Successfully installed {PROJECT}-{VERSION}" in installed.stdout

    # Its dependencies from the usual index (the server serves only the SDK).
    deps = _run([*pip, "install", "httpx>=0.27,<1", "websockets>=15", "typing_extensions>=4.7"],
                env, tmp_path)  # fmt: skip
    assert deps.returncode == 0, deps.stdout[-3000:] + deps.stderr[-3000:]

    used = _run(
        [str(bin_dir / "python"), "-c",
         "import bastion; from bastion import Bastion; "
         "print(bastion.__version__, bastion.__file__); "
         f"print(Bastion({server.url!r}).health()['version'])"],
        env, tmp_path,
    )  # fmt: skip
    assert used.returncode == 0, used.stderr
    version, path = used.stdout.splitlines()[0].split()
    assert version == VERSION
    assert path.startswith(str(venv)), path  # the installed copy, not this checkout
    assert used.stdout.splitlines()[1] == VERSION  # the server's own version

    # Installed from a wheel, the server packs that distribution again.
    extra = _run([*pip, "install", "fastapi"], env, tmp_path)
    assert extra.returncode == 0, extra.stdout[-3000:] + extra.stderr[-3000:]
    packed_dir = tmp_path / "data"
    packed = _run(
        [str(bin_dir / "python"), "-c",
         "import sys; from pathlib import Path; "
         "from bastion_server.api import sdk_index as s; "
         "assert s.source_root() is None; "
         "print(s.obtain_wheel(Path(sys.argv[1])).path)", str(packed_dir)],
        env, tmp_path,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    packed_wheel = Path(packed.stdout.strip())
    assert packed_wheel.name == WHEEL_NAME
    served = next((server.data_dir / "sdk").glob("*/*.whl"))
    with zipfile.ZipFile(packed_wheel) as a, zipfile.ZipFile(served) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        record = a.read(f"bastion_py_sdk-{VERSION}.dist-info/RECORD").decode()
        assert "bastion/__init__.py,sha256=" in record

    # And that wheel installs, too (pip checks it against its RECORD).
    venv2 = tmp_path / "venv2"
    subprocess.run([sys.executable, "-m", "venv", str(venv2)], check=True, capture_output=True)
    again = _run(
        [str(venv2 / "bin" / "python"), "-m", "pip", "install", "--no-deps", str(packed_wheel)],
        _clean_env(venv2 / "bin"), tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
