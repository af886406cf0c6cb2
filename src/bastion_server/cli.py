"""`bastion serve`: run the server (registered into the `bastion` CLI by entry point)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from bastion_server.config import ConfigError
from bastion_server.serve_options import (
    add_serve_options,
    check_operator_files,
    config_from_args,
)

log = logging.getLogger("bastion.server")


def register_serve(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the Bastion server",
        description="Run the Bastion server. Every option can also be set by the "
        "environment variable named in its help, or in a TOML file given with --config "
        "(keys: the options without their dashes); the command line overrides the "
        "environment, which overrides the file.",
    )
    add_serve_options(p)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bastion_server import logs
    from bastion_server.api.app import create_app

    try:
        config = config_from_args(args)
        config.check()
        check_operator_files(config)
    except ConfigError as exc:
        print(f"bastion serve: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            "bastion serve: must run as root (it mounts overlays and runs an OCI runtime)",
            file=sys.stderr,
        )
        return 2
    logs.configure(config.log_level)
    from bastion_server.image.builder import ImageError
    from bastion_server.runtime.host import HostNotReady
    from bastion_server.service.container import Services, make_runtime

    try:
        runtime = make_runtime(config)
        asyncio.run(runtime.prepare_host())  # fail here, with a plain message, not mid-start
    except (ImageError, HostNotReady) as exc:
        print(f"bastion serve: {exc}", file=sys.stderr)
        return 2
    from bastion_server.api.connections import guarded_protocol

    app = create_app(config, runtime)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # First end what the app holds open (job waits and event streams, terminals)
            # with their documented endings: uvicorn would wait for them, then cut them
            # off (a plain 500, a stream cut mid-body, a terminal closed with 1012).
            services: Services | None = getattr(app.state, "services", None)
            try:
                if services is not None:
                    await services.begin_shutdown()
            except Exception:  # the shutdown itself must go on
                log.exception("ending the held requests failed")
            await super().shutdown(sockets)

    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            # uvicorn has no header-read timeout and no hard connection cap: this
            # subclass of its httptools protocol adds both.
            http=guarded_protocol(config),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
            ws_ping_interval=20,
            ws_ping_timeout=20,
            # A terminal message is a JSON body too: bounded like one (past it, 1009).
            ws_max_size=config.max_json_bytes,
        )
    )
    log.info(
        "starting",
        extra={
            "host": config.host,
            "port": config.port,
            "auth": "api-keys" if config.api_keys else "none (loopback)",
        },
    )
    # uvicorn's own handlers do a graceful shutdown on SIGINT and SIGTERM: the app ends
    # its held requests and terminals (above), then uvicorn stops accepting, lets
    # requests finish (up to timeout_graceful_shutdown), then runs the lifespan
    # shutdown, which ends running jobs and closes the store.
    # uvicorn re-raises the signal it shut down on once it has restored the handlers it
    # found; finding no-op handlers, a signalled shutdown ends with exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    asyncio.run(server.serve())
    if not server.started:
        return 1
    log.info("stopped")
    return 0
