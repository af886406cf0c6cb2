"""Fixtures shared by the integration tests: a client of the shared server and a session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from tests.conftest import ServerProcess

from bastion import Bastion, SessionStateError


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url) as c:
        yield c


@pytest.fixture
def sid(client: Bastion) -> Iterator[str]:
    """A running session of this test's own; deleted afterwards unless a test did."""
    session_id = client.sessions.create()["session_id"]
    client.sessions.start(session_id)
    yield session_id
    with contextlib.suppress(SessionStateError):
        client.sessions.delete(session_id)
