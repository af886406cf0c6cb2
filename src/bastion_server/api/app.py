"""The ASGI application: routes, the error table, auth, request logging, lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.wire import API_PREFIX, HealthInfo
from bastion_server import __version__
from bastion_server.api import (
    docs,
    errors,
    files,
    files_archive,
    images,
    jobs,
    keys,
    legacy,
    openapi,
    sdk_index,
    sessions,
    snapshots,
    terminal,
)
from bastion_server.api.bodies import BodyLimits
from bastion_server.api.guard import RequestGuard
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import Runtime
from bastion_server.service.container import Services

log = logging.getLogger("bastion.api")


class RequestLog:
    """Logs one line per HTTP request: method, path, status, duration, owner."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round((time.perf_counter() - start) * 1000, 2),
                    "owner": scope.get("bastion.owner"),
                },
            )


def create_app(config: ServerConfig, runtime: Runtime | None = None) -> FastAPI:
    """Build the app; services start in its lifespan (so tests can use TestClient)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await Services.start(config, runtime)
        try:
            yield
        finally:
            await app.state.services.close()

    app = FastAPI(
        title="Bastion",
        version=__version__,
        description="Self-hosted sandboxed execution: sessions, jobs, files, terminals.",
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # served by api/docs.py, from local assets
        redoc_url=None,
    )
    app.state.config = config
    errors.install(app)
    openapi.install(app)
    app.include_router(docs.router)
    for module in (
        sessions,
        snapshots,
        images,
        jobs,
        files,
        files_archive,
        terminal,
        keys,
        sdk_index,
        legacy,
    ):
        app.include_router(module.router)
    app.include_router(jobs.processes_router)

    @app.get(f"{API_PREFIX}/health", response_model=HealthInfo, tags=["service"])
    async def health() -> HealthInfo:
        """Liveness: answers without authentication."""
        return {"status": "ok", "version": __version__, "runtime": config.runtime}

    # Outermost last: the log sees every answer, the guard (key, Host, per-key share)
    # runs before any body is read, and bodies are bounded before FastAPI parses them.
    app.add_middleware(BodyLimits, config=config)
    app.add_middleware(RequestGuard, config=config)
    app.add_middleware(RequestLog)
    return app
