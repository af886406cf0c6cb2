"""The session state machine on the fake runtime: transitions, refusals, ownership."""

from __future__ import annotations

import asyncio

import pytest
from tests.service.conftest import OTHER, OWNER, Run

from bastion.wire import ErrorCode, SessionStatus
from bastion_server.runtime.base import SandboxError
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.service.paging import PageRequest
from bastion_server.testing import FakeRuntime


def test_create_start_stop_start_delete(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> list[str]:
        seen = []
        record = await s.sessions.create(OWNER)
        seen.append(record.status)
        for step in (s.sessions.start, s.sessions.stop, s.sessions.start, s.sessions.delete):
            seen.append((await step(OWNER, record.id)).status)
        assert record.id not in runtime.sandboxes
        assert s.store.get_session(record.id).status == SessionStatus.DELETED  # type: ignore[union-attr]
        return seen

    assert run(body) == ["created", "running", "stopped", "running", "deleted"]


@pytest.mark.parametrize(
    ("steps", "refused"),
    [
        ((), "stop"),  # created: nothing to stop
        (("start",), "start"),  # running: already started
        (("start", "stop"), "stop"),
        (("delete",), "start"),  # deleted is final
        (("delete",), "delete"),
    ],
)
def test_transitions_outside_the_machine_are_409(
    run: Run, steps: tuple[str, ...], refused: str
) -> None:
    async def body(s: Services) -> None:
        record = await s.sessions.create(OWNER)
        for step in steps:
            await getattr(s.sessions, step)(OWNER, record.id)
        with pytest.raises(ServiceError) as caught:
            await getattr(s.sessions, refused)(OWNER, record.id)
        assert caught.value.code == ErrorCode.SESSION_STATE

    run(body)


def test_another_owner_sees_no_such_session(run: Run) -> None:
    async def body(s: Services) -> None:
        record = await s.sessions.create(OWNER)
        for action in (s.sessions.start, s.sessions.stop, s.sessions.delete):
            with pytest.raises(ServiceError) as caught:
                await action(OTHER, record.id)
            assert caught.value.code == ErrorCode.SESSION_NOT_FOUND
        assert [r.id for r in s.sessions.list(OTHER, PageRequest()).items] == []
        assert [r.id for r in s.sessions.list(OWNER, PageRequest()).items] == [record.id]

    run(body)


def test_failed_start_leaves_the_session_startable(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> str:
        record = await s.sessions.create(OWNER)
        runtime.fail("start", SandboxError("no room"))
        with pytest.raises(ServiceError) as caught:
            await s.sessions.start(OWNER, record.id)
        assert caught.value.code == ErrorCode.SESSION_START_FAILED
        assert s.sessions.get(OWNER, record.id).status == SessionStatus.CREATED
        return (await s.sessions.start(OWNER, record.id)).status

    assert run(body) == SessionStatus.RUNNING


def test_failed_allocation_creates_nothing_usable(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        runtime.fail("create", SandboxError("disk full"))
        with pytest.raises(ServiceError) as caught:
            await s.sessions.create(OWNER)
        assert caught.value.code == ErrorCode.SESSION_START_FAILED
        assert runtime.sandboxes == {}
        live = [
            r
            for r in s.sessions.list(OWNER, PageRequest()).items
            if r.status != SessionStatus.DELETED
        ]
        assert live == []

    run(body)


def test_racing_stop_and_delete_are_serialised(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> list[object]:
        record = await s.sessions.create(OWNER)
        await s.sessions.start(OWNER, record.id)
        results = await asyncio.gather(
            s.sessions.stop(OWNER, record.id),
            s.sessions.delete(OWNER, record.id),
            return_exceptions=True,
        )
        assert s.store.get_session(record.id).status == SessionStatus.DELETED  # type: ignore[union-attr]
        return [r.status if not isinstance(r, BaseException) else type(r) for r in results]

    # The stop takes the lock first and finishes; the delete then deletes a stopped one.
    assert run(body) == [SessionStatus.STOPPED, SessionStatus.DELETED]


def test_a_sandbox_that_dies_is_noticed(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> str:
        record = await s.sessions.create(OWNER)
        await s.sessions.start(OWNER, record.id)
        runtime.crash(record.id)
        await s.sessions.check_sandbox(record.id)
        return s.sessions.get(OWNER, record.id).status

    assert run(body) == SessionStatus.STOPPED


def test_idempotent_create_returns_the_same_session(run: Run, runtime: FakeRuntime) -> None:
    async def body(s: Services) -> None:
        first = await s.sessions.create(OWNER, idempotency_key="k1")
        again = await s.sessions.create(OWNER, idempotency_key="k1")
        other = await s.sessions.create(OTHER, idempotency_key="k1")
        assert again.id == first.id
        assert other.id != first.id
        assert len(runtime.sandboxes) == 2

    run(body)
