"""Fixtures shared by the security tests (each module brings its own ``client``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.security.helpers import Sessions, User

from bastion import Bastion


@pytest.fixture
def sessions_gone_ok() -> bool:
    """Whether a module's sessions may be gone by teardown (a module overrides this)."""
    return False


@pytest.fixture
def sessions(client: Bastion, sessions_gone_ok: bool) -> Iterator[Sessions]:
    """Sessions of this test's own, deleted afterwards."""
    pool = Sessions(client, gone_ok=sessions_gone_ok)
    yield pool
    pool.delete_all()


@pytest.fixture(params=["user", "root"])
def as_user(request: pytest.FixtureRequest) -> User:
    """Whom an attack's jobs run as: the sandbox user, then root of the session's user
    namespace (``jobs.run(..., user="root")``), against whom the sandbox must hold
    all the same."""
    user: User = request.param
    return user
