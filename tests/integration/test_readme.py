"""Every Python example in the README runs, verbatim, against a real server."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import ServerProcess

from bastion_server.testing import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def readme_server(data_root: Path) -> Iterator[ServerProcess]:
    """On port 8080, as `make serve` would be, when that port is free."""
    srv = ServerProcess(data_root / "readme", port=8080 if _port_free(8080) else free_port())
    srv.start()
    yield srv
    srv.delete_all_sessions()
    srv.stop()


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, readme_server: ServerProcess) -> None:
    code = EXAMPLES[index]
    if readme_server.port != 8080:  # only when something else holds 8080 on this machine
        code = code.replace("http://localhost:8080", readme_server.url)
    env = {**os.environ, "BASTION_URL": readme_server.url}
    env.pop("BASTION_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"example {index} failed:\n{result.stdout}\n{result.stderr}"
