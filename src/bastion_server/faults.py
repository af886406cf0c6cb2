"""Test-only fault injection: die at a chosen point of an operation.

``BASTION_FAULT=create.after_insert`` makes the server SIGKILL itself the first time
it reaches :func:`point` ``("create.after_insert")``; ``BASTION_FAULT=sigterm:NAME``
sends it SIGTERM there instead (a graceful shutdown in the middle of the operation).
The crash-consistency tests use it to stop the server exactly between two steps,
then restart it on the same data directory and check that nothing is half done.

The variable is read once, at import: with it unset, :func:`point` is a function
that returns at once.
"""

from __future__ import annotations

import os
import signal

ENV = "BASTION_FAULT"


def _parse(value: str | None) -> tuple[str, signal.Signals] | None:
    if not value:
        return None
    kind, sep, name = value.partition(":")
    if not sep:
        return value, signal.SIGKILL
    if kind != "sigterm" or not name:
        raise ValueError(f"{ENV} must be NAME or sigterm:NAME, not {value!r}")
    return name, signal.SIGTERM


_TARGET = _parse(os.environ.get(ENV))
_fired = False


def point(name: str) -> None:
    """A place where a fault may be injected; ``name`` is ``<operation>.<where>``."""
    global _fired
    if _TARGET is None or _fired or name != _TARGET[0]:
        return
    _fired = True
    os.kill(os.getpid(), _TARGET[1])
