"""A runtime's failure that carries an error code of its own (``SandboxError.code``:
an image no node of a cluster holds, say) reaches the client under that code, with
its message; any other keeps the code of the operation that failed."""

from __future__ import annotations

import pytest
from tests.service.conftest import OWNER, Run

from bastion.wire import ErrorCode, SessionStatus
from bastion_server.runtime.base import SandboxError
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.testing import FakeRuntime


class _ImageNowhere(SandboxError):
    code = ErrorCode.IMAGE_STATE


def test_a_create_fails_with_the_runtimes_code(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        runtime.fail("create", _ImageNowhere("no ready node holds image 'tools'"))
        with pytest.raises(ServiceError) as caught:
            await s.sessions.create(OWNER)
        assert caught.value.code == ErrorCode.IMAGE_STATE
        assert "no ready node holds image 'tools'" in caught.value.message
        assert s.store.list_sessions(OWNER) == []  # rolled back
        runtime.fail("create")  # a failure of no code of its own
        with pytest.raises(ServiceError) as caught:
            await s.sessions.create(OWNER)
        assert caught.value.code == ErrorCode.SESSION_START_FAILED

    run(body)


def test_a_start_fails_with_the_runtimes_code(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        record = await s.sessions.create(OWNER)
        runtime.fail("start", _ImageNowhere("the image is on no node now"))
        with pytest.raises(ServiceError) as caught:
            await s.sessions.start(OWNER, record.id)
        assert caught.value.code == ErrorCode.IMAGE_STATE
        assert s.sessions.get(OWNER, record.id).status == SessionStatus.CREATED

    run(body)
