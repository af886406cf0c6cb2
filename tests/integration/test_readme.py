"""Every Python example in the README runs, verbatim, against a real server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import ServerProcess
from tests.examples import REPO, docs_server, fill_in_url, run_example

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = REPO / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def readme_server(data_root: Path) -> Iterator[ServerProcess]:
    """On port 8080, as `make serve` would be, when that port is free."""
    srv = docs_server(data_root / "readme")
    srv.start()
    yield srv
    srv.delete_all_sessions()
    srv.stop()


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, readme_server: ServerProcess) -> None:
    result = run_example(fill_in_url(EXAMPLES[index], readme_server), readme_server)
    assert result.returncode == 0, f"example {index} failed:\n{result.stdout}\n{result.stderr}"
