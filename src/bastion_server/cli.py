"""`bastion serve`: run the server (registered into the `bastion` CLI by entry point)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from bastion_server.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_IMAGES_DIR,
    ConfigError,
    Limits,
    ServerConfig,
    env_api_keys,
)

log = logging.getLogger("bastion.server")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def register_serve(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the Bastion server",
        description="Run the Bastion server. Every option can also be set by the "
        "environment variable named in its help.",
    )
    p.add_argument(
        "--host",
        default=_env("BASTION_HOST", "127.0.0.1"),
        help="address to listen on (BASTION_HOST; default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(_env("BASTION_PORT", "8080")),
        help="port (BASTION_PORT; default 8080)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("BASTION_DATA_DIR", str(DEFAULT_DATA_DIR))),
        help=f"records, session files and job output (BASTION_DATA_DIR; "
        f"default {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--images-dir",
        type=Path,
        default=Path(_env("BASTION_IMAGES_DIR", str(DEFAULT_IMAGES_DIR))),
        help=f"built sandbox images (BASTION_IMAGES_DIR; default {DEFAULT_IMAGES_DIR})",
    )
    p.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        default=None,
        help="accept this API key; repeat for several (BASTION_API_KEYS, "
        "comma-separated). Without any, only loopback addresses are served.",
    )
    p.add_argument(
        "--runtime",
        default=_env("BASTION_RUNTIME", "crun"),
        help="OCI runtime binary: crun, runc, or another by name (BASTION_RUNTIME)",
    )
    p.add_argument(
        "--max-upload-bytes",
        type=int,
        default=int(_env("BASTION_MAX_UPLOAD_BYTES", str(4 * 1024**3))),
        help="largest accepted upload (BASTION_MAX_UPLOAD_BYTES; default 4 GiB)",
    )
    p.add_argument(
        "--default-memory-mb",
        type=int,
        default=int(_env("BASTION_DEFAULT_MEMORY_MB", "512")),
        help="memory (and memory+swap) of a session that asks for none "
        "(BASTION_DEFAULT_MEMORY_MB; default 512)",
    )
    p.add_argument(
        "--default-pids",
        type=int,
        default=int(_env("BASTION_DEFAULT_PIDS", "256")),
        help="process limit of a session that asks for none (BASTION_DEFAULT_PIDS)",
    )
    p.add_argument(
        "--default-cpus",
        type=float,
        default=float(_env("BASTION_DEFAULT_CPUS", "1.0")),
        help="CPU cores of a session that asks for none (BASTION_DEFAULT_CPUS)",
    )
    p.add_argument(
        "--default-disk-mb",
        type=int,
        default=int(_env("BASTION_DEFAULT_DISK_MB", "1024")),
        help="size of a session's writable layer when it asks for none "
        "(BASTION_DEFAULT_DISK_MB; default 1024)",
    )
    p.add_argument(
        "--max-output-bytes",
        type=int,
        default=int(_env("BASTION_MAX_OUTPUT_BYTES", str(16 * 1024**2))),
        help="output kept per job and stream; the rest is counted and dropped "
        "(BASTION_MAX_OUTPUT_BYTES; default 16 MiB)",
    )
    p.add_argument(
        "--max-memory-mb",
        type=int,
        default=int(_env("BASTION_MAX_MEMORY_MB", "8192")),
        help="most memory a session may ask for (BASTION_MAX_MEMORY_MB; default 8192)",
    )
    p.add_argument(
        "--max-pids",
        type=int,
        default=int(_env("BASTION_MAX_PIDS", "4096")),
        help="most processes a session may ask for (BASTION_MAX_PIDS; default 4096)",
    )
    p.add_argument(
        "--max-cpus",
        type=float,
        default=float(_env("BASTION_MAX_CPUS", str(float(os.cpu_count() or 1)))),
        help="most CPU cores a session may ask for (BASTION_MAX_CPUS; default: all)",
    )
    p.add_argument(
        "--max-disk-mb",
        type=int,
        default=int(_env("BASTION_MAX_DISK_MB", "65536")),
        help="largest writable layer a session may ask for (BASTION_MAX_DISK_MB; default 65536)",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=int(_env("BASTION_POOL_SIZE", "2")),
        help="sandboxes kept started ahead of need for fast session starts "
        "(BASTION_POOL_SIZE; default 2; 0 turns the warm pool off)",
    )
    p.add_argument(
        "--no-network",
        action="store_true",
        default=_env("BASTION_NO_NETWORK", "") not in ("", "0"),
        help="refuse sessions that ask for outbound network (BASTION_NO_NETWORK=1)",
    )
    limits = p.add_argument_group(
        "request-level limits", "see docs/SECURITY.md, section Request-level limits"
    )
    limits.add_argument(
        "--max-json-bytes",
        type=int,
        default=int(_env("BASTION_MAX_JSON_BYTES", str(1024**2))),
        help="largest JSON request body; larger ones get 413 (BASTION_MAX_JSON_BYTES; "
        "default 1 MiB; uploads have --max-upload-bytes)",
    )
    limits.add_argument(
        "--max-json-depth",
        type=int,
        default=int(_env("BASTION_MAX_JSON_DEPTH", "64")),
        help="deepest nesting of arrays and objects in a JSON request body "
        "(BASTION_MAX_JSON_DEPTH; default 64)",
    )
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=float(_env("BASTION_HEADER_TIMEOUT", "10")),
        help="seconds a connection has to send a request's line and headers before it "
        "is closed (BASTION_HEADER_TIMEOUT; default 10)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=float(_env("BASTION_BODY_TIMEOUT", "30")),
        help="seconds a request body may go without a byte arriving before it is "
        "aborted with 408 (BASTION_BODY_TIMEOUT; default 30)",
    )
    limits.add_argument(
        "--max-requests-per-key",
        type=int,
        default=int(_env("BASTION_MAX_REQUESTS_PER_KEY", "256")),
        help="requests and terminals one API key may have in flight; more get 429 "
        "(BASTION_MAX_REQUESTS_PER_KEY; default 256)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=int(_env("BASTION_MAX_CONNECTIONS", "0")),
        help="open connections the server keeps; more are answered 429 and closed "
        "(BASTION_MAX_CONNECTIONS; default 0: half the open-file limit)",
    )
    p.add_argument(
        "--log-level",
        default=_env("BASTION_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="(BASTION_LOG_LEVEL; default info)",
    )
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bastion_server import logs
    from bastion_server.api.app import create_app

    config = ServerConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir.absolute(),
        images_dir=args.images_dir.absolute(),
        api_keys=tuple(args.api_keys) if args.api_keys else env_api_keys(),
        runtime=args.runtime,
        max_upload_bytes=args.max_upload_bytes,
        log_level=args.log_level,
        allow_network=not args.no_network,
        max_output_bytes=args.max_output_bytes,
        pool_size=args.pool_size,
        max_json_bytes=args.max_json_bytes,
        max_json_depth=args.max_json_depth,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_requests_per_key=args.max_requests_per_key,
        max_connections=args.max_connections,
        max_limits=Limits(args.max_memory_mb, args.max_pids, args.max_cpus, args.max_disk_mb),
        default_limits=Limits(
            args.default_memory_mb, args.default_pids, args.default_cpus, args.default_disk_mb
        ),
    )
    try:
        config.check()
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
