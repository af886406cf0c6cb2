"""Background tasks started with bastion_server.tasks.spawn never fail unobserved."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from bastion_server.tasks import spawn


async def _fail() -> None:
    raise RuntimeError("boom")


def test_a_failing_task_is_logged_at_once_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        spawn(_fail(), name="job job_123")  # nobody keeps or awaits it
        await asyncio.sleep(0.01)
        gc.collect()

    loop_errors: list[dict[str, object]] = []

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        loop_errors.append(context)

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(on_loop_error)
        await main()

    with caplog.at_level(logging.ERROR, logger="bastion.tasks"):
        asyncio.run(run())
        gc.collect()
    [record] = [r for r in caplog.records if r.name == "bastion.tasks"]
    assert "RuntimeError: boom" in record.getMessage()
    assert record.__dict__["task"] == "job job_123"
    assert record.exc_info is not None
    assert not loop_errors  # no "Task exception was never retrieved"


def test_the_task_still_gives_its_result_and_cancels_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> int:
        async def answer() -> int:
            return 42

        sleeper = spawn(asyncio.sleep(10), name="sleeper")
        await asyncio.sleep(0)
        sleeper.cancel()
        return await spawn(answer(), name="answer")

    with caplog.at_level(logging.ERROR, logger="bastion.tasks"):
        assert asyncio.run(main()) == 42
    assert not [r for r in caplog.records if r.name == "bastion.tasks"]
