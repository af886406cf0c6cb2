"""Request-scoped access to the assembled services."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from bastion_server.service.container import Services


async def services(conn: HTTPConnection) -> Services:
    """FastAPI dependency.  ``async`` on purpose: FastAPI runs a plain ``def``
    dependency in a worker thread, a hand-off that cost ~15% of a short job's time."""
    result: Services = conn.app.state.services
    return result
