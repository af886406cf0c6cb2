"""Request-scoped access to the assembled services."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from bastion_server.service.container import Services


def services(conn: HTTPConnection) -> Services:
    result: Services = conn.app.state.services
    return result
