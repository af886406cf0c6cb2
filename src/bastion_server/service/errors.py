"""Domain errors: what the service layer raises; the API layer turns them into responses.

Each carries a wire :class:`~bastion.wire.ErrorCode`; the HTTP status comes from the
one table in :mod:`bastion.wire`, so domain code never thinks in HTTP.
"""

from __future__ import annotations

from bastion.wire import ErrorCode


class ServiceError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def session_not_found(session_id: str) -> ServiceError:
    return ServiceError(ErrorCode.SESSION_NOT_FOUND, f"session {session_id!r} not found")


def job_not_found(job_id: str) -> ServiceError:
    return ServiceError(ErrorCode.JOB_NOT_FOUND, f"job {job_id!r} not found")


def invalid(message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_REQUEST, message)


def shutting_down() -> ServiceError:
    """For what the server can no longer finish: it has begun to shut down."""
    return ServiceError(
        ErrorCode.SERVER_SHUTDOWN, "the server is shutting down; try again once it is back"
    )
