"""Blocking calls kept off the event loop, and transfers that a stop ends at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest

from bastion.wire import ErrorCode
from bastion_server.blocking import OnEventLoop, run_to_end, run_to_end_or_undo
from bastion_server.runtime import host
from bastion_server.service.errors import ServiceError
from bastion_server.service.transfers import Transfers

# -- blocking calls -------------------------------------------------------------------


def test_umount_refuses_the_event_loop_thread() -> None:
    async def on_the_loop() -> None:
        host.umount("/nonexistent/bastion-test")

    with pytest.raises(OnEventLoop, match=r"host\.umount"):
        asyncio.run(on_the_loop())
    with pytest.raises(OnEventLoop, match=r"host\.mount_image"):
        asyncio.run(_call(host.mount_image, "/nonexistent.img", "/nonexistent", "ext4"))


async def _call(fn: object, *args: object) -> None:
    fn(*args)  # type: ignore[operator]


def test_umount_runs_in_a_worker_thread() -> None:
    # Off the loop it does its work: here the kernel's answer for a missing path.
    with pytest.raises(FileNotFoundError):
        asyncio.run(asyncio.to_thread(host.umount, "/nonexistent/bastion-test"))


def test_run_to_end_lets_the_call_finish_before_a_cancellation() -> None:
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.3)
        finished.set()
        return "done"

    async def main() -> None:
        task = asyncio.create_task(run_to_end(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The thread was done before the cancellation reached the caller.
        assert finished.is_set()

    asyncio.run(main())


def test_run_to_end_or_undo_hands_a_lost_result_to_undo() -> None:
    undone: list[str] = []

    def opens() -> str:
        time.sleep(0.2)
        return "fd"

    async def main() -> None:
        task = asyncio.create_task(run_to_end_or_undo(undone.append, opens))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert undone == ["fd"]
        assert await run_to_end_or_undo(undone.append, opens) == "fd"
        assert undone == ["fd"]

    asyncio.run(main())


# -- transfers --------------------------------------------------------------------------


async def _never_ending_body() -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.Event().wait()  # a client that sends nothing more
    yield b"never"


def test_ending_a_session_interrupts_a_transfer_waiting_on_its_client() -> None:
    async def main() -> None:
        transfers = Transfers()
        transfer = transfers.begin("ses_1", "run-1")
        got: list[bytes] = []

        async def upload() -> None:
            try:
                async for chunk in transfer.guard(_never_ending_body()):
                    got.append(chunk)
            finally:
                transfer.finish()

        task = asyncio.create_task(upload())
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await transfers.end_session("ses_1", "session_deleted", "run-1")
        assert time.monotonic() - began < 0.5
        with pytest.raises(ServiceError) as info:
            await task
        assert info.value.code == ErrorCode.SESSION_STOPPED
        assert "deleted" in info.value.message
        assert got == [b"first"]
        assert task.cancelling() == 0  # the interruption is not left as a cancellation
        assert not transfers.active("ses_1")

    asyncio.run(main())


def test_a_run_that_is_ending_refuses_new_transfers_and_the_next_run_does_not() -> None:
    async def main() -> None:
        transfers = Transfers()
        await transfers.end_session("ses_1", "session_stopped", "run-1")
        with pytest.raises(ServiceError) as info:
            transfers.begin("ses_1", "run-1")
        assert info.value.code == ErrorCode.SESSION_STOPPED
        transfers.begin("ses_1", "run-2").finish()  # started again: transfers are back
        transfers.begin("ses_1", "run-1").finish()

    asyncio.run(main())


def test_a_body_complete_only_as_the_session_stops_is_not_taken() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"all of it"

    async def main() -> None:
        transfers = Transfers()
        transfer = transfers.begin("ses_1", "run-1")
        source = transfer.guard(body())
        assert await anext(source) == b"all of it"
        transfer.end("session_stopped")
        with pytest.raises(ServiceError):
            await anext(source)

    asyncio.run(main())
