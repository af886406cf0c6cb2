"""Every Python example in docs/API.md (the SDK's docstrings) runs against a real server.

The examples are fragments: they use ``bastion``, ``sid``, ``job`` and ``p`` as the
surrounding text describes them.  Each runs with those bound to a real client, a real
running session, a finished job of it and a file in it; the ``await`` ones run inside a
coroutine with an :class:`AsyncBastion`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServerProcess

from bastion import AsyncBastion, Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "API.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def context(server: ServerProcess) -> Iterator[dict[str, Any]]:
    with Bastion(base_url=server.url) as client:
        sid = client.sessions.create()["session_id"]
        client.sessions.start(sid)
        client.files.upload(sid, b"example data\n", "/home/user/example.txt")
        job = client.jobs.run_and_wait(sid, ["sh", "-c", "echo from a job"])
        yield {"sid": sid, "job": job, "p": "/home/user/example.txt"}
        client.sessions.delete(sid)


def test_api_doc_has_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_api_doc_example_runs(
    index: int, context: dict[str, Any], server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = EXAMPLES[index]
    monkeypatch.setenv("BASTION_URL", server.url)
    monkeypatch.delenv("BASTION_API_KEY", raising=False)
    names: dict[str, Any] = {
        **context,
        "Bastion": Bastion,
        "AsyncBastion": AsyncBastion,
        "contextlib": contextlib,
    }
    if "await " in code or "async " in code:
        body = "async def _example(bastion):\n" + textwrap.indent(code, "    ")

        async def run() -> None:
            async with AsyncBastion(base_url=server.url) as bastion:
                exec(body, names)
                await names["_example"](bastion)

        asyncio.run(run())
    else:
        with Bastion(base_url=server.url) as bastion:
            exec(code, {**names, "bastion": bastion})
