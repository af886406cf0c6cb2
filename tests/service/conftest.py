"""Service-level tests: the real service layer over the in-memory FakeRuntime.

No root, no sandbox, no HTTP: each test gets its own store and runtime and runs in
milliseconds.  What these prove about the state machine, the job lifecycle and the
reaper holds for every backend that honours the runtime contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bastion_server.config import ServerConfig
from bastion_server.service.container import Services
from bastion_server.testing import FakeRuntime

T = TypeVar("T")
Body = Callable[[Services], Awaitable[Any]]
Run = Callable[[Body], Any]

OWNER = "owner-a"
OTHER = "owner-b"


@pytest.fixture
def runtime(tmp_path: Path) -> FakeRuntime:
    return FakeRuntime(tmp_path / "sandboxes")


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    data = tmp_path / "data"
    data.mkdir()
    return ServerConfig(data_dir=data, images_dir=tmp_path / "no-images", reaper_interval=0.05)


@pytest.fixture
def run(config: ServerConfig, runtime: FakeRuntime) -> Run:
    """Run ``body(services)`` in a fresh event loop over started services, then close."""

    def run(body: Body) -> Any:
        async def main() -> Any:
            services = await Services.start(config, runtime)
            try:
                return await body(services)
            finally:
                await services.close()

        return asyncio.run(main())

    return run
